//! Shared-memory lanes between a shard and a worker on its host: the same training through a
//! lane as through TCP (bit for bit), what a lane push and pull look like on the wire, and
//! what a worker cannot do with one: push NaN through it, use a lane it did not prove it
//! mapped, name a lane its connection does not have, or take more lane memory than the
//! shard's budget (the worker then stays on TCP).
#![cfg(target_os = "linux")]

mod common;

use common::*;
use pstrain_core::{ParameterClient, PullCodec, PushCodec};
use pstrain_net::lane::Lane;
use pstrain_net::message::{kind, Hello, PushHead, Reply, Request, Role, PULLED_LEN};
use pstrain_net::{ClientConfig, RunToken, ShardConfig, ShardHandle, TcpClient};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

fn start(lane_budget: u64, token: Option<RunToken>) -> ShardHandle {
    start_for(1, lane_budget, token)
}

fn start_for(workers: usize, lane_budget: u64, token: Option<RunToken>) -> ShardHandle {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, workers));
    cfg.exit_when_finished = false;
    cfg.token = token;
    cfg.lane_budget = lane_budget;
    let initial: Vec<f32> = (0..N).map(|i| (i as f32 * 0.37).sin()).collect();
    ShardHandle::start("127.0.0.1:0", cfg, &initial, 1).unwrap()
}

fn client(server: &ShardHandle, lanes: bool) -> TcpClient {
    let mut cfg = ClientConfig::new(
        vec![server.address().to_string()],
        Role::Worker,
        0,
        plan(ASYNC, 1),
        layout(),
    );
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.lanes = lanes;
    TcpClient::connect(&cfg).unwrap()
}

/// Ten pull-push rounds of gradients that depend on the weights pulled; the weights pulled
/// at the end.
fn train(c: &mut TcpClient) -> Vec<f32> {
    let mut params = vec![0.0; N];
    for _ in 0..10 {
        let v = c.pull(&mut params, None, false).unwrap().version;
        let grad: Vec<f32> = params.iter().map(|p| p * 0.5 - 0.1).collect();
        c.push(push_meta(0, v), &grad).unwrap();
    }
    c.pull(&mut params, None, false).unwrap();
    params
}

#[test]
fn training_through_a_lane_matches_tcp_bit_for_bit() {
    let (tcp_server, lane_server) = (start(0, None), start(1 << 20, None));
    let mut plain = client(&tcp_server, true);
    // A shard with no lane budget declines; one with room gives this worker a lane.
    assert_eq!(plain.lanes_in_use(), 0);
    let over_tcp = train(&mut plain);
    let mut c = client(&lane_server, true);
    assert_eq!(c.lanes_in_use(), 1);
    assert_eq!(client(&start(1 << 20, None), false).lanes_in_use(), 0);
    let through_lane = train(&mut c);
    assert_eq!(
        over_tcp.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        through_lane.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // The worker's record counts a lane push and pull as the same bytes over TCP.
    let link = c.stats().unwrap()[0].workers[0];
    let push = (PushHead::len(1) + 4 * N) as u64;
    assert_eq!(link.push_bytes.0, 10 * push);
    assert_eq!(link.pull_bytes.0, 11 * 4 * N as u64);
}

/// A raw worker 0 on `server` (token `token`), after its hello.
fn raw_worker(server: &ShardHandle, token: &RunToken) -> TcpStream {
    raw_worker_of(server, token, 0, 1)
}

/// A raw worker `rank` of a `workers`-worker run, after its hello.
fn raw_worker_of(server: &ShardHandle, token: &RunToken, rank: usize, workers: usize) -> TcpStream {
    let hello = Hello::new(Role::Worker, rank, 0, 1, &plan(ASYNC, workers), &layout());
    let mut s = join_with_token(server.address(), token, hello);
    assert_eq!(read_frame(&mut s).0, kind::HELLO_OK);
    s
}

fn send(s: &mut TcpStream, request: &Request) -> (u16, Vec<u8>) {
    s.write_all(&frame(request.kind(), &request.encode(1)))
        .unwrap();
    read_frame(s)
}

/// Asks for a lane and maps it: the lane and the nonce read from it.
fn offered_lane(s: &mut TcpStream) -> (Lane, [u8; 16]) {
    let (k, body) = send(s, &Request::Lane);
    let Ok(Reply::LaneOffer { path }) = Reply::decode(k, &body, 1) else {
        panic!(
            "expected a lane offer, got kind {k:#x}: {}",
            String::from_utf8_lossy(&body)
        );
    };
    Lane::open(&path, N).unwrap()
}

fn lane_push(values_in_lane: bool) -> Request {
    Request::Push(PushHead {
        base_version: 0,
        samples: 1,
        loss: 0.0,
        pull_s: 0.0,
        codec: PushCodec::Fp32,
        lane: values_in_lane,
        own: None,
        step: None,
    })
}

/// An fp32 pull of the whole slice, now, through the lane or not.
fn fp32_pull(lane: bool) -> Request {
    Request::Pull {
        newer_than: None,
        wait: false,
        codec: PullCodec::Fp32,
        lane,
    }
}

fn error_text(k: u16, body: &[u8]) -> String {
    assert_eq!(k, kind::ERROR, "{}", String::from_utf8_lossy(body));
    String::from_utf8_lossy(body).into_owned()
}

#[test]
fn a_lane_push_is_checked_after_it_is_copied_and_a_lane_pull_arrives_in_the_lane() {
    let token = RunToken::generate().unwrap();
    let server = start(1 << 20, Some(token.clone()));
    let mut s = raw_worker(&server, &token);
    let (lane, nonce) = offered_lane(&mut s);
    assert_eq!(
        send(&mut s, &Request::LaneConfirm { nonce }).0,
        kind::LANE_READY
    );
    // NaN through the lane is refused like NaN over TCP.
    let mut grad = vec![1.0f32; N];
    grad[17] = f32::NAN;
    lane.write(false, &grad);
    let (k, body) = send(&mut s, &lane_push(true));
    assert!(
        error_text(k, &body).contains("non-finite"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // A finite one is applied (SGD lr 0.1 on the initial weights).
    lane.write(false, &vec![1.0f32; N]);
    let (k, _) = send(&mut s, &lane_push(true));
    assert_eq!(k, kind::PUSH_REPLY);
    let (k, body) = send(&mut s, &fp32_pull(true));
    let Ok(Reply::Pulled(p)) = Reply::decode(k, &body, 1) else {
        panic!("expected a pull reply, got kind {k:#x}");
    };
    // Nothing follows the head: the slice is in the lane.
    assert!(p.in_lane && p.updated && p.version == 1 && body.len() == PULLED_LEN);
    let mut weights = vec![0.0f32; N];
    lane.read(true, &mut weights);
    for (i, w) in weights.iter().enumerate() {
        let expected = (i as f32 * 0.37).sin() - 0.1;
        assert!((w - expected).abs() < 1e-6, "{i}: {w} vs {expected}");
    }
}

#[test]
fn a_lane_not_proven_or_not_offered_cannot_be_used() {
    let token = RunToken::generate().unwrap();
    let server = start(1 << 20, Some(token.clone()));
    // The wrong nonce: refused, and a push naming the lane then ends the connection.
    let mut s = raw_worker(&server, &token);
    let (_lane, nonce) = offered_lane(&mut s);
    let mut wrong = nonce;
    wrong[0] ^= 1;
    let (k, body) = send(&mut s, &Request::LaneConfirm { nonce: wrong });
    assert!(error_text(k, &body).contains("nonce"));
    let (k, body) = send(&mut s, &lane_push(true));
    assert!(error_text(k, &body).contains("lane"));
    // Never offered: a pull naming a lane is refused too.
    let mut s = raw_worker(&server, &token);
    let (k, body) = send(&mut s, &fp32_pull(true));
    assert!(error_text(k, &body).contains("lane"));
    // A lane push that also carries values is malformed.
    let mut s = raw_worker(&server, &token);
    let (_lane, nonce) = offered_lane(&mut s);
    assert_eq!(
        send(&mut s, &Request::LaneConfirm { nonce }).0,
        kind::LANE_READY
    );
    let mut payload = lane_push(true).encode(1);
    payload.extend(std::iter::repeat_n(0u8, 4 * N));
    s.write_all(&frame(kind::PUSH, &payload)).unwrap();
    let (k, body) = read_frame(&mut s);
    assert!(error_text(k, &body).contains("lane push"));
    // An observer holds no seat and gets no lane.
    let hello = Hello::new(Role::Observer, 0, 0, 1, &plan(ASYNC, 1), &layout());
    let mut s = join_with_token(server.address(), &token, hello);
    assert_eq!(read_frame(&mut s).0, kind::HELLO_OK);
    let (k, _) = send(&mut s, &Request::Lane);
    assert_eq!(k, kind::ERROR);
}

#[test]
fn past_the_lane_budget_a_worker_stays_on_tcp() {
    let token = RunToken::generate().unwrap();
    // Two workers; room for one lane of this slice (64 + 8N bytes), not two.
    let server = start_for(2, 64 + 8 * N as u64 + 100, Some(token.clone()));
    let mut first = raw_worker_of(&server, &token, 0, 2);
    let (_lane, _) = offered_lane(&mut first);
    let mut second = raw_worker_of(&server, &token, 1, 2);
    let (k, body) = send(&mut second, &Request::Lane);
    assert!(error_text(k, &body).contains("budget"));
    // The connection goes on over TCP.
    let (k, body) = send(&mut second, &fp32_pull(false));
    assert_eq!(k, kind::PULL_REPLY);
    assert_eq!(body.len(), PULLED_LEN + 4 * N);
    // Once the first connection ends, its lane's bytes are free again.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (k, _) = send(&mut second, &Request::Lane);
        if k == kind::LANE_OFFER {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lane's bytes never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
