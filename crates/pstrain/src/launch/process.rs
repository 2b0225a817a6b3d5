//! Child processes of a local run: a guard that kills what is still running when dropped,
//! and the address line a shard prints once bound.

use crate::run::TrainError;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a shard may take to print its address.
const ADDRESS_GRACE: Duration = Duration::from_secs(30);

/// How a child ends when its launcher dies.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ending {
    /// SIGTERM: a shard stops as on Ctrl-C and writes its final checkpoint.
    Stop,
    /// SIGKILL: a worker holds nothing the run needs, and may be waiting on a shard that is
    /// gone.
    Kill,
}

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
    /// Starts `cmd` with its stdout piped, and its stdin piped if `stdin` (else empty). On
    /// Linux the child is sent `ending`'s signal if this thread ends, so that the processes
    /// of a run end with their launcher even when it is killed outright (SIGKILL runs no
    /// `Drop`): an orphan never goes on training, or writing the checkpoint folder a
    /// `--resume` is about to use.
    pub fn spawn(
        name: String,
        cmd: &mut Command,
        stdin: bool,
        ending: Ending,
    ) -> Result<Proc, TrainError> {
        #[cfg(target_os = "linux")]
        end_with_this_thread(cmd, ending);
        #[cfg(not(target_os = "linux"))]
        let _ = ending;
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

/// Makes the child of `cmd` receive `ending`'s signal when the thread that starts it ends
/// (Linux's parent-death signal); launchers start their children from the thread that runs
/// the run.
#[cfg(target_os = "linux")]
fn end_with_this_thread(cmd: &mut Command, ending: Ending) {
    use std::os::unix::process::CommandExt;
    let launcher = std::process::id();
    let signal = match ending {
        Ending::Stop => libc::SIGTERM,
        Ending::Kill => libc::SIGKILL,
    };
    // SAFETY: the closure runs in the forked child before `exec` and only makes two system
    // calls (async-signal-safe) and, if the launcher is already gone, `_exit`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before the call above: then no signal will come.
            if libc::getppid() as u32 != launcher {
                libc::_exit(1);
            }
            Ok(())
        });
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
