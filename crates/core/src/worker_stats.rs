//! What a shard saw of each worker: gradients, staleness (with a histogram), how far ahead
//! of the shard it ran, and where its time went (computing, or waiting at the pull gate).

use crate::worker_field::{worker_numbers, Exported, Merge, WorkerField, WorkerNumber};

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

worker_numbers! {
    /// One worker rank, as one shard saw it. A new per-worker number is one row here (its
    /// description for every surface) plus the line in the engine that counts it.
    pub struct WorkerStats {
        /// Gradients that went into an update (or a pending sync/SSP step).
        applied: u64 {
            name: "gradients_applied",
            title: Some("applied"),
            prometheus: Exported::counter(
                "pstrain_worker_gradients_applied",
                "A worker's gradients that went into an update",
            ),
            merge: Merge::First,
        }
        /// Gradients not used: stale, late, refused or not finite.
        not_applied: u64 {
            name: "not_applied",
            title: Some("not used"),
            prometheus: Exported::counter(
                "pstrain_worker_gradients_not_applied",
                "A worker's gradients not used (stale, late, refused)",
            ),
            merge: Merge::Max,
        }
        /// Samples behind its applied gradients.
        samples: u64 {
            name: "samples",
            title: None,
            prometheus: None,
            merge: Merge::First,
        }
        /// Staleness summed over its applied gradients (the histogram's sum).
        staleness_sum: u64 {
            name: "staleness_sum",
            title: None,
            prometheus: None,
            merge: Merge::First,
        }
        staleness_max: u64 {
            name: "staleness_max",
            title: Some("staleness max"),
            prometheus: None,
            merge: Merge::First,
        }
        /// SSP: the most steps this rank's gradient was ahead of the shard's version.
        max_lead: u64 {
            name: "max_lead",
            title: Some("lead"),
            prometheus: Exported::gauge(
                "pstrain_worker_lead_max_steps",
                "SSP: the most steps the worker ran ahead of the shard",
            ),
            merge: Merge::Max,
        }
        /// Seconds between the shard serving the rank weights and its next gradient arriving:
        /// its compute time (and any network time), not its waits.
        compute_s: f64 {
            name: "compute_s",
            title: Some("compute s"),
            prometheus: Exported::counter(
                "pstrain_worker_compute_seconds",
                "Time from serving a worker weights to its gradient arriving",
            ),
            merge: Merge::Max,
        }
        /// Seconds its pulls spent waiting at the consistency gate (a barrier or the bound).
        wait_s: f64 {
            name: "wait_s",
            title: Some("wait s"),
            prometheus: Exported::counter(
                "pstrain_worker_wait_seconds",
                "Time a worker's pulls waited at a barrier or the staleness bound",
            ),
            merge: Merge::Max,
        }
        /// Samples in its latest gradient (with speed-balanced sync, the size it was given).
        batch: u32 {
            name: "batch",
            title: Some("batch"),
            prometheus: Exported::gauge(
                "pstrain_worker_batch_samples",
                "Samples in the worker's latest gradient",
            ),
            merge: Merge::First,
        }
    }
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

    /// Combines two shards' views of the same rank, each number by its `Merge` rule: counts
    /// from the first (every shard sees every gradient), the longest times and leads.
    pub fn merge(&mut self, other: &WorkerStats) {
        for field in WORKER_FIELDS {
            field.merge_into(self, other);
        }
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

    #[test]
    fn every_field_travels_and_merges_by_its_rule() {
        let mut names: Vec<&str> = WORKER_FIELDS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), WORKER_FIELDS.len(), "field names repeat");
        let a = WorkerStats {
            applied: 7,
            not_applied: 1,
            max_lead: 2,
            compute_s: 1.5,
            wait_s: 0.25,
            batch: 32,
            ..Default::default()
        };
        let b = WorkerStats {
            applied: 9,
            not_applied: 3,
            max_lead: 1,
            compute_s: 2.5,
            wait_s: 0.125,
            batch: 16,
            ..Default::default()
        };
        let mut copy = WorkerStats::default();
        for f in WORKER_FIELDS {
            (f.set)(&mut copy, (f.get)(&a).to_raw());
        }
        copy.staleness_hist = a.staleness_hist;
        assert_eq!(copy, a);
        let mut merged = a;
        merged.merge(&b);
        assert_eq!(
            (
                merged.applied,
                merged.batch,
                merged.not_applied,
                merged.max_lead
            ),
            (7, 32, 3, 2)
        );
        assert_eq!((merged.compute_s, merged.wait_s), (2.5, 0.25));
    }
}
