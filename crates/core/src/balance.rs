//! Speed-balanced sync batches (after LB-BSP, Chen et al. 2018): each worker's batch is set
//! in proportion to its measured speed, so a sync step's gradients arrive together instead of
//! at the slowest worker's pace. The step's total stays `batch * active workers` and the step
//! still averages by samples, so an update is the same kind of update as before.

/// Weight of the newest speed measurement in the moving average.
const SMOOTHING: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct BatchBalancer {
    batch: usize,
    /// No worker is asked for fewer samples than this.
    min: usize,
    /// Per rank: moving average of samples per second of compute.
    speed: Vec<Option<f64>>,
}

impl BatchBalancer {
    /// For `workers` ranks whose plan batch is `batch`.
    pub fn new(workers: usize, batch: usize) -> Self {
        BatchBalancer {
            batch: batch.max(1),
            min: (batch / 8).max(1),
            speed: vec![None; workers],
        }
    }

    /// `rank` computed a gradient on `samples` samples in `seconds`.
    pub fn observe(&mut self, rank: usize, samples: u32, seconds: f64) {
        let Some(speed) = self.speed.get_mut(rank) else {
            return;
        };
        if !(seconds.is_finite() && seconds > 1e-6) || samples == 0 {
            return;
        }
        let measured = f64::from(samples) / seconds;
        *speed = Some(match *speed {
            None => measured,
            Some(avg) => (1.0 - SMOOTHING) * avg + SMOOTHING * measured,
        });
    }

    /// The measured speed of `rank` (samples per second), once there is one.
    pub fn speed(&self, rank: usize) -> Option<f64> {
        self.speed.get(rank).copied().flatten()
    }

    /// Every rank's batch for the next step: the active ranks share `batch * active` samples
    /// in proportion to their speeds (a rank not yet measured counts as the mean of those
    /// that are); an inactive rank gets the plan's batch.
    pub fn sizes(&self, active: &[bool]) -> Vec<u32> {
        let ranks: Vec<usize> = (0..self.speed.len())
            .filter(|&r| active.get(r).copied().unwrap_or(false))
            .collect();
        let known: Vec<f64> = ranks.iter().filter_map(|&r| self.speed(r)).collect();
        let fallback = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let weights: Vec<f64> = ranks
            .iter()
            .map(|&r| self.speed(r).unwrap_or(fallback))
            .collect();
        let total = self.batch * ranks.len();
        let sum: f64 = weights.iter().sum();
        let mut out = vec![self.batch as u32; self.speed.len()];
        if ranks.is_empty() || sum.is_nan() || sum <= 0.0 {
            return out;
        }
        // Largest remainder: the shares add up to exactly `total` before the minimum.
        let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
        let mut floors: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
        let mut left = total.saturating_sub(floors.iter().sum());
        let mut order: Vec<usize> = (0..ranks.len()).collect();
        order.sort_by(|&a, &b| {
            let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
            fb.total_cmp(&fa).then(a.cmp(&b))
        });
        for &i in order.iter().cycle().take(ranks.len() * 2) {
            if left == 0 {
                break;
            }
            floors[i] += 1;
            left -= 1;
        }
        // Every rank does at least `min` samples; what that adds comes off the largest
        // shares, so the step's total stays exact.
        let min = self.min.min(total / ranks.len());
        let mut excess = 0;
        for f in &mut floors {
            if *f < min {
                excess += min - *f;
                *f = min;
            }
        }
        while excess > 0 {
            let Some(largest) = (0..floors.len()).max_by_key(|&i| floors[i]) else {
                break;
            };
            if floors[largest] <= min {
                break;
            }
            floors[largest] -= 1;
            excess -= 1;
        }
        for (i, &r) in ranks.iter().enumerate() {
            out[r] = floors[i] as u32;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_converge_to_speed_proportional_shares() {
        let mut b = BatchBalancer::new(3, 64);
        let active = [true; 3];
        assert_eq!(b.sizes(&active), vec![64, 64, 64], "nothing measured yet");
        // A simulated run: ranks 0 and 1 take 1 ms per sample, rank 2 four times as long;
        // each step's time follows the batch it was given.
        for _ in 0..30 {
            let sizes = b.sizes(&active);
            for (rank, &n) in sizes.iter().enumerate() {
                let per_sample = if rank == 2 { 4e-3 } else { 1e-3 };
                b.observe(rank, n, per_sample * f64::from(n));
            }
        }
        let sizes = b.sizes(&active);
        assert_eq!(sizes.iter().sum::<u32>(), 192);
        // 192 * (4, 4, 1) / 9 = 85.3, 85.3, 21.3
        assert!((21..=22).contains(&sizes[2]), "{sizes:?}");
        assert!(
            sizes[..2].iter().all(|n| (85..=86).contains(n)),
            "{sizes:?}"
        );
        // Speeds change: rank 2 recovers, and the sizes follow.
        for _ in 0..30 {
            let sizes = b.sizes(&active);
            for (rank, &n) in sizes.iter().enumerate() {
                b.observe(rank, n, 1e-3 * f64::from(n));
            }
        }
        let sizes = b.sizes(&active);
        assert_eq!(sizes.iter().sum::<u32>(), 192);
        assert!(sizes.iter().all(|&n| n.abs_diff(64) <= 1), "{sizes:?}");
    }

    #[test]
    fn departed_ranks_leave_their_share_and_bad_times_are_ignored() {
        let mut b = BatchBalancer::new(2, 10);
        b.observe(0, 10, 1.0);
        b.observe(1, 10, 0.0);
        b.observe(1, 10, f64::NAN);
        assert_eq!(b.speed(1), None);
        assert_eq!(b.sizes(&[true, false]), vec![10, 10]);
        b.observe(1, 10, 9.0);
        // 20 * (10, 10/9) / (100/9) = 18, 2.
        let sizes = b.sizes(&[true, true]);
        assert_eq!(sizes.iter().sum::<u32>(), 20);
        assert!(sizes[1] <= 3 && sizes[1] >= 1, "{sizes:?}");
        // A rank is never given fewer than batch / 8 samples, and the total stays exact.
        let mut b = BatchBalancer::new(3, 64);
        b.observe(0, 64, 0.01);
        b.observe(1, 64, 0.01);
        b.observe(2, 1, 10.0);
        let sizes = b.sizes(&[true; 3]);
        assert_eq!(sizes[2], 8);
        assert_eq!(sizes.iter().sum::<u32>(), 192, "{sizes:?}");
    }
}
