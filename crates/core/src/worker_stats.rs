//! What a shard saw of each worker: gradients, staleness (with a histogram), how far ahead
//! of the shard it ran, and where its time went (computing, or waiting at the pull gate).

/// Upper bounds (inclusive) of the staleness histogram's buckets; the last bucket takes
/// everything above the previous bound.
pub const STALENESS_BOUNDS: [u64; 8] = [0, 1, 2, 4, 8, 16, 32, u64::MAX];

/// The histogram bucket of staleness `s`.
pub fn staleness_bucket(s: u64) -> usize {
    STALENESS_BOUNDS
        .iter()
        .position(|&bound| s <= bound)
        .unwrap_or(STALENESS_BOUNDS.len() - 1)
}

/// One worker rank, as one shard saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerStats {
    /// Gradients that went into an update (or a pending sync/SSP step).
    pub applied: u64,
    /// Gradients not used: stale, late, refused or not finite.
    pub not_applied: u64,
    pub samples: u64,
    pub staleness_sum: u64,
    pub staleness_max: u64,
    /// Counts per `STALENESS_BOUNDS` bucket.
    pub staleness_hist: [u64; STALENESS_BOUNDS.len()],
    /// SSP: the most steps this rank's gradient was ahead of the shard's version.
    pub max_lead: u64,
    /// Seconds between the shard serving the rank weights and its next gradient arriving:
    /// its compute time (and any network time), not its waits.
    pub compute_s: f64,
    /// Seconds its pulls spent waiting at the consistency gate (a barrier or the bound).
    pub wait_s: f64,
    /// Samples in its latest gradient (with speed-balanced sync, the size it was given).
    pub batch: u32,
}

impl WorkerStats {
    pub fn staleness_mean(&self) -> f64 {
        if self.applied == 0 {
            0.0
        } else {
            self.staleness_sum as f64 / self.applied as f64
        }
    }

    pub fn record_applied(&mut self, samples: u32, staleness: u64) {
        self.applied += 1;
        self.samples += u64::from(samples);
        self.staleness_sum += staleness;
        self.staleness_max = self.staleness_max.max(staleness);
        self.staleness_hist[staleness_bucket(staleness)] += 1;
    }

    /// Combines two shards' views of the same rank: counts from the first (every shard sees
    /// every gradient), the longest times and leads.
    pub fn merge(&mut self, other: &WorkerStats) {
        self.max_lead = self.max_lead.max(other.max_lead);
        self.compute_s = self.compute_s.max(other.compute_s);
        self.wait_s = self.wait_s.max(other.wait_s);
        self.not_applied = self.not_applied.max(other.not_applied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_cover_every_staleness() {
        let cases = [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 3),
            (4, 3),
            (5, 4),
            (16, 5),
            (17, 6),
        ];
        for (s, bucket) in cases {
            assert_eq!(staleness_bucket(s), bucket, "staleness {s}");
        }
        assert_eq!(staleness_bucket(33), 7);
        assert_eq!(staleness_bucket(u64::MAX), 7);
        let mut w = WorkerStats::default();
        w.record_applied(10, 0);
        w.record_applied(10, 3);
        assert_eq!(w.staleness_hist[0] + w.staleness_hist[3], 2);
        assert_eq!((w.applied, w.samples, w.staleness_max), (2, 20, 3));
        assert_eq!(w.staleness_mean(), 1.5);
    }
}
