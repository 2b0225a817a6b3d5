//! A fleet on one shard: 600 workers from one address, each with its own connection and a
//! heartbeat connection beside it (1,200 connections and an observer), all join, push and are
//! counted; the shard's connection caps grow with the run's workers (they were 512 whatever
//! the run).

mod common;

use common::*;
use pstrain_core::{ParameterClient, PushMeta};
use pstrain_net::{ClientConfig, Heartbeat, Role, ShardConfig, ShardHandle, TcpClient};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const WORKERS: usize = 600;

#[test]
fn six_hundred_workers_with_heartbeats_join_one_shard_and_push() {
    let p = plan(ASYNC, WORKERS);
    let cfg = ShardConfig::new(0, 1, layout(), p.clone());
    assert!(cfg.max_connections > 2 * WORKERS, "{}", cfg.max_connections);
    let mut server_cfg = cfg;
    server_cfg.exit_when_finished = false;
    let server = ShardHandle::start("127.0.0.1:0", server_cfg, &vec![0.0; N], 1).unwrap();
    let address = server.address().to_string();
    // Everyone stays connected until all have pushed: the connections are open at once.
    let all_pushed = Arc::new(Barrier::new(WORKERS + 1));
    let counted = Arc::new(Barrier::new(WORKERS + 1));
    let threads: Vec<_> = (0..WORKERS)
        .map(|rank| {
            let mut c = ClientConfig::new(
                vec![address.clone()],
                Role::Worker,
                rank,
                p.clone(),
                layout(),
            );
            c.connect_timeout = Duration::from_secs(60);
            let (all_pushed, counted) = (all_pushed.clone(), counted.clone());
            std::thread::spawn(move || {
                let mut client = TcpClient::connect(&c).unwrap();
                let beat = Heartbeat::start(&c, Duration::from_secs(1)).unwrap();
                let mut params = vec![0.0; N];
                let v = client.pull(&mut params, None, false).unwrap().version;
                let meta = PushMeta {
                    rank,
                    base_version: v,
                    samples: 1,
                    loss: 0.0,
                    accumulated: false,
                };
                client.push(meta, &vec![1e-3; N]).unwrap();
                all_pushed.wait();
                counted.wait();
                drop(beat);
                client.leave().unwrap();
            })
        })
        .collect();
    all_pushed.wait();
    let mut observer = TcpClient::connect(&ClientConfig::new(
        vec![address],
        Role::Observer,
        0,
        p,
        layout(),
    ))
    .unwrap();
    let stats = observer.stats().unwrap();
    assert_eq!(stats[0].active_workers as usize, WORKERS);
    assert!(stats[0].workers.iter().all(|w| w.applied == 1));
    counted.wait();
    for t in threads {
        t.join().unwrap();
    }
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, WORKERS as u64);
    // Connections still in their handshake are capped per address (strangers cannot crowd
    // out the run's peers), so a fleet joining at once from one address is partly turned
    // away at accept and retries: everyone got in all the same.
    println!("closed at accept: {}", report.events.over_capacity);
}
