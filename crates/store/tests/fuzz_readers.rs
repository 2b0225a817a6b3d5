//! Property tests of the readers of files a user or a disk can damage: the safetensors parser
//! and the checkpoint reader get random bytes and mutations of a valid checkpoint; they answer
//! `Ok` or `Err`, never panic, and no allocation exceeds a bound proportional to the input.

#[path = "../../../test-support/peak_alloc.rs"]
mod peak_alloc;

use peak_alloc::{mutate, Peak};
use proptest::prelude::*;
use pstrain_core::{ShardCounters, ShardSnapshot};
use pstrain_store::{safetensors, Checkpoint, ShardIdentity};
use std::path::Path;
use std::sync::OnceLock;

#[global_allocator]
static ALLOCATOR: Peak = Peak;

fn valid_checkpoint() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let ckpt = Checkpoint {
            identity: ShardIdentity {
                run_id: "fuzz-run".into(),
                shard: 0,
                shards: 1,
                range: 0..6,
                fingerprint: 0xabc,
            },
            state: ShardSnapshot {
                params: vec![0.5, -1.0, 2.0, 0.0, 1.0, 3.0],
                optimizer: vec![("m".into(), vec![0.1; 6]), ("v".into(), vec![0.2; 6])],
                optimizer_step: 4,
                version: 9,
                stats: ShardCounters::default(),
            },
            model: "cnn".into(),
            config: "{}".into(),
            layout: vec![("w".into(), vec![2, 3])],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        ckpt.write(&path, None).unwrap();
        std::fs::read(&path).unwrap()
    })
}

fn read_everything(input: &[u8]) {
    let _ = peak_alloc::bounded("safetensors", input, 4096, 16, safetensors::parse);
    let _ = peak_alloc::bounded("checkpoint", input, 4096, 16, |b| {
        Checkpoint::from_bytes(b, Path::new("fuzz"), None)
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        read_everything(&input);
    }

    #[test]
    fn a_header_then_anything(
        header_len in 0u64..2000,
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut input = header_len.to_le_bytes().to_vec();
        input.extend_from_slice(&body);
        read_everything(&input);
    }

    #[test]
    fn mutated_checkpoints_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<usize>()),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        read_everything(&mutate(valid_checkpoint(), &edits, cut, &tail));
    }
}

#[test]
fn the_valid_checkpoint_reads_back() {
    let c = Checkpoint::from_bytes(valid_checkpoint(), Path::new("valid"), None).unwrap();
    assert_eq!(c.state.version, 9);
}
