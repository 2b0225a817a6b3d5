//! A running shard's beacon: a small file in its checkpoint folder, rewritten every half
//! second, saying that it runs, its version, and the run point it restored at start. A
//! restarting shard of a sync or SSP run watches its peers' beacons to tell its own restart
//! (the others run on: it takes its own newest file, losing the least) from a restart of the
//! whole run (it takes the run's newest complete point, like every other shard).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A beacon larger than this is not read.
const MAX_BEACON_BYTES: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beacon {
    /// Advances with every write: a beacon that does not advance belongs to a dead shard.
    pub beat: u64,
    pub version: u64,
    /// The manifest version the shard restored at start, if it restored one.
    pub restored_point: Option<u64>,
    pub pid: u32,
}

impl Beacon {
    /// `ROOT/shard-I-of-S/alive.RUN.json`.
    pub fn path(root: &Path, run_id: &str, shard: usize, shards: usize) -> PathBuf {
        root.join(format!("shard-{shard}-of-{shards}"))
            .join(format!("alive.{run_id}.json"))
    }

    /// Replaces the beacon (temporary file and rename, no fsync: it only matters while the
    /// shard runs).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension(format!("{}.partial", std::process::id()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    pub fn read(path: &Path) -> Option<Beacon> {
        serde_json::from_slice(&crate::read_at_most(path, MAX_BEACON_BYTES).ok()?).ok()
    }
}

/// Where a restarting shard should resume from, given its peers' beacons read twice, a
/// watch window apart (`None`: no readable beacon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The run's newest complete point: some peer is not running (the run, or part of it,
    /// is restarting), or a peer restarted at a point and has not moved from it.
    RunPoint,
    /// This shard's own newest file: every peer runs on.
    OwnNewest,
}

pub fn resume_from(before: &[Option<Beacon>], after: &[Option<Beacon>]) -> ResumeFrom {
    let mut peers = before.iter().zip(after);
    let all_run_on = peers.all(|pair| match pair {
        (Some(b), Some(a)) => {
            let running = a.beat > b.beat && a.pid == b.pid;
            let waiting_at_a_point = a.restored_point == Some(a.version);
            running && !waiting_at_a_point
        }
        _ => false,
    });
    if all_run_on {
        ResumeFrom::OwnNewest
    } else {
        ResumeFrom::RunPoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beacon(beat: u64, version: u64, restored_point: Option<u64>) -> Option<Beacon> {
        Some(Beacon {
            beat,
            version,
            restored_point,
            pid: 7,
        })
    }

    #[test]
    fn a_shard_restarting_alone_takes_its_own_newest_file() {
        let before = [beacon(10, 4700, None)];
        let after = [beacon(12, 4712, None)];
        assert_eq!(resume_from(&before, &after), ResumeFrom::OwnNewest);
        // Restarted alone earlier from its own file, and running on: still alone.
        let after = [beacon(12, 4712, Some(4000))];
        assert_eq!(resume_from(&before, &after), ResumeFrom::OwnNewest);
    }

    #[test]
    fn a_dead_or_missing_peer_or_one_waiting_at_a_point_means_the_run_restarts() {
        let dead = ([beacon(10, 4700, None)], [beacon(10, 4700, None)]);
        assert_eq!(resume_from(&dead.0, &dead.1), ResumeFrom::RunPoint);
        assert_eq!(resume_from(&[None], &[None]), ResumeFrom::RunPoint);
        // The peer came back first, restored the point, and waits for this shard there.
        let waiting = ([beacon(1, 4000, Some(4000))], [beacon(3, 4000, Some(4000))]);
        assert_eq!(resume_from(&waiting.0, &waiting.1), ResumeFrom::RunPoint);
        // Another process under the same name is a restart too.
        let mut other = beacon(11, 4701, None);
        other.as_mut().unwrap().pid = 8;
        assert_eq!(
            resume_from(&[beacon(10, 4700, None)], &[other]),
            ResumeFrom::RunPoint
        );
    }
}
