//! What each process of a run used: peak resident memory (Linux `VmHWM`) and CPU time (user
//! and system, from `/proc/PID/stat`), for run summaries and `pstrain bench`: what a small
//! device must have free for a shard or a worker, and where a run's cores went.

use serde::{Deserialize, Serialize};

/// One process's (or one role's: a restarted worker's processes add up) use of the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessUsage {
    pub process: String,
    pub peak_rss_mb: f64,
    /// CPU seconds in user space and in the kernel (a socket's copies are kernel time);
    /// `None` where the system does not say.
    #[serde(default)]
    pub cpu_user_s: Option<f64>,
    #[serde(default)]
    pub cpu_system_s: Option<f64>,
}

impl ProcessUsage {
    /// `name user + system` in seconds, where the system reported them.
    pub fn cpu_text(&self) -> Option<String> {
        let (user, system) = (self.cpu_user_s?, self.cpu_system_s?);
        Some(format!("{} {user:.1} + {system:.1}", self.process))
    }
}

/// `VmHWM` of `/proc/PID/status` (this process without a pid), in MB (10^6 bytes); `None`
/// where the system does not say (not Linux, or the process is gone).
pub fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

/// `VmRSS` (resident now) of `/proc/PID/status`, in MB, where the system says.
pub fn rss_mb(pid: Option<u32>) -> Option<f64> {
    status_mb(pid, "VmRSS:")
}

fn status_mb(pid: Option<u32>, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// CPU seconds (user, system) a process has used so far: fields 14 and 15 of
/// `/proc/PID/stat`, in clock ticks. A process that has exited but not been reaped still
/// reports its final times.
pub fn cpu_seconds(pid: Option<u32>) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    parse_cpu_ticks(&stat).and_then(|(user, system)| {
        let hz = clock_ticks_per_second()?;
        Some((user as f64 / hz, system as f64 / hz))
    })
}

/// (utime, stime) of a `/proc/PID/stat` line. The command name (field 2) is in parentheses
/// and may itself hold spaces and parentheses: fields are counted after the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace().skip(11);
    let user = fields.next()?.parse().ok()?;
    let system = fields.next()?.parse().ok()?;
    Some((user, system))
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

#[cfg(unix)]
fn clock_ticks_per_second() -> Option<f64> {
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then_some(hz as f64)
}

#[cfg(not(unix))]
fn clock_ticks_per_second() -> Option<f64> {
    None
}

/// Whether child `pid` has exited and waits to be reaped (its figures are still readable).
#[cfg(target_os = "linux")]
pub fn exited(pid: u32) -> bool {
    // SAFETY: an all-zero siginfo_t is a valid value; waitid writes into it and, with
    // WNOWAIT, leaves the child unreaped; with WNOHANG it returns at once, si_pid 0 when the
    // child is still running.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOWAIT | libc::WNOHANG;
        libc::waitid(libc::P_PID, pid, &mut info, flags) == 0 && info.si_pid() != 0
    }
}

#[cfg(not(target_os = "linux"))]
pub fn exited(_pid: u32) -> bool {
    false
}

/// This process's usage so far, under `name`.
pub fn this_process(name: &str) -> Option<ProcessUsage> {
    let mut tracker = UsageTracker::default();
    tracker.sample(name, std::process::id());
    tracker.into_vec().pop()
}

/// Usage of several processes sampled while they run (a process's figures can only be read
/// while it exists): the highest peak of each name, and the CPU time of each of its
/// processes as last seen, added up.
#[derive(Debug, Default)]
pub struct UsageTracker {
    seen: Vec<Tracked>,
}

#[derive(Debug)]
struct Tracked {
    name: String,
    peak_rss_mb: Option<f64>,
    /// (pid, user s, system s) as last sampled.
    cpu: Vec<(u32, f64, f64)>,
}

impl UsageTracker {
    pub fn sample(&mut self, name: &str, pid: u32) {
        self.record(name, pid, peak_rss_mb(Some(pid)), cpu_seconds(Some(pid)));
    }

    fn record(&mut self, name: &str, pid: u32, mb: Option<f64>, cpu: Option<(f64, f64)>) {
        if mb.is_none() && cpu.is_none() {
            return;
        }
        let entry = match self.seen.iter().position(|t| t.name == name) {
            Some(i) => &mut self.seen[i],
            None => {
                self.seen.push(Tracked {
                    name: name.to_string(),
                    peak_rss_mb: None,
                    cpu: Vec::new(),
                });
                self.seen.last_mut().expect("just pushed")
            }
        };
        if let Some(mb) = mb {
            entry.peak_rss_mb = Some(entry.peak_rss_mb.map_or(mb, |p| p.max(mb)));
        }
        if let Some((user, system)) = cpu {
            match entry.cpu.iter_mut().find(|c| c.0 == pid) {
                Some(c) => *c = (pid, user.max(c.1), system.max(c.2)),
                None => entry.cpu.push((pid, user, system)),
            }
        }
    }

    pub fn into_vec(self) -> Vec<ProcessUsage> {
        self.seen
            .into_iter()
            .map(|t| {
                let cpu = !t.cpu.is_empty();
                ProcessUsage {
                    process: t.name,
                    peak_rss_mb: t.peak_rss_mb.unwrap_or(0.0),
                    cpu_user_s: cpu.then(|| t.cpu.iter().map(|c| c.1).sum()),
                    cpu_system_s: cpu.then(|| t.cpu.iter().map(|c| c.2).sum()),
                }
            })
            .collect()
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
        let mut t = UsageTracker::default();
        t.sample("me", std::process::id());
        assert!(t.into_vec()[0].peak_rss_mb >= after);
    }

    #[test]
    fn cpu_time_grows_with_work_done() {
        // Spins until the process's own counter says 0.3 s of user time went by (other
        // threads of the test binary may share the cores, so wall time says little); the
        // counter must get there, and this process's usage must report at least as much.
        let (user0, _) = cpu_seconds(None).expect("Linux reports CPU times");
        let start = std::time::Instant::now();
        let mut x = 1u64;
        let mut user1 = user0;
        while user1 - user0 < 0.3 && start.elapsed().as_secs_f64() < 60.0 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            user1 = cpu_seconds(None).unwrap().0;
        }
        assert!(
            user1 - user0 >= 0.3,
            "{user0} -> {user1} in 60 s of spinning"
        );
        let usage = this_process("me").unwrap();
        assert!(usage.cpu_user_s.unwrap() >= user1);
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (odd) name (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 52 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(line), Some((731, 52)));
        assert_eq!(parse_cpu_ticks("4242 (cut) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn a_restarted_process_adds_its_time_to_its_role() {
        let mut t = UsageTracker::default();
        t.record("worker 0", 7, Some(100.0), Some((1.0, 0.1)));
        // The same process seen later: its latest times replace the earlier ones.
        t.record("worker 0", 7, Some(90.0), Some((3.0, 0.2)));
        // Its replacement (another pid) adds to the role; the peak is the highest seen.
        t.record("worker 0", 9, Some(120.0), Some((2.0, 0.5)));
        t.record("shard 0", 8, Some(40.0), None);
        t.record("gone", 10, None, None);
        let usage = t.into_vec();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].process, "worker 0");
        assert_eq!(usage[0].peak_rss_mb, 120.0);
        assert_eq!(usage[0].cpu_user_s, Some(5.0));
        assert_eq!(usage[0].cpu_system_s, Some(0.7));
        assert_eq!(usage[1].cpu_user_s, None);
    }
}
