//! Replay pulls over a live shard: a worker that makes the shard's updates itself ends with
//! the shard's weights bit for bit, whatever its push codec, for a pull's bytes of pushes;
//! a worker that reconnects is sent the whole slice with the optimizer's state; under `auto`
//! a sync run's worker replays from its first pull unless it has a lane to its shard.

mod common;

use common::*;
use pstrain_core::{OptimizerConfig, ParameterClient, PullCodec, PushCodec, PushMeta, RunPlan};
use pstrain_net::{ShardConfig, ShardHandle, TcpClient};

fn replay_plan(push: PushCodec) -> RunPlan {
    RunPlan {
        push_codec: push,
        pull_codec: PullCodec::Replay,
        optimizer: OptimizerConfig::adam(0.01),
        ..plan(ASYNC, 1)
    }
}

fn start(plan: RunPlan) -> ShardHandle {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan);
    cfg.exit_when_finished = false;
    let initial: Vec<f32> = (0..N).map(|i| (i % 17) as f32 * 0.01).collect();
    ShardHandle::start("127.0.0.1:0", cfg, &initial, 1).unwrap()
}

fn client(server: &ShardHandle, plan: RunPlan) -> TcpClient {
    worker_of(server, plan).unwrap()
}

fn meta(version: u64, push: PushCodec) -> PushMeta {
    PushMeta {
        rank: 0,
        base_version: version,
        samples: 1,
        loss: 0.0,
        accumulated: push.accumulates(),
    }
}

#[test]
fn replaying_workers_hold_the_shards_weights_bit_for_bit() {
    for push in [
        PushCodec::TopK { per_mille: 50 },
        PushCodec::Int8,
        PushCodec::Fp32,
    ] {
        let p = replay_plan(push);
        let server = start(p.clone());
        let mut c = client(&server, p.clone());
        let mut params = vec![0.0; N];
        let mut v = c.pull(&mut params, None, false).unwrap().version;
        for step in 0..30usize {
            let grad: Vec<f32> = (0..N)
                .map(|i| ((i * 7 + step) % 13) as f32 * 0.1 - 0.6)
                .collect();
            c.push(meta(v, push), &grad).unwrap();
            let reply = c.pull(&mut params, Some(v), false).unwrap();
            assert!(reply.updated);
            v = reply.version;
            if step == 10 {
                // A new connection (as after a failure) holds nothing the shard knows of:
                // it is sent the whole slice and the state, and goes on replaying.
                c.leave().unwrap();
                c = client(&server, p.clone());
                v = c.pull(&mut params, None, false).unwrap().version;
            }
        }
        let link = c.stats().unwrap()[0].workers[0];
        c.leave().unwrap();
        let report = server.finish().unwrap();
        assert_eq!(v, 30);
        let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&params), bits(&report.params), "{push}");
        // The weights moved (most of them: top-k's sends some only late or never).
        let moved = (report.params.iter().zip(0..))
            .filter(|(w, i)| **w != (i % 17) as f32 * 0.01)
            .count();
        assert!(moved > N / 2, "{push}: {moved} moved");
        if push.accumulates() {
            // Whole slices with Adam's state at the two joins (about 12 bytes a value and
            // the weights), the rest 50 values a push.
            assert!(
                link.pull_bytes.0 < 2 * 16 * N as u64 + 30 * 1000,
                "{link:?}"
            );
        }
    }
}

/// Under `auto` in a sync run a worker asks for replayed pulls from its first pull (whole,
/// with a fresh optimizer's state, so it costs what fp32 does), unless a shared-memory lane
/// to its shard makes fp32 pulls free; either way it holds the shard's weights.
#[test]
fn an_auto_sync_worker_replays_from_its_first_pull_unless_it_has_a_lane() {
    let p = RunPlan {
        auto_codecs: true,
        optimizer: OptimizerConfig::adam(0.01),
        ..plan(pstrain_core::Mode::Sync { backup_workers: 0 }, 1)
    };
    for lanes in [false, true] {
        let server = start(p.clone());
        let mut cfg = worker_config(&server, p.clone());
        cfg.lanes = lanes;
        let mut c = TcpClient::connect(&cfg).unwrap();
        let mut params = vec![0.0; N];
        let mut v = c.pull(&mut params, None, false).unwrap().version;
        let first = c.stats().unwrap()[0].workers[0].codecs.pull;
        for step in 0..5usize {
            let grad: Vec<f32> = (0..N).map(|i| ((i + step) % 5) as f32 * 0.1).collect();
            c.push(meta(v, PushCodec::Fp32), &grad).unwrap();
            v = c.pull(&mut params, Some(v), true).unwrap().version;
        }
        c.leave().unwrap();
        let report = server.finish().unwrap();
        let expected = if lanes {
            PullCodec::Fp32
        } else {
            PullCodec::Replay
        };
        assert_eq!(first, Some(expected), "lanes {lanes}");
        let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&params), bits(&report.params), "lanes {lanes}");
    }
}
