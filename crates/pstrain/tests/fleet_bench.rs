//! `pstrain bench-fleet` measures what it says on a small fleet, async and sync: gradients
//! applied by every worker, the shard's CPU and memory, latencies, and in sync how long each
//! step waited for its last gradient.

mod common;

use pstrain::bench::fleet::{markdown, run_fleet_bench, FleetConfig};
use std::path::PathBuf;

fn bench(sync: bool) {
    let _guard = common::one_at_a_time();
    let cfg = FleetConfig {
        exe: PathBuf::from(common::pstrain_bin()),
        worker_counts: vec![1, 4],
        model: "convnet".into(),
        sync,
        seconds: 0.5,
    };
    let points = run_fleet_bench(&cfg, &mut |_| {}).unwrap();
    println!("{}", markdown(&points));
    assert_eq!(points.len(), 2);
    for p in &points {
        assert!(p.gradients_applied > 0, "{p:?}");
        assert!(p.shard_cpu_ms_per_gradient > 0.0, "{p:?}");
        assert!(p.shard_rss_idle_mb > 0.0, "{p:?}");
        assert!(
            p.pull_p50_ms > 0.0 && p.pull_p99_ms >= p.pull_p50_ms,
            "{p:?}"
        );
        // Every worker was served.
        assert!(p.applied_min_over_mean > 0.0, "{p:?}");
        assert_eq!(p.step_wait_p50_ms.is_some(), sync, "{p:?}");
    }
    if sync {
        // In lockstep every worker applies one gradient per step.
        let four = &points[1];
        assert!(
            four.applied_max_over_mean - four.applied_min_over_mean < 0.05,
            "{four:?}"
        );
        assert!(four.step_wait_p99_ms >= four.step_wait_p50_ms);
    }
}

#[test]
fn bench_fleet_measures_an_async_shard() {
    bench(false);
}

#[test]
fn bench_fleet_measures_a_sync_shard_and_its_step_waits() {
    bench(true);
}
