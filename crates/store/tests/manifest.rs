//! Run-consistent checkpoints: the manifest is written only when every shard's file of a
//! version is there; every shard of a restarted run restores the same point; files and
//! manifests of other runs are neither restored nor pruned; a point whose files changed is
//! passed over by every shard alike.

use pstrain_core::{ShardCounters, ShardSnapshot};
use pstrain_store::{
    assemble, runs_in, Checkpoint, CheckpointDir, CheckpointPolicy, FileKey, Manifest, ResumeError,
    Saver, ShardIdentity, StoreError,
};
use std::path::Path;

const SHARDS: usize = 2;
const PER_SHARD: usize = 4;

fn identity(run: &str, shard: usize) -> ShardIdentity {
    ShardIdentity {
        run_id: run.into(),
        shard,
        shards: SHARDS,
        range: shard * PER_SHARD..(shard + 1) * PER_SHARD,
        fingerprint: 0xfeed,
    }
}

/// The state a shard has at `version` (its weights say which shard and version they are).
fn state(shard: usize, version: u64) -> ShardSnapshot {
    ShardSnapshot {
        params: vec![shard as f32 * 1000.0 + version as f32; PER_SHARD],
        optimizer: vec![("momentum".into(), vec![0.5; PER_SHARD])],
        optimizer_step: version,
        version,
        stats: ShardCounters {
            version,
            ..Default::default()
        },
    }
}

fn saver(root: &Path, run: &str, shard: usize, keep: usize) -> Saver {
    sealed_saver(root, run, shard, keep, None)
}

fn sealed_saver(root: &Path, run: &str, shard: usize, keep: usize, key: Option<FileKey>) -> Saver {
    let policy = CheckpointPolicy {
        run_id: run.into(),
        dir: root.to_owned(),
        every_updates: Some(10),
        every: None,
        keep,
        resume: true,
        key,
    };
    Saver::new(
        &policy,
        identity(run, shard),
        "toy",
        "plan".into(),
        Vec::new(),
    )
}

/// What a fresh process of `shard` restores when the run restarts: (version, whether from
/// a manifest).
fn restore(root: &Path, run: &str, shard: usize) -> Result<(u64, bool), ResumeError> {
    restore_as(root, run, shard, true)
}

fn restore_as(
    root: &Path,
    run: &str,
    shard: usize,
    from_point: bool,
) -> Result<(u64, bool), ResumeError> {
    let mut restored = None;
    let r = saver(root, run, shard, 3).restore_into(from_point, |s| {
        restored = Some(s.clone());
        Ok(())
    })?;
    let s = restored.expect("restore called");
    assert_eq!(
        s,
        state(shard, r.version),
        "the state written at that version"
    );
    Ok((r.version, r.from_manifest))
}

fn manifests(root: &Path) -> Vec<u64> {
    Manifest::list(root).iter().map(|(v, _)| *v).collect()
}

#[test]
fn every_shard_restores_the_newest_point_all_of_them_reached() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (mut s0, mut s1) = (saver(root, "run-a", 0, 3), saver(root, "run-a", 1, 3));
    for v in [10, 20] {
        s0.save(&state(0, v)).unwrap();
        assert!(
            !manifests(root).contains(&v),
            "one shard's file is no point"
        );
        s1.save(&state(1, v)).unwrap();
        assert!(manifests(root).contains(&v), "the last shard completes it");
    }
    // Every shard dies while shard 0 has written version 30 and shard 1 has not.
    s0.save(&state(0, 30)).unwrap();
    assert_eq!(manifests(root), vec![20, 10]);
    // A shard restarting alone while the others run on takes its own newest file (it loses
    // the least), and nothing is removed.
    assert_eq!(restore_as(root, "run-a", 0, false).unwrap(), (30, false));
    assert_eq!(restore(root, "run-a", 0).unwrap(), (20, true));
    assert_eq!(restore(root, "run-a", 1).unwrap(), (20, true));
    // Shard 0's version 30 belonged to the abandoned future: gone, so it cannot be mixed
    // into a later point.
    let dir0 = CheckpointDir::for_shard(root, 0, SHARDS, 3);
    assert!(!dir0.file("run-a", 30).exists());
    // `eval`/`export` read the same point.
    let a = assemble(root, None).unwrap();
    assert_eq!(a.versions, vec![20, 20]);
    assert_eq!(a.manifest, Some(("run-a".to_string(), 20)));
}

#[test]
fn a_point_whose_file_was_replaced_is_passed_over_by_every_shard() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (mut s0, mut s1) = (saver(root, "run-a", 0, 3), saver(root, "run-a", 1, 3));
    for v in [10, 20] {
        s0.save(&state(0, v)).unwrap();
        s1.save(&state(1, v)).unwrap();
    }
    // Shard 1's file of version 20 is replaced with other contents after the manifest was
    // made (a writer of another timeline): its checksum no longer matches the manifest's.
    let mut other = state(1, 20);
    other.params[0] = -1.0;
    CheckpointDir::for_shard(root, 1, SHARDS, 3)
        .save(
            &Checkpoint {
                identity: identity("run-a", 1),
                state: other,
                model: "toy".into(),
                config: "plan".into(),
                layout: Vec::new(),
            },
            None,
        )
        .unwrap();
    assert_eq!(restore(root, "run-a", 0).unwrap(), (10, true));
    assert_eq!(restore(root, "run-a", 1).unwrap(), (10, true));
}

#[test]
fn another_runs_files_are_refused_and_survive() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let mut a0 = saver(root, "run-a", 0, 1);
    a0.save(&state(0, 10)).unwrap();
    match restore(root, "run-b", 0) {
        Err(ResumeError::NothingValid { skipped, .. }) => {
            let text = format!("{skipped:?}");
            assert!(text.contains("run-a"), "names the other run: {text}");
        }
        other => panic!("run b restored run a's file: {other:?}"),
    }
    assert_eq!(runs_in(root), vec![("run-a".to_string(), 10)]);
    // Run b writing into the same folder never prunes run a's files or manifests.
    let (mut b0, mut b1) = (saver(root, "run-b", 0, 1), saver(root, "run-b", 1, 1));
    for v in [10, 20, 30] {
        b0.save(&state(0, v)).unwrap();
        b1.save(&state(1, v)).unwrap();
    }
    let dir0 = CheckpointDir::for_shard(root, 0, SHARDS, 1);
    assert!(
        dir0.file("run-a", 10).exists(),
        "run a's file is still there"
    );
    assert_eq!(restore(root, "run-a", 0).unwrap(), (10, false));
    assert_eq!(restore(root, "run-b", 1).unwrap(), (30, true));
}

#[test]
fn a_lagging_shard_keeps_the_point_pinned_against_pruning() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (mut s0, mut s1) = (saver(root, "run-a", 0, 1), saver(root, "run-a", 1, 1));
    s0.save(&state(0, 10)).unwrap();
    s1.save(&state(1, 10)).unwrap();
    // Shard 0 runs ahead (async, after shard 1 restarted) while keeping one file.
    for v in [20, 30, 40] {
        s0.save(&state(0, v)).unwrap();
    }
    let dir0 = CheckpointDir::for_shard(root, 0, SHARDS, 1);
    let kept: Vec<u64> = dir0.list().iter().map(|(v, _)| *v).collect();
    assert_eq!(kept, vec![40, 10], "10 is the run's only complete point");
    assert_eq!(restore(root, "run-a", 0).unwrap(), (10, true));
    assert_eq!(restore(root, "run-a", 1).unwrap(), (10, true));
}

#[test]
fn without_any_complete_point_a_shard_restores_its_own_newest_file() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let mut s1 = saver(root, "run-a", 1, 3);
    s1.save(&state(1, 10)).unwrap();
    s1.save(&state(1, 20)).unwrap();
    assert!(manifests(root).is_empty());
    assert_eq!(restore(root, "run-a", 1).unwrap(), (20, false));
}

#[test]
fn hostile_manifests_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (mut s0, mut s1) = (saver(root, "run-a", 0, 3), saver(root, "run-a", 1, 3));
    s0.save(&state(0, 10)).unwrap();
    s1.save(&state(1, 10)).unwrap();
    let good = Manifest::read(&Manifest::path(root, "run-a", 10), None).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("escaping path", {
            let mut m = good.clone();
            m.files[0].file = "../../etc/passwd".into();
            serde_json::to_vec(&m).unwrap()
        }),
        ("absolute path", {
            let mut m = good.clone();
            m.files[1].file = "/etc/passwd".into();
            serde_json::to_vec(&m).unwrap()
        }),
        ("missing shard", {
            let mut m = good.clone();
            m.files.pop();
            serde_json::to_vec(&m).unwrap()
        }),
        ("not json", b"{\"format\": 7".to_vec()),
    ];
    for (what, bytes) in cases {
        let path = Manifest::path(root, "run-a", 99);
        std::fs::write(&path, bytes).unwrap();
        assert!(Manifest::read(&path, None).is_err(), "{what} accepted");
        assert_eq!(restore(root, "run-a", 0).unwrap(), (10, true), "{what}");
    }
    std::fs::write(Manifest::path(root, "run-a", 98), vec![b' '; 5 << 20]).unwrap();
    assert!(
        Manifest::read(&Manifest::path(root, "run-a", 98), None).is_err(),
        "oversized"
    );
}

/// Manifests of this run that the shards did not write (planted, or left by another
/// process) are neither pruned as theirs nor able to push the run's own out.
#[test]
fn only_manifests_a_shard_wrote_are_pruned() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (mut s0, mut s1) = (saver(root, "run-a", 0, 2), saver(root, "run-a", 1, 2));
    s0.save(&state(0, 10)).unwrap();
    s1.save(&state(1, 10)).unwrap();
    // Someone plants five later manifests of the same run (copies of the real one).
    let real = std::fs::read_to_string(Manifest::path(root, "run-a", 10)).unwrap();
    for v in [1000, 2000, 3000, 4000, 5000] {
        std::fs::write(Manifest::path(root, "run-a", v), &real).unwrap();
    }
    for v in [20, 30, 40] {
        s0.save(&state(0, v)).unwrap();
        s1.save(&state(1, v)).unwrap();
    }
    let kept = manifests(root);
    // The run's own newest two, and the planted ones (not the shards' to remove).
    assert_eq!(kept, vec![5000, 4000, 3000, 2000, 1000, 40, 30], "{kept:?}");
    // The planted ones do not verify (their files are version 10's), so a restart takes the
    // run's own newest point.
    assert_eq!(restore(root, "run-a", 0).unwrap(), (40, true));
}

/// With the run's key, someone who can write the folder but lacks the token cannot choose
/// what a shard restores: a whole later point of well-formed files and a manifest made
/// without the key is passed over, and so is the run's own manifest once edited.
#[test]
fn with_a_key_only_points_sealed_by_the_run_are_restored() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let key = FileKey::new([4; 32]);
    let sealed = |shard| sealed_saver(root, "run-a", shard, 5, Some(key.clone()));
    let (mut s0, mut s1) = (sealed(0), sealed(1));
    for v in [10, 20] {
        s0.save(&state(0, v)).unwrap();
        s1.save(&state(1, v)).unwrap();
    }
    // The forger's point 30: every shard's file, intact, of this run's name and identity,
    // and its manifest, all without the key.
    let (mut f0, mut f1) = (saver(root, "run-a", 0, 5), saver(root, "run-a", 1, 5));
    let forged = |saver: &mut Saver, shard| {
        let mut s = state(shard, 30);
        s.params = vec![666.0; PER_SHARD];
        saver.save(&s).unwrap();
    };
    forged(&mut f0, 0);
    forged(&mut f1, 1);
    assert_eq!(manifests(root), vec![30, 20, 10]);
    // `eval`/`export` without the token would take the forger's point; with it, the run's.
    assert_eq!(assemble(root, None).unwrap().versions, vec![30, 30]);
    assert_eq!(assemble(root, Some(&key)).unwrap().versions, vec![20, 20]);
    let restore_sealed = |shard| {
        let mut got = None;
        let r = sealed(shard)
            .restore_into(true, |s| {
                got = Some(s.clone());
                Ok(())
            })
            .unwrap();
        assert_eq!(got.unwrap(), state(shard, r.version));
        (r.version, r.from_manifest, r.skipped)
    };
    let (version, from_manifest, skipped) = restore_sealed(0);
    assert_eq!((version, from_manifest), (20, true));
    assert!(
        skipped
            .iter()
            .any(|e| matches!(e, StoreError::Unsealed { .. })),
        "{skipped:?}"
    );
    // Point 20's manifest edited (its files are the run's own): refused, 10 is restored.
    let path = Manifest::path(root, "run-a", 20);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"plan\"", "\"plan2\"")).unwrap();
    assert!(matches!(
        Manifest::read(&path, Some(&key)),
        Err(StoreError::Unsealed { .. })
    ));
    assert_eq!(restore_sealed(1).0, 10);
    assert_eq!(assemble(root, Some(&key)).unwrap().versions, vec![10, 10]);
}
