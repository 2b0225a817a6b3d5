//! Stopping a command on a signal: the first Ctrl-C or SIGTERM asks for a clean stop (final
//! checkpoint, summary); another one a moment later ends the process at once (a stop can wait
//! on a shard that is gone).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Signals closer than this to the first count as the same one: a launcher that dies sends
/// its children one parent-death signal per thread it had.
const SAME_SIGNAL: Duration = Duration::from_millis(500);

/// A flag set by Ctrl-C or SIGTERM, for a clean stop (final checkpoint, summary).
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let mut first: Option<Instant> = None;
    let handler = move || match first {
        None => {
            first = Some(Instant::now());
            flag.store(true, Ordering::Relaxed);
        }
        Some(at) if at.elapsed() >= SAME_SIGNAL => std::process::exit(130),
        Some(_) => {}
    };
    if let Err(e) = ctrlc::set_handler(handler) {
        pstrain_observe::log_line!("warning: cannot install the Ctrl-C handler: {e}");
    }
    stop
}
