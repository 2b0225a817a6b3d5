//! What a stranger costs a shard with a run token before proving anything: a header and an
//! AUTH frame, no more (larger unproven hellos wait for one of a few permits); and strangers
//! on a few addresses cannot take the slots the run's own peers need, nor keep a finished run
//! alive.

mod common;

use common::*;
use pstrain_net::frame::Header;
use pstrain_net::message::kind;
use pstrain_net::message::Role;
use pstrain_net::{ClientConfig, RunToken, ShardConfig, ShardHandle, TcpClient};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn shard(token: &RunToken, tune: impl FnOnce(&mut ShardConfig)) -> ShardHandle {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 2));
    cfg.token = Some(token.clone());
    cfg.exit_when_finished = false;
    cfg.handshake_timeout = Duration::from_secs(30);
    tune(&mut cfg);
    ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 2).unwrap()
}

/// A header announcing a `len`-byte frame of `kind`, then `body` bytes of it (not all).
fn announce(kind: u16, len: u64, body: usize) -> Vec<u8> {
    let mut bytes = Header { kind, len }.encode().to_vec();
    bytes.extend(std::iter::repeat_n(0x41u8, body));
    bytes
}

/// A TCP connection to `addr` from the local address `from` (any 127.x.y.z is this host).
fn connect_from(from: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{from}:0").parse().map_err(std::io::Error::other)?)?;
        socket.connect(addr).await?.into_std()
    })
    .and_then(|s| {
        s.set_nonblocking(false)?;
        Ok(s)
    })
}

#[test]
fn unproven_frames_cost_the_shard_almost_nothing() {
    let token = RunToken::generate().unwrap();
    let server = shard(&token, |cfg| {
        cfg.max_unproven = 1000;
        cfg.max_unproven_per_address = 1000;
        cfg.max_connections = 1000;
        cfg.max_connections_per_address = 1000;
    });
    let addr = server.address();
    std::thread::sleep(Duration::from_millis(200));
    let before = resident_kib();
    // 150 strangers announce a 1 MiB hello as their first frame and send half of it; 150
    // more send a proper AUTH first, then the same hello.
    let mut held = Vec::new();
    for i in 0..300 {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut bytes = Vec::new();
        if i % 2 == 1 {
            bytes.extend(frame(kind::AUTH, &[9; 32]));
        }
        bytes.extend(announce(kind::HELLO, 1 << 20, 512 << 10));
        let _ = s.write_all(&bytes);
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let grown = resident_kib().saturating_sub(before);
    println!("300 unproven 1 MiB hellos: resident memory grew by {grown} KiB");
    // Reading every one would be 150 MiB at least; a few permits' worth is allowed.
    assert!(grown < 24 * 1024, "grew by {grown} KiB");
    drop(held);
    let report = server.finish().unwrap();
    assert!(report.events.unauthorized >= 150, "{:?}", report.events);
}

#[test]
fn strangers_on_a_few_addresses_cannot_take_every_slot() {
    let token = RunToken::generate().unwrap();
    let server = shard(&token, |_| {});
    let addr = server.address();
    // Four addresses park 128 connections each: the old per-address cap, which let them take
    // all 512 slots.
    let mut parked = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        parked.extend((0..128).filter_map(|_| connect_from(from, addr).ok()));
    }
    assert!(parked.len() >= 500, "{} connected", parked.len());
    std::thread::sleep(Duration::from_millis(300));
    let mut cfg = ClientConfig::new(
        vec![addr.to_string()],
        Role::Worker,
        0,
        plan(ASYNC, 2),
        layout(),
    );
    cfg.token = Some(token.clone());
    cfg.connect_timeout = Duration::from_secs(3);
    let mut worker = TcpClient::connect(&cfg).expect("the run's worker gets a slot");
    train_unit_steps(&mut worker, 10, Duration::ZERO);
    drop(parked);
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 10);
    assert!(report.events.over_capacity >= 400, "{:?}", report.events);
}

#[test]
fn a_stranger_cannot_keep_a_finished_run_alive() {
    let token = RunToken::generate().unwrap();
    let server = shard(&token, |cfg| {
        cfg.exit_when_finished = true;
        cfg.plan = plan(ASYNC, 1);
    });
    let addr = server.address();
    // A stranger keeps at least one connection open at every moment, opening a new one
    // before it drops an old one, and never says a word.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stranger = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut open = std::collections::VecDeque::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(s) = TcpStream::connect(addr) {
                    open.push_back(s);
                }
                if open.len() > 2 {
                    open.pop_front();
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut cfg = ClientConfig::new(
        vec![addr.to_string()],
        Role::Worker,
        0,
        plan(ASYNC, 1),
        layout(),
    );
    cfg.token = Some(token.clone());
    let mut worker = TcpClient::connect(&cfg).unwrap();
    train_unit_steps(&mut worker, 5, Duration::ZERO);
    // The run is over when its worker is done, whoever else is connected.
    let report = server.wait(Some(Duration::from_secs(5))).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stranger.join().unwrap();
    let report = report.expect("the shard ended within 5 s of its worker's goodbye");
    assert_eq!(report.stats.gradients_applied, 5);
}
