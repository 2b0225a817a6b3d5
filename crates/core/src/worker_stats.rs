//! What a shard saw of each worker: gradients, staleness (with a histogram), how far ahead
//! of the shard it ran, where its time went (computing, on its link, or waiting at the pull
//! gate) and the bytes its link carried each way.

use crate::compression::{CodecPair, PullCodec, PushCodec};
use crate::worker_field::{worker_numbers, Bytes, Exported, Merge, WorkerField, WorkerNumber};

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
        /// its compute time and its link's (`pull_link_s`, `push_link_s`), not its waits.
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
        /// Bytes of its pushes as they crossed its link (encoded: after compression).
        push_bytes: Bytes {
            name: "push_bytes",
            title: Some("MB up"),
            prometheus: Exported::counter(
                "pstrain_worker_push_bytes",
                "Bytes of a worker's pushes as sent (after compression)",
            ),
            merge: Merge::Sum,
        }
        /// Bytes of the weights sent to it (encoded).
        pull_bytes: Bytes {
            name: "pull_bytes",
            title: Some("MB down"),
            prometheus: Exported::counter(
                "pstrain_worker_pull_bytes",
                "Bytes of weights sent to a worker (after compression)",
            ),
            merge: Merge::Sum,
        }
        /// Seconds its pushes took to arrive, first byte to last (measured by the shard; over
        /// TCP only): its time sending.
        push_link_s: f64 {
            name: "push_link_s",
            title: Some("up s"),
            prometheus: Exported::counter(
                "pstrain_worker_push_link_seconds",
                "Time a worker's pushes took to arrive, first byte to last",
            ),
            merge: Merge::Max,
        }
        /// Seconds it took to receive the weights, first byte to last (as the worker reports
        /// it with its next push; over TCP only): its time receiving.
        pull_link_s: f64 {
            name: "pull_link_s",
            title: Some("down s"),
            prometheus: Exported::counter(
                "pstrain_worker_pull_link_seconds",
                "Time a worker took to receive its weights, first byte to last (reported)",
            ),
            merge: Merge::Max,
        }
        /// The codecs its link used last (its latest push's, its latest pull's): the run's,
        /// or under `auto` its own pick.
        codecs: CodecPair {
            name: "codecs",
            title: Some("codecs"),
            prometheus: None,
            merge: Merge::First,
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

/// What a worker's link carried in one exchange, as the transport measured it (TCP only:
/// the in-process transport has no link).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkUse {
    pub push_bytes: u64,
    pub pull_bytes: u64,
    /// Measured by the shard.
    pub push_s: f64,
    /// Reported by the worker: believed only when finite and at most `MAX_REPORTED_S`.
    pub pull_s: f64,
    /// The codec of the push, or of the pull, this use was.
    pub push_codec: Option<PushCodec>,
    pub pull_codec: Option<PullCodec>,
}

/// The longest link time one report may add (a worker's word moves only its own record).
pub const MAX_REPORTED_S: f64 = 3600.0;

impl WorkerStats {
    /// Adds what the worker's link carried.
    pub fn add_link(&mut self, link: LinkUse) {
        self.push_bytes.0 = self.push_bytes.0.saturating_add(link.push_bytes);
        self.pull_bytes.0 = self.pull_bytes.0.saturating_add(link.pull_bytes);
        let seconds = |s: f64| {
            if (0.0..=MAX_REPORTED_S).contains(&s) {
                s
            } else {
                0.0
            }
        };
        self.push_link_s += seconds(link.push_s);
        self.pull_link_s += seconds(link.pull_s);
        if link.push_codec.is_some() {
            self.codecs.push = link.push_codec;
        }
        if link.pull_codec.is_some() {
            self.codecs.pull = link.pull_codec;
        }
    }

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
        let (mut a, mut b) = (a, b);
        a.add_link(LinkUse {
            push_bytes: 100,
            pull_bytes: 40,
            push_s: 0.5,
            pull_s: f64::NAN,
            push_codec: Some(PushCodec::Int8),
            pull_codec: None,
        });
        b.add_link(LinkUse {
            push_bytes: 50,
            pull_bytes: 20,
            push_s: 0.25,
            pull_s: 1.0e9,
            push_codec: Some(PushCodec::Fp32),
            pull_codec: Some(PullCodec::Fp32),
        });
        b.add_link(LinkUse {
            pull_s: 0.75,
            ..Default::default()
        });
        a.add_link(LinkUse {
            pull_codec: Some(PullCodec::DeltaTopK { per_mille: 20 }),
            ..Default::default()
        });
        // The latest of each side stands; shard 0's record speaks for the rank.
        assert_eq!(a.codecs.to_string(), "int8 / delta-topk:20");
        let mut merged = a;
        merged.merge(&b);
        // Bytes add up over the shards; link times are the longest; a reported time that is
        // not finite or beyond an hour adds nothing.
        assert_eq!(
            (merged.push_bytes, merged.pull_bytes),
            (Bytes(150), Bytes(60))
        );
        assert_eq!((merged.push_link_s, merged.pull_link_s), (0.5, 0.75));
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
        assert_eq!(merged.codecs, a.codecs);
    }
}
