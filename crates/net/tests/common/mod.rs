//! What the black-box tests share: a small model layout, the run every test shard serves,
//! and raw frames written and read by hand (as a hostile peer would).
#![allow(dead_code)]

use pstrain_core::{Layout, Mode, OptimizerConfig, RunPlan, ScheduleKind};
use pstrain_net::frame::{Header, HEADER_LEN};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const N: usize = 1000;

pub fn layout() -> Layout {
    Layout::new([("w", &[N - 10][..]), ("b", &[10][..])]).unwrap()
}

/// The run every test shard serves: SGD lr 0.1, constant rate.
pub fn plan(mode: Mode, workers: usize) -> RunPlan {
    RunPlan {
        model: "test".into(),
        mode,
        workers,
        optimizer: OptimizerConfig::sgd(0.1),
        schedule: ScheduleKind::Constant,
        ..RunPlan::default()
    }
}

/// Worker 0 of `plan` for `server` (giving up after 2 s), to adjust before connecting.
pub fn worker_config(
    server: &pstrain_net::ShardHandle,
    plan: RunPlan,
) -> pstrain_net::ClientConfig {
    let address = vec![server.address().to_string()];
    let role = pstrain_net::message::Role::Worker;
    let mut cfg = pstrain_net::ClientConfig::new(address, role, 0, plan, layout());
    cfg.connect_timeout = Duration::from_secs(2);
    cfg
}

/// Worker 0 of `plan`, connected to `server`.
pub fn worker_of(
    server: &pstrain_net::ShardHandle,
    plan: RunPlan,
) -> Result<pstrain_net::TcpClient, pstrain_net::NetError> {
    pstrain_net::TcpClient::connect(&worker_config(server, plan))
}

pub const ASYNC: Mode = Mode::Async {
    max_staleness: None,
};

pub fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Header {
        kind,
        len: payload.len() as u64,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(payload);
    out
}

/// Sends `bytes` and returns everything the shard sends back before it closes.
pub fn attack(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    reply
}

/// One whole frame from `s`: (kind, payload).
pub fn read_frame(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let header = Header::decode(&h, 1 << 30).unwrap();
    let mut payload = vec![0u8; header.len as usize];
    s.read_exact(&mut payload).unwrap();
    (header.kind, payload)
}

/// The header of a push of one sample from `rank`, computed on weights of `base_version`.
pub fn push_meta(rank: usize, base_version: u64) -> pstrain_core::PushMeta {
    pstrain_core::PushMeta {
        rank,
        base_version,
        samples: 1,
        loss: 0.0,
        accumulated: false,
    }
}

/// `steps` pull-then-push rounds of unit gradients as rank 0, `pause` apart, then a goodbye:
/// how many were applied, and the weights.
pub fn train_unit_steps(
    client: &mut pstrain_net::TcpClient,
    steps: usize,
    pause: std::time::Duration,
) -> (u64, Vec<f32>) {
    use pstrain_core::{ParameterClient, PushOutcome};
    let mut params = vec![0.0; N];
    let mut applied = 0;
    for _ in 0..steps {
        let v = client.pull(&mut params, None, false).unwrap().version;
        let meta = push_meta(0, v);
        if let PushOutcome::Applied { .. } = client.push(meta, &vec![1.0; N]).unwrap() {
            applied += 1;
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    client.leave().unwrap();
    (applied, params)
}

/// This process's resident memory in KiB (Linux).
pub fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A token holder, as a raw client: AUTH, then a proven hello; returns the stream.
pub fn join_with_token(
    addr: SocketAddr,
    token: &pstrain_net::RunToken,
    hello: pstrain_net::message::Hello,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mine = [3u8; 32];
    s.write_all(&frame(pstrain_net::message::kind::AUTH, &mine))
        .unwrap();
    let (k, body) = read_frame(&mut s);
    assert_eq!(k, pstrain_net::message::kind::CHALLENGE);
    let mut theirs = [0u8; 32];
    theirs.copy_from_slice(&body[..32]);
    let hello = hello.proven(token, &mine, &theirs);
    s.write_all(&frame(pstrain_net::message::kind::HELLO, &hello.encode()))
        .unwrap();
    s
}
