//! What strangers can write into a shard's log: nothing of their own. A `pstrain server` with
//! a token, flooded with hellos whose tensor names hold newlines, terminal escapes and
//! forged log lines: the log never shows them raw and stays small.

mod common;

use pstrain_core::{Layout, RunPlan};
use pstrain_net::frame::Header;
use pstrain_net::message::{kind, Hello, Role};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Header {
        kind,
        len: payload.len() as u64,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(payload);
    out
}

#[test]
fn peer_text_never_reaches_the_log_and_refusals_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("run.token");
    let out = Command::new(common::pstrain_bin())
        .args(["token", "-o", token.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = dir.path().join("shard.log");
    let mut child = common::KillOnDrop(
        Command::new(common::pstrain_bin())
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--shard",
                "0",
                "--shards",
                "1",
            ])
            .args(["--workers", "1", "--model", "convnet", "--iterations", "10"])
            .arg("--token-file")
            .arg(&token)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = common::listening_address(&mut child);

    // A hello whose tensor name forges a log line and clears the screen, with a dimension
    // count the decoder refuses (so that the decoder's error would quote the name).
    let layout = Layout::new([("w", &[2usize][..])]).unwrap();
    let mut hello = Hello::new(Role::Worker, 0, 0, 1, &RunPlan::default(), &layout);
    let forged = format!("x\n[shard 0] FORGED LINE\u{1b}[2J{}", "y".repeat(50_000));
    hello.run.tensors = vec![(forged, vec![1; 40])];
    let hello = frame(kind::HELLO, &hello.encode());
    for i in 0..200 {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut bytes = Vec::new();
        if i % 2 == 0 {
            bytes.extend(frame(kind::AUTH, &[5; 32]));
        }
        bytes.extend_from_slice(&hello);
        let _ = s.write_all(&bytes);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        assert!(
            !String::from_utf8_lossy(&reply).contains("FORGED"),
            "the reply quotes the peer"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("FORGED"), "peer text in the log:\n{text}");
    assert!(!text.contains('\u{1b}'), "a terminal escape in the log");
    assert!(
        text.len() < 16 * 1024,
        "the log grew to {} bytes",
        text.len()
    );
}
