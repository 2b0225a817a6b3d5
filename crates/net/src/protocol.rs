//! The messages: their kind codes and the byte layout of their fixed parts. Tensor payloads
//! follow the fixed part as raw little-endian `f32` and are handled by `connection`.

use crate::error::NetError;
use pstrain_core::{Layout, Mode, ServerStats};

pub mod kind {
    pub const HELLO: u16 = 0x01;
    pub const PULL: u16 = 0x02;
    pub const PUSH: u16 = 0x03;
    pub const STATS: u16 = 0x04;
    pub const GOODBYE: u16 = 0x05;
    /// A worker process's sign of life, on its own connection (no payload, no reply).
    pub const HEARTBEAT: u16 = 0x06;
    /// "What do you serve?": allowed instead of a hello, answered with the shard's own
    /// description (a `Hello` from the server's side: workers, mode with its backup workers,
    /// shard, layout), for clients that adopt the layout.
    pub const DESCRIBE: u16 = 0x07;
    pub const HELLO_OK: u16 = 0x81;
    pub const PULL_REPLY: u16 = 0x82;
    pub const PUSH_REPLY: u16 = 0x83;
    pub const STATS_REPLY: u16 = 0x84;
    pub const GOODBYE_OK: u16 = 0x85;
    pub const DESCRIBE_REPLY: u16 = 0x87;
    pub const ERROR: u16 = 0xff;
}

/// Error codes carried by an `ERROR` frame.
pub mod code {
    pub const BAD_FRAME: u16 = 1;
    pub const HANDSHAKE: u16 = 2;
    pub const PUSH_REFUSED: u16 = 3;
    pub const UNEXPECTED: u16 = 4;
    pub const PUSH_NONFINITE: u16 = 5;
    /// The rank is still connected (an old connection not yet noticed gone): retry shortly.
    pub const RANK_BUSY: u16 = 6;
}

/// The largest handshake accepted (names and shapes of every tensor).
pub const HELLO_LIMIT: u64 = 1 << 20;
/// A push's head: base version, samples, loss, step, then the step's members as a bitmask
/// (one bit per worker). Step and members matter only in coordinated mode (sync with backup
/// workers over several shards): shard 0 decides each step's members and the other shards
/// apply exactly those; elsewhere the step is `NO_STEP` and the mask zero.
pub fn push_head_len(workers: usize) -> usize {
    24 + mask_len(workers)
}

/// "Not a coordinated step."
pub const NO_STEP: u64 = u64::MAX;

/// Bytes of a member bitmask for `workers` workers.
pub fn mask_len(workers: usize) -> usize {
    workers.div_ceil(8)
}

pub fn encode_mask(members: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; mask_len(members.len())];
    for (i, _) in members.iter().enumerate().filter(|(_, &m)| m) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

pub fn decode_mask(bytes: &[u8], workers: usize) -> Vec<bool> {
    (0..workers)
        .map(|i| bytes.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

/// The push head's fields.
#[derive(Debug, Clone, PartialEq)]
pub struct PushHead {
    pub base_version: u64,
    pub samples: u32,
    pub loss: f32,
    pub step: u64,
    pub members: Vec<bool>,
}

impl PushHead {
    pub fn encode(&self) -> Vec<u8> {
        Self::encode_parts(
            self.base_version,
            self.samples,
            self.loss,
            self.step,
            &self.members,
        )
    }

    /// The encoding of a head with these fields, without building one (a push's hot path).
    pub fn encode_parts(
        base_version: u64,
        samples: u32,
        loss: f32,
        step: u64,
        members: &[bool],
    ) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(base_version).u32(samples).f32(loss).u64(step);
        w.0.extend_from_slice(&encode_mask(members));
        w.0
    }

    pub fn decode(bytes: &[u8], workers: usize) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "push");
        let (base_version, samples, loss, step) = (r.u64()?, r.u32()?, r.f32()?, r.u64()?);
        let mask = r.take(mask_len(workers))?;
        r.finish()?;
        Ok(PushHead {
            base_version,
            samples,
            loss,
            step,
            members: decode_mask(mask, workers),
        })
    }
}

/// A push's answer: the outcome code, version (applied), staleness, how many gradients the
/// step still waits for (buffered), and in coordinated mode the step and its members.
#[derive(Debug, Clone, PartialEq)]
pub struct PushReply {
    pub code: u8,
    pub version: u64,
    pub staleness: u64,
    pub waiting: u32,
    pub step: u64,
    pub members: Vec<bool>,
}

impl PushReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.code)
            .u64(self.version)
            .u64(self.staleness)
            .u32(self.waiting)
            .u64(self.step);
        w.0.extend_from_slice(&encode_mask(&self.members));
        w.0
    }

    pub fn decode(bytes: &[u8], workers: usize) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "push reply");
        let (code, version, staleness, waiting, step) =
            (r.u8()?, r.u64()?, r.u64()?, r.u32()?, r.u64()?);
        let mask = r.take(mask_len(workers))?;
        r.finish()?;
        Ok(PushReply {
            code,
            version,
            staleness,
            waiting,
            step,
            members: decode_mask(mask, workers),
        })
    }
}
/// Fixed part of a pull reply: version, flags.
pub const PULL_REPLY_HEAD_LEN: usize = 9;

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

/// Appends little-endian fields.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.u32(v.to_bits())
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
}

/// Reads little-endian fields, refusing to read past the end.
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], NetError> {
        if self.bytes.len() < n {
            return Err(NetError::Malformed {
                what: self.what,
                why: format!("needs {n} more bytes, has {}", self.bytes.len()),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, NetError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, NetError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, NetError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, NetError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn f32(&mut self) -> Result<f32, NetError> {
        Ok(f32::from_bits(self.u32()?))
    }
    pub fn str(&mut self) -> Result<String, NetError> {
        let n = self.u32()? as usize;
        let what = self.what;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| NetError::Malformed {
            what,
            why: "string is not UTF-8".into(),
        })
    }
    /// Fails if bytes are left over: every message has an exact size.
    pub fn finish(&self) -> Result<(), NetError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(NetError::Malformed {
                what: self.what,
                why: format!("{} trailing bytes", self.bytes.len()),
            })
        }
    }
}

/// The first message of every connection: who is calling and what it believes about the run,
/// so that a mismatched peer is refused before any tensor moves.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub role: Role,
    pub rank: u32,
    pub workers: u32,
    pub sync: bool,
    /// Sync: backup workers (with several shards they make shard 0 coordinate the steps, so
    /// every worker must agree on them).
    pub backup_workers: u32,
    pub shard: u32,
    pub shards: u32,
    pub fingerprint: u64,
    pub tensors: Vec<(String, Vec<u64>)>,
}

impl Hello {
    pub fn new(
        role: Role,
        rank: usize,
        workers: usize,
        mode: &Mode,
        shard: usize,
        shards: usize,
        layout: &Layout,
    ) -> Self {
        Hello {
            role,
            // usize::MAX (the client's "any rank") becomes ANY_RANK on the wire.
            rank: u32::try_from(rank).unwrap_or(ANY_RANK),
            workers: workers as u32,
            sync: mode.is_sync(),
            backup_workers: match mode {
                Mode::Sync { backup_workers } => *backup_workers as u32,
                Mode::Async { .. } => 0,
            },
            shard: shard as u32,
            shards: shards as u32,
            fingerprint: layout.fingerprint(),
            tensors: layout
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), t.shape.iter().map(|&d| d as u64).collect()))
                .collect(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(match self.role {
            Role::Worker => 1,
            Role::Observer => 2,
            Role::Heartbeat => 3,
        })
        .u32(self.rank)
        .u32(self.workers)
        .u8(u8::from(self.sync))
        .u32(self.backup_workers)
        .u32(self.shard)
        .u32(self.shards)
        .u64(self.fingerprint)
        .u32(self.tensors.len() as u32);
        for (name, shape) in &self.tensors {
            w.str(name).u32(shape.len() as u32);
            for &d in shape {
                w.u64(d);
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "hello");
        let role = match r.u8()? {
            1 => Role::Worker,
            2 => Role::Observer,
            3 => Role::Heartbeat,
            other => {
                return Err(NetError::Malformed {
                    what: "hello",
                    why: format!("unknown role {other}"),
                })
            }
        };
        let (rank, workers, sync, backup_workers) = (r.u32()?, r.u32()?, r.u8()? != 0, r.u32()?);
        let (shard, shards, fingerprint) = (r.u32()?, r.u32()?, r.u64()?);
        let count = r.u32()? as usize;
        // Each tensor needs at least 8 bytes, so the count cannot promise more than is there.
        if count > bytes.len() / 8 {
            return Err(NetError::Malformed {
                what: "hello",
                why: format!("{count} tensors in {} bytes", bytes.len()),
            });
        }
        let mut tensors = Vec::with_capacity(count);
        for _ in 0..count {
            let name = r.str()?;
            let dims = r.u32()? as usize;
            if dims > 16 {
                return Err(NetError::Malformed {
                    what: "hello",
                    why: format!("tensor `{name}` has {dims} dimensions"),
                });
            }
            let shape = (0..dims).map(|_| r.u64()).collect::<Result<_, _>>()?;
            tensors.push((name, shape));
        }
        r.finish()?;
        Ok(Hello {
            role,
            rank,
            workers,
            sync,
            backup_workers,
            shard,
            shards,
            fingerprint,
            tensors,
        })
    }

    /// The layout the peer described, if it is a valid one.
    pub fn layout(&self) -> Result<Layout, String> {
        let shapes: Vec<(String, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(n, s)| (n.clone(), s.iter().map(|&d| d as usize).collect()))
            .collect();
        Layout::new(shapes.iter().map(|(n, s)| (n.clone(), &s[..]))).map_err(|e| e.to_string())
    }
}

/// The server's answer to a good hello: the key range this shard owns and its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloOk {
    pub start: u64,
    pub end: u64,
    pub version: u64,
    /// The worker's rank: the one it asked for, or the one assigned for `ANY_RANK`.
    pub rank: u32,
}

/// A worker's hello for "any free rank": the shard assigns one (a dead worker's first).
pub const ANY_RANK: u32 = u32::MAX;

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

/// Pull: `newer_than` (u64::MAX for none) and whether to wait for newer weights.
pub fn encode_pull(newer_than: Option<u64>, wait: bool) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(newer_than.unwrap_or(u64::MAX)).u8(u8::from(wait));
    w.0
}

pub fn decode_pull(bytes: &[u8]) -> Result<(Option<u64>, bool), NetError> {
    let mut r = Reader::new(bytes, "pull");
    let v = r.u64()?;
    let wait = r.u8()? != 0;
    r.finish()?;
    Ok(((v != u64::MAX).then_some(v), wait))
}

/// Outcome codes of a push reply.
pub mod outcome {
    pub const APPLIED: u8 = 0;
    pub const BUFFERED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const DONE: u8 = 3;
}

/// Stats reply: the shard's counters plus its quorum and whether the run is over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardStats {
    pub stats: ServerStats,
    pub active_workers: u32,
    pub done: bool,
}

impl ShardStats {
    pub fn encode(&self) -> Vec<u8> {
        let s = &self.stats;
        let mut w = Writer::default();
        w.u64(s.version)
            .u64(s.gradients_applied)
            .u64(s.samples_applied)
            .u64(s.dropped_stale)
            .u64(s.rejected_nonfinite)
            .u64(s.rejected_other)
            .u64(s.staleness_sum)
            .u64(s.staleness_max)
            .f32(s.loss_ema.unwrap_or(f32::NAN))
            .u32(self.active_workers)
            .u8(u8::from(self.done));
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, NetError> {
        let mut r = Reader::new(bytes, "stats");
        let stats = ServerStats {
            version: r.u64()?,
            gradients_applied: r.u64()?,
            samples_applied: r.u64()?,
            dropped_stale: r.u64()?,
            rejected_nonfinite: r.u64()?,
            rejected_other: r.u64()?,
            staleness_sum: r.u64()?,
            staleness_max: r.u64()?,
            loss_ema: Some(r.f32()?).filter(|l| !l.is_nan()),
        };
        let v = ShardStats {
            stats,
            active_workers: r.u32()?,
            done: r.u8()? != 0,
        };
        r.finish()?;
        Ok(v)
    }
}

pub fn encode_error(code: u16, message: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.u16(code).str(message);
    w.0
}

pub fn decode_error(bytes: &[u8]) -> NetError {
    let mut r = Reader::new(bytes, "error");
    match (r.u16(), r.str()) {
        (Ok(code), Ok(message)) => NetError::Remote { code, message },
        _ => NetError::Malformed {
            what: "error",
            why: "unreadable error frame".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let layout = Layout::new([("w", &[3usize, 2][..]), ("b", &[3][..])]).unwrap();
        let hello = Hello::new(
            Role::Worker,
            1,
            2,
            &Mode::Sync { backup_workers: 0 },
            0,
            2,
            &layout,
        );
        let bytes = hello.encode();
        let back = Hello::decode(&bytes).unwrap();
        assert_eq!(back, hello);
        assert_eq!(back.layout().unwrap(), layout);
        for cut in [0, 5, bytes.len() - 1] {
            assert!(Hello::decode(&bytes[..cut]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Hello::decode(&long).is_err());
        let mut huge_count = bytes.clone();
        huge_count[30..34].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Hello::decode(&huge_count).is_err());
    }

    #[test]
    fn small_messages_round_trip() {
        assert_eq!(
            decode_pull(&encode_pull(Some(7), true)).unwrap(),
            (Some(7), true)
        );
        assert_eq!(
            decode_pull(&encode_pull(None, false)).unwrap(),
            (None, false)
        );
        let ok = HelloOk {
            start: 1,
            end: 9,
            version: 4,
            rank: 2,
        };
        assert_eq!(HelloOk::decode(&ok.encode()).unwrap(), ok);
        let st = ShardStats {
            stats: ServerStats {
                version: 3,
                loss_ema: Some(0.5),
                ..Default::default()
            },
            active_workers: 2,
            done: true,
        };
        assert_eq!(ShardStats::decode(&st.encode()).unwrap(), st);
        let members = vec![true, false, false, true, false, false, false, false, true];
        let head = PushHead {
            base_version: 3,
            samples: 16,
            loss: 0.25,
            step: 7,
            members: members.clone(),
        };
        let bytes = head.encode();
        assert_eq!(bytes.len(), push_head_len(9));
        assert_eq!(PushHead::decode(&bytes, 9).unwrap(), head);
        assert!(PushHead::decode(&bytes[..bytes.len() - 1], 9).is_err());
        let reply = PushReply {
            code: outcome::APPLIED,
            version: 8,
            staleness: 0,
            waiting: 0,
            step: 7,
            members,
        };
        assert_eq!(PushReply::decode(&reply.encode(), 9).unwrap(), reply);
        assert!(matches!(
            decode_error(&encode_error(3, "nope")),
            NetError::Remote { code: 3, .. }
        ));
    }
}
