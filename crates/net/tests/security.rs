//! Strangers against a live shard with a run token, each attack a client of its own: without
//! the token nothing leaves the shard and nothing changes it, while a real worker with the
//! token trains; the handshake has a deadline, connections have caps, and a shard refuses to
//! listen beyond loopback without a token.

mod common;

use common::*;
use pstrain_core::{Mode, OptimizerConfig, ParameterClient, PushMeta, PushOutcome, RunPlan};
use pstrain_net::frame::{Header, HEADER_LEN};
use pstrain_net::message::{kind, Hello, PushHead, Role, StepMembers};
use pstrain_net::{
    ClientConfig, Heartbeat, NetError, RunToken, ShardConfig, ShardHandle, TcpClient,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn shard(token: Option<RunToken>, tune: impl FnOnce(&mut ShardConfig)) -> ShardHandle {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 2));
    cfg.token = token;
    cfg.exit_when_finished = false;
    tune(&mut cfg);
    ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 2).unwrap()
}

fn client_cfg(addr: SocketAddr, rank: usize, token: Option<RunToken>) -> ClientConfig {
    let mut cfg = ClientConfig::new(
        vec![addr.to_string()],
        Role::Worker,
        rank,
        plan(ASYNC, 2),
        layout(),
    );
    cfg.token = token;
    cfg.connect_timeout = Duration::from_secs(2);
    cfg
}

/// The kinds of the frames in `reply`.
fn kinds(reply: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut rest = reply;
    while rest.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&rest[..HEADER_LEN]);
        let header = Header::decode(&h, u64::MAX).unwrap();
        out.push(header.kind);
        rest = &rest[(HEADER_LEN + header.len as usize).min(rest.len())..];
    }
    out
}

fn worker_hello(rank: usize) -> Vec<u8> {
    frame(
        kind::HELLO,
        &Hello::new(Role::Worker, rank, 0, 1, &plan(ASYNC, 2), &layout()).encode(),
    )
}

#[test]
fn without_the_token_nothing_leaves_the_shard_and_nothing_changes_it() {
    let token = RunToken::generate().unwrap();
    let server = shard(Some(token.clone()), |_| {});
    let addr = server.address();

    // A real worker with the token trains throughout.
    let good_cfg = client_cfg(addr, 0, Some(token.clone()));
    let good = std::thread::spawn(move || {
        let mut c = TcpClient::connect(&good_cfg).unwrap();
        train_unit_steps(&mut c, 200, Duration::from_millis(2)).0
    });

    // DESCRIBE without proving anything: an error, never a description (which was itself
    // a valid observer hello before).
    let reply = attack(addr, &frame(kind::DESCRIBE, &[0; 32]));
    assert_eq!(kinds(&reply), [kind::ERROR]);
    assert!(String::from_utf8_lossy(&reply).contains("requires the run's token"));
    // A hello, then pull / push / goodbye: refused at the hello, nothing else is read.
    for rank in [0, 1] {
        let mut bytes = worker_hello(rank);
        bytes.extend(frame(kind::PULL, &[255; 9]));
        bytes.extend(frame(kind::GOODBYE, &[]));
        assert_eq!(kinds(&attack(addr, &bytes)), [kind::ERROR]);
    }
    // An AUTH, then a hello with a made-up proof.
    let mut bytes = frame(kind::AUTH, &[7; 32]);
    bytes.extend(worker_hello(1));
    let reply = attack(addr, &bytes);
    assert_eq!(kinds(&reply), [kind::CHALLENGE, kind::ERROR]);
    assert!(String::from_utf8_lossy(&reply).contains("wrong run token"));
    // A "hello" that is no hello at all: its proof is checked over the raw bytes before any
    // of them is decoded, so it is refused for its proof, not for its contents.
    let mut bytes = frame(kind::AUTH, &[7; 32]);
    bytes.extend(frame(kind::HELLO, &[0xff; 200]));
    let reply = attack(addr, &bytes);
    assert_eq!(kinds(&reply), [kind::CHALLENGE, kind::ERROR]);
    assert!(String::from_utf8_lossy(&reply).contains("wrong run token"));

    // The project's own client: no token, a wrong token, an auto-rank flood.
    let err = TcpClient::connect(&client_cfg(addr, 1, None))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("requires the run's token"),
        "{err}"
    );
    let wrong = Some(RunToken::generate().unwrap());
    let err = TcpClient::connect(&client_cfg(addr, 1, wrong.clone()))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("does not hold this run's token"),
        "{err}"
    );
    for _ in 0..20 {
        let flood = client_cfg(addr, pstrain_net::ANY_RANK, None);
        assert!(TcpClient::connect(&flood).is_err());
    }
    let describe = pstrain_net::describe(
        &[addr.to_string()],
        Duration::from_secs(2),
        Duration::from_secs(2),
        None,
        None,
    );
    assert!(describe.is_err());
    assert!(pstrain_net::describe(
        &[addr.to_string()],
        Duration::from_secs(2),
        Duration::from_secs(2),
        Some(&token),
        None,
    )
    .is_ok());

    assert_eq!(good.join().unwrap(), 200);
    let report = server.finish().unwrap();
    // Only the good worker's 200 unit gradients moved the weights: 200 * lr 0.1.
    assert_eq!(report.stats.gradients_applied, 200);
    assert!(report.params.iter().all(|&p| (p + 20.0).abs() < 1e-3));
    assert!(report.events.unauthorized >= 25, "{:?}", report.events);
}

#[test]
fn a_shard_without_a_token_refuses_a_client_that_brings_one() {
    let server = shard(None, |_| {});
    let token = Some(RunToken::generate().unwrap());
    let err = TcpClient::connect(&client_cfg(server.address(), 0, token))
        .err()
        .unwrap();
    assert!(err.to_string().contains("without a run token"), "{err}");
}

#[test]
fn the_handshake_has_a_deadline() {
    let server = shard(Some(RunToken::generate().unwrap()), |cfg| {
        cfg.handshake_timeout = Duration::from_millis(500);
        cfg.io_timeout = Duration::from_secs(30);
    });
    // Connects, says nothing: closed once the handshake deadline passes.
    let mut s = TcpStream::connect(server.address()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
}

#[test]
fn parked_connections_are_capped_and_a_real_worker_still_trains() {
    let token = RunToken::generate().unwrap();
    let server = shard(Some(token.clone()), |cfg| {
        cfg.max_connections = 64;
        cfg.max_connections_per_address = 32;
        cfg.handshake_timeout = Duration::from_secs(30);
    });
    let addr = server.address();
    let mut good = TcpClient::connect(&client_cfg(addr, 0, Some(token.clone()))).unwrap();
    // As a real worker does: heartbeats from a thread of their own (else it is evicted).
    let _beats = Heartbeat::start(good.config(), Duration::from_millis(500)).unwrap();
    // Its heartbeat connection is made before the flood (all of this comes from 127.0.0.1,
    // so a flood from the worker's own address could otherwise take every slot first).
    std::thread::sleep(Duration::from_secs(1));
    let before = resident_kib();
    // Strangers park 5,000 connections without a word.
    let parked: Vec<TcpStream> = (0..5000)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(parked.len() >= 4900, "{} connected", parked.len());
    std::thread::sleep(Duration::from_millis(300));
    let grown = resident_kib().saturating_sub(before);
    // This process holds both ends; the shard serves at most 32 of them (the per-address
    // cap), the rest are closed on accept.
    println!("5,000 parked connections: resident memory grew by {grown} KiB");
    assert!(grown < 64 * 1024, "grew by {grown} KiB");
    train_unit_steps(&mut good, 50, Duration::ZERO);
    drop(parked);
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 50);
    // At most 32 of them were ever served at once: the rest were closed on accept.
    assert!(report.events.over_capacity >= 4900, "{:?}", report.events);
}

#[test]
fn token_holders_are_bounded_too() {
    let token = RunToken::generate().unwrap();
    let server = shard(Some(token.clone()), |cfg| {
        cfg.plan.optimizer = OptimizerConfig::adam(0.1);
        cfg.plan.batch_size = 64;
    });
    let addr = server.address();
    let plan = RunPlan {
        optimizer: OptimizerConfig::adam(0.1),
        batch_size: 64,
        ..plan(ASYNC, 2)
    };
    let mut cfg = client_cfg(addr, 0, Some(token.clone()));
    cfg.plan = plan.clone();
    let mut c = TcpClient::connect(&cfg).unwrap();
    let mut params = vec![0.0; N];
    c.pull(&mut params, None, false).unwrap();
    // A 1e30 push under Adam: refused, counted, weights unchanged; Adam still moves after.
    let meta = PushMeta {
        rank: 0,
        base_version: 0,
        samples: u32::MAX,
        loss: 0.0,
        accumulated: false,
    };
    let err = c.push(meta, &vec![1e30; N]).unwrap_err();
    assert!(err.to_string().contains("1e30"), "{err}");
    let after = c.pull(&mut params, None, false).unwrap();
    assert_eq!(after.version, 0);
    assert!(params.iter().all(|&p| p == 0.0));
    // u32::MAX samples counts as the plan's batch (64).
    assert!(matches!(
        c.push(meta, &vec![1.0; N]).unwrap(),
        PushOutcome::Applied { .. }
    ));
    let stats = c.stats().unwrap()[0].stats;
    assert_eq!((stats.samples_applied, stats.rejected_nonfinite), (64, 1));
    c.pull(&mut params, None, false).unwrap();
    assert!(params.iter().all(|&p| p < 0.0 && p.is_finite()));
    c.leave().unwrap();

    // A 1 MiB hello naming 95,000 tensors is answered (refused) quickly: the duplicate check
    // is linear and the fingerprint is compared before any layout is built.
    // Short distinct names (1-3 printable characters, no dimensions) to fit 95,000 in 1 MiB.
    let alphabet: Vec<char> = (b' '..=b'~').map(char::from).collect();
    let name = |mut i: usize| {
        let mut s = String::new();
        loop {
            s.push(alphabet[i % alphabet.len()]);
            i /= alphabet.len();
            if i == 0 {
                break s;
            }
            i -= 1;
        }
    };
    let names: Vec<(String, Vec<u64>)> = (0..95_000).map(|i| (name(i), vec![])).collect();
    let mut big = Hello::new(Role::Worker, 1, 0, 1, &plan, &layout());
    big.run.tensors = names;
    let started = Instant::now();
    assert!(
        big.encode().len() <= 1 << 20,
        "{} bytes",
        big.encode().len()
    );
    let mut s = join_with_token(addr, &token, big);
    let (k, body) = read_frame(&mut s);
    let took = started.elapsed();
    println!("a 95,000-tensor hello was refused in {took:?}");
    assert_eq!(k, kind::ERROR);
    assert!(String::from_utf8_lossy(&body).contains("layout mismatch"));
    assert!(took < Duration::from_secs(1), "{took:?}");
    let report = server.finish().unwrap();
    assert!(report.params.iter().all(|p| p.is_finite()));
}

#[test]
fn a_proven_hello_cannot_be_altered_on_the_way() {
    let token = RunToken::generate().unwrap();
    let server = shard(Some(token.clone()), |_| {});
    let hello = Hello::new(Role::Worker, 1, 0, 1, &plan(ASYNC, 2), &layout());
    // Every byte of the body is covered: the role and rank, and the plan and layout after
    // them (which an earlier proof did not cover).
    for at in [0, 3, 12, hello.signed_body().len() - 1] {
        let mut s = TcpStream::connect(server.address()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mine = [9u8; 32];
        s.write_all(&frame(kind::AUTH, &mine)).unwrap();
        let (_, challenge) = read_frame(&mut s);
        let mut theirs = [0u8; 32];
        theirs.copy_from_slice(&challenge[..32]);
        let mut bytes = hello.clone().proven(&token, &mine, &theirs).encode();
        bytes[at] ^= 0x01;
        s.write_all(&frame(kind::HELLO, &bytes)).unwrap();
        let (k, body) = read_frame(&mut s);
        assert_eq!(k, kind::ERROR);
        assert!(
            String::from_utf8_lossy(&body).contains("wrong run token"),
            "byte {at}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    server.finish().unwrap();
}

#[test]
fn protected_mode_refuses_to_listen_beyond_loopback_without_a_token() {
    let cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 2));
    let err = ShardHandle::start("0.0.0.0:0", cfg.clone(), &vec![0.0; N], 1)
        .err()
        .expect("refused");
    assert!(matches!(err, NetError::Unprotected(_)), "{err}");
    assert!(err.to_string().contains("pstrain token"), "{err}");
    let with_token = ShardConfig {
        token: Some(RunToken::generate().unwrap()),
        ..cfg
    };
    let ok = ShardHandle::start("0.0.0.0:0", with_token, &vec![0.0; N], 1).unwrap();
    ok.finish().unwrap();
}

#[test]
fn a_token_holder_cannot_jump_a_follower_shard_to_the_end() {
    let token = RunToken::generate().unwrap();
    let coordinated = RunPlan {
        mode: Mode::Sync { backup_workers: 1 },
        workers: 3,
        ..plan(ASYNC, 2)
    };
    let follower = {
        let mut cfg = ShardConfig::new(1, 2, layout(), coordinated.clone());
        cfg.token = Some(token.clone());
        cfg.exit_when_finished = false;
        ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 1).unwrap()
    };
    let hello = Hello::new(Role::Worker, 1, 1, 2, &coordinated, &layout());
    let mut s = join_with_token(follower.address(), &token, hello);
    let (k, _) = read_frame(&mut s);
    assert_eq!(k, kind::HELLO_OK);
    let head = PushHead {
        base_version: 0,
        samples: 1,
        loss: 0.0,
        pull_s: 0.0,
        codec: pstrain_core::PushCodec::Fp32,
        lane: false,
        own: None,
        step: Some(StepMembers {
            step: u64::MAX - 1,
            members: vec![false, true, false],
        }),
    };
    let mut push = head.encode(3);
    push.extend(std::iter::repeat_n(0u8, 4 * (N / 2)));
    s.write_all(&frame(kind::PUSH, &push)).unwrap();
    let (k, body) = read_frame(&mut s);
    assert_eq!(k, kind::ERROR);
    assert!(String::from_utf8_lossy(&body).contains("too far ahead"));
    // Within the window, a step naming only the sender is complete at once; it waits until
    // a second rank has pushed that far, so it cannot jump the follower on its own.
    let head = PushHead {
        step: Some(StepMembers {
            step: 500,
            members: vec![false, true, false],
        }),
        ..head
    };
    let mut push = head.encode(3);
    push.extend(std::iter::repeat_n(0u8, 4 * (N / 2)));
    s.write_all(&frame(kind::PUSH, &push)).unwrap();
    let (k, _) = read_frame(&mut s);
    assert_eq!(k, kind::PUSH_REPLY);
    drop(s);
    let report = follower.finish().unwrap();
    assert_eq!(report.stats.version, 0, "the version did not move");
}
