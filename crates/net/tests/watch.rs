//! A shard's `/metrics` and live page during training: the exposition parses, the counters
//! and the latency histograms move with the pushes, and the worker table names the worker's
//! address and state.

mod common;

use common::*;
use pstrain_core::{ParameterClient, PushMeta};
use pstrain_net::message::Role;
use pstrain_net::{ClientConfig, ShardConfig, ShardHandle, TcpClient};
use std::time::Duration;

#[path = "../../../test-support/scrape.rs"]
mod scrape;

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape::value(&scrape::parse(text), name, labels)
}

#[test]
fn metrics_move_with_training_and_the_page_names_the_workers() {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 2));
    cfg.exit_when_finished = false;
    cfg.metrics_addr = Some("127.0.0.1:0".into());
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 2).unwrap();
    let watch = server.metrics_address().expect("metrics served");
    let mut client_cfg = ClientConfig::new(
        vec![server.address().to_string()],
        Role::Worker,
        0,
        plan(ASYNC, 2),
        layout(),
    );
    client_cfg.connect_timeout = Duration::from_secs(5);
    let mut c = TcpClient::connect(&client_cfg).unwrap();
    let mut params = vec![0.0; N];
    let mut push = |n: usize| {
        for _ in 0..n {
            let reply = c.pull(&mut params, None, false).unwrap();
            let meta = PushMeta {
                rank: 0,
                base_version: reply.version,
                samples: 4,
                loss: 0.5,
                accumulated: false,
            };
            c.push(meta, &vec![0.01; N]).unwrap();
        }
    };
    push(10);
    let first = scrape::get(watch, "/metrics", "");
    assert_eq!(first.status, 200);
    let first = first.body;
    assert_eq!(sample(&first, "pstrain_model_version", &[]), Some(10.0));
    push(15);
    // A request's duration is recorded once its answer is written, which the client may see
    // first: scrape until the last one is in.
    let mut second = scrape::get(watch, "/metrics", "").body;
    for _ in 0..200 {
        let timed = |family| sample(&second, family, &[]);
        if timed("pstrain_push_duration_seconds") == Some(25.0)
            && timed("pstrain_pull_duration_seconds") == Some(25.0)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        second = scrape::get(watch, "/metrics", "").body;
    }
    assert_eq!(sample(&second, "pstrain_model_version", &[]), Some(25.0));
    assert_eq!(
        sample(&second, "pstrain_gradients_applied_total", &[]),
        Some(25.0)
    );
    assert_eq!(
        sample(
            &second,
            "pstrain_worker_gradients_applied_total",
            &[("rank", "0")]
        ),
        Some(25.0)
    );
    // Every push and pull was timed; the byte counters count the tensors.
    assert_eq!(
        sample(&second, "pstrain_push_duration_seconds", &[]),
        Some(25.0)
    );
    assert_eq!(
        sample(&second, "pstrain_pull_duration_seconds", &[]),
        Some(25.0)
    );
    assert!(sample(&second, "pstrain_received_bytes_total", &[]).unwrap() >= (25 * 4 * N) as f64);
    assert_eq!(
        sample(
            &second,
            "pstrain_worker_state",
            &[("rank", "0"), ("state", "training")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &second,
            "pstrain_worker_state",
            &[("rank", "1"), ("state", "not joined")]
        ),
        Some(1.0)
    );
    let json = scrape::get(watch, "/api/run", "");
    assert_eq!(json.status, 200);
    let run: serde_json::Value = serde_json::from_str(&json.body).unwrap();
    let worker = &run["shards"][0]["workers"][0];
    assert!(
        worker["address"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1"),
        "{worker}"
    );
    assert_eq!(worker["gradients_applied"], 25);
    drop(c);
    server.finish().unwrap();
}
