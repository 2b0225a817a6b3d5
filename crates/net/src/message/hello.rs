//! The handshake: a peer's `Hello` (who it is, which shard it thinks it talks to, the run plan
//! and the model layout it holds), the shard's `HelloOk`, and the `Description` a shard gives
//! a client that adopts its plan and layout.

use super::plan::{decode_plan, encode_plan};
use crate::auth::{Nonce, Proof, RunToken, HELLO_LABEL, NO_PROOF, PROOF_LEN};
use crate::codec::{Reader, Writer};
use crate::error::NetError;
use pstrain_core::{Layout, RunPlan};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Pushes gradients as rank `rank`.
    Worker,
    /// Only pulls weights and reads stats (evaluators, monitors).
    Observer,
    /// Sends heartbeats for worker `rank` from a thread of its own, so that a frozen or
    /// stopped worker process is told apart from one that is busy computing.
    Heartbeat,
}

fn role_code(role: Role) -> u8 {
    match role {
        Role::Worker => 1,
        Role::Observer => 2,
        Role::Heartbeat => 3,
    }
}

/// A worker's hello for "any free rank": the shard assigns one (a dead worker's first).
pub const WIRE_ANY_RANK: u32 = u32::MAX;

/// Tensor names and shapes as they travel.
pub type WireTensors = Vec<(String, Vec<u64>)>;

/// The most dimensions a tensor may have.
const MAX_DIMS: usize = 16;

fn encode_layout(w: &mut Writer, fingerprint: u64, tensors: &WireTensors) {
    w.u64(fingerprint).u32(tensors.len() as u32);
    for (name, shape) in tensors {
        w.str(name).u32(shape.len() as u32);
        for &d in shape {
            w.u64(d);
        }
    }
}

fn decode_layout(r: &mut Reader<'_>, total: usize) -> Result<(u64, WireTensors), NetError> {
    let fingerprint = r.u64()?;
    let count = r.u32()? as usize;
    // Each tensor needs at least 8 bytes, so the count cannot promise more than is there.
    if count > total / 8 {
        return Err(r
            .malformed(format!("{count} tensors in {total} bytes"))
            .into());
    }
    let mut tensors = Vec::with_capacity(count);
    for _ in 0..count {
        let name = r.str()?;
        let dims = r.u32()? as usize;
        if dims > MAX_DIMS {
            return Err(r
                .malformed(format!("tensor `{name}` has {dims} dimensions"))
                .into());
        }
        let shape = (0..dims).map(|_| r.u64()).collect::<Result<_, _>>()?;
        tensors.push((name, shape));
    }
    Ok((fingerprint, tensors))
}

pub fn wire_tensors(layout: &Layout) -> WireTensors {
    layout
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.iter().map(|&d| d as u64).collect()))
        .collect()
}

/// `text` cut to at most `max` characters: a peer's names go into logs and replies.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// The layout a peer described, if it is a valid one (errors name tensors cut short).
pub fn layout_of(tensors: &WireTensors) -> Result<Layout, String> {
    layout_from(tensors).map_err(|e| cut(&e, 160))
}

fn layout_from(tensors: &WireTensors) -> Result<Layout, String> {
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s)| {
            let dims = s
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| format!("`{n}` too large")));
            Ok((n.clone(), dims.collect::<Result<Vec<_>, String>>()?))
        })
        .collect::<Result<_, String>>()?;
    Layout::new(shapes.iter().map(|(n, s)| (n.clone(), &s[..]))).map_err(|e| e.to_string())
}

/// The first message of every connection: who is calling and what it believes about the run
/// (the shard it talks to, the plan, the layout), so that a mismatched peer is refused before
/// any tensor moves.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub role: Role,
    /// A worker's rank (or `WIRE_ANY_RANK`); the rank a heartbeat connection speaks for.
    pub rank: u32,
    pub run: Description,
    /// With a run token: the HMAC over both nonces and `signed_body()` (else zeros).
    pub proof: Proof,
}

impl Hello {
    pub fn new(
        role: Role,
        rank: usize,
        shard: usize,
        shards: usize,
        plan: &RunPlan,
        layout: &Layout,
    ) -> Self {
        Hello {
            role,
            // The client's `ANY_RANK` (usize::MAX) becomes `WIRE_ANY_RANK` on the wire.
            rank: u32::try_from(rank).unwrap_or(WIRE_ANY_RANK),
            run: Description::new(shard, shards, plan, layout),
            proof: NO_PROOF,
        }
    }

    /// Every byte of the hello but its proof: what the proof covers, so a shard checks the
    /// proof over the raw bytes before it decodes any of them.
    pub fn signed_body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(role_code(self.role)).u32(self.rank);
        self.run.encode_into(&mut w);
        w.0
    }

    /// This hello with the proof that `token` holds, over both nonces and its body.
    pub fn proven(self, token: &RunToken, peer: &Nonce, shard: &Nonce) -> Hello {
        let proof = token.prove(HELLO_LABEL, peer, shard, &self.signed_body());
        Hello { proof, ..self }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.signed_body();
        bytes.extend_from_slice(&self.proof);
        bytes
    }

    /// A hello frame's payload cut into its signed body and its proof, without decoding it.
    pub fn split_proof(bytes: &[u8]) -> Result<(&[u8], Proof), NetError> {
        let cut = bytes
            .len()
            .checked_sub(PROOF_LEN)
            .ok_or_else(|| NetError::Malformed {
                what: "hello",
                why: "shorter than its proof".into(),
            })?;
        let (body, tail) = bytes.split_at(cut);
        let mut proof = NO_PROOF;
        proof.copy_from_slice(tail);
        Ok((body, proof))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "hello");
        let role = match r.u8()? {
            1 => Role::Worker,
            2 => Role::Observer,
            3 => Role::Heartbeat,
            other => return Err(r.malformed(format!("unknown role {other}")).into()),
        };
        let rank = r.u32()?;
        let run = Description::decode_from(&mut r, bytes.len())?;
        let mut proof = NO_PROOF;
        proof.copy_from_slice(r.take(PROOF_LEN)?);
        r.finish()?;
        Ok(Hello {
            role,
            rank,
            run,
            proof,
        })
    }

    pub fn layout(&self) -> Result<Layout, String> {
        self.run.layout()
    }
}

/// The server's answer to a good hello: the key range this shard owns and its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloOk {
    pub start: u64,
    pub end: u64,
    pub version: u64,
    /// The worker's rank: the one it asked for, or the one assigned for `WIRE_ANY_RANK`.
    pub rank: u32,
}

impl HelloOk {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.start)
            .u64(self.end)
            .u64(self.version)
            .u32(self.rank);
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "hello reply");
        let v = HelloOk {
            start: r.u64()?,
            end: r.u64()?,
            version: r.u64()?,
            rank: r.u32()?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// What a shard serves: its place among the shards, the run plan and the layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub shard: u32,
    pub shards: u32,
    pub plan: RunPlan,
    pub fingerprint: u64,
    pub tensors: WireTensors,
}

impl Description {
    pub fn new(shard: usize, shards: usize, plan: &RunPlan, layout: &Layout) -> Self {
        Description {
            shard: shard as u32,
            shards: shards as u32,
            plan: plan.clone(),
            fingerprint: layout.fingerprint(),
            tensors: wire_tensors(layout),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode_into(&mut w);
        w.0
    }

    fn encode_into(&self, w: &mut Writer) {
        w.u32(self.shard).u32(self.shards);
        encode_plan(w, &self.plan);
        encode_layout(w, self.fingerprint, &self.tensors);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "description");
        let d = Self::decode_from(&mut r, bytes.len())?;
        r.finish()?;
        Ok(d)
    }

    /// `total` is the whole message's size, which bounds the tensor count.
    fn decode_from(r: &mut Reader<'_>, total: usize) -> Result<Self, NetError> {
        let (shard, shards) = (r.u32()?, r.u32()?);
        let plan = decode_plan(r)?;
        let (fingerprint, tensors) = decode_layout(r, total)?;
        Ok(Description {
            shard,
            shards,
            plan,
            fingerprint,
            tensors,
        })
    }

    pub fn layout(&self) -> Result<Layout, String> {
        layout_of(&self.tensors)
    }
}
