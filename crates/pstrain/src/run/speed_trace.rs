//! A recorded trace of device speeds (`--speed-trace FILE`): for each device, from which
//! second of its run it computes how many times slower than this machine, as measured on
//! real phones and boards, replayed by the workers of an emulated fleet.
//!
//! The file is text, one change of speed a line: `DEVICE,FROM_SECONDS,FACTOR` (`#` starts a
//! comment; a first line naming the columns is allowed). Devices are numbered 0 to D-1 and
//! every one needs a line; rank R replays device R mod D, so a trace of 20 devices drives a
//! fleet of 256. A device's first factor holds from the start of its run, its last to the
//! end. A factor is a device's step time over this machine's step time for the same model
//! and batch (the run's summary prints this machine's compute seconds per step).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// At most this many bytes: a trace is a few changes per device per minute, not a log.
pub const MAX_TRACE_BYTES: u64 = 32 << 20;
/// At most this many devices (a device number past it is a mistake, not a fleet).
pub const MAX_TRACE_DEVICES: usize = 100_000;

#[derive(Debug, Error)]
pub enum SpeedTraceError {
    #[error("cannot read the speed trace {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "speed trace line {line}: {what} (expected DEVICE,FROM_SECONDS,FACTOR, e.g. `3,60,2.5`)"
    )]
    Line { line: usize, what: String },
    #[error("speed trace: {0}")]
    Shape(String),
}

/// Every device's speed changes, each device's in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedTrace {
    /// `devices[d]`: (from second, factor), ascending in time, at least one.
    devices: Vec<Vec<(f64, f64)>>,
}

impl SpeedTrace {
    /// Reads and checks a trace file.
    pub fn read(path: &Path) -> Result<Arc<SpeedTrace>, SpeedTraceError> {
        let failed = |source| SpeedTraceError::Read {
            path: path.display().to_string(),
            source,
        };
        let text = pstrain_store::read_text_at_most(path, MAX_TRACE_BYTES).map_err(failed)?;
        Ok(Arc::new(Self::parse(&text)?))
    }

    /// Parses a trace's text (see the module's doc for the format).
    pub fn parse(text: &str) -> Result<SpeedTrace, SpeedTraceError> {
        let mut devices: Vec<Vec<(f64, f64)>> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() || (line == 1 && is_header(content)) {
                continue;
            }
            let bad = |what: String| SpeedTraceError::Line { line, what };
            let fields: Vec<&str> = content.split(',').map(str::trim).collect();
            let [device, from, factor] = fields[..] else {
                return Err(bad(format!("{} fields", fields.len())));
            };
            let device: usize = device
                .parse()
                .map_err(|_| bad(format!("device `{device}` is not a number")))?;
            if device >= MAX_TRACE_DEVICES {
                return Err(bad(format!(
                    "device {device} (at most {MAX_TRACE_DEVICES} devices)"
                )));
            }
            let from: f64 = from
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| bad(format!("`{from}` is not a second >= 0")))?;
            let factor: f64 = factor
                .parse()
                .ok()
                .filter(|f: &f64| f.is_finite() && (1.0..=1000.0).contains(f))
                .ok_or_else(|| bad(format!("factor `{factor}` is not in 1..=1000")))?;
            if devices.len() <= device {
                devices.resize_with(device + 1, Vec::new);
            }
            devices[device].push((from, factor));
        }
        if devices.is_empty() {
            return Err(SpeedTraceError::Shape("no devices".into()));
        }
        if let Some(missing) = devices.iter().position(Vec::is_empty) {
            return Err(SpeedTraceError::Shape(format!(
                "device {missing} has no line (devices are numbered 0 to {} without gaps)",
                devices.len() - 1
            )));
        }
        for changes in &mut devices {
            // Stable: two lines at the same second keep their order, the later one wins.
            changes.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(SpeedTrace { devices })
    }

    /// How many devices the trace records.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// How many times slower than this machine worker `rank` computes `elapsed` into its run.
    pub fn factor(&self, rank: usize, elapsed: Duration) -> f64 {
        let changes = &self.devices[rank % self.devices.len()];
        let at = elapsed.as_secs_f64();
        let started = changes.partition_point(|(from, _)| *from <= at);
        changes[started.saturating_sub(1)].1
    }
}

/// A first line naming the columns (`device,from_s,factor` or the like).
fn is_header(line: &str) -> bool {
    line.split(',')
        .next()
        .is_some_and(|first| first.trim().parse::<f64>().is_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_trace_replays_each_devices_changes_and_ranks_wrap_around_its_devices() {
        let trace = SpeedTrace::parse(
            "device,from_s,factor\n\
             # a board that slows down after a minute\n\
             0, 0, 1.0\n\
             0, 60, 4   # something else took its cores\n\
             0, 90, 1.5\n\
             1, 30, 8\n\
             1, 10, 2\n",
        )
        .unwrap();
        assert_eq!(trace.devices(), 2);
        assert_eq!(trace.factor(0, secs(0.0)), 1.0);
        assert_eq!(trace.factor(0, secs(59.9)), 1.0);
        assert_eq!(trace.factor(0, secs(60.0)), 4.0);
        assert_eq!(trace.factor(0, secs(1e6)), 1.5);
        // Lines out of order are put in order; the first factor holds from the start.
        assert_eq!(trace.factor(1, secs(0.0)), 2.0);
        assert_eq!(trace.factor(1, secs(29.0)), 2.0);
        assert_eq!(trace.factor(1, secs(31.0)), 8.0);
        // Rank 5 replays device 1, rank 4 device 0.
        assert_eq!(trace.factor(5, secs(31.0)), 8.0);
        assert_eq!(trace.factor(4, secs(61.0)), 4.0);
    }

    #[test]
    fn a_damaged_trace_is_refused_by_line_and_reason() {
        let refused = |text: &str, says: &str| {
            let err = SpeedTrace::parse(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text:?}: {err}");
        };
        refused("", "no devices");
        refused("# only a comment\n", "no devices");
        refused("0,0,2\n2,0,3\n", "device 1 has no line");
        refused("0,0\n", "line 1: 2 fields");
        refused("0,0,2\n0,5,0.5\n", "line 2: factor `0.5`");
        refused("0,0,NaN\n", "factor `NaN`");
        refused("0,0,inf\n", "factor `inf`");
        refused("0,-1,2\n", "`-1` is not a second");
        refused("0,0,2\nx,0,2\n", "line 2: device `x`");
        refused("100000,0,2\n", "device 100000");
        refused("0,0,2,7\n", "4 fields");
    }
}
