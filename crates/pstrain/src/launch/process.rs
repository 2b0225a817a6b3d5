//! Child processes of a local run: a guard that kills what is still running when dropped,
//! and the address line a shard prints once bound.

use crate::run::TrainError;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a shard may take to print its address.
const ADDRESS_GRACE: Duration = Duration::from_secs(30);

/// A child process that is killed if it is still running when this guard drops.
pub(crate) struct Proc {
    pub name: String,
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proc {
    /// Starts `cmd` with its stdout piped, and its stdin piped if `stdin` (else empty).
    pub fn spawn(name: String, cmd: &mut Command, stdin: bool) -> Result<Proc, TrainError> {
        let child = cmd
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| TrainError::Launch(format!("cannot start {name}: {e}")))?;
        Ok(Proc { name, child })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the "listening on ADDR" line a shard prints once bound.
pub(crate) fn read_address(name: &str, stdout: ChildStdout) -> Result<String, TrainError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = tx.send(reader.read_line(&mut line).map(|_| line));
        // Keep draining so the shard never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(ADDRESS_GRACE)
        .map_err(|_| TrainError::Launch(format!("{name} did not report its address")))?
        .map_err(|e| TrainError::Launch(format!("{name}: {e}")))?;
    line.trim()
        .strip_prefix("listening on ")
        .map(str::to_string)
        .ok_or_else(|| match line.trim() {
            "" => TrainError::Launch(format!("{name} failed to start (its error is above)")),
            said => TrainError::Launch(format!("{name} failed to start (said {said:?})")),
        })
}
