//! A worker's heartbeats stop the moment they are dropped, whatever they are waiting on: the
//! next interval, or a shard that cannot be reached. A worker process ends when its work does
//! (it drops its heartbeats on the way out), not up to an interval later.

mod common;

use common::*;
use pstrain_net::message::Role;
use pstrain_net::{ClientConfig, Heartbeat, ShardConfig, ShardHandle, TcpClient};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

/// A whole minute between heartbeats: any wait for the interval would show.
const EVERY: Duration = Duration::from_secs(60);
/// Far below `EVERY` and the connect retry window, far above a thread's wake-up.
const PROMPTLY: Duration = Duration::from_secs(10);

fn client_cfg(servers: Vec<String>) -> ClientConfig {
    let mut cfg = ClientConfig::new(servers, Role::Worker, 0, plan(ASYNC, 1), layout());
    cfg.connect_timeout = Duration::from_secs(120);
    cfg
}

/// Drops `beats` on a thread of its own; true if the drop returned within `PROMPTLY`.
fn dropped_promptly(beats: Heartbeat) -> bool {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        drop(beats);
        let _ = done.send(());
    });
    finished.recv_timeout(PROMPTLY).is_ok()
}

#[test]
fn dropping_heartbeats_does_not_wait_for_the_next_interval() {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 1));
    cfg.exit_when_finished = false;
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 1).unwrap();
    let ccfg = client_cfg(vec![server.address().to_string()]);
    let mut client = TcpClient::connect(&ccfg).unwrap();
    let beats = Heartbeat::start(client.config(), EVERY).unwrap();
    // The first heartbeat goes out at once; then the loop sleeps for a minute.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dropped_promptly(beats),
        "the heartbeat thread waited out its interval"
    );
    client.goodbye().unwrap();
    server.finish().unwrap();
}

#[test]
fn dropping_heartbeats_does_not_wait_for_an_unreachable_shard() {
    // An address where nothing listens any more: every connection attempt is refused and
    // retried for the client's two-minute connect window.
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let beats = Heartbeat::start(&client_cfg(vec![gone.to_string()]), EVERY).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dropped_promptly(beats),
        "the heartbeat thread waited on its connection attempts"
    );
}

/// A worker evicted for missing heartbeats (a device that was slow or away for a while)
/// connects again and carries on: its push at the moment of the eviction is given up, the
/// next ones are applied. Before, the eviction was an error that ended the worker.
#[test]
fn an_evicted_worker_rejoins_and_carries_on() {
    use pstrain_core::{ParameterClient, PushMeta, PushOutcome};
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 1));
    cfg.exit_when_finished = false;
    cfg.heartbeat_timeout = Duration::from_millis(500);
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 1).unwrap();
    let ccfg = client_cfg(vec![server.address().to_string()]);
    let mut client = TcpClient::connect(&ccfg).unwrap();
    let beats = Heartbeat::start(client.config(), Duration::from_millis(100)).unwrap();
    let mut params = vec![0.0; N];
    let push = |client: &mut TcpClient, params: &mut Vec<f32>| {
        let version = client.pull(params, None, false).unwrap().version;
        let meta = PushMeta {
            rank: 0,
            base_version: version,
            samples: 1,
            loss: 0.0,
            accumulated: false,
        };
        client.push(meta, &vec![1.0; N]).unwrap()
    };
    assert!(matches!(
        push(&mut client, &mut params),
        PushOutcome::Applied { .. }
    ));
    // The heartbeats stop for longer than the timeout: the shard evicts rank 0.
    drop(beats);
    std::thread::sleep(Duration::from_millis(1500));
    let outcome = push(&mut client, &mut params);
    assert!(
        matches!(
            outcome,
            PushOutcome::Dropped { .. } | PushOutcome::Applied { .. }
        ),
        "{outcome:?}"
    );
    assert!(
        client.reconnects() >= 1,
        "the eviction was not met by a rejoin"
    );
    let beats = Heartbeat::start(client.config(), Duration::from_millis(100)).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            push(&mut client, &mut params),
            PushOutcome::Applied { .. }
        ));
    }
    drop(beats);
    client.goodbye().unwrap();
    let report = server.finish().unwrap();
    assert!(report.stats.gradients_applied >= 4, "{:?}", report.stats);
}

/// A worker that said goodbye while its heartbeats still beat (a Python client kept in scope
/// after `leave()`, say) does not hold the run open: the shard finishes as soon as every
/// worker has left, with the heartbeat connection still there.
#[test]
fn heartbeats_alone_do_not_hold_a_finished_run_open() {
    let cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 1));
    assert!(cfg.exit_when_finished);
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 1).unwrap();
    let ccfg = client_cfg(vec![server.address().to_string()]);
    let mut client = TcpClient::connect(&ccfg).unwrap();
    let beats = Heartbeat::start(client.config(), Duration::from_millis(100)).unwrap();
    // Long enough for the heartbeat connection to be made and beat a few times.
    std::thread::sleep(Duration::from_millis(500));
    client.goodbye().unwrap();
    let report = server.wait(Some(PROMPTLY)).unwrap();
    drop(beats);
    assert!(
        report.is_some(),
        "the shard kept serving a run whose only worker had left, held by its heartbeats"
    );
}

/// A worker whose connection dropped without a goodbye while its heartbeats still arrive is
/// a process on its way back: the shard keeps serving past its finishing grace, and ends once
/// the heartbeats stop too.
#[test]
fn heartbeats_of_a_vanished_worker_keep_the_run_open_until_they_stop() {
    let cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 1));
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 1).unwrap();
    let ccfg = client_cfg(vec![server.address().to_string()]);
    let client = TcpClient::connect(&ccfg).unwrap();
    let beats = Heartbeat::start(client.config(), Duration::from_millis(100)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(client); // no goodbye: the worker vanished
                  // Past the shard's 5 s of quiet before it ends a run whose workers have all gone.
    assert!(
        server.wait(Some(Duration::from_secs(7))).unwrap().is_none(),
        "the shard ended while a vanished worker's heartbeats still came"
    );
    drop(beats);
    assert!(
        server.wait(Some(PROMPTLY)).unwrap().is_some(),
        "the shard did not end once the heartbeats stopped too"
    );
}
