//! TLS against a live shard: a worker that trusts the shard's CA trains over it; a client
//! that speaks plain TCP, or trusts another CA, is refused and changes nothing.

mod common;

use common::*;
use pstrain_core::{ParameterClient, PushMeta, PushOutcome};
use pstrain_net::{
    ClientConfig, Role, RunToken, ShardConfig, ShardHandle, TcpClient, TlsClient, TlsServer,
};
use std::net::SocketAddr;
use std::time::Duration;

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM).
fn self_signed() -> (String, String) {
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    (certified.cert.pem(), certified.key_pair.serialize_pem())
}

fn client(addr: SocketAddr, token: &RunToken, tls: Option<TlsClient>) -> ClientConfig {
    let mut cfg = ClientConfig::new(
        vec![addr.to_string()],
        Role::Worker,
        0,
        plan(ASYNC, 1),
        layout(),
    );
    cfg.token = Some(token.clone());
    cfg.tls = tls;
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.io_timeout = Duration::from_secs(5);
    cfg
}

#[test]
fn a_worker_over_tls_trains_and_clients_without_the_ca_are_refused() {
    let (cert, key) = self_signed();
    let token = RunToken::generate().unwrap();
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 1));
    cfg.token = Some(token.clone());
    cfg.tls = Some(TlsServer::from_pem(cert.as_bytes(), key.as_bytes()).unwrap());
    cfg.exit_when_finished = false;
    cfg.handshake_timeout = Duration::from_secs(2);
    let server = ShardHandle::start("127.0.0.1:0", cfg, &vec![0.0; N], 2).unwrap();
    let addr = server.address();

    // Plain TCP to a TLS shard: the handshake fails, nothing is served.
    assert!(TcpClient::connect(&client(addr, &token, None)).is_err());
    // TLS trusting another CA: the shard's certificate is refused by the client.
    let (other_ca, _) = self_signed();
    let stranger = TlsClient::from_ca_pem(other_ca.as_bytes()).unwrap();
    let err = TcpClient::connect(&client(addr, &token, Some(stranger)))
        .err()
        .unwrap();
    assert!(err.to_string().contains("TLS"), "{err}");

    let trusted = TlsClient::from_ca_pem(cert.as_bytes()).unwrap();
    let served = pstrain_net::describe(
        &[addr.to_string()],
        Duration::from_secs(2),
        Duration::from_secs(2),
        Some(&token),
        Some(&trusted),
    )
    .unwrap();
    assert_eq!(served.plan, plan(ASYNC, 1));
    let mut c = TcpClient::connect(&client(addr, &token, Some(trusted))).unwrap();
    let mut params = vec![0.0; N];
    for _ in 0..100 {
        let v = c.pull(&mut params, None, false).unwrap().version;
        let meta = PushMeta {
            rank: 0,
            base_version: v,
            samples: 1,
            loss: 0.0,
            accumulated: false,
        };
        assert!(matches!(
            c.push(meta, &vec![1.0; N]).unwrap(),
            PushOutcome::Applied { .. }
        ));
    }
    c.pull(&mut params, None, false).unwrap();
    assert!(
        params.iter().all(|&p| (p + 10.0).abs() < 1e-3),
        "{}",
        params[0]
    );
    c.leave().unwrap();
    let report = server.finish().unwrap();
    assert_eq!(report.stats.gradients_applied, 100);
    assert!(report.events.protocol_errors >= 2, "{:?}", report.events);
}

#[test]
fn bad_certificate_files_get_clear_errors() {
    assert!(TlsServer::from_pem(b"not a certificate", b"nor a key").is_err());
    let err = TlsClient::from_ca_pem(b"").unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
    let missing = TlsClient::from_ca_file(std::path::Path::new("/nonexistent/ca.pem"));
    assert!(missing.is_err());
}
