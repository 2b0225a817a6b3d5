//! Which training samples a worker sees, in which order: a disjoint shard per worker,
//! reshuffled every epoch with a seeded RNG, cut into equally many full batches.

use pstrain_core::{shard_ranges, Rng};
use std::ops::Range;

/// Rank `rank`'s shard of `0..n`: a contiguous block of one seeded permutation, so shards are
/// disjoint, cover every sample, and differ in size by at most one.
pub fn shard_indices(n: usize, workers: usize, rank: usize, seed: u64) -> Vec<usize> {
    shards_indices(n, workers, rank..rank + 1, seed)
}

/// The shards of `ranks`, one after the other (a block of the same permutation): what a
/// process running several workers loads once.
pub fn shards_indices(n: usize, workers: usize, ranks: Range<usize>, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    Rng::new(seed).fork(0x5a4d).shuffle(&mut all);
    let blocks = shard_ranges(n, workers);
    let start = blocks.get(ranks.start).map_or(n, |r| r.start);
    let end = ranks
        .end
        .checked_sub(1)
        .and_then(|last| blocks.get(last))
        .map_or(start, |r| r.end);
    all[start..end.max(start)].to_vec()
}

/// How many samples each of `ranks` holds, in rank order.
pub fn shard_sizes(n: usize, workers: usize, ranks: Range<usize>) -> Vec<usize> {
    let blocks = shard_ranges(n, workers);
    ranks
        .map(|r| blocks.get(r).map_or(0, |b| b.len()))
        .collect()
}

/// Batches per epoch, the same for every worker: enough to cover the largest shard once.
/// Equal counts keep sync workers in lockstep to the end of each epoch, whatever the shard
/// sizes; a smaller shard wraps around and repeats a few samples.
pub use pstrain_core::plan::steps_per_epoch;

/// The batches of one worker, addressed by step number, so that a restarted worker can take
/// up exactly where the run is: epoch `e` is the shard in an order drawn from
/// (seed, rank, e), and step `k` is the k-th batch of that sequence.
pub struct EpochSampler {
    base: Vec<usize>,
    order: Vec<usize>,
    epoch: Option<u64>,
    batch: usize,
    steps: usize,
    rng: Rng,
}

impl EpochSampler {
    pub fn new(n: usize, workers: usize, rank: usize, batch: usize, seed: u64) -> Self {
        let base = shard_indices(n, workers, rank, seed);
        Self::over(base, n, workers, rank, batch, seed)
    }

    /// Rank `rank`'s sequence over `base`, its shard of `n` samples.
    fn over(
        base: Vec<usize>,
        n: usize,
        workers: usize,
        rank: usize,
        batch: usize,
        seed: u64,
    ) -> Self {
        EpochSampler {
            order: base.clone(),
            base,
            epoch: None,
            batch,
            steps: steps_per_epoch(n, workers, batch),
            rng: Rng::new(seed).fork(1 + rank as u64),
        }
    }

    /// The same sequence for a worker that loaded only its shard of the `n` samples, in
    /// `shard_indices` order: it yields positions in that loaded shard. A shuffle moves
    /// positions whatever they hold, so position `i` here is `shard_indices(..)[i]` there,
    /// batch for batch.
    pub fn over_loaded_shard(
        n: usize,
        workers: usize,
        rank: usize,
        batch: usize,
        seed: u64,
    ) -> Self {
        let shard = shard_ranges(n, workers)
            .into_iter()
            .nth(rank)
            .map_or(0, |r| r.len());
        Self::over((0..shard).collect(), n, workers, rank, batch, seed)
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.steps
    }

    pub fn shard(&self) -> &[usize] {
        &self.base
    }

    fn enter_epoch(&mut self, epoch: u64) {
        if self.epoch != Some(epoch) {
            self.order.copy_from_slice(&self.base);
            self.rng.fork(epoch).shuffle(&mut self.order);
            self.epoch = Some(epoch);
        }
    }

    /// For batches whose sizes vary (speed-balanced sync): the `n` samples at position `pos`
    /// of this worker's sequence of epochs, where epoch `e` is the shard once over, in the
    /// order drawn from (seed, rank, e).
    pub fn samples_from(&mut self, pos: u64, n: usize, out: &mut Vec<usize>) {
        out.clear();
        let len = self.order.len() as u64;
        if len == 0 {
            return;
        }
        for p in pos..pos.saturating_add(n as u64) {
            self.enter_epoch(p / len);
            out.push(self.order[(p % len) as usize]);
        }
    }

    /// The sample indices of global step `step` (counting from the run's first step).
    pub fn batch_at(&mut self, step: u64) -> impl Iterator<Item = usize> + '_ {
        let epoch = step / self.steps as u64;
        self.enter_epoch(epoch);
        let k = (step % self.steps as u64) as usize;
        let (len, batch) = (self.order.len(), self.batch);
        let order = &self.order;
        (0..batch).map(move |j| order[(k * batch + j) % len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_and_cover_everything() {
        let n = 1003;
        let mut seen = vec![0u8; n];
        for rank in 0..4 {
            for i in shard_indices(n, 4, rank, 9) {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }

    #[test]
    fn uneven_shards_get_equal_step_counts_and_full_batches() {
        // 7 workers over 100 samples: shards of 15 and 14.
        let steps = steps_per_epoch(100, 7, 4);
        assert_eq!(steps, 4);
        for rank in 0..7 {
            let mut s = EpochSampler::new(100, 7, rank, 4, 1);
            assert_eq!(s.steps_per_epoch(), steps);
            let mut covered: Vec<usize> = (0..steps as u64)
                .flat_map(|k| s.batch_at(k).collect::<Vec<_>>())
                .collect();
            assert_eq!(covered.len(), steps * 4);
            covered.sort_unstable();
            covered.dedup();
            assert_eq!(covered.len(), s.shard().len(), "every shard sample is used");
        }
    }

    #[test]
    fn epochs_are_reshuffled_and_any_step_can_be_revisited() {
        let mut s = EpochSampler::new(1000, 2, 0, 10, 3);
        let steps = s.steps_per_epoch() as u64;
        let first: Vec<usize> = s.batch_at(0).collect();
        let second: Vec<usize> = s.batch_at(steps).collect();
        assert_ne!(first, second);
        let later: Vec<usize> = s.batch_at(steps + 7).collect();
        let mut fresh = EpochSampler::new(1000, 2, 0, 10, 3);
        assert_eq!(
            fresh.batch_at(steps + 7).collect::<Vec<_>>(),
            later,
            "a restart sees the same batch"
        );
        assert_eq!(s.batch_at(0).collect::<Vec<_>>(), first);
    }

    #[test]
    fn a_loaded_shard_yields_the_same_samples_by_position() {
        let (n, workers, batch, seed) = (1003, 3, 8, 17);
        for rank in 0..workers {
            let shard = shard_indices(n, workers, rank, seed);
            let mut whole = EpochSampler::new(n, workers, rank, batch, seed);
            let mut own = EpochSampler::over_loaded_shard(n, workers, rank, batch, seed);
            assert_eq!(own.shard().len(), shard.len());
            assert_eq!(own.steps_per_epoch(), whole.steps_per_epoch());
            for step in [0, 1, 40, 41, 42, 300] {
                let want: Vec<usize> = whole.batch_at(step).collect();
                let got: Vec<usize> = own.batch_at(step).map(|i| shard[i]).collect();
                assert_eq!(got, want, "rank {rank} step {step}");
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            whole.samples_from(333, 50, &mut a);
            own.samples_from(333, 50, &mut b);
            assert_eq!(b.iter().map(|&i| shard[i]).collect::<Vec<_>>(), a);
        }
    }

    #[test]
    fn a_block_of_ranks_is_their_shards_one_after_the_other() {
        let (n, workers, seed) = (1003, 7, 17);
        for ranks in [0..7, 2..5, 6..7, 3..3] {
            let block = shards_indices(n, workers, ranks.clone(), seed);
            let each: Vec<usize> = (ranks.clone())
                .flat_map(|r| shard_indices(n, workers, r, seed))
                .collect();
            assert_eq!(block, each, "{ranks:?}");
            let sizes = shard_sizes(n, workers, ranks.clone());
            assert_eq!(sizes.iter().sum::<usize>(), block.len());
        }
    }

    #[test]
    fn varying_batches_cover_each_epoch_once() {
        let mut s = EpochSampler::new(100, 2, 1, 10, 5);
        let (mut pos, mut out, mut seen) = (0u64, Vec::new(), Vec::new());
        for n in [7, 21, 3, 19] {
            s.samples_from(pos, n, &mut out);
            assert_eq!(out.len(), n);
            seen.extend_from_slice(&out);
            pos += n as u64;
        }
        // 50 samples: one whole epoch of the 50-sample shard, each once.
        seen.sort_unstable();
        let mut shard = s.shard().to_vec();
        shard.sort_unstable();
        assert_eq!(seen, shard);
        // Crossing into the next epoch reshuffles.
        s.samples_from(45, 10, &mut out);
        assert_eq!(out.len(), 10);
        let mut again = Vec::new();
        s.samples_from(50, 5, &mut again);
        assert_eq!(&out[5..], &again[..]);
    }
}
