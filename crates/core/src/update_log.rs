//! The shard's last updates as their pushes arrived, for workers that pull by replaying them
//! (`PullCodec::Replay`). Such a worker keeps the shard's optimizer state for its slice and
//! makes each update itself, from the same decoded pushes, summed in the same order, through
//! the same kernels (which give the same bits on every instruction set), so its weights stay
//! the shard's bit for bit while a pull carries only the pushes' bytes. A checksum of the
//! weights after each update catches what could still differ (a platform's `cos` in a cosine
//! schedule): the worker then fails its pull, reconnects and is sent the whole slice with the
//! optimizer's state (`replay::write_whole`).
//!
//! The log holds the updates of the last `budget` bytes of pushes; a worker further behind,
//! or behind an update the log cannot describe, is sent the whole slice and state.

use crate::compression::{CodecError, PushCodec};
use std::collections::VecDeque;
use std::sync::Arc;

/// A replay pull's body of the updates since the version the worker holds (`encode_since`).
pub const FORM_UPDATES: u8 = 1;
/// A replay pull's body of the whole slice and the optimizer's state (`replay::write_whole`).
pub const FORM_WHOLE: u8 = 2;

/// A push's values as they crossed the link: its codec, the bytes it was decoded from
/// (fp32: the values' little-endian bytes) and their `fingerprint`, taken once.
#[derive(Debug, Clone, Copy)]
pub struct WireRef<'a> {
    pub codec: PushCodec,
    pub bytes: &'a [u8],
    pub fingerprint: u64,
}

impl<'a> WireRef<'a> {
    pub fn new(codec: PushCodec, bytes: &'a [u8]) -> Self {
        WireRef {
            codec,
            bytes,
            fingerprint: fingerprint(bytes),
        }
    }
}

/// What an update's values were made of, as far as a worker replaying it must know.
#[derive(Debug, Clone, Copy, Default)]
pub enum Source<'a> {
    /// Not recorded (the run keeps no log, or values the log cannot describe).
    #[default]
    Unknown,
    /// One push's decoded values, each times `clip` first when the gate clipped them.
    Push {
        wire: WireRef<'a>,
        clip: Option<f32>,
    },
    /// A step's sum of pushes, in the order they were added (`StepSum`).
    Sum(&'a [Contribution]),
}

/// One push in an update: how to make its values again, and how they were weighted.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// The samples it counted for in a step's sum (unused for an update of its own).
    pub samples: u32,
    /// The factor its values were taken with (`ScaledGrad::scale`).
    pub scale: f32,
    pub accumulated: bool,
    /// The gate's clipping factor, multiplied into each decoded value first.
    pub clip: Option<f32>,
    pub codec: PushCodec,
    /// Shared between a step's sum and the log's entry (one copy of a push's bytes).
    pub bytes: Arc<[u8]>,
    /// `fingerprint` of the bytes: a pull leaves out the puller's own last push.
    pub fingerprint: u64,
}

impl Contribution {
    /// A copy of the push `wire` (clipped by `clip`), taken as `scale` times its values.
    pub fn new(wire: WireRef<'_>, clip: Option<f32>, samples: u32, scale: f32, acc: bool) -> Self {
        Contribution {
            samples,
            scale,
            accumulated: acc,
            clip,
            codec: wire.codec,
            bytes: Arc::from(wire.bytes),
            fingerprint: wire.fingerprint,
        }
    }

    /// Its values as the shard took them (decoded, clipped) into `out`, `len` of them
    /// (every decoder writes every value, zeros included).
    pub fn values(&self, len: usize, out: &mut Vec<f32>) -> Result<(), CodecError> {
        out.resize(len, 0.0);
        self.codec.decode(&self.bytes, out)?;
        if let Some(clip) = self.clip {
            // As the gate clips: each value times the factor, nothing else.
            for v in out.iter_mut() {
                *v *= clip;
            }
        }
        Ok(())
    }
}

/// One update as a worker replays it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The version it was made on (it made `from + 1`).
    pub from: u64,
    /// The weights changed; else only the version moved (a step whose every gradient was
    /// refused, or whose update was rolled back).
    pub applied: bool,
    /// A step's sum of its contributions; else one push's values, the update on its own.
    pub sum: bool,
    pub lr_scale: f32,
    pub contributions: Vec<Contribution>,
    /// `checksum` of the weights after it.
    pub checksum: u64,
}

/// The bytes of an entry's head and of each contribution's head, on the wire.
const ENTRY_HEAD: usize = 8 + 1 + 4 + 8 + 4;
const CONTRIBUTION_HEAD: usize = 4 + 4 + 1 + 4 + 1 + 2 + 4;

impl Entry {
    /// Its bytes on the wire when nothing is left out (what the log's budget counts).
    fn wire_len(&self) -> usize {
        ENTRY_HEAD
            + self
                .contributions
                .iter()
                .map(|c| CONTRIBUTION_HEAD + c.bytes.len())
                .sum::<usize>()
    }

    /// Writes it into `out`, leaving out the bytes of a push whose fingerprint is `yours`
    /// (the puller's last push, which it keeps).
    fn encode(&self, yours: Option<u64>, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.from.to_le_bytes());
        out.push(u8::from(self.applied) | (u8::from(self.sum) << 1));
        out.extend_from_slice(&self.lr_scale.to_le_bytes());
        out.extend_from_slice(&self.checksum.to_le_bytes());
        out.extend_from_slice(&(self.contributions.len() as u32).to_le_bytes());
        for c in &self.contributions {
            out.extend_from_slice(&c.samples.to_le_bytes());
            out.extend_from_slice(&c.scale.to_le_bytes());
            let own = yours == Some(c.fingerprint);
            let flags = u8::from(c.accumulated) | (u8::from(c.clip.is_some()) << 1);
            out.push(flags | (u8::from(own) << 2));
            out.extend_from_slice(&c.clip.unwrap_or(1.0).to_le_bytes());
            let (tag, param) = c.codec.to_tag();
            out.push(tag);
            out.extend_from_slice(&param.to_le_bytes());
            let bytes = if own { &[][..] } else { &c.bytes[..] };
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

/// The shard's recent updates, oldest first, contiguous in version.
#[derive(Debug, Clone)]
pub struct UpdateLog {
    entries: VecDeque<Entry>,
    /// The entries' bytes on the wire.
    held: usize,
    budget: usize,
}

impl UpdateLog {
    /// A log that keeps the latest updates whose pushes take at most `budget` bytes (and the
    /// latest one whatever its size).
    pub fn new(budget: usize) -> Self {
        UpdateLog {
            entries: VecDeque::new(),
            held: 0,
            budget,
        }
    }

    /// Records the update made on version `from` of `source`'s values (taken as
    /// `scale * values`, of the kind `accumulated`), its learning rate times `lr_scale`,
    /// which left `weights`. An update the log cannot describe empties it.
    pub fn record(&mut self, from: u64, update: Recorded<'_>, weights: &[f32]) {
        let (sum, contributions) = match update.source {
            Source::Unknown => return self.clear(),
            Source::Push { wire, clip } => (
                false,
                vec![Contribution::new(
                    wire,
                    clip,
                    0,
                    update.scale,
                    update.accumulated,
                )],
            ),
            Source::Sum(parts) => (true, parts.to_vec()),
        };
        self.push(Entry {
            from,
            applied: true,
            sum,
            lr_scale: update.lr_scale,
            contributions,
            checksum: checksum(weights),
        });
    }

    /// Records that version `from` moved on with `weights` unchanged.
    pub fn record_skip(&mut self, from: u64, weights: &[f32]) {
        self.push(Entry {
            from,
            applied: false,
            sum: false,
            lr_scale: 1.0,
            contributions: Vec::new(),
            checksum: checksum(weights),
        });
    }

    fn push(&mut self, entry: Entry) {
        if self
            .entries
            .back()
            .is_some_and(|e| e.from + 1 != entry.from)
        {
            // Not contiguous (the version jumped): what came before no longer leads here.
            self.clear();
        }
        self.held += entry.wire_len();
        self.entries.push_back(entry);
        while self.held > self.budget && self.entries.len() > 1 {
            if let Some(old) = self.entries.pop_front() {
                self.held -= old.wire_len();
            }
        }
    }

    /// Forgets every update (a restore, or an update it cannot describe).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.held = 0;
    }

    /// Encodes the updates from version `held` to `now` into `out` (cleared first), if it
    /// holds them all: a replay pull's body (`FORM_UPDATES`), without the bytes of
    /// the push whose fingerprint is `yours`.
    pub fn encode_since(&self, held: u64, now: u64, yours: Option<u64>, out: &mut Vec<u8>) -> bool {
        out.clear();
        let Some(first) = self.entries.front() else {
            return false;
        };
        let last = first.from + self.entries.len() as u64;
        if held < first.from || now != last || held > now {
            return false;
        }
        let skip = (held - first.from) as usize;
        let count = self.entries.len() - skip;
        out.push(FORM_UPDATES);
        out.extend_from_slice(&(count as u32).to_le_bytes());
        for entry in self.entries.iter().skip(skip) {
            entry.encode(yours, out);
        }
        true
    }

    /// The updates it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// An applied update as the log records it.
#[derive(Debug, Clone, Copy)]
pub struct Recorded<'a> {
    pub source: Source<'a>,
    pub scale: f32,
    pub accumulated: bool,
    pub lr_scale: f32,
}

/// A cheap fingerprint of a push's bytes (the same caveat as `checksum`'s: a worker's own
/// push left out of a pull on a false match makes its replay diverge, which it catches).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut acc = [0u64; 4];
    for (i, word) in (&mut words).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let position = (i as u64).wrapping_mul(2) | 1;
        acc[i % 4] = acc[i % 4].wrapping_add(u64::from_le_bytes(w).wrapping_mul(position));
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    acc[0] ^= u64::from_le_bytes(tail).rotate_left(17);
    acc.iter()
        .enumerate()
        .fold(bytes.len() as u64, |h, (i, &a)| {
            (h ^ a.rotate_left(i as u32 * 13)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        })
}

/// A cheap fingerprint of `values`' bits (not a cryptographic one: it catches a replay that
/// drifted, not a forger; the shard is trusted by a worker that joined it).
pub fn checksum(values: &[f32]) -> u64 {
    const LANES: usize = 8;
    let mut acc = [0u64; LANES];
    let mut chunks = values.chunks_exact(LANES);
    let mut index = 1u64;
    for chunk in &mut chunks {
        for (lane, (a, v)) in acc.iter_mut().zip(chunk).enumerate() {
            let position = index.wrapping_add(lane as u64) | 1;
            *a = a.wrapping_add(u64::from(v.to_bits()).wrapping_mul(position));
        }
        index = index.wrapping_add(LANES as u64);
    }
    for (lane, v) in chunks.remainder().iter().enumerate() {
        let position = index.wrapping_add(lane as u64) | 1;
        acc[lane] = acc[lane].wrapping_add(u64::from(v.to_bits()).wrapping_mul(position));
    }
    acc.iter()
        .enumerate()
        .fold(values.len() as u64, |h, (i, &a)| {
            (h ^ a.rotate_left(i as u32 * 7)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        })
}

#[cfg(test)]
#[path = "update_log_tests.rs"]
mod tests;
