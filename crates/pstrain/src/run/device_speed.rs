//! How much slower than this machine an emulated device runs: a fixed factor (`--slowdown`,
//! `--speed-spread`), or one drawn anew every period (`--speed-period`: a device slow for a
//! while, then fast, as phones and boards are when something else takes their cores), or
//! replayed from a recorded trace of real devices (`--speed-trace`).

use crate::run::speed_trace::SpeedTrace;
use pstrain_core::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub enum DeviceSpeed {
    /// Always this many times slower (1: full speed).
    Fixed(f64),
    /// Every `period` of the worker's run, a factor drawn log-uniform from 1 to `spread`,
    /// seeded by the run's `seed`, the `rank` and the period's index.
    Varying {
        spread: f64,
        period: Duration,
        seed: u64,
        rank: usize,
    },
    /// Device `rank mod devices` of a recorded trace.
    Traced { trace: Arc<SpeedTrace>, rank: usize },
}

impl DeviceSpeed {
    pub const FULL: DeviceSpeed = DeviceSpeed::Fixed(1.0);

    /// A factor log-uniform from 1 to `spread` (as many devices 1-2x slow as 2-4x, 4-8x...).
    pub fn draw(spread: f64, rng: &mut Rng) -> f64 {
        spread.powf(f64::from(rng.next_f32()))
    }

    /// The seeded stream a rank's factors are drawn from.
    pub fn rank_rng(seed: u64, rank: usize) -> Rng {
        Rng::new(seed).fork(0x5bee_d000 + rank as u64)
    }

    /// The factor `elapsed` into the worker's run.
    pub fn factor_at(&self, elapsed: Duration) -> f64 {
        match *self {
            DeviceSpeed::Fixed(factor) => factor,
            DeviceSpeed::Traced { ref trace, rank } => trace.factor(rank, elapsed),
            DeviceSpeed::Varying {
                spread,
                period,
                seed,
                rank,
            } => {
                let index = (elapsed.as_secs_f64() / period.as_secs_f64().max(1e-3)) as u64;
                Self::draw(spread, &mut Self::rank_rng(seed, rank).fork(index))
            }
        }
    }
}

/// A device's speed on the clock of one worker's run.
#[derive(Debug, Clone)]
pub struct SpeedClock {
    speed: DeviceSpeed,
    started: Instant,
}

impl SpeedClock {
    pub fn start(speed: DeviceSpeed) -> Self {
        SpeedClock {
            speed,
            started: Instant::now(),
        }
    }

    /// After a compute that took `took`: waits `factor - 1` times as long, so the device
    /// computes `factor` times slower than this machine.
    pub fn pace(&self, took: Duration) {
        let factor = self.speed.factor_at(self.started.elapsed());
        if factor > 1.0 {
            std::thread::sleep(took.mul_f64(factor - 1.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_varying_device_keeps_a_factor_for_a_period_then_draws_another() {
        let device = |rank| DeviceSpeed::Varying {
            spread: 16.0,
            period: Duration::from_secs(10),
            seed: 7,
            rank,
        };
        let speed = device(3);
        let at = |s: f64| speed.factor_at(Duration::from_secs_f64(s));
        assert_eq!(at(0.0), at(9.9));
        let factors: Vec<f64> = (0..100).map(|p| at(10.0 * p as f64 + 5.0)).collect();
        assert!(
            factors.iter().all(|f| (1.0..=16.0).contains(f)),
            "{factors:?}"
        );
        // Log-uniform from 1 to 16: about half the periods slower than 4x, and they change.
        let slow = factors.iter().filter(|f| **f > 4.0).count();
        assert!((30..70).contains(&slow), "{slow} of 100");
        let changes = factors.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes > 90, "{changes}");
        // Seeded: the same rank and seed give the same trace; another rank another.
        let other = device(4);
        assert_ne!(at(5.0), other.factor_at(Duration::from_secs(5)));
        assert_eq!(at(5.0), speed.factor_at(Duration::from_secs(5)));
    }

    #[test]
    fn a_fixed_device_is_always_as_slow() {
        let speed = DeviceSpeed::Fixed(2.5);
        assert_eq!(speed.factor_at(Duration::ZERO), 2.5);
        assert_eq!(speed.factor_at(Duration::from_secs(1000)), 2.5);
    }
}
