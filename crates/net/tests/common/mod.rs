//! What the black-box tests share: a small model layout, the run every test shard serves,
//! and raw frames written and read by hand (as a hostile peer would).
#![allow(dead_code)]

use pstrain_core::{Layout, Mode, OptimizerConfig, RunPlan, Schedule};
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
        schedule: Schedule::Constant,
        ..RunPlan::default()
    }
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
