//! `Fault`: a failure injected into a local cluster (a killed, frozen or replaced process),
//! for testing recovery with real processes.

use std::time::Duration;

/// A failure injected into a local cluster, for testing recovery with real processes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// `kill -9` worker `rank` once the servers reach `at_update` updates; with
    /// `restart_after`, start a new process with the same rank that long after (it pulls the
    /// latest weights and rejoins).
    KillWorker {
        rank: usize,
        at_update: u64,
        restart_after: Option<Duration>,
    },
    /// `kill -9` shard `shard` at `at_update`, and start it again on the same address after
    /// `down_for` (it reloads its newest checkpoint).
    KillShard {
        shard: usize,
        at_update: u64,
        down_for: Duration,
    },
    /// `kill -9` worker `rank` at `at_update` without telling the launcher, which finds a
    /// worker that failed (as after a crash or an out-of-memory kill).
    CrashWorker { rank: usize, at_update: u64 },
    /// `kill -STOP` worker `rank` at `at_update`: alive but silent, as a hung host is. It is
    /// killed when the run ends.
    FreezeWorker { rank: usize, at_update: u64 },
    /// `kill -9` worker `rank` at `at_update` and start a replacement with `--rank auto`
    /// `after` later: it must take the vacated rank.
    ReplaceWorker {
        rank: usize,
        at_update: u64,
        after: Duration,
    },
}

impl Fault {
    pub(crate) fn at_update(&self) -> u64 {
        match *self {
            Fault::KillWorker { at_update, .. }
            | Fault::KillShard { at_update, .. }
            | Fault::CrashWorker { at_update, .. }
            | Fault::FreezeWorker { at_update, .. }
            | Fault::ReplaceWorker { at_update, .. } => at_update,
        }
    }
}
