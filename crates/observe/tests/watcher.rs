//! Black-box tests of the watcher on 127.0.0.1:0 (and 0.0.0.0:0 with a token), over raw
//! TCP: the exposition parses as Prometheus text, bad requests get 4xx and the server keeps
//! serving, strangers need the token off loopback.

use pstrain_core::{Presence, ShardCounters, WorkerStats, WORKER_FIELDS};
use pstrain_observe::{render_metrics, EvalPoint, Latencies, RunSnapshot, ShardView, Watcher};
#[path = "../../../test-support/scrape.rs"]
mod scrape;
use scrape::{get, parse, request, value};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Rank 0's record: five applied gradients of known staleness, and every timed number set.
fn worker() -> WorkerStats {
    let mut w = WorkerStats {
        max_lead: 2,
        compute_s: 1.5,
        wait_s: 0.25,
        batch: 32,
        not_applied: 1,
        ..Default::default()
    };
    for s in [0, 1, 1, 5, 40] {
        w.record_applied(32, s);
    }
    w
}

fn snapshot(version: u64) -> RunSnapshot {
    let stats = ShardCounters {
        version,
        gradients_applied: 3 * version,
        samples_applied: 96 * version,
        dropped_stale: 2,
        loss_ema: Some(0.25),
        ..Default::default()
    };
    let w = worker();
    let presence = [
        (
            Presence::Held {
                since_beat: Some(Duration::from_millis(300)),
            },
            false,
        ),
        (Presence::Held { since_beat: None }, true),
    ];
    RunSnapshot {
        title: "test run".into(),
        plan: vec![("mode".into(), "ssp".into())],
        uptime_s: 10.0,
        shards: vec![ShardView::new(
            0,
            &stats,
            &[w, WorkerStats::default()],
            &presence,
            Duration::from_secs(10),
        )],
        evals: vec![EvalPoint {
            time_s: 5.0,
            samples: 1000,
            accuracy: 0.9,
            loss: 0.3,
        }],
        ..Default::default()
    }
}

#[test]
fn exposition_parses_with_counters_gauges_and_well_formed_histograms() {
    let latencies = Latencies::new(0);
    latencies.push(0.002, 4096);
    latencies.pull(0.5, 8192);
    let text = render_metrics(&snapshot(7), Some(&latencies));
    assert!(text.ends_with("# EOF\n"), "{text}");
    let scrape = parse(&text);
    assert_eq!(
        value(&scrape, "pstrain_model_version", &[("shard", "0")]),
        Some(7.0)
    );
    assert_eq!(
        value(&scrape, "pstrain_gradients_applied_total", &[]),
        Some(21.0)
    );
    assert_eq!(
        value(
            &scrape,
            "pstrain_gradients_not_applied_total",
            &[("reason", "stale")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&scrape, "pstrain_test_accuracy_ratio", &[]),
        Some(0.9)
    );
    assert_eq!(
        value(
            &scrape,
            "pstrain_worker_state",
            &[("rank", "1"), ("state", "waiting")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "pstrain_received_bytes_total", &[]),
        Some(4096.0)
    );
    // The staleness histogram: cumulative buckets ending in +Inf = count, and the sum.
    let hist = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "pstrain_worker_staleness_updates" && s.labels.get("rank") == Some("0")
        })
        .expect("staleness histogram");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {:?}", hist.value)
    };
    let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "cumulative: {counts:?}"
    );
    assert_eq!(counts.first(), Some(&1.0), "one gradient of staleness 0");
    assert_eq!(counts.last(), Some(&5.0));
    assert_eq!(buckets.last().map(|b| b.less_than), Some(f64::INFINITY));
    assert!(
        text.contains("pstrain_worker_staleness_updates_sum{shard=\"0\",rank=\"0\"} 47"),
        "{text}"
    );
    // Every number of the worker record that has a family of its own is exported per rank.
    for field in WORKER_FIELDS {
        if let Some(exported) = field.prometheus {
            let name = if exported.counter {
                format!("{}_total", exported.name)
            } else {
                exported.name.to_string()
            };
            let got = value(&scrape, &name, &[("rank", "0")]);
            assert_eq!(got, Some((field.get)(&worker()).as_f64()), "{name}");
        }
    }
    for name in [
        "pstrain_push_duration_seconds",
        "pstrain_pull_duration_seconds",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == name),
            "{name} missing"
        );
    }
}

#[test]
fn serves_metrics_page_and_json_and_refuses_bad_requests() {
    let version = Arc::new(AtomicU64::new(1));
    let v = Arc::clone(&version);
    let w = Watcher::start(
        "127.0.0.1:0",
        None,
        Arc::new(move || snapshot(v.load(Ordering::Relaxed))),
        None,
    )
    .unwrap();
    let addr = w.addr();
    let first = get(addr, "/metrics", "");
    assert_eq!(first.status, 200);
    version.store(5, Ordering::Relaxed);
    let second = get(addr, "/metrics", "");
    let (a, b) = (parse(&first.body), parse(&second.body));
    assert_eq!(value(&a, "pstrain_model_version", &[]), Some(1.0));
    assert_eq!(
        value(&b, "pstrain_model_version", &[]),
        Some(5.0),
        "the counters move"
    );
    let page = get(addr, "/", "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<canvas id=\"curve\""));
    let json = get(addr, "/api/run", "");
    let run: serde_json::Value = serde_json::from_str(&json.body).unwrap();
    assert_eq!(run["shards"][0]["workers"][1]["state"], "waiting");
    // The page's table: every titled number is a column, and each worker carries it.
    let columns = run["worker_columns"].as_array().unwrap();
    let titled = WORKER_FIELDS.iter().filter(|f| f.title.is_some()).count();
    assert_eq!(columns.len(), titled);
    let rank0 = &run["shards"][0]["workers"][0];
    for column in columns {
        let name = column[0].as_str().unwrap();
        // Numbers, and the codecs by name.
        let shown = rank0[name].is_number() || rank0[name].is_string();
        assert!(shown, "{name} missing from {rank0}");
    }
    assert_eq!(rank0["codecs"], "- / -", "no link seen yet");
    assert_eq!(rank0["gradients_applied"], 5);
    assert_eq!(rank0["wait_s"], 0.25);
    assert_eq!(get(addr, "/nope", "").status, 404);
    assert_eq!(
        request(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .status,
        405
    );
    // Garbage, an oversized head and a silent client: 4xx or a closed connection, never a
    // crash; the server keeps serving.
    let garbage = request(addr, "\x00\x01\x02 not http at all\r\n\r\n");
    assert!(garbage.status == 0 || (400..500).contains(&garbage.status));
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(1 << 20));
    let r = request(addr, &huge);
    assert!(
        r.status == 0 || (400..500).contains(&r.status),
        "{}",
        r.status
    );
    let _idle = TcpStream::connect(addr).unwrap();
    assert_eq!(get(addr, "/metrics", "").status, 200);
}

#[test]
fn off_loopback_the_token_is_required() {
    let token = "ab".repeat(32);
    assert!(Watcher::start("0.0.0.0:0", None, Arc::new(|| snapshot(1)), None).is_err());
    let w = Watcher::start(
        "0.0.0.0:0",
        Some(token.clone()),
        Arc::new(|| snapshot(1)),
        None,
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", w.addr().port()).parse().unwrap();
    assert_eq!(get(addr, "/metrics", "").status, 401);
    assert_eq!(
        get(addr, "/api/run", "Authorization: Bearer 00\r\n").status,
        401
    );
    assert_eq!(
        get(
            addr,
            "/metrics",
            &format!("Authorization: Bearer {token}\r\n")
        )
        .status,
        200
    );
    assert_eq!(
        get(addr, &format!("/api/run?token={token}"), "").status,
        200
    );
    // The same token in upper-case hex is the same token.
    let upper = token.to_ascii_uppercase();
    assert_eq!(
        get(
            addr,
            "/metrics",
            &format!("Authorization: Bearer {upper}\r\n")
        )
        .status,
        200
    );
}

/// Strangers who pipeline requests and never read the answers: each gets one 401 and its
/// connection closed, more than the slots are dropped on accept, and neither the token
/// holder's request nor the watcher's stop waits for them.
#[test]
fn a_metrics_port_under_attack_still_answers_and_stops() {
    let token = "cd".repeat(32);
    let w = Watcher::start(
        "0.0.0.0:0",
        Some(token.clone()),
        Arc::new(|| snapshot(1)),
        None,
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", w.addr().port()).parse().unwrap();
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    let attackers: Vec<TcpStream> = (0..64)
        .filter_map(|_| {
            let mut s = TcpStream::connect(addr).ok()?;
            s.set_write_timeout(Some(Duration::from_millis(100))).ok()?;
            let _ = std::io::Write::write_all(&mut s, pipelined.as_bytes());
            Some(s)
        })
        .collect();
    assert!(
        attackers.len() >= 32,
        "{} attackers connected",
        attackers.len()
    );
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let answer = get(
        addr,
        "/metrics",
        &format!("Authorization: Bearer {token}\r\n"),
    );
    assert_eq!(answer.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
    // Stopping does not wait for the attackers' sockets (they are still open).
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(w);
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "the watcher did not stop within 5 s"
    );
    drop(attackers);
}
