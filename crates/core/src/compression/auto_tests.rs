use super::*;
use crate::compression::{auto_allows_pull, auto_allows_push, PushCodec};

/// The cnn's parameters.
const CNN: usize = 1_199_882;

/// A worker that measured `rate` bytes/s both ways and `compute` seconds per step.
fn measured(rate: f64, compute: f64) -> AutoCodec {
    measure(AutoCodec::new(), rate, compute)
}

/// `auto` after measuring `rate` bytes/s both ways and `compute` seconds per step.
fn measure(mut auto: AutoCodec, rate: f64, compute: f64) -> AutoCodec {
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
    // A 20 ms step, then a link as fast as memory: against it the codecs' CPU is worth more
    // than the hysteresis (at 3 GB/s, whose fp32 transfers take a few ms too, the rungs'
    // 3-5 ms of codecs are within it, and the climb rightly stops there).
    let mut auto = measured(10e6 / 8.0, 0.02);
    let slow = position(auto.choose(CNN));
    for _ in 0..30 {
        let bytes = 4 * CNN as u64;
        auto.received(bytes, bytes as f64 / 3e10);
        auto.sent(bytes, bytes as f64 / 3e10);
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

/// A sync worker among `workers` that measured `mbit` both ways and a 40 ms step.
fn sync_worker(workers: usize, mbit: f64) -> AutoCodec {
    measure(AutoCodec::replaying(workers), mbit * 1e6 / 8.0, 0.04)
}

/// `sync_worker`'s rung once it chose its ladder: after one replayed pull of a push like its
/// own if it waited for one (no peer replays).
fn decided(auto: &mut AutoCodec) -> Rung {
    let first = auto.choose(CNN);
    auto.replayed(first.push.typical_len(CNN) as u64);
    auto.choose(CNN)
}

#[test]
fn a_sync_worker_replays_its_pulls_until_it_has_measured_its_link() {
    let mut auto = AutoCodec::replaying(2);
    assert_eq!(auto.rung(), REPLAY_LADDER[0], "fp32 pushes, replayed pulls");
    auto.computed(0.04);
    assert_eq!(
        auto.choose(CNN),
        REPLAY_LADDER[0],
        "unmeasured: no choice yet"
    );
}

#[test]
fn on_slow_links_a_sync_worker_keeps_replaying_and_on_fast_ones_leaves() {
    let pulls = |mbit: f64| decided(&mut sync_worker(2, mbit));
    // Loopback: nothing to gain from replay's optimizer pass; fp32 both ways (after one
    // replayed pull: the two ladders price within the hysteresis there).
    assert_eq!(pulls(20_000.0), AUTO_LADDER[0]);
    // 100 and 10 Mbit/s: a replayed pull is one top-k push, far less than any difference.
    let fast = pulls(100.0);
    let slow = pulls(10.0);
    for rung in [fast, slow] {
        assert_eq!(rung.pull, PullCodec::Replay, "{rung:?}");
        assert!(matches!(rung.push, PushCodec::TopK { .. }), "{rung:?}");
    }
    let position = |r: Rung| REPLAY_LADDER.iter().position(|x| *x == r).unwrap();
    assert!(position(slow) >= position(fast), "{slow:?} {fast:?}");
    assert_eq!(slow, REPLAY_LADDER[REPLAY_LADDER.len() - 1]);
}

#[test]
fn a_replayed_pull_is_priced_by_the_pushes_of_every_other_worker() {
    // Among 128 workers a replayed pull is 127 pushes: differences cost less.
    let fleet = sync_worker(128, 100.0).choose(CNN);
    assert_ne!(fleet.pull, PullCodec::Replay, "{fleet:?}");
    assert!(AUTO_LADDER.contains(&fleet));
    let two = sync_worker(2, 100.0);
    let many = sync_worker(64, 100.0);
    let rung = REPLAY_LADDER[REPLAY_LADDER.len() - 1];
    assert!(many.cost(&rung, CNN) > two.cost(&rung, CNN));
    // A worker on the difference ladder does not price replay at all.
    assert_eq!(measured(12.5e6, 0.04).cost(&rung, CNN), None);
}

#[test]
fn a_worker_that_left_replay_does_not_come_back() {
    // A fast link at first: the difference ladder, whose pulls leave the optimizer behind.
    let mut auto = sync_worker(2, 20_000.0);
    assert_eq!(decided(&mut auto), AUTO_LADDER[0]);
    // The link turns slow: down the difference ladder, never back to replay (whose first
    // pull would carry the optimizer's whole state).
    for _ in 0..40 {
        let bytes = 4 * CNN as u64;
        auto.received(bytes, bytes as f64 / (10e6 / 8.0));
        auto.sent(bytes, bytes as f64 / (10e6 / 8.0));
    }
    for _ in 0..20 {
        let rung = auto.choose(CNN);
        assert!(AUTO_LADDER.contains(&rung), "{rung:?}");
    }
    assert_ne!(auto.rung(), AUTO_LADDER[0], "it did compress");
}

#[test]
fn replayed_rungs_push_as_the_difference_ladder_does_and_pull_replayed() {
    for r in REPLAY_LADDER {
        assert!(auto_allows_push(r.push), "{r:?}");
        assert_eq!(r.pull, PullCodec::Replay);
    }
    // A shard allows replay from `auto` only in sync runs (`RunPlan::allows_pull`).
    assert!(!auto_allows_pull(PullCodec::Replay));
}

#[test]
fn a_slow_worker_whose_replayed_pulls_bring_large_pushes_leaves_replay() {
    // 10 Mbit/s, two workers: it replays, expecting pulls of one top-k push like its own.
    let mut auto = sync_worker(2, 10.0);
    let rung = auto.choose(CNN);
    assert_eq!(rung.pull, PullCodec::Replay);
    let mut stays = auto.clone();
    // Its pulls turn out to be as small as expected: it stays.
    for _ in 0..10 {
        let bytes = PushCodec::TopK { per_mille: 10 }.typical_len(CNN) as u64;
        stays.replayed(bytes);
        assert_eq!(stays.choose(CNN).pull, PullCodec::Replay);
    }
    // The other worker, on a fast link, pushes `topk:100` (ten times the bytes): after a few
    // such pulls, differences are cheaper, and it leaves replay.
    let large = PushCodec::TopK { per_mille: 100 }.typical_len(CNN) as u64;
    let mut pulls = Vec::new();
    for _ in 0..10 {
        auto.replayed(large);
        pulls.push(auto.choose(CNN).pull);
    }
    assert_eq!(pulls[0], PullCodec::Replay, "not on one pull");
    assert!(pulls[9].is_delta(), "{pulls:?}");
    assert!(AUTO_LADDER.contains(&auto.rung()));
}

#[test]
fn early_large_replayed_pulls_do_not_make_a_worker_leave_once_they_shrink() {
    // A fast peer pushes `topk:100` until its shard tells it this worker replays; then it
    // pushes `topk:10` like this worker: two large pulls, then small ones.
    let mut auto = sync_worker(2, 10.0);
    assert_eq!(auto.choose(CNN).pull, PullCodec::Replay);
    let large = PushCodec::TopK { per_mille: 100 }.typical_len(CNN) as u64;
    let small = PushCodec::TopK { per_mille: 10 }.typical_len(CNN) as u64;
    for bytes in [large, large, small, large, large, small, small, small] {
        auto.replayed(bytes);
        let rung = auto.choose(CNN);
        assert_eq!(
            rung.pull,
            PullCodec::Replay,
            "after a pull of {bytes} bytes"
        );
    }
}

#[test]
fn a_worker_pushes_no_denser_than_its_replaying_peers_chose() {
    // On the difference ladder by its own link (a fleet's worker: replay prices far higher).
    let mut fast = measured(20_000.0 * 1e6 / 8.0, 0.04);
    assert_eq!(fast.choose(CNN), AUTO_LADDER[0]);
    assert_eq!(fast.own_push(), None);
    // A peer replays and chose `topk:10`: this worker's pushes are that peer's pulls.
    fast.peers_replay(Some(PushCodec::TopK { per_mille: 10 }));
    let rung = fast.choose(CNN);
    assert_eq!(rung.push, PushCodec::TopK { per_mille: 10 });
    assert_eq!(rung.pull, PullCodec::Fp32, "its own pulls are its link's");
    assert_eq!(
        fast.own_push(),
        Some(PushCodec::Fp32),
        "what binds its peers"
    );
    // A peer's word picks among the ladder's pushes, no further than its sparsest.
    fast.peers_replay(Some(PushCodec::TopK { per_mille: 1 }));
    assert_eq!(fast.choose(CNN).push, PushCodec::TopK { per_mille: 10 });
    fast.peers_replay(Some(PushCodec::TopK { per_mille: 30 }));
    assert_eq!(fast.choose(CNN).push, PushCodec::TopK { per_mille: 20 });
    // Denser peers bind nothing; nor do peers once none replays.
    fast.peers_replay(Some(PushCodec::Fp32));
    assert_eq!(fast.choose(CNN), AUTO_LADDER[0]);
    fast.peers_replay(None);
    assert_eq!(fast.choose(CNN), AUTO_LADDER[0]);
    assert_eq!(fast.own_push(), None);
    // A replaying worker whose own choice is the sparsest push is not bound.
    let mut slow = sync_worker(2, 10.0);
    let own = slow.choose(CNN);
    assert_eq!(own, REPLAY_LADDER[REPLAY_LADDER.len() - 1]);
    slow.peers_replay(Some(PushCodec::TopK { per_mille: 1 }));
    assert_eq!(slow.choose(CNN), own);
    assert_eq!(slow.own_push(), None);
}

#[test]
fn a_fast_worker_beside_a_slow_replaying_one_waits_a_pull_then_replays_bound() {
    // 1 Gbit/s: differences price a little below replay, within the hysteresis: it
    // replays one more push, as sparse as replay goes, to hear of its peers first.
    let mut fast = sync_worker(2, 1_000.0);
    let first = fast.choose(CNN);
    assert_eq!(first, REPLAY_LADDER[REPLAY_LADDER.len() - 1]);
    // Its peers are told what its link chose, not that sparse push: a fast peer putting
    // off its own choice is not bound by it.
    let own = fast.own_push().unwrap();
    assert!(
        own.typical_len(CNN) > first.push.typical_len(CNN),
        "{own:?}"
    );
    // Its first replayed pull brings the slow peer's `topk:10` push, and the shard's word.
    let sparse = PushCodec::TopK { per_mille: 10 };
    let mut alone = fast.clone();
    fast.peers_replay(Some(sparse));
    for _ in 0..20 {
        fast.replayed(sparse.typical_len(CNN) as u64);
        let rung = fast.choose(CNN);
        assert_eq!((rung.push, rung.pull), (sparse, PullCodec::Replay));
        assert_eq!(fast.own_push().map(|p| p != sparse), Some(true));
    }
    // Beside a fast peer (its pull brings that peer's `topk:100` push, and no word of a
    // replaying peer) it takes differences, as its link prices.
    alone.replayed(PushCodec::TopK { per_mille: 100 }.typical_len(CNN) as u64);
    let rung = alone.choose(CNN);
    assert!(AUTO_LADDER.contains(&rung), "{rung:?}");
}

#[test]
fn a_worker_waits_a_replayed_pull_once_at_most() {
    let mut fast = sync_worker(2, 1_000.0);
    assert_eq!(fast.choose(CNN).pull, PullCodec::Replay);
    // Its pull came whole (no replayed updates): it chooses now all the same.
    let rung = fast.choose(CNN);
    assert!(AUTO_LADDER.contains(&rung), "{rung:?}");
}

/// `auto` that saw its top-k pushes code to 0.65 of their size before the entropy stage,
/// top-k differences to 0.8 and ternary ones to 0.32 (about what the cnn's did).
fn seen_coded(mut auto: AutoCodec) -> AutoCodec {
    let push = PushCodec::TopK { per_mille: 100 };
    auto.pushed(push, (0.65 * push.typical_len(CNN) as f64) as u64, CNN);
    for (pull, share) in [
        (PullCodec::DeltaTopK { per_mille: 5 }, 0.8),
        (PullCodec::DeltaTernary, 0.32),
    ] {
        auto.pulled(
            pull,
            (share * pull.typical_delta_len(CNN) as f64) as u64,
            CNN,
        );
    }
    auto
}

#[test]
fn payloads_the_entropy_stage_shrinks_are_priced_as_they_went() {
    // Each rate: the rung chosen before and after seeing what coding left; never sparser
    // after, and denser at some rate between 10 and 100 Mbit/s.
    let mut denser = 0;
    for mbit in [10.0, 15.0, 20.0, 30.0, 50.0, 70.0, 100.0] {
        let rate = mbit * 1e6 / 8.0;
        let before = position(measured_overlapped(rate, 0.035).choose(CNN));
        let after = position(seen_coded(measured_overlapped(rate, 0.035)).choose(CNN));
        assert!(after <= before, "{mbit} Mbit/s: rung {before} -> {after}");
        denser += usize::from(after < before);
    }
    assert!(denser > 0, "coding made no rung affordable");
    // A ternary pull that coded to a third is priced at a third.
    let mut auto = measured(1e7, 0.035);
    let rung = AUTO_LADDER[3];
    let full = auto.cost(&rung, CNN).unwrap();
    auto = seen_coded(auto);
    assert!(auto.cost(&rung, CNN).unwrap() < full);
}
