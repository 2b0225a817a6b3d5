//! A worker's side of replay pulls (`PullCodec::Replay`): it holds its slice with the shard's
//! optimizer state and makes each update the shard's log sends (`update_log`) itself, so the
//! pull carries the pushes' bytes, not the weights. A pull's body is one of two forms: the
//! updates since the version the worker holds, or (first, or after anything went wrong) the
//! whole slice with the optimizer's state. Everything in it is checked as hostile input
//! before the worker's weights change.

use crate::compression::{CodecError, PushCodec};
use crate::config::ServerConfig;
use crate::consistency::StepSum;
use crate::optimizer::{Optimizer, ScaledGrad};
use crate::update_log::{checksum, Contribution, Entry, Source};
pub use crate::update_log::{FORM_UPDATES, FORM_WHOLE};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay pull: {0}")]
    Malformed(String),
    #[error("replay pull: {0}")]
    Codec(#[from] CodecError),
    #[error("replay pull: updates from version {from}, but this worker holds {held:?}")]
    NotHeld { from: u64, held: Option<u64> },
    #[error("replay pull: the weights after update {from} differ from the shard's")]
    Diverged { from: u64 },
}

fn malformed(why: impl Into<String>) -> ReplayError {
    ReplayError::Malformed(why.into())
}

/// Writes the whole form: `weights` and `optimizer`'s state.
pub fn write_whole(weights: &[f32], optimizer: &Optimizer, out: &mut Vec<u8>) {
    out.clear();
    out.push(FORM_WHOLE);
    out.extend_from_slice(&(weights.len() as u64).to_le_bytes());
    out.extend(weights.iter().flat_map(|w| w.to_le_bytes()));
    optimizer.write_state(out);
}

/// The largest body a replay pull of a slice of `values` may have under a log of `budget`
/// bytes: the log whole, or the slice with an optimizer's largest state.
pub fn max_body(values: usize, budget: usize) -> usize {
    let whole = 1 + 8 + 4 * values + Optimizer::max_state_len(values);
    // The log's updates, and the heads of what its budget lets it keep past it (the latest
    // update is kept whatever its size).
    let updates = 1 + 4 + budget + 2 * (4 * values + 4096);
    whole.max(updates)
}

/// A worker's copy of one shard's slice and optimizer, kept by replaying its updates.
#[derive(Debug, Clone)]
pub struct Replayer {
    optimizer: Optimizer,
    sum: StepSum,
    weights: Vec<f32>,
    /// A contribution's values, decoded.
    values: Vec<f32>,
    held: Option<u64>,
    /// The most pushes one update may hold (a step's: one per worker).
    max_contributions: usize,
    /// This worker's last push to the shard, which a pull leaves out.
    last_push: Option<(PushCodec, Arc<[u8]>)>,
}

impl Replayer {
    /// A replayer for a slice of `len` values of a shard run by `config`.
    pub fn new(config: &ServerConfig, len: usize) -> Self {
        Replayer {
            optimizer: Optimizer::with_schedule(config.optimizer, config.schedule, len),
            sum: StepSum::new(len, config.aggregate),
            weights: Vec::new(),
            values: Vec::new(),
            held: None,
            max_contributions: config.workers.max(1),
            last_push: None,
        }
    }

    /// This worker pushed `bytes` in `codec` (the values' little-endian bytes for fp32):
    /// the shard leaves them out of the next pull's updates.
    pub fn pushed(&mut self, codec: PushCodec, bytes: &[u8]) {
        self.last_push = Some((codec, Arc::from(bytes)));
    }

    /// This worker pushed `values` as fp32 (their little-endian bytes are what the shard
    /// logged).
    pub fn pushed_values(&mut self, values: &[f32]) {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.last_push = Some((PushCodec::Fp32, bytes));
    }

    /// This worker's last push went where the shard does not leave it out (a lane).
    pub fn forget_push(&mut self) {
        self.last_push = None;
    }

    /// The version it holds, if it holds one.
    pub fn held(&self) -> Option<u64> {
        self.held
    }

    /// Takes a replay pull's `body`, which brings the slice to `version`, and writes the
    /// weights into `slice`. On an error nothing is written and it holds nothing.
    pub fn apply(
        &mut self,
        body: &[u8],
        version: u64,
        slice: &mut [f32],
    ) -> Result<(), ReplayError> {
        let held = self.held.take();
        let (&form, rest) = body
            .split_first()
            .ok_or_else(|| malformed("an empty body"))?;
        match form {
            FORM_WHOLE => self.take_whole(rest, slice.len())?,
            FORM_UPDATES => self.take_updates(rest, held, version)?,
            other => return Err(malformed(format!("unknown form {other}"))),
        }
        slice.copy_from_slice(&self.weights);
        self.held = Some(version);
        Ok(())
    }

    fn take_whole(&mut self, bytes: &[u8], len: usize) -> Result<(), ReplayError> {
        let mut r = Reader(bytes);
        let n = r.u64()?;
        if n != len as u64 {
            return Err(malformed(format!("{n} weights for a slice of {len}")));
        }
        let raw = r.take(4 * len)?;
        self.weights.clear();
        self.weights.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        if self.weights.iter().any(|w| !w.is_finite()) {
            return Err(malformed("weights that are not finite"));
        }
        self.optimizer
            .read_state(r.0)
            .map_err(|e| malformed(format!("optimizer state: {e}")))
    }

    fn take_updates(
        &mut self,
        bytes: &[u8],
        held: Option<u64>,
        version: u64,
    ) -> Result<(), ReplayError> {
        let mut r = Reader(bytes);
        let count = r.u32()? as u64;
        let mut at = held.ok_or(ReplayError::NotHeld { from: 0, held })?;
        for _ in 0..count {
            let entry = self.read_entry(&mut r)?;
            if entry.from != at {
                return Err(ReplayError::NotHeld {
                    from: entry.from,
                    held: Some(at),
                });
            }
            self.replay(&entry)?;
            at += 1;
        }
        if !r.0.is_empty() || at != version {
            return Err(malformed(format!(
                "updates to version {at} (and {} bytes after them) for version {version}",
                r.0.len()
            )));
        }
        Ok(())
    }

    fn read_entry(&self, r: &mut Reader<'_>) -> Result<Entry, ReplayError> {
        let from = r.u64()?;
        let flags = r.u8()?;
        let lr_scale = r.f32()?;
        let checksum = r.u64()?;
        let count = r.u32()? as usize;
        let (applied, sum) = (flags & 1 != 0, flags & 2 != 0);
        let most = match (applied, sum) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => self.max_contributions,
        };
        if flags > 3 || count > most || (applied && count == 0) || !lr_scale.is_finite() {
            return Err(malformed(format!(
                "update {from}: flags {flags}, {count} pushes, learning rate times {lr_scale}"
            )));
        }
        let mut contributions = Vec::with_capacity(count);
        for _ in 0..count {
            contributions.push(self.read_contribution(r)?);
        }
        Ok(Entry {
            from,
            applied,
            sum,
            lr_scale,
            contributions,
            checksum,
        })
    }

    /// Makes `entry`'s update as the shard made it, and checks where it led.
    fn replay(&mut self, entry: &Entry) -> Result<(), ReplayError> {
        let len = self.weights.len();
        let made = if !entry.applied {
            true
        } else if entry.sum {
            self.sum.clear();
            for c in &entry.contributions {
                c.values(len, &mut self.values)?;
                self.sum.add(c.samples, taken(c, &self.values), None);
            }
            match self.sum.combined() {
                Some(update) => {
                    self.optimizer
                        .apply_scaled(&mut self.weights, update, entry.lr_scale)
                }
                None => false,
            }
        } else {
            let c = &entry.contributions[0];
            c.values(len, &mut self.values)?;
            let grad = taken(c, &self.values);
            self.optimizer
                .apply_scaled(&mut self.weights, grad, entry.lr_scale)
        };
        if !made || checksum(&self.weights) != entry.checksum {
            return Err(ReplayError::Diverged { from: entry.from });
        }
        Ok(())
    }
}

impl Replayer {
    /// One push of an update, its bytes read or (left out as this worker's own) its last
    /// push's, which must be of the same codec.
    fn read_contribution(&self, r: &mut Reader<'_>) -> Result<Contribution, ReplayError> {
        let samples = r.u32()?;
        let scale = r.f32()?;
        let flags = r.u8()?;
        let clip = r.f32()?;
        let (tag, param) = (r.u8()?, r.u16()?);
        let len = r.u32()? as usize;
        let codec = PushCodec::from_tag(tag, param)
            .ok_or_else(|| malformed(format!("push codec tag {tag}:{param}")))?;
        if flags > 7 || !scale.is_finite() || !clip.is_finite() {
            return Err(malformed(format!(
                "a push with flags {flags}, scale {scale}, clip {clip}"
            )));
        }
        let bytes = if flags & 4 != 0 {
            match &self.last_push {
                Some((pushed, bytes)) if *pushed == codec && len == 0 => Arc::clone(bytes),
                _ => return Err(malformed("a push said to be this worker's, which it lacks")),
            }
        } else {
            Arc::from(r.take(len)?)
        };
        Ok(Contribution {
            samples,
            scale,
            accumulated: flags & 1 != 0,
            clip: (flags & 2 != 0).then_some(clip),
            codec,
            fingerprint: 0,
            bytes,
        })
    }
}

/// `values` (a contribution's, decoded) as the shard's rule took them.
fn taken<'v>(c: &Contribution, values: &'v [f32]) -> ScaledGrad<'v> {
    ScaledGrad {
        values,
        scale: c.scale,
        accumulated: c.accumulated,
        source: Source::Unknown,
    }
}

/// Reads little-endian fields off the front of a body, refusing to run past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReplayError> {
        if n > self.0.len() {
            return Err(malformed(format!(
                "{n} bytes wanted, {} left",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReplayError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ReplayError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ReplayError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, ReplayError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, ReplayError> {
        self.array().map(u64::from_le_bytes)
    }

    fn f32(&mut self) -> Result<f32, ReplayError> {
        self.array().map(f32::from_le_bytes)
    }
}

#[cfg(test)]
#[path = "replay_tests.rs"]
mod tests;
