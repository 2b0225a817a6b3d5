//! A shard's checkpoint folder, keeping the newest K and falling back past damaged files to
//! the newest good one.

use crate::checkpoint::{max_bytes_for, Checkpoint, ShardIdentity, StoreError, DEFAULT_MAX_BYTES};
use crate::seal::FileKey;
use std::path::{Path, PathBuf};

/// One shard's checkpoint folder: `ROOT/shard-I-of-S/ckpt-VERSION.safetensors`.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
    keep: usize,
}

impl CheckpointDir {
    pub fn for_shard(root: &Path, shard: usize, shards: usize, keep: usize) -> Self {
        CheckpointDir {
            dir: root.join(format!("shard-{shard}-of-{shards}")),
            keep: keep.max(1),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Checkpoint files, newest version first.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                Some((parse_versioned(&name, "ckpt-", ".safetensors")?, e.path()))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found
    }

    /// The file name of `run_id`'s checkpoint of `version`: the run in the name, so two runs
    /// sharing a folder never replace each other's files.
    pub fn file_name(run_id: &str, version: u64) -> String {
        format!("ckpt-{version:012}.{run_id}.safetensors")
    }

    /// The path of this shard's checkpoint of `version` in `run_id`.
    pub fn file(&self, run_id: &str, version: u64) -> PathBuf {
        self.dir.join(Self::file_name(run_id, version))
    }

    /// How many of its own files a writer keeps.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Writes `ckpt` (atomically). Pruning is the writer's: only files it wrote itself may
    /// go, whatever else the folder holds (see `Saver::save`).
    pub fn save(&self, ckpt: &Checkpoint, key: Option<&FileKey>) -> Result<PathBuf, StoreError> {
        let run = &ckpt.identity.run_id;
        if !is_plain_run_id(run) {
            return Err(StoreError::Invalid {
                path: self.dir.clone(),
                why: format!("run id `{run}` is not a plain name"),
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let path = self.file(&ckpt.identity.run_id, ckpt.state.version);
        ckpt.write(&path, key)?;
        Ok(path)
    }

    /// The newest checkpoint that reads back intact (sealed with `key`, if given) and
    /// belongs to `identity`; every file passed over is reported in the returned list of
    /// problems.
    /// `metadata` bounds the names and records a file of `identity` holds (`metadata_bound`).
    pub fn load_newest(
        &self,
        identity: &ShardIdentity,
        metadata: u64,
        key: Option<&FileKey>,
    ) -> (Option<(PathBuf, Checkpoint)>, Vec<StoreError>) {
        let accept = |c: &Checkpoint| &c.identity == identity;
        // A refused file says how it differs from this shard.
        let why = |c: &Checkpoint| unlike(c, identity);
        self.newest(max_bytes_for(identity, metadata), key, accept, why)
    }

    /// The newest intact checkpoint accepted by `accept`.
    pub fn load_newest_where(
        &self,
        key: Option<&FileKey>,
        accept: impl Fn(&Checkpoint) -> bool,
    ) -> (Option<(PathBuf, Checkpoint)>, Vec<StoreError>) {
        let why = |c: &Checkpoint| format!("saved for {}", describe(&c.identity));
        self.newest(DEFAULT_MAX_BYTES, key, accept, why)
    }

    /// The newest file of at most `max_bytes` that reads back intact and is accepted; each
    /// one refused says `why`.
    fn newest(
        &self,
        max_bytes: u64,
        key: Option<&FileKey>,
        accept: impl Fn(&Checkpoint) -> bool,
        why: impl Fn(&Checkpoint) -> String,
    ) -> (Option<(PathBuf, Checkpoint)>, Vec<StoreError>) {
        let mut problems = Vec::new();
        for (_, path) in self.list() {
            match Checkpoint::read_bounded(&path, max_bytes, key) {
                Ok(c) if accept(&c) => return (Some((path, c)), problems),
                Ok(c) => problems.push(StoreError::Mismatch {
                    path: path.clone(),
                    why: why(&c),
                }),
                Err(e) => problems.push(e),
            }
        }
        (None, problems)
    }
}

/// A checkpoint's identity in words.
fn describe(id: &ShardIdentity) -> String {
    format!(
        "run {}, shard {} of {}, values {}..{}",
        id.run_id, id.shard, id.shards, id.range.start, id.range.end
    )
}

/// How checkpoint `file` differs from the shard `ours`, in words.
pub(crate) fn unlike(file: &Checkpoint, ours: &ShardIdentity) -> String {
    let theirs = &file.identity;
    let mut why = Vec::new();
    if theirs.run_id != ours.run_id {
        why.push(format!(
            "saved by run {}, this is run {}",
            theirs.run_id, ours.run_id
        ));
    }
    if (theirs.shard, theirs.shards) != (ours.shard, ours.shards) {
        why.push(format!(
            "saved for shard {} of {}, this is shard {} of {}",
            theirs.shard, theirs.shards, ours.shard, ours.shards
        ));
    }
    if theirs.range != ours.range || theirs.fingerprint != ours.fingerprint {
        why.push(format!(
            "its model (`{}`) has values {}..{} here, this run's {}..{} (another model, or one \
             sized for other data)",
            file.model, theirs.range.start, theirs.range.end, ours.range.start, ours.range.end
        ));
    }
    if why.is_empty() {
        describe(theirs)
    } else {
        why.join("; ")
    }
}

/// A run id fit for file names and messages: 1 to 64 letters, digits, `-`, `_` or `.`, not
/// starting with `.`.
pub fn is_plain_run_id(run: &str) -> bool {
    let plain = run
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    !run.is_empty() && run.len() <= 64 && plain && !run.starts_with('.')
}

/// The version in `PREFIX VERSION [.RUN] SUFFIX` (the run is in the name since run ids; files
/// without one are listed too, and refused when read).
pub(crate) fn parse_versioned(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let middle = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let version = middle.split_once('.').map_or(middle, |(v, _)| v);
    version.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::FileKey;
    use pstrain_core::{ShardCounters, ShardSnapshot};

    fn ckpt(version: u64) -> Checkpoint {
        Checkpoint {
            identity: ShardIdentity {
                run_id: "run-a".into(),
                shard: 1,
                shards: 2,
                range: 10..14,
                fingerprint: 0xabc,
            },
            state: ShardSnapshot {
                params: vec![1.0, 2.0, 3.0, version as f32],
                optimizer: vec![
                    ("exp_avg".into(), vec![0.1; 4]),
                    ("exp_avg_sq".into(), vec![0.2; 4]),
                ],
                optimizer_step: version,
                version,
                stats: ShardCounters {
                    version,
                    gradients_applied: 2 * version,
                    samples_applied: 64 * version,
                    ..Default::default()
                },
            },
            model: "convnet".into(),
            config: "{\"mode\":\"sync\"}".into(),
            layout: vec![("w".into(), vec![2, 2])],
        }
    }

    /// Run `run-a`'s checkpoints in `root`, the newest two kept.
    fn policy(root: &Path, resume: bool) -> crate::CheckpointPolicy {
        crate::CheckpointPolicy {
            run_id: "run-a".into(),
            dir: root.to_owned(),
            every_updates: None,
            every: None,
            keep: 2,
            resume,
            key: None,
        }
    }

    /// A model of many tensors with long names records more than the fixed megabyte of
    /// metadata a file was allowed: its own checkpoints were refused at the restore as
    /// larger than a checkpoint of its layout could be.
    #[test]
    fn a_checkpoint_of_a_hundred_thousand_named_tensors_restores() {
        let root = tempfile::tempdir().unwrap();
        let tensors = 100_000;
        let layout: crate::checkpoint::TensorShapes = (0..tensors)
            .map(|i| {
                (
                    format!("blocks.{i}.attention.query_projection.weight"),
                    vec![1],
                )
            })
            .collect();
        let identity = ShardIdentity {
            run_id: "run-a".into(),
            shard: 0,
            shards: 1,
            range: 0..tensors,
            fingerprint: 0xabc,
        };
        let mut saver = crate::Saver::new(
            &policy(root.path(), true),
            identity,
            "custom",
            String::new(),
            layout,
        );
        let state = ShardSnapshot {
            params: vec![0.5; tensors],
            version: 3,
            ..ckpt(3).state
        };
        let state = ShardSnapshot {
            optimizer: vec![],
            ..state
        };
        saver.save(&state).unwrap();
        let mut restored = None;
        let r = saver
            .restore_into(false, |s| {
                restored = Some(s.params.len());
                Ok(())
            })
            .unwrap();
        assert_eq!((r.version, restored), (3, Some(tensors)));
    }

    #[test]
    fn keeps_the_newest_and_falls_back_past_damage() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::for_shard(root.path(), 1, 2, 2);
        // The writer prunes its own files down to the newest two.
        let c0 = ckpt(0);
        let policy = policy(root.path(), false);
        let mut saver = crate::Saver::new(&policy, c0.identity, &c0.model, c0.config, c0.layout);
        for v in [5, 10, 15] {
            saver.save(&ckpt(v).state).unwrap();
        }
        let versions: Vec<u64> = dir.list().iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, vec![15, 10], "only the newest two are kept");
        let id = ckpt(0).identity;
        let (found, problems) = dir.load_newest(&id, 0, None);
        assert_eq!(found.unwrap().1, ckpt(15));
        assert!(problems.is_empty());

        // Flip one byte of the newest file's data: the checksum catches it, 10 is used.
        let newest = dir.list()[0].1.clone();
        let mut bytes = std::fs::read(&newest).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&newest, &bytes).unwrap();
        let (found, problems) = dir.load_newest(&id, 0, None);
        assert_eq!(found.unwrap().1.state.version, 10);
        assert!(
            matches!(problems[0], StoreError::Checksum { .. }),
            "{:?}",
            problems
        );

        // Truncate it instead: a format error, same fallback.
        std::fs::write(&newest, &bytes[..n / 2]).unwrap();
        let (found, problems) = dir.load_newest(&id, 0, None);
        assert_eq!(found.unwrap().1.state.version, 10);
        assert!(
            matches!(problems[0], StoreError::Format { .. }),
            "{:?}",
            problems
        );

        // Another shard's identity matches nothing, and each refusal says how it differs.
        let other = ShardIdentity {
            shard: 0,
            ..id.clone()
        };
        let (found, problems) = dir.load_newest(&other, 0, None);
        assert!(found.is_none());
        let mismatch = |problems: &[StoreError]| {
            (problems.iter())
                .find(|p| matches!(p, StoreError::Mismatch { .. }))
                .map(ToString::to_string)
                .expect("a mismatch")
        };
        let said = mismatch(&problems);
        assert!(
            said.contains("saved for shard 1 of 2, this is shard 0 of 2")
                && !said.contains("values"),
            "{said}"
        );
        // A model of another size (another data shape) is named, with both ranges.
        let wider = ShardIdentity {
            range: 10..20,
            fingerprint: 0xdef,
            ..id
        };
        let (_, problems) = dir.load_newest(&wider, 0, None);
        let said = mismatch(&problems);
        assert!(
            said.contains("its model (`convnet`) has values 10..14 here, this run's 10..20"),
            "{said}"
        );
    }

    /// Files that are not what they seem never stall or flood a restore, and an intact file
    /// holding non-finite values is passed over for an older good one: a FIFO (which would
    /// block a reader), a link to `/dev/zero` (which reads without end), a file larger than
    /// the slice's checkpoint can be, a newer file of NaNs.
    #[test]
    fn hostile_files_are_passed_over_for_the_newest_good_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::for_shard(root.path(), 1, 2, 10);
        let id = ckpt(0).identity;
        dir.save(&ckpt(10), None).unwrap();
        let mut nan = ckpt(20);
        nan.state.params[1] = f32::NAN;
        dir.save(&nan, None).unwrap();
        let name = |v| dir.path().join(CheckpointDir::file_name("run-a", v));
        let fifo = std::ffi::CString::new(name(30).to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/zero", name(40)).unwrap();
        let big = std::fs::File::create(name(50)).unwrap();
        big.set_len(crate::checkpoint::max_bytes_for(&id, 0) + 1)
            .unwrap();

        let started = std::time::Instant::now();
        let (found, problems) = dir.load_newest(&id, 0, None);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(found.unwrap().1.state.version, 10);
        let said: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(said.len(), 4, "{said:?}");
        assert!(said[0].contains("more than a checkpoint"), "{said:?}");
        assert!(said[1].contains("not a regular file"), "{said:?}");
        assert!(said[2].contains("not a regular file"), "{said:?}");
        assert!(said[3].contains("NaN"), "{said:?}");
    }

    /// With the run's key, a file the run did not seal is refused by name, however intact:
    /// one written without a key (anyone with write access to the folder can make one, CRC
    /// and all), and one sealed with another run's key.
    #[test]
    fn a_sealed_run_restores_only_files_sealed_with_its_key() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::for_shard(root.path(), 1, 2, 10);
        let id = ckpt(0).identity;
        let (ours, theirs) = (FileKey::new([7; 32]), FileKey::new([8; 32]));
        dir.save(&ckpt(10), Some(&ours)).unwrap();
        let mut forged = ckpt(20);
        forged.state.params = vec![123.0; 4];
        dir.save(&forged, None).unwrap();
        let mut other = ckpt(30);
        other.state.params = vec![-5.0; 4];
        dir.save(&other, Some(&theirs)).unwrap();

        let (found, problems) = dir.load_newest(&id, 0, Some(&ours));
        assert_eq!(found.unwrap().1, ckpt(10));
        let said: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said
            .iter()
            .all(|s| s.contains("not sealed with this run's key")));
        assert!(said[0].contains("000000000030") && said[1].contains("000000000020"));
        // Without the key only the CRC is checked: the newest intact file is read.
        assert_eq!(dir.load_newest(&id, 0, None).0.unwrap().1, other);
    }
}
