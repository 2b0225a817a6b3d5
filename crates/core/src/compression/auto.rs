//! `auto`: each worker picks its codecs from its own link. It measures the link as it runs
//! (the bytes and seconds of every pull it receives and of every push, as the shard timed its
//! arrival) and its own compute time per step, and before each push takes the rung of
//! `AUTO_LADDER` with the least expected time per useful update:
//!
//! `cost(rung) = updates_cost × (compute + push bytes / up rate + pull bytes / down rate +
//! encoding)`
//!
//! or, for a worker that pushes and pulls while it computes (`--overlap`), `updates_cost ×
//! max(compute, link + encoding)`: there the link is free up to the compute it hides behind.
//!
//! where `updates_cost` is how many updates the rung needs for the accuracy fp32 reaches in
//! one (measured on the cnn, docs/edge-links.md). A fast link keeps fp32 (its link time is
//! small against compute); a slow one moves down the ladder until the link stops dominating.
//! Rates are windowed as bytes over seconds (not a mean of rates), so one transfer timed near
//! zero (already buffered when read) cannot make a link look infinitely fast.

use super::{PullCodec, PushCodec};

/// One choice of `auto`: a push codec, a pull codec, and the updates it needs relative to
/// fp32 for the same accuracy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rung {
    pub push: PushCodec,
    pub pull: PullCodec,
    pub updates_cost: f64,
    /// Nanoseconds per value its encoding and decoding cost the shard and the worker
    /// together, per push and pull (the sum of `pstrain bench-net`'s codec rows on this
    /// project's 2-core machines; an estimate elsewhere, which only matters on fast links).
    pub codec_ns_per_value: f64,
}

/// From least to most compressed. The costs: int8 pushes are unbiased and delta pulls carry
/// their error to the next pull, so the first rungs train as fp32 does (measured: the same
/// updates to 98.5% within noise); top-k needs more updates the sparser it is (Adam
/// normalises each coordinate's step, and a delta pull leaves the worker's copy of the
/// coordinates it did not send behind): the means of the sittings in docs/edge-links.md
/// (updates for 98.5% held, against fp32's in the same sitting). Rung 6's is an estimate.
/// Rung 3's pull, ternary differences, leaves no weight behind by more than what moved since
/// the last pull, and measured as few updates as fp32's (docs/edge-links.md, thirteenth
/// sitting); 1.05 prices it like the int8 rungs.
/// The codec costs are the sums of `pstrain bench-net`'s codec rows for the cnn.
pub const AUTO_LADDER: [Rung; 8] = [
    Rung {
        push: PushCodec::Fp32,
        pull: PullCodec::Fp32,
        codec_ns_per_value: 0.0,
        updates_cost: 1.0,
    },
    Rung {
        push: PushCodec::Int8,
        pull: PullCodec::DeltaInt8,
        codec_ns_per_value: 6.5,
        updates_cost: 1.02,
    },
    Rung {
        push: PushCodec::Int8,
        pull: PullCodec::DeltaTopK { per_mille: 20 },
        codec_ns_per_value: 5.5,
        updates_cost: 1.05,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 100 },
        pull: PullCodec::DeltaTernary,
        codec_ns_per_value: 5.2,
        updates_cost: 1.05,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 100 },
        pull: PullCodec::DeltaTopK { per_mille: 50 },
        codec_ns_per_value: 6.5,
        updates_cost: 1.25,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 50 },
        pull: PullCodec::DeltaTopK { per_mille: 20 },
        codec_ns_per_value: 5.9,
        updates_cost: 1.4,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 20 },
        pull: PullCodec::DeltaTopK { per_mille: 5 },
        codec_ns_per_value: 5.3,
        updates_cost: 1.5,
    },
    Rung {
        push: PushCodec::TopK { per_mille: 10 },
        pull: PullCodec::DeltaTopK { per_mille: 5 },
        codec_ns_per_value: 5.2,
        updates_cost: 2.0,
    },
];

/// Whether `auto` may push with `codec` (a shard refuses any other).
pub fn auto_allows_push(codec: PushCodec) -> bool {
    AUTO_LADDER.iter().any(|r| r.push == codec)
}

/// Whether `auto` may ask for pulls in `codec`.
pub fn auto_allows_pull(codec: PullCodec) -> bool {
    AUTO_LADDER.iter().any(|r| r.pull == codec)
}

/// Transfers smaller than this say more about latency than rate: not counted.
const MIN_SAMPLE_BYTES: u64 = 16 * 1024;
/// How much of the window each new sample replaces.
const WINDOW_WEIGHT: f64 = 0.25;
/// A less-compressed rung must beat the current one by this factor before the worker moves
/// (measurements are noisy; flapping costs the shard's delta replica its whole slice).
const HYSTERESIS: f64 = 0.9;
/// Pushes at a rung before the worker may move to a less-compressed one, one rung at a time.
/// A shaper's token bucket lets a transfer smaller than its burst through at line rate, so a
/// link measured with small payloads looks faster than it is for bigger ones; climbing a
/// rung at a time lets the next rung's own transfers show the rate it really gets (straight
/// to the rung the small ones priced, a 10 Mbit/s link went from 25 KB pushes to 1.2 MB ones
/// of a second each and back, again and again).
const PUSHES_BEFORE_CLIMBING: u32 = 10;

/// A rate as a window of bytes over seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    bytes: f64,
    seconds: f64,
}

impl Window {
    fn add(&mut self, bytes: u64, seconds: f64) {
        if bytes < MIN_SAMPLE_BYTES || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if self.bytes == 0.0 {
            (self.bytes, self.seconds) = (bytes as f64, seconds);
        } else {
            self.bytes += WINDOW_WEIGHT * (bytes as f64 - self.bytes);
            self.seconds += WINDOW_WEIGHT * (seconds - self.seconds);
        }
    }

    /// Bytes per second, if measured (a window of zero seconds: no link to speak of).
    fn rate(&self) -> Option<f64> {
        (self.bytes > 0.0).then(|| self.bytes / self.seconds.max(1e-9))
    }
}

/// One worker's view of one shard link, and its choice.
#[derive(Debug, Clone, Default)]
pub struct AutoCodec {
    up: Window,
    down: Window,
    /// Seconds per step computing (a moving mean).
    compute_s: Option<f64>,
    /// The worker computes while this link carries its last push and the next pull.
    overlapped: bool,
    rung: usize,
    /// Pushes since the rung last changed.
    at_rung: u32,
}

impl AutoCodec {
    pub fn new() -> Self {
        AutoCodec::default()
    }

    /// A push of `bytes` took `seconds` to arrive (as its shard timed it).
    pub fn sent(&mut self, bytes: u64, seconds: f64) {
        self.up.add(bytes, seconds);
    }

    /// A pull of `bytes` took `seconds` to arrive, first byte to last.
    pub fn received(&mut self, bytes: u64, seconds: f64) {
        self.down.add(bytes, seconds);
    }

    /// A step computed in `seconds`.
    pub fn computed(&mut self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        self.compute_s = Some(match self.compute_s {
            None => seconds,
            Some(c) => c + WINDOW_WEIGHT * (seconds - c),
        });
    }

    /// A step computed in `seconds` while the link carried the last push and a pull.
    pub fn computed_beside(&mut self, seconds: f64) {
        self.overlapped = true;
        self.computed(seconds);
    }

    /// The rung in use.
    pub fn rung(&self) -> Rung {
        AUTO_LADDER[self.rung]
    }

    /// The expected seconds per useful update at `rung` for a slice of `values`, once both
    /// directions are measured (an unmeasured uplink is taken to match the downlink).
    pub fn cost(&self, rung: &Rung, values: usize) -> Option<f64> {
        let down = self.down.rate()?;
        let up = self.up.rate().unwrap_or(down);
        // A delta pull's steady size (the first pull of a connection is whole).
        let pull = if rung.pull.is_delta() {
            rung.pull.typical_delta_len(values)
        } else {
            rung.pull.encoded_len(values)
        };
        let link = rung.push.typical_len(values) as f64 / up + pull as f64 / down;
        let codec = rung.codec_ns_per_value * 1e-9 * values as f64;
        let compute = self.compute_s.unwrap_or(0.0);
        let round = if self.overlapped {
            compute.max(link + codec)
        } else {
            compute + link + codec
        };
        Some(rung.updates_cost * round)
    }

    /// Picks the rung for the next push of a slice of `values` and returns it. Until the
    /// link is measured (the first pull), fp32.
    pub fn choose(&mut self, values: usize) -> Rung {
        let costs = AUTO_LADDER.map(|r| self.cost(&r, values));
        let Some(current) = costs[self.rung] else {
            return self.rung();
        };
        let (best, best_cost) = costs
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.map(|c| (i, c)))
            .fold(
                (self.rung, current),
                |acc, (i, c)| if c < acc.1 { (i, c) } else { acc },
            );
        let next = if best > self.rung {
            // More compressed at once: a link too slow costs every push.
            best
        } else if best < self.rung
            && best_cost < HYSTERESIS * current
            && self.at_rung >= PUSHES_BEFORE_CLIMBING
        {
            self.rung - 1
        } else {
            self.rung
        };
        if next == self.rung {
            self.at_rung = self.at_rung.saturating_add(1);
        } else {
            (self.rung, self.at_rung) = (next, 0);
        }
        self.rung()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cnn's parameters.
    const CNN: usize = 1_199_882;

    /// A worker that measured `rate` bytes/s both ways and `compute` seconds per step.
    fn measured(rate: f64, compute: f64) -> AutoCodec {
        let mut auto = AutoCodec::new();
        for _ in 0..8 {
            let bytes = 4 * CNN as u64;
            auto.received(bytes, bytes as f64 / rate);
            auto.sent(bytes, bytes as f64 / rate);
            auto.computed(compute);
        }
        auto
    }

    /// `measured`, but the worker computes while the link pushes and pulls.
    fn measured_overlapped(rate: f64, compute: f64) -> AutoCodec {
        let mut auto = measured(rate, compute);
        auto.computed_beside(compute);
        auto
    }

    fn position(rung: Rung) -> usize {
        AUTO_LADDER.iter().position(|r| *r == rung).unwrap()
    }

    #[test]
    fn an_overlapped_worker_pays_for_the_link_only_past_its_compute() {
        let gbit = 1000.0 * 1e6 / 8.0;
        // 4.8 MB each way at 1 Gbit/s is about as long as the step: hidden behind it.
        assert_eq!(position(measured_overlapped(gbit, 0.08).choose(CNN)), 0);
        assert!(
            position(measured(gbit, 0.08).choose(CNN)) > 0,
            "serial: sums"
        );
        // On 100 Mbit/s the overlapped worker still compresses, but stops at the rung whose
        // link fits in its compute rather than the one that sends least (which needs more
        // updates): a worker that measured only what its compute left over (the gap from a
        // pull to a push under overlap) went to the last rung.
        let fast = 100.0 * 1e6 / 8.0;
        let rung = position(measured_overlapped(fast, 0.08).choose(CNN));
        assert!((1..AUTO_LADDER.len() - 2).contains(&rung), "rung {rung}");
        // There the ternary pull (0.26 MB) fits the step beside a top-k push, and costs
        // fewer updates than a top-k pull.
        assert_eq!(AUTO_LADDER[rung].pull, PullCodec::DeltaTernary);
        let slow = position(measured_overlapped(10e6 / 8.0, 0.08).choose(CNN));
        assert!(slow > rung, "10 Mbit/s: rung {slow}");
        let serial = position(measured(fast, 0.002).choose(CNN));
        assert!(serial >= AUTO_LADDER.len() - 2, "rung {serial}");
    }

    #[test]
    fn a_fast_link_keeps_fp32_and_slower_ones_move_down_the_ladder() {
        let rung_at = |mbit: f64| position(measured(mbit * 1e6 / 8.0, 0.05).choose(CNN));
        assert_eq!(rung_at(20_000.0), 0, "loopback");
        let (lan, fast, slow) = (rung_at(1000.0), rung_at(100.0), rung_at(10.0));
        let slowest = rung_at(2.0);
        assert!(
            lan <= fast && fast <= slow && slow <= slowest,
            "{lan} {fast} {slow} {slowest}"
        );
        assert!(fast >= 2, "100 Mbit/s compresses: rung {fast}");
        assert!(slow >= AUTO_LADDER.len() - 2, "10 Mbit/s: rung {slow}");
        assert_eq!(
            slowest,
            AUTO_LADDER.len() - 1,
            "2 Mbit/s: the most compressed"
        );
    }

    #[test]
    fn before_the_link_is_measured_it_is_fp32() {
        let mut auto = AutoCodec::new();
        auto.computed(0.05);
        assert_eq!(auto.choose(CNN), AUTO_LADDER[0]);
        // Small transfers say nothing about the rate.
        auto.received(100, 1.0);
        assert_eq!(auto.choose(CNN), AUTO_LADDER[0]);
    }

    #[test]
    fn a_transfer_timed_near_zero_does_not_make_a_slow_link_look_fast() {
        let mut auto = measured(10e6 / 8.0, 0.05);
        let slow = auto.choose(CNN);
        auto.received(4 * CNN as u64, 0.0);
        assert_eq!(auto.choose(CNN), slow, "one buffered read moves nothing");
    }

    #[test]
    fn a_link_that_speeds_up_is_followed_back_up_the_ladder_a_rung_at_a_time() {
        // A 20 ms step: against it the codecs' CPU is worth more than the hysteresis on a
        // fast link (against a 50 ms one, ternary pulls' few ms are within it, and the
        // climb rightly stops there).
        let mut auto = measured(10e6 / 8.0, 0.02);
        let slow = position(auto.choose(CNN));
        for _ in 0..30 {
            let bytes = 4 * CNN as u64;
            auto.received(bytes, bytes as f64 / 3e9);
            auto.sent(bytes, bytes as f64 / 3e9);
        }
        let mut path = vec![slow];
        for _ in 0..(PUSHES_BEFORE_CLIMBING as usize + 1) * AUTO_LADDER.len() {
            let rung = position(auto.choose(CNN));
            if path.last() != Some(&rung) {
                path.push(rung);
            }
        }
        let expected: Vec<usize> = (0..=slow).rev().collect();
        assert_eq!(path, expected, "one rung at a time, up to fp32");
    }

    #[test]
    fn small_transfers_through_a_token_bucket_do_not_send_it_up_the_ladder_at_once() {
        // 10 Mbit/s, but every transfer of the last rung fits a shaper's burst and arrives at
        // line rate: the link looks like 1 Gbit/s for them.
        let mut auto = measured_overlapped(10e6 / 8.0, 0.045);
        let last = position(auto.choose(CNN));
        for _ in 0..40 {
            auto.received(20_000, 20_000.0 / 125e6);
            auto.sent(30_000, 30_000.0 / 125e6);
            auto.computed_beside(0.045);
        }
        let rungs: Vec<usize> = (0..PUSHES_BEFORE_CLIMBING as usize + 2)
            .map(|_| position(auto.choose(CNN)))
            .collect();
        assert!(
            rungs.iter().all(|&r| r + 1 >= last),
            "at most one rung up: {rungs:?} from {last}"
        );
    }

    #[test]
    fn every_rung_is_allowed_and_nothing_else() {
        for r in AUTO_LADDER {
            assert!(auto_allows_push(r.push) && auto_allows_pull(r.pull));
        }
        assert!(!auto_allows_push(PushCodec::Bf16));
        assert!(!auto_allows_pull(PullCodec::Bf16));
        assert!(!auto_allows_push(PushCodec::TopK { per_mille: 7 }));
    }
}
