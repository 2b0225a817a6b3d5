//! Black-box tests against a live shard server on 127.0.0.1:0: hostile and broken peers get
//! their error and lose their connection, while a well-behaved worker trains to completion.

mod common;

use common::*;
use pstrain_core::{Layout, Mode, ParameterClient, PushMeta, PushOutcome};
use pstrain_net::frame::{Header, HEADER_LEN, MAGIC};
use pstrain_net::message::{kind, Hello, PushHead, Role};
use pstrain_net::{ClientConfig, ShardConfig, ShardHandle, TcpClient};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn start(mode: Mode, workers: usize) -> ShardHandle {
    start_shard(0, 1, mode, workers)
}

fn client(addr: SocketAddr, rank: usize, workers: usize, mode: Mode) -> TcpClient {
    client_as(Role::Worker, addr, rank, workers, mode)
}

fn client_as(role: Role, addr: SocketAddr, rank: usize, workers: usize, mode: Mode) -> TcpClient {
    let cfg = ClientConfig::new(
        vec![addr.to_string()],
        role,
        rank,
        plan(mode, workers),
        layout(),
    );
    TcpClient::connect(&cfg).unwrap()
}

/// A push of one sample by `rank` computed on the initial weights.
fn first_push(rank: usize) -> PushMeta {
    PushMeta {
        rank,
        base_version: 0,
        samples: 1,
        loss: 0.0,
        accumulated: false,
    }
}

fn error_text(reply: &[u8]) -> String {
    assert!(
        reply.len() >= HEADER_LEN,
        "expected an error frame, got {} bytes",
        reply.len()
    );
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&reply[..HEADER_LEN]);
    let header = Header::decode(&h, 1 << 20).unwrap();
    assert_eq!(header.kind, kind::ERROR);
    // Code (u16), count (u64), then the message's length (u32) and text.
    String::from_utf8_lossy(&reply[HEADER_LEN + 14..]).into_owned()
}

fn hello(layout: &Layout, mode: Mode, rank: usize) -> Vec<u8> {
    frame(
        kind::HELLO,
        &Hello::new(Role::Worker, rank, 0, 1, &plan(mode, 2), layout).encode(),
    )
}

/// A push from a worker of a 2-worker run, with `values` gradient values.
fn push_frame(values: usize) -> Vec<u8> {
    let mut payload = PushHead {
        base_version: 0,
        samples: 1,
        loss: 0.0,
        pull_s: 0.0,
        codec: pstrain_core::PushCodec::Fp32,
        lane: false,
        own: None,
        step: None,
    }
    .encode(2);
    for _ in 0..values {
        payload.extend_from_slice(&0.25f32.to_le_bytes());
    }
    frame(kind::PUSH, &payload)
}

#[test]
fn hostile_peers_are_cut_off_and_the_good_worker_finishes() {
    let server = start(ASYNC, 2);
    let addr = server.address();
    let good = std::thread::spawn(move || {
        let mut c = client(addr, 0, 2, ASYNC);
        train_unit_steps(&mut c, 200, Duration::from_millis(2))
    });

    // Random bytes: not a pstrain peer.
    let reply = attack(
        addr,
        &[
            0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
        ],
    );
    assert!(
        error_text(&reply).contains("magic"),
        "{}",
        error_text(&reply)
    );

    // A wrong protocol version.
    let mut old = frame(kind::HELLO, &[]);
    old[4] = 99;
    assert!(error_text(&attack(addr, &old)).contains("protocol version 99"));

    // An oversized length, refused before any allocation.
    let mut huge = Header {
        kind: kind::HELLO,
        len: 1 << 40,
    }
    .encode()
    .to_vec();
    huge.extend_from_slice(&[0; 32]);
    assert!(error_text(&attack(addr, &huge)).contains("exceeds"));

    // A truncated frame: the header promises more than ever arrives; the peer then vanishes.
    let mut cut = Header {
        kind: kind::HELLO,
        len: 100,
    }
    .encode()
    .to_vec();
    cut.extend_from_slice(&[1; 10]);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&cut).unwrap();
    drop(s);

    // A peer that stalls inside a header is timed out.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    slow.write_all(&MAGIC.to_le_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);

    // A layout mismatch is refused at the handshake.
    let other = Layout::new([("w", &[N][..])]).unwrap();
    let text = error_text(&attack(addr, &hello(&other, ASYNC, 1)));
    assert!(text.contains("layout mismatch"), "{text}");
    // So is a mode mismatch, and a rank out of range.
    let text = error_text(&attack(
        addr,
        &hello(&layout(), Mode::Sync { backup_workers: 0 }, 1),
    ));
    assert!(text.contains("mode: server async"), "{text}");
    assert!(error_text(&attack(addr, &hello(&layout(), ASYNC, 7))).contains("out of range"));

    // A worker with the right handshake but bad pushes: wrong length, NaN, Inf. Each gets its
    // error and the connection stays usable.
    let mut bad = client(addr, 1, 2, ASYNC);
    let meta = first_push(1);
    let mut params = vec![0.0; N];
    bad.pull(&mut params, None, false).unwrap();
    let mut nan = vec![0.5; N];
    nan[17] = f32::NAN;
    let err = bad.push(meta, &nan).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    let mut inf = vec![0.5; N];
    inf[3] = f32::INFINITY;
    inf[4] = f32::NEG_INFINITY;
    assert!(bad.push(meta, &inf).is_err());
    assert!(
        bad.push_all(meta, &vec![0.5; N - 1]).is_err(),
        "the client checks lengths"
    );
    bad.leave().unwrap();

    // Raw pushes of the wrong length from a peer that skips the client's checks: a short one
    // gets an error and the connection stays; a longer one exceeds the frame limit and closes it.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&hello(&layout(), ASYNC, 1)).unwrap();
    let reply = read_frame(&mut raw);
    assert_eq!(reply.0, kind::HELLO_OK);
    raw.write_all(&push_frame(N - 1)).unwrap();
    let (k, payload) = read_frame(&mut raw);
    assert_eq!(k, kind::ERROR);
    assert!(String::from_utf8_lossy(&payload).contains("expects 1000"));
    raw.write_all(&push_frame(N + 1)).unwrap();
    let (k, payload) = read_frame(&mut raw);
    assert_eq!(k, kind::ERROR);
    assert!(String::from_utf8_lossy(&payload).contains("exceeds"));
    let mut rest = Vec::new();
    assert_eq!(
        raw.read_to_end(&mut rest).unwrap_or(0),
        0,
        "closed after an oversized frame"
    );

    let (applied, params) = good.join().unwrap();
    assert_eq!(applied, 200);
    // Only the good worker's 200 unit gradients moved the weights: 200 * lr 0.1.
    assert!(
        params
            .iter()
            .all(|&p| (p + 19.9).abs() < 1e-3 || (p + 20.0).abs() < 1e-3),
        "{}",
        params[0]
    );

    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 200);
    assert_eq!(report.stats.rejected_nonfinite, 2);
    assert!(report.stats.rejected_other >= 1, "short push counted");
    assert!(report.events.refused_handshakes >= 3, "{:?}", report.events);
    assert!(report.events.protocol_errors >= 5, "{:?}", report.events);
    assert!(report.params.iter().all(|p| p.is_finite()));
}

#[test]
fn a_sync_worker_that_vanishes_does_not_hang_the_barrier() {
    let mode = Mode::Sync { backup_workers: 0 };
    let server = start(mode, 2);
    let mut a = client(server.address(), 0, 2, mode);
    let b = client(server.address(), 1, 2, mode);
    let mut params = vec![0.0; N];
    a.pull(&mut params, None, false).unwrap();
    let meta = first_push(0);
    assert!(matches!(
        a.push(meta, &vec![1.0; N]).unwrap(),
        PushOutcome::Buffered { .. }
    ));
    // Worker 1 dies without a goodbye; worker 0's wait for the step must end.
    drop(b);
    let started = std::time::Instant::now();
    let reply = a.pull(&mut params, Some(0), true).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(reply.version, 1);
    assert!(params.iter().all(|&p| (p + 0.1).abs() < 1e-6));
    a.leave().unwrap();
    let report = server.finish().unwrap();
    assert_eq!(report.events.vanished_workers, 1);
}

#[test]
fn describe_tells_a_client_what_the_shard_serves() {
    let mode = Mode::Sync { backup_workers: 0 };
    let running = start(mode, 3);
    let addr = running.address().to_string();
    let served = pstrain_net::describe(
        std::slice::from_ref(&addr),
        Duration::from_secs(2),
        Duration::from_secs(2),
        None,
        None,
    )
    .unwrap();
    assert_eq!(served.layout, layout());
    assert_eq!(served.plan, plan(mode, 3));
    // A client that adopts what it was told is accepted, and can push.
    let cfg = ClientConfig::new(
        vec![addr.clone()],
        Role::Worker,
        2,
        served.plan.clone(),
        served.layout.clone(),
    );
    let mut c = TcpClient::connect(&cfg).unwrap();
    let mut params = vec![0.0; N];
    c.pull(&mut params, None, false).unwrap();
    // The same shard named twice (as shards 0 and 1) is refused by name.
    let err = pstrain_net::describe(
        &[addr.clone(), addr.clone()],
        Duration::from_secs(2),
        Duration::from_secs(2),
        None,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("shard 0 of 1"), "{err}");
    // A describe followed by garbage gets an error, not a crash; the server goes on.
    let mut s = TcpStream::connect(running.address()).unwrap();
    s.write_all(&frame(kind::DESCRIBE, &[0; 32])).unwrap();
    let (k, _) = read_frame(&mut s);
    assert_eq!(k, kind::DESCRIBE_REPLY);
    s.write_all(&frame(kind::PUSH, &[0; 8])).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(error_text(&rest).contains("hello"), "{}", error_text(&rest));
    c.leave().unwrap();
    let report = running.finish().unwrap();
    assert_eq!(report.events.protocol_errors, 1);
}

/// Starts shard `shard` of `shards` on 127.0.0.1:0.
fn start_shard(shard: usize, shards: usize, mode: Mode, workers: usize) -> ShardHandle {
    let mut cfg = ShardConfig::new(shard, shards, layout(), plan(mode, workers));
    cfg.io_timeout = Duration::from_secs(1);
    cfg.idle_timeout = Duration::from_secs(10);
    cfg.exit_when_finished = false;
    ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 2).unwrap()
}

#[test]
fn with_backup_workers_shard_0_decides_each_steps_members_for_every_shard() {
    let mode = Mode::Sync { backup_workers: 1 };
    let shards = [start_shard(0, 2, mode, 3), start_shard(1, 2, mode, 3)];
    let servers: Vec<String> = shards.iter().map(|s| s.address().to_string()).collect();
    let connect = |rank: usize| {
        let cfg = ClientConfig::new(servers.clone(), Role::Worker, rank, plan(mode, 3), layout());
        TcpClient::connect(&cfg).unwrap()
    };
    // A worker that believes in another number of backup workers is refused up front.
    let mut wrong = ClientConfig::new(
        servers.clone(),
        Role::Worker,
        0,
        plan(Mode::Sync { backup_workers: 0 }, 3),
        layout(),
    );
    wrong.connect_timeout = Duration::from_secs(1);
    let err = TcpClient::connect(&wrong).err().expect("refused");
    assert!(err.to_string().contains("backup workers"), "{err}");
    let mut clients: Vec<TcpClient> = (0..3).map(connect).collect();
    let mut params = vec![0.0; N];
    for c in &mut clients {
        c.pull(&mut params, None, false).unwrap();
    }
    let meta = first_push;
    // Workers 2 and 0 make step 0 (shard 0 answers them once it is complete); worker 1 is
    // late and dropped everywhere.
    let mut c2 = clients.pop().unwrap();
    let early = std::thread::spawn(move || {
        let out = c2.push(meta(2), &vec![1.0; N]).unwrap();
        (c2, out)
    });
    std::thread::sleep(Duration::from_millis(100));
    let out0 = clients[0].push(meta(0), &vec![1.0; N]).unwrap();
    let (mut c2, out2) = early.join().unwrap();
    // Applied on shard 0; on shard 1 whichever member came second completed the step.
    for out in [out0, out2] {
        assert!(
            matches!(
                out,
                PushOutcome::Applied { .. } | PushOutcome::Buffered { .. }
            ),
            "{out:?}"
        );
    }
    let late = clients[1].push(meta(1), &vec![5.0; N]).unwrap();
    assert!(matches!(late, PushOutcome::Dropped { .. }), "{late:?}");
    // Both shards applied the same step: mean gradient 1, lr 0.1.
    c2.pull(&mut params, Some(0), true).unwrap();
    assert!(
        params.iter().all(|&p| (p + 0.1).abs() < 1e-6),
        "{:?}",
        &params[..3]
    );
    let versions: Vec<u64> = c2
        .stats()
        .unwrap()
        .iter()
        .map(|s| s.stats.version)
        .collect();
    assert_eq!(versions, [1, 1]);
    // A follower refuses a push that shard 0 did not admit into a step.
    clients[1].leave().unwrap();
    let mut raw = TcpStream::connect(shards[1].address()).unwrap();
    let hello = Hello::new(Role::Worker, 1, 1, 2, &plan(mode, 3), &layout());
    raw.write_all(&frame(kind::HELLO, &hello.encode())).unwrap();
    let (k, _) = read_frame(&mut raw);
    assert_eq!(k, kind::HELLO_OK);
    let mut push = PushHead {
        base_version: 1,
        samples: 1,
        loss: 0.0,
        pull_s: 0.0,
        codec: pstrain_core::PushCodec::Fp32,
        lane: false,
        own: None,
        step: None,
    }
    .encode(3);
    push.extend(std::iter::repeat_n(0u8, 4 * (N / 2)));
    raw.write_all(&frame(kind::PUSH, &push)).unwrap();
    let (k, body) = read_frame(&mut raw);
    assert_eq!(k, kind::ERROR);
    assert!(String::from_utf8_lossy(&body).contains("not a member"));
    drop(raw);
    clients[0].leave().unwrap();
    c2.leave().unwrap();
    for s in shards {
        let report = s.finish().unwrap();
        assert_eq!(report.stats.version, 1);
    }
}

#[test]
fn a_push_past_the_receive_budget_waits_unread_while_a_stalled_one_holds_it() {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 2));
    cfg.io_timeout = Duration::from_secs(1);
    cfg.idle_timeout = Duration::from_secs(10);
    cfg.exit_when_finished = false;
    // Room for one push being received at a time.
    cfg.receive_budget = 1;
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 2).unwrap();
    let addr = server.address();

    // A worker that sends half a push and stalls: it holds the whole budget until the shard
    // gives up on it (its I/O deadline, 1 s).
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled.write_all(&hello(&layout(), ASYNC, 1)).unwrap();
    assert_eq!(read_frame(&mut stalled).0, kind::HELLO_OK);
    let push = push_frame(N);
    stalled.write_all(&push[..push.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // A good worker's push waits for the budget (its bytes unread) and is applied once the
    // stalled push is cut off.
    let mut good = client(addr, 0, 2, ASYNC);
    let mut params = vec![0.0; N];
    let version = good.pull(&mut params, None, false).unwrap().version;
    let started = std::time::Instant::now();
    let outcome = good.push(push_meta(0, version), &vec![1.0; N]).unwrap();
    let waited = started.elapsed();
    assert!(
        matches!(outcome, PushOutcome::Applied { .. }),
        "{outcome:?}"
    );
    assert!(
        waited >= Duration::from_millis(500),
        "read while another push held the budget: answered in {waited:?}"
    );
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    good.leave().unwrap();
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 1);
    assert!(report.events.protocol_errors >= 1, "{:?}", report.events);
}

/// A worker of a `workers`-worker async run over `layout` that asks for the whole slice and
/// reads only the reply's header and head: the shard is left sending it (it is far larger
/// than the sockets' buffers). Returns the stream and the version the reply names.
fn stalled_pull(
    addr: SocketAddr,
    layout: &Layout,
    rank: usize,
    workers: usize,
) -> (TcpStream, u64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Hello::new(Role::Worker, rank, 0, 1, &plan(ASYNC, workers), layout).encode();
    s.write_all(&frame(kind::HELLO, &hello)).unwrap();
    assert_eq!(read_frame(&mut s).0, kind::HELLO_OK);
    let pull = pstrain_net::message::Request::Pull {
        newer_than: None,
        wait: false,
        codec: pstrain_core::PullCodec::Fp32,
        lane: false,
    };
    s.write_all(&frame(pull.kind(), &pull.encode(workers)))
        .unwrap();
    let mut head = [0u8; HEADER_LEN + 8];
    s.read_exact(&mut head).unwrap();
    let version = u64::from_le_bytes(head[HEADER_LEN..].try_into().unwrap());
    (s, version)
}

#[test]
fn in_async_pulls_past_the_budget_share_a_copy_being_sent_instead_of_copying_again() {
    // 32 MB of weights: a pull's reply outlasts the sockets' buffers while nobody reads it.
    let values = 8 << 20;
    let big = Layout::new([("w", &[values][..])]).unwrap();
    let workers = 4;
    let mut cfg = ShardConfig::new(0, 1, big.clone(), plan(ASYNC, workers));
    cfg.io_timeout = Duration::from_secs(20);
    cfg.exit_when_finished = false;
    // The smallest budget: two copies alive at once.
    cfg.receive_budget = 1;
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; values], 1).unwrap();
    let addr = server.address();
    let pusher_cfg = ClientConfig::new(
        vec![addr.to_string()],
        Role::Worker,
        3,
        plan(ASYNC, workers),
        big.clone(),
    );
    let mut pusher = TcpClient::connect(&pusher_cfg).unwrap();
    let grad = vec![0.5; values];
    let mut push = |base_version| {
        let outcome = pusher.push(push_meta(3, base_version), &grad).unwrap();
        assert!(matches!(outcome, PushOutcome::Applied { .. }));
    };
    let (a, at) = stalled_pull(addr, &big, 0, workers);
    assert_eq!(at, 0);
    push(0);
    let (b, at) = stalled_pull(addr, &big, 1, workers);
    assert_eq!(at, 1);
    push(1);
    // Version 2 is the shard's, but two copies (0 and 1) are still being sent: this pull is
    // answered from version 1's.
    let (c, at) = stalled_pull(addr, &big, 2, workers);
    assert_eq!(at, 1, "a third copy was made");
    drop((a, b, c));
    pusher.leave().unwrap();
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 2);
}

/// A port that accepts connections and never answers (another service waiting for its own
/// request, a stuck process) is named, with what it most likely is, by `describe` and by a
/// client's handshake alike: not a bare "timed out".
#[test]
fn an_address_that_accepts_and_never_answers_is_named_as_likely_not_a_shard() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let second = Duration::from_secs(1);
    let err = pstrain_net::describe(std::slice::from_ref(&addr), second, second, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&addr) && err.contains("did not answer the handshake"),
        "{err}"
    );
    assert!(err.contains("is that address a pstrain shard"), "{err}");
    let mode = Mode::Async {
        max_staleness: None,
    };
    let mut cfg = ClientConfig::new(vec![addr.clone()], Role::Worker, 0, plan(mode, 1), layout());
    (cfg.io_timeout, cfg.connect_timeout) = (second, second);
    let err = TcpClient::connect(&cfg).err().expect("refused").to_string();
    assert!(
        err.contains(&addr) && err.contains("did not answer the handshake"),
        "{err}"
    );
    drop(silent);
}

/// An observer that pushes is told only workers push (it was called a malformed push), loses
/// its connection, and nothing reaches the model.
#[test]
fn an_observers_push_is_refused_as_such() {
    let server = start(ASYNC, 1);
    let addr = server.address();
    let mut observer = client_as(Role::Observer, addr, 0, 1, ASYNC);
    let meta = first_push(0);
    let refused = observer.push(meta, &vec![1.0; N]).unwrap_err().to_string();
    assert!(refused.contains("only workers push"), "{refused}");
    let mut worker = client(addr, 0, 1, ASYNC);
    let mut params = vec![0.0; N];
    worker.pull(&mut params, None, false).unwrap();
    assert!(
        params.iter().all(|&v| v == 0.0),
        "the observer's push moved the weights"
    );
    worker.goodbye().unwrap();
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 0);
}

/// An address that cannot be one (no port, a port past 65535) is refused by name at once,
/// not retried until the connect timeout as a shard that is not up yet would be.
#[test]
fn an_address_of_the_wrong_form_is_refused_at_once() {
    for addr in ["nowhere", "127.0.0.1:99999"] {
        let mut cfg =
            ClientConfig::new(vec![addr.into()], Role::Worker, 0, plan(ASYNC, 1), layout());
        cfg.connect_timeout = Duration::from_secs(30);
        let started = std::time::Instant::now();
        let err = TcpClient::connect(&cfg).err().expect("refused").to_string();
        assert!(err.contains(&format!("`{addr}` is not HOST:PORT")), "{err}");
        // A retry loop would have taken the 30 s; a refusal takes no wait at all.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
