//! A shard with a run token seals its checkpoint files with the token's key and restores
//! only sealed ones: a well-formed file planted in the folder by someone without the token
//! (of this run's name, identity and a later version) is passed over, and a shard with
//! another token refuses the folder instead of restoring it.

mod common;

use common::*;
use pstrain_core::{ParameterClient, ShardCounters, ShardSnapshot};
use pstrain_net::message::Role;
use pstrain_net::{ClientConfig, NetError, RunToken, ShardConfig, ShardHandle, TcpClient};
use pstrain_store::{Checkpoint, CheckpointDir, CheckpointPolicy, ShardIdentity};
use std::path::Path;
use std::time::Duration;

const RUN: &str = "sealed";

fn config(dir: &Path, token: &RunToken) -> ShardConfig {
    let mut cfg = ShardConfig::new(0, 1, layout(), plan(ASYNC, 1));
    cfg.token = Some(token.clone());
    cfg.exit_when_finished = false;
    cfg.checkpoint = Some(CheckpointPolicy {
        run_id: RUN.into(),
        dir: dir.to_owned(),
        every_updates: Some(5),
        every: None,
        keep: 3,
        resume: true,
        key: None,
    });
    cfg
}

fn client(addr: std::net::SocketAddr, token: &RunToken) -> TcpClient {
    let mut cfg = ClientConfig::new(
        vec![addr.to_string()],
        Role::Worker,
        0,
        plan(ASYNC, 1),
        layout(),
    );
    cfg.token = Some(token.clone());
    cfg.connect_timeout = Duration::from_secs(2);
    TcpClient::connect(&cfg).unwrap()
}

#[test]
fn a_planted_checkpoint_is_not_restored_by_a_shard_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = RunToken::generate().unwrap();
    let shard = ShardHandle::start("127.0.0.1:0", config(dir.path(), &token), &[0.0; N], 1)
        .expect("a fresh folder starts");
    train_unit_steps(&mut client(shard.address(), &token), 10, Duration::ZERO);
    let report = shard.finish().unwrap();
    assert_eq!(report.stats.version, 10);

    // Someone who can write the folder, without the token: a later file, intact, of this
    // run and this shard, holding their weights.
    let planted = Checkpoint {
        identity: ShardIdentity {
            run_id: RUN.into(),
            shard: 0,
            shards: 1,
            range: 0..N,
            fingerprint: layout().fingerprint(),
        },
        state: ShardSnapshot {
            params: vec![666.0; N],
            optimizer: vec![],
            optimizer_step: 50,
            version: 50,
            stats: ShardCounters {
                version: 50,
                ..Default::default()
            },
        },
        model: "test".into(),
        config: String::new(),
        layout: Vec::new(),
    };
    let folder = CheckpointDir::for_shard(dir.path(), 0, 1, 3);
    planted.write(&folder.file(RUN, 50), None).unwrap();

    let shard = ShardHandle::start("127.0.0.1:0", config(dir.path(), &token), &[0.0; N], 1)
        .expect("restores past the planted file");
    let mut c = client(shard.address(), &token);
    let mut params = vec![0.0; N];
    let pulled = c.pull(&mut params, None, false).unwrap();
    assert_eq!(
        pulled.version, 10,
        "the run's own newest file, not the planted one"
    );
    assert!(
        params.iter().all(|&p| (p + 1.0).abs() < 1e-5),
        "10 unit steps at lr 0.1"
    );
    c.leave().unwrap();
    shard.finish().unwrap();

    // A shard of another token finds nothing it can trust, and says so.
    let other = RunToken::generate().unwrap();
    let err = ShardHandle::start("127.0.0.1:0", config(dir.path(), &other), &[0.0; N], 1)
        .err()
        .expect("refused");
    assert!(matches!(err, NetError::Restore(_)), "{err}");
    assert!(
        err.to_string().contains("not sealed with this run's key"),
        "{err}"
    );
}
