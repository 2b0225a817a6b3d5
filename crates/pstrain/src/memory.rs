//! Peak resident memory of this process or a child (Linux `VmHWM`), for run summaries and
//! `pstrain bench`: what a small device must have free for a shard or a worker.

use serde::Serialize;

/// One process's peak resident memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessMemory {
    pub process: String,
    pub peak_rss_mb: f64,
}

/// `VmHWM` of `/proc/PID/status` (this process without a pid), in MB (10^6 bytes); `None`
/// where the system does not say (not Linux, or the process is gone).
pub fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// The highest peak seen of each of several processes, sampled while they run (the peak of
/// a process can only be read while it exists).
#[derive(Debug, Default)]
pub struct PeakTracker {
    seen: Vec<ProcessMemory>,
}

impl PeakTracker {
    pub fn sample(&mut self, process: &str, pid: u32) {
        let Some(mb) = peak_rss_mb(Some(pid)) else {
            return;
        };
        match self.seen.iter_mut().find(|m| m.process == process) {
            Some(m) => m.peak_rss_mb = m.peak_rss_mb.max(mb),
            None => self.seen.push(ProcessMemory {
                process: process.to_string(),
                peak_rss_mb: mb,
            }),
        }
    }

    pub fn into_vec(self) -> Vec<ProcessMemory> {
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_peak_that_grows_with_what_it_touches() {
        let before = peak_rss_mb(None).expect("Linux reports VmHWM");
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let after = peak_rss_mb(None).unwrap();
        assert!(after >= before + 60.0, "{before} -> {after}");
        let mut t = PeakTracker::default();
        t.sample("me", std::process::id());
        assert!(t.into_vec()[0].peak_rss_mb >= after);
    }
}
