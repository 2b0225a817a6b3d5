//! Buffered async (FedBuff, Nguyen et al. 2022): gradients are taken as they arrive, from
//! whoever sends them, and every `k` of them are combined into one update. Nobody waits for
//! anybody (a worker's pull takes whatever the shard holds), yet each update averages `k`
//! gradients, so a fleet of many small devices moves the model by averaged steps instead of
//! one noisy step per device. A gradient more than `max_staleness` updates old is dropped;
//! with the staleness-aware rate each gradient in the buffer is damped by `1 / sqrt(1 + s)`
//! (the paper's choice) before the mean.

use super::asynchronous::staleness_within;
use super::{Consistency, StepSource, StepSum};
use crate::admission::{Checked, Refused};
use crate::config::Aggregate;
use crate::error::PushError;
use crate::shard_state::{PushOutcome, ShardState};

#[derive(Debug, Clone)]
pub struct BufferedAsync {
    k: usize,
    max_staleness: Option<u64>,
    staleness_aware: bool,
    sum: StepSum,
    /// Gradients in the buffer.
    held: usize,
}

impl BufferedAsync {
    pub fn new(
        k: usize,
        max_staleness: Option<u64>,
        staleness_aware: bool,
        aggregate: Aggregate,
        len: usize,
    ) -> Self {
        BufferedAsync {
            k: k.max(1),
            max_staleness,
            staleness_aware,
            sum: StepSum::new(len, aggregate),
            held: 0,
        }
    }
}

impl Consistency for BufferedAsync {
    fn step_source(&self) -> StepSource {
        StepSource::Own { quorum: false }
    }

    fn push(
        &mut self,
        state: &mut ShardState,
        _active: &[bool],
        grad: Checked<'_>,
    ) -> Result<PushOutcome, PushError> {
        let staleness = match staleness_within(state, grad.meta.base_version, self.max_staleness) {
            Ok(s) => s,
            Err(dropped) => return Ok(dropped),
        };
        let damping = if self.staleness_aware {
            1.0 / (1.0 + staleness as f32).sqrt()
        } else {
            1.0
        };
        self.sum
            .add(grad.meta.samples, grad.scaled(damping), state.splitter());
        self.held += 1;
        state.record_applied(grad.meta, staleness);
        if self.held < self.k {
            return Ok(PushOutcome::Buffered {
                waiting_for: self.k - self.held,
            });
        }
        let applied = self
            .sum
            .combined()
            .is_some_and(|update| state.apply(update));
        if !applied {
            // Not finite after the update: the weights stay, the buffer's step is skipped.
            state.skip_step();
        }
        self.sum.clear();
        self.held = 0;
        Ok(PushOutcome::Applied {
            version: state.version(),
            staleness,
        })
    }

    fn refused(&mut self, _state: &mut ShardState, _active: &[bool], _from: Refused<'_>) -> bool {
        // The buffer fills with whatever arrives: a refused gradient holds nothing up.
        false
    }

    fn leave(&mut self, _state: &mut ShardState, _active: &[bool], _rank: usize) -> bool {
        false
    }

    fn reset(&mut self) {
        self.sum.clear();
        self.held = 0;
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Mode, ServerConfig};
    use crate::optimizer::OptimizerConfig;
    use crate::server::{PushMeta, ServerCore};
    use crate::shard_state::PushOutcome;

    fn server(k: usize, max_staleness: Option<u64>, staleness_aware: bool) -> ServerCore {
        let cfg = ServerConfig {
            mode: Mode::Buffered { k, max_staleness },
            workers: 3,
            optimizer: OptimizerConfig::sgd(1.0),
            staleness_aware_lr: staleness_aware,
            ..Default::default()
        };
        ServerCore::new(cfg, vec![0.0; 2]).unwrap()
    }

    fn meta(rank: usize, base_version: u64, samples: u32) -> PushMeta {
        PushMeta {
            rank,
            base_version,
            samples,
            loss: 1.0,
            accumulated: false,
        }
    }

    #[test]
    fn every_k_gradients_from_anyone_make_one_mean_update() {
        let mut s = server(3, None, false);
        // Rank 0 twice and rank 2 once: whoever sends them, three fill the buffer.
        assert_eq!(
            s.push(meta(0, 0, 1), &[3.0, 0.0]).unwrap(),
            PushOutcome::Buffered { waiting_for: 2 }
        );
        assert_eq!(
            s.push(meta(0, 0, 1), &[0.0, 3.0]).unwrap(),
            PushOutcome::Buffered { waiting_for: 1 }
        );
        assert_eq!(s.version(), 0, "nothing applied yet");
        assert_eq!(s.params(), &[0.0, 0.0]);
        assert_eq!(
            s.push(meta(2, 0, 2), &[3.0, 3.0]).unwrap(),
            PushOutcome::Applied {
                version: 1,
                staleness: 0
            }
        );
        // The sample-weighted mean: (3 + 0 + 2*3) / 4 and (0 + 3 + 2*3) / 4, SGD lr 1.
        assert_eq!(s.params(), &[-2.25, -2.25]);
        let workers = s.worker_stats();
        assert_eq!((workers[0].applied, workers[2].applied), (2, 1));
        // The next buffer starts empty; its gradients' staleness is recorded.
        s.push(meta(1, 0, 1), &[1.0, 1.0]).unwrap();
        assert_eq!(s.worker_stats()[1].staleness_max, 1);
    }

    #[test]
    fn a_gradient_past_the_bound_is_dropped_and_not_buffered() {
        let mut s = server(2, Some(1), false);
        for _ in 0..4 {
            s.push(meta(0, s.version(), 1), &[1.0, 1.0]).unwrap();
        }
        assert_eq!(s.version(), 2);
        assert!(matches!(
            s.push(meta(1, 0, 1), &[1.0, 1.0]).unwrap(),
            PushOutcome::Dropped { staleness: 2 }
        ));
        assert_eq!(s.stats().dropped_stale, 1);
        // The buffer still waits for two.
        assert_eq!(
            s.push(meta(1, 2, 1), &[1.0, 1.0]).unwrap(),
            PushOutcome::Buffered { waiting_for: 1 }
        );
    }

    #[test]
    fn with_the_staleness_aware_rate_stale_gradients_are_damped() {
        let mut s = server(2, None, true);
        // Four updates of nothing: the weights stay, the version moves to 4.
        for _ in 0..8 {
            s.push(meta(0, s.version(), 1), &[0.0, 0.0]).unwrap();
        }
        assert_eq!(s.version(), 4);
        // One fresh, one 3 updates old (damped by 1 / sqrt(4) = 1/2): mean (2 + 1) / 2.
        s.push(meta(0, 4, 1), &[2.0, 2.0]).unwrap();
        s.push(meta(1, 1, 1), &[2.0, 2.0]).unwrap();
        assert_eq!(s.params(), &[-1.5, -1.5]);
    }
}
