//! Crash-safe file replacement: temporary file, fsync, rename, fsync of the folder, so a
//! crash at any moment leaves either the old file or the complete new one. The temporary
//! file is a new one (`O_EXCL`: an existing file or a link planted under its name is never
//! opened, let alone followed) with a name nobody can guess.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Makes `dir` (and its parents) and checks that a file can be created in it: a folder that
/// cannot take files is found when a run starts, not at its first save.
pub fn check_writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".write-check.{:016x}.partial", unguessable()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.partial", unguessable()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        write(&mut file)?;
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself must reach the disk for the new name to survive a power cut.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// 64 bits no other process can predict: a hasher keyed from the OS's randomness (std's
/// `RandomState`), fed this process, a counter and the time.
fn unguessable() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Links planted under every name a writer could pick are never followed: the victim
    /// stays as it was (the temporary name is not guessable, and not opened if it exists).
    #[test]
    fn a_planted_link_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let target = dir.path().join("ckpt");
        // The old scheme's names for this process and its first thousand saves.
        for n in 0..1000 {
            let old = dir
                .path()
                .join(format!(".ckpt.{}-{n}.partial", std::process::id()));
            std::os::unix::fs::symlink(&victim, old).unwrap();
        }
        for _ in 0..20 {
            write_atomically(&target, |f| f.write_all(b"new")).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        let a = unguessable();
        assert_ne!(a, unguessable());
    }
}
