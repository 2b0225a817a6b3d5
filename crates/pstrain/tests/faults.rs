//! Real processes killed with SIGKILL mid-training: a worker in async mode, a worker in sync
//! mode with and without backup workers, and a server shard restarted from its checkpoint.
//! Every run must finish within its time bound and still reach the accuracy threshold.

mod common;

use pstrain::launch::cluster::{train_tcp, ClusterConfig, Fault};
use pstrain::run::CheckpointPolicy;
use pstrain::{Quiet, RunPlan, ScheduleKind, TrainConfig, TrainOutcome};
use pstrain_compute::ModelKind;
use pstrain_core::{Mode, OptimizerConfig};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Runs the cluster on another thread and fails the test if it takes longer than `bound`.
fn run_bounded(cfg: TrainConfig, cluster: ClusterConfig, bound: Duration) -> TrainOutcome {
    let _guard = common::one_at_a_time();
    let data = common::mnist();
    let outcome = common::within(bound, move || {
        train_tcp(&cfg, &cluster, data, &mut Quiet, &AtomicBool::new(false))
    })
    .unwrap();
    println!("{}", outcome.summary.render());
    outcome
}

fn cluster(shards: usize, faults: Vec<Fault>) -> ClusterConfig {
    let mut c = ClusterConfig::local(
        PathBuf::from(common::pstrain_bin()),
        shards,
        common::mnist_dir(),
    );
    c.faults = faults;
    c
}

/// The small model for long enough (a few seconds over TCP) that faults land mid-run.
fn convnet(mode: Mode, workers: usize, iterations: u64) -> TrainConfig {
    TrainConfig {
        plan: RunPlan {
            mode,
            workers,
            model: ModelKind::Convnet.name().into(),
            iterations: Some(iterations),
            batch_size: 128,
            optimizer: OptimizerConfig::sgd(0.01),
            schedule: ScheduleKind::Constant,
            ..RunPlan::default()
        },
        eval_every: Some(0),
        ..TrainConfig::default()
    }
}

const BOUND: Duration = Duration::from_secs(120);

/// Runs `cfg` over `shards` shards with one fault, and checks that it reached its update
/// budget (the survivors carry it) and the accuracy threshold.
fn survives(
    cfg: TrainConfig,
    shards: usize,
    fault: Fault,
    tune: impl FnOnce(&mut ClusterConfig),
) -> pstrain::report::records::Summary {
    let budget = cfg.plan.iterations;
    let mut c = cluster(shards, vec![fault]);
    tune(&mut c);
    let out = run_bounded(cfg, c, BOUND);
    assert_eq!(
        Some(out.summary.updates),
        budget,
        "the run reached its budget"
    );
    assert!(
        out.summary.test_accuracy >= 0.85,
        "{}",
        out.summary.test_accuracy
    );
    out.summary
}

fn kill(rank: usize, at_update: u64, restart_after: Option<Duration>) -> Fault {
    Fault::KillWorker {
        rank,
        at_update,
        restart_after,
    }
}

#[test]
fn async_run_survives_a_killed_worker() {
    let cfg = convnet(
        Mode::Async {
            max_staleness: Some(32),
        },
        2,
        3000,
    );
    survives(cfg, 2, kill(1, 400, None), |_| {});
}

#[test]
fn sync_run_without_backups_survives_a_killed_worker() {
    // The barrier moves on without the dead worker.
    survives(
        convnet(Mode::Sync { backup_workers: 0 }, 2, 1500),
        2,
        kill(0, 300, None),
        |_| {},
    );
}

#[test]
fn sync_run_with_a_backup_worker_survives_a_killed_worker() {
    // Two shards: shard 0 decides each step's members and shard 1 applies exactly those, so
    // the shards stay in lockstep (their final checkpoints hold the same version).
    let dir = tempfile::tempdir().unwrap();
    survives(
        convnet(Mode::Sync { backup_workers: 1 }, 3, 1500),
        2,
        kill(2, 300, None),
        |c| {
            c.checkpoint = Some(CheckpointPolicy {
                run_id: "test-run".into(),
                dir: dir.path().to_owned(),
                every_updates: None,
                every: None,
                keep: 1,
                resume: false,
                key: None,
            })
        },
    );
    let versions = pstrain_store::assemble(dir.path(), None).unwrap().versions;
    assert_eq!(versions, vec![1500, 1500], "the shards drifted apart");
}

#[test]
fn a_restarted_sync_worker_rejoins_with_its_rank() {
    let restart = Some(Duration::from_millis(300));
    survives(
        convnet(Mode::Sync { backup_workers: 0 }, 2, 1500),
        2,
        kill(1, 300, restart),
        |_| {},
    );
}

#[test]
fn a_replacement_worker_started_with_rank_auto_takes_the_vacated_rank() {
    // The new process does not know which worker died: `--rank auto`. The launcher checks
    // that its report says it ran as rank 1.
    let replace = Fault::ReplaceWorker {
        rank: 1,
        at_update: 300,
        after: Duration::from_millis(300),
    };
    survives(
        convnet(Mode::Sync { backup_workers: 0 }, 2, 1500),
        2,
        replace,
        |_| {},
    );
}

#[test]
fn a_frozen_sync_worker_is_dropped_when_its_heartbeats_stop() {
    // SIGSTOP keeps the sockets open: only the missing heartbeats (2 s here) tell the shards.
    let freeze = Fault::FreezeWorker {
        rank: 1,
        at_update: 300,
    };
    let summary = survives(
        convnet(Mode::Sync { backup_workers: 0 }, 2, 1500),
        2,
        freeze,
        |c| {
            c.heartbeat_timeout = Some(Duration::from_secs(2));
        },
    );
    // Without heartbeats the shards would have waited out the 120 s idle deadline.
    assert!(summary.wall_time_s < 60.0, "{}", summary.wall_time_s);
}

#[test]
fn a_killed_shard_restarts_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(
        2,
        vec![Fault::KillShard {
            shard: 1,
            at_update: 400,
            down_for: Duration::from_millis(500),
        }],
    );
    c.checkpoint = Some(CheckpointPolicy {
        run_id: "test-run".into(),
        dir: dir.path().to_owned(),
        every_updates: Some(50),
        every: None,
        keep: 3,
        resume: true,
        key: None,
    });
    let cfg = convnet(Mode::Sync { backup_workers: 0 }, 2, 1500);
    let out = run_bounded(cfg, c, BOUND);
    assert!(
        out.summary.test_accuracy >= 0.85,
        "{}",
        out.summary.test_accuracy
    );
    // Both shards checkpointed their final state. The restarted shard went back to its last
    // checkpoint and then stepped in lockstep with the other; the workers go on until every
    // shard reached the budget, so the gap closes. In any case it is never more than the
    // updates it lost: at most the checkpoint interval (50), plus the steps in flight.
    let assembled = pstrain_store::assemble(dir.path(), None).unwrap();
    let v = &assembled.versions;
    assert_eq!(v.len(), 2);
    assert_eq!(v.iter().max(), Some(&1500), "{v:?}");
    assert!(
        v[0].abs_diff(v[1]) <= 50 + 2,
        "lost updates beyond the checkpoint interval: {v:?}"
    );
}

#[test]
fn a_worker_that_crashes_is_started_again_by_the_launcher() {
    // Unannounced SIGKILL of worker 1 in sync mode: the launcher finds it failed, starts it
    // again with its rank, and the run reaches its budget and the threshold.
    let crash = Fault::CrashWorker {
        rank: 1,
        at_update: 150,
    };
    survives(
        convnet(Mode::Sync { backup_workers: 0 }, 2, 600),
        1,
        crash,
        |_| {},
    );
    // With no restarts allowed, the same crash ends the run with the worker's status.
    let mut c = cluster(1, vec![crash]);
    c.worker_restarts = 0;
    let _guard = common::one_at_a_time();
    let cfg = convnet(
        Mode::Async {
            max_staleness: None,
        },
        2,
        600,
    );
    let run = common::within(BOUND, move || {
        train_tcp(
            &cfg,
            &c,
            common::mnist(),
            &mut Quiet,
            &AtomicBool::new(false),
        )
    });
    let Err(err) = run else {
        panic!("a failed worker ends the run");
    };
    assert!(err.to_string().contains("worker 1 exited with"), "{err}");
}
