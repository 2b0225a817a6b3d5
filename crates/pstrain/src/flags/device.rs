//! How a worker's device behaves, the same flags for `pstrain train` (every worker) and
//! `pstrain worker` (this one): emulated slowness, changing speeds, an overlapped link.

use crate::run::speed_trace::SpeedTrace;
use crate::run::{TrainConfig, DEFAULT_LOOKAHEAD, DEFAULT_OVERLAP_UNTIL};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Default, Args)]
pub struct DeviceArgs {
    /// Make the worker of rank RANK FACTOR times slower (it waits FACTOR-1 times its compute
    /// time after each gradient), to study slow devices; repeatable
    #[arg(long, value_name = "RANK=FACTOR", value_parser = parse_slowdown)]
    pub slowdown: Vec<(usize, f64)>,
    /// A fleet of devices of different speeds: each worker is slowed by a factor drawn for
    /// its rank, log-uniform from 1 to F (seeded by the run's seed; --slowdown overrides a
    /// rank)
    #[arg(long, value_name = "F")]
    pub speed_spread: Option<f64>,
    /// With --speed-spread: each worker draws its factor anew every S seconds of its run (a
    /// device slow for a while, then fast)
    #[arg(long, value_name = "S", requires = "speed_spread")]
    pub speed_period: Option<f64>,
    /// Devices' speeds replayed from a recorded trace: lines DEVICE,FROM_SECONDS,FACTOR
    /// (device D computes FACTOR times slower than this machine from that second of its run);
    /// rank R replays device R mod the trace's devices (--slowdown overrides a rank)
    #[arg(long, value_name = "FILE", value_parser = parse_speed_trace, conflicts_with = "speed_spread")]
    pub speed_trace: Option<(PathBuf, Arc<SpeedTrace>)>,
    /// Async and buffered modes: push the last gradient and pull while computing the next,
    /// hiding a slow link's time (each gradient is one round older)
    #[arg(long)]
    pub overlap: bool,
    /// With --overlap: compute each gradient on the weights extrapolated K rounds past the
    /// last pull along the last round's move, making up for the round the overlap adds (0:
    /// on the pulled weights) [default: 1]
    #[arg(long, value_name = "K", requires = "overlap")]
    pub lookahead: Option<f32>,
    /// With --overlap: overlap for this share of the run's planned updates (0 to 1), then run
    /// exact rounds (push, pull, compute on what was pulled) to the end, no gradient a round
    /// older [default: 1, to the end]
    #[arg(long, value_name = "SHARE", requires = "overlap")]
    pub overlap_until: Option<f64>,
}

impl DeviceArgs {
    /// `cfg` with these flags' settings.
    pub fn configure(&self, cfg: TrainConfig) -> TrainConfig {
        TrainConfig {
            slowdown: self.slowdown.clone(),
            speed_spread: self.speed_spread,
            speed_period: self.speed_period,
            speed_trace: self.speed_trace.clone(),
            overlap: self.overlap,
            lookahead: self.lookahead.unwrap_or(DEFAULT_LOOKAHEAD),
            overlap_until: self.overlap_until.unwrap_or(DEFAULT_OVERLAP_UNTIL),
            ..cfg
        }
    }

    /// The flags that reproduce `cfg`'s device settings.
    pub fn argv(cfg: &TrainConfig) -> Vec<String> {
        let mut a: Vec<String> = (cfg.slowdown.iter())
            .flat_map(|(r, f)| ["--slowdown".to_string(), format!("{r}={f}")])
            .collect();
        if let Some(spread) = cfg.speed_spread {
            a.extend(["--speed-spread".to_string(), spread.to_string()]);
        }
        if let Some(period) = cfg.speed_period {
            a.extend(["--speed-period".to_string(), period.to_string()]);
        }
        if let Some((path, _)) = &cfg.speed_trace {
            a.extend(["--speed-trace".to_string(), path.display().to_string()]);
        }
        if cfg.overlap {
            a.push("--overlap".into());
        }
        if cfg.overlap && cfg.lookahead != DEFAULT_LOOKAHEAD {
            a.extend(["--lookahead".to_string(), cfg.lookahead.to_string()]);
        }
        if cfg.overlap && cfg.overlap_until != DEFAULT_OVERLAP_UNTIL {
            a.extend(["--overlap-until".to_string(), cfg.overlap_until.to_string()]);
        }
        a
    }
}

/// `RANK=FACTOR`, e.g. `2=4` (worker 2, four times slower).
pub fn parse_slowdown(s: &str) -> Result<(usize, f64), String> {
    let bad = || format!("`{s}` is not RANK=FACTOR (e.g. 2=4: worker 2 four times slower)");
    let (rank, factor) = s.split_once('=').ok_or_else(bad)?;
    let rank: usize = rank.trim().parse().map_err(|_| bad())?;
    let factor: f64 = factor.trim().parse().map_err(|_| bad())?;
    if !(factor.is_finite() && (1.0..=1000.0).contains(&factor)) {
        return Err(format!("slowdown factor {factor} must be in 1..=1000"));
    }
    Ok((rank, factor))
}

/// A speed trace file, read and checked when the flags are (a damaged one is refused before
/// anything starts).
pub fn parse_speed_trace(s: &str) -> Result<(PathBuf, Arc<SpeedTrace>), String> {
    // Absolute, so the worker processes a launcher starts read the same file.
    let path = std::path::absolute(s).map_err(|e| format!("speed trace {s}: {e}"))?;
    let trace = SpeedTrace::read(&path).map_err(|e| e.to_string())?;
    Ok((path, trace))
}
