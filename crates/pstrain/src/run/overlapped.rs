//! The worker loop with its link overlapped (`--overlap`): a helper thread pushes the last
//! gradient and pulls while the next one is computed, so a round takes about the longer of
//! the link and compute rather than their sum.

use super::device_speed::SpeedClock;
use super::worker::{
    continues, counted, first_step, goes_on, Buffers, Overlapped, Resume, WorkerConfig, WorkerData,
    WorkerError, WorkerReport,
};
use pstrain_compute::Model;
use pstrain_core::client::{ClientError, ParameterClient};
use pstrain_core::{PullReply, PushMeta, PushOutcome, Rng};
use std::time::Instant;

/// `train_until` with each step's link time hidden behind the next step's compute
/// (`WorkerConfig::overlap`): a helper thread pushes the gradient computed last and pulls
/// while this one computes the next on the weights it has. The pulls land in a buffer of
/// their own (a delta pull adds to what the last one left there), copied to the model's
/// weights between steps (extrapolated ahead if `cfg.lookahead` says so: `Lookahead`). From
/// `cfg.exact_from` on, it pushes what it has, pulls, and hands over to exact rounds.
pub(super) fn train_overlapped(
    client: &mut dyn ParameterClient,
    model: &mut dyn Model,
    data: WorkerData<'_>,
    cfg: &WorkerConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Overlapped, WorkerError> {
    let mut sampler = data.sampler(cfg);
    let data = data.samples();
    let rank = cfg.rank;
    let client_err = |source| WorkerError::Client { rank, source };
    let mut buffers = Buffers::new(model, cfg.batch_size);
    let device = SpeedClock::start(cfg.speed.clone());
    let dropout_seed = Rng::new(cfg.seed).fork(0xd20f + rank as u64);
    let mut report = WorkerReport::of(rank);
    let mut pulled = vec![0.0; buffers.params.len()];
    let first = client.pull(&mut pulled, None, false).map_err(client_err)?;
    if first.done {
        return Ok(Overlapped::Ended(report));
    }
    let mut pulled_version = first.version;
    let total = cfg
        .epochs
        .map(|e| (e as u64).saturating_mul(sampler.steps_per_epoch() as u64));
    let mut step = first_step(cfg, pulled_version);
    // The gradient computed last, not pushed yet: its values, its push's header and the
    // seconds it took to compute.
    let mut outgoing = vec![0.0; pulled.len()];
    let mut unsent: Option<(PushMeta, f64)> = None;
    // The version of the weights in `buffers.params` (copied only when a pull brought newer).
    let mut params_version = None;
    let mut lookahead = Lookahead::new(cfg.lookahead);
    let goes_exact = |version: u64| cfg.exact_from.is_some_and(|from| version >= from);
    while total.is_none_or(|t| step < t) && !stop() && !goes_exact(pulled_version) {
        if params_version != Some(pulled_version) {
            lookahead.place(&pulled, pulled_version, step, &mut buffers.params);
            params_version = Some(pulled_version);
        }
        let computed_on = pulled_version;
        buffers.pick(sampler.batch_at(step));
        let mut rng = dropout_seed.fork(step);
        let last = unsent.take().map(|(meta, s)| (meta, s, &outgoing[..]));
        let (computed, seconds, exchanged) =
            beside_link(client, last, (&mut pulled, pulled_version), || {
                buffers.compute(model, data, &mut rng, &device)
            });
        if let Some((pushed, pull)) = exchanged {
            if !goes_on(pushed, &mut report)? {
                return Ok(Overlapped::Ended(report));
            }
            if let Some(reply) = pull {
                let reply = reply.map_err(client_err)?;
                pulled_version = reply.version;
                if reply.done {
                    return Ok(Overlapped::Ended(report));
                }
            }
        }
        unsent = Some((counted(computed, computed_on, cfg, &mut report)?, seconds));
        std::mem::swap(&mut buffers.grads, &mut outgoing);
        step += 1;
    }
    if let Some((meta, _)) = unsent {
        if !goes_on(client.push(meta, &outgoing), &mut report)? {
            return Ok(Overlapped::Ended(report));
        }
    }
    if !goes_exact(pulled_version) || total.is_some_and(|t| step >= t) || stop() {
        return Ok(Overlapped::Ended(report));
    }
    let resume = Resume {
        report,
        step,
        pulled,
        version: pulled_version,
        device,
    };
    hand_over(client, resume).map_err(client_err)
}

/// Runs `compute` on this thread while a helper pushes `last` (a gradient's header, the
/// seconds it took to compute, its values), if any, and pulls weights newer than `version`
/// into `pulled`: what `compute` gave, the seconds it took, and the link's round.
fn beside_link<T>(
    client: &mut dyn ParameterClient,
    last: Option<(PushMeta, f64, &[f32])>,
    (pulled, version): (&mut [f32], u64),
    compute: impl FnOnce() -> T,
) -> (T, f64, Option<Round>) {
    std::thread::scope(|scope| {
        let link = last.map(|last| scope.spawn(move || exchange(client, last, pulled, version)));
        let started = Instant::now();
        let computed = compute();
        let seconds = started.elapsed().as_secs_f64();
        let exchanged = link.map(|handle| {
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        (computed, seconds, exchanged)
    })
}

/// Hands an overlapped worker's place to exact rounds, which start from weights that include
/// the gradient it pushed last: it pulls once more into `at.pulled`.
fn hand_over(client: &mut dyn ParameterClient, mut at: Resume) -> Result<Overlapped, ClientError> {
    let reply = client.pull(&mut at.pulled, Some(at.version), false)?;
    if reply.done {
        return Ok(Overlapped::Ended(at.report));
    }
    at.version = reply.version;
    Ok(Overlapped::ExactFrom(at))
}

/// A push's answer and, if the worker goes on after it, the answer to pulling weights newer
/// than `version` into `pulled`.
type Round = (
    Result<PushOutcome, ClientError>,
    Option<Result<PullReply, ClientError>>,
);

/// Pushes the last gradient (its header, the seconds it took to compute, its values), telling
/// the client how long the compute was, then pulls weights newer than `version`.
fn exchange(
    client: &mut dyn ParameterClient,
    (meta, computed_s, grad): (PushMeta, f64, &[f32]),
    pulled: &mut [f32],
    version: u64,
) -> Round {
    client.computed_beside(computed_s);
    let pushed = client.push(meta, grad);
    let pull = continues(&pushed).then(|| client.pull(pulled, Some(version), false));
    (pushed, pull)
}

/// Where an overlapped worker computes its next gradient. Its gradient reaches the shards a
/// round later than without overlap, when the weights have moved on by about a round's move;
/// computing it on the pulled weights plus `rounds` times the last round's move (the
/// difference between the last two pulls it computed on, per step between them) takes the
/// gradient where the weights will be instead of where they were, as weight prediction does
/// for pipelined training. Under Adam each weight moves by about the learning rate in a steady
/// direction for many updates, so one round's move predicts the next well; `rounds` = 0
/// computes on the pulled weights.
struct Lookahead {
    rounds: f32,
    /// The weights of the last pull computed on, its version and the step it was placed at.
    last: Option<(Vec<f32>, u64, u64)>,
}

impl Lookahead {
    fn new(rounds: f32) -> Self {
        Lookahead { rounds, last: None }
    }

    /// Writes into `params` the weights to compute step `step` on, from the pull of version
    /// `version` in `pulled`.
    fn place(&mut self, pulled: &[f32], version: u64, step: u64, params: &mut [f32]) {
        if self.rounds <= 0.0 {
            params.copy_from_slice(pulled);
            return;
        }
        match &mut self.last {
            // Only ahead of an earlier pull: weights that went back (shards restarted from a
            // checkpoint) say nothing about where they go next.
            Some((last, last_version, last_step)) if version > *last_version => {
                let steps = step.saturating_sub(*last_step).max(1) as f32;
                let ahead = self.rounds / steps;
                for ((p, &w), old) in params.iter_mut().zip(pulled).zip(last.iter_mut()) {
                    *p = w + ahead * (w - *old);
                    *old = w;
                }
                (*last_version, *last_step) = (version, step);
            }
            _ => {
                params.copy_from_slice(pulled);
                self.last = Some((pulled.to_vec(), version, step));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Lookahead;
    use crate::run::device_speed::DeviceSpeed;
    use crate::run::worker::{train_until, WorkerConfig, WorkerData};
    use pstrain_compute::mnist::Split;
    use pstrain_compute::{ModelKind, ModelOptions};
    use pstrain_core::client::{ClientError, ParameterClient, PullReply};
    use pstrain_core::{PushMeta, PushOutcome};

    /// A shard of one worker that applies every push at once and records, per push, the
    /// version its gradient was computed on, the version it reached, and whether the worker
    /// computed it beside the link.
    struct Recorder {
        version: u64,
        last: u64,
        beside: bool,
        pushes: Vec<(u64, u64, bool)>,
    }

    impl ParameterClient for Recorder {
        fn pull(
            &mut self,
            params: &mut [f32],
            newer_than: Option<u64>,
            _wait: bool,
        ) -> Result<PullReply, ClientError> {
            let updated = newer_than.is_none_or(|v| v < self.version);
            if updated {
                params.fill(self.version as f32 * 1e-3);
            }
            Ok(PullReply {
                version: self.version,
                updated,
                done: self.version >= self.last,
                batch: None,
            })
        }

        fn push(&mut self, meta: PushMeta, _grad: &[f32]) -> Result<PushOutcome, ClientError> {
            if self.version >= self.last {
                return Ok(PushOutcome::Done);
            }
            let beside = std::mem::take(&mut self.beside);
            self.pushes.push((meta.base_version, self.version, beside));
            self.version += 1;
            let staleness = self.version - 1 - meta.base_version;
            Ok(PushOutcome::Applied {
                version: self.version,
                staleness,
            })
        }

        fn leave(&mut self) -> Result<(), ClientError> {
            Ok(())
        }

        fn computed_beside(&mut self, _seconds: f64) {
            self.beside = true;
        }
    }

    #[test]
    fn an_overlapped_worker_turns_exact_at_its_version_and_keeps_its_place() {
        let mut model = ModelKind::Convnet.build(ModelOptions::default());
        let labels: Vec<u8> = (0..32).map(|i| (i % 10) as u8).collect();
        let pixels: Vec<u8> = (0..32 * 784).map(|i| (i * 7 % 256) as u8).collect();
        let data = Split::from_pixels(pstrain_compute::DataShape::MNIST, &pixels, labels);
        let cfg = WorkerConfig {
            rank: 0,
            workers: 1,
            batch_size: 8,
            epochs: None,
            seed: 1,
            lockstep: false,
            step_is_version: false,
            pull_waits: false,
            max_batch: 8,
            speed: DeviceSpeed::Fixed(1.0),
            overlap: true,
            lookahead: 1.0,
            exact_from: Some(6),
        };
        let mut shard = Recorder {
            version: 0,
            last: 12,
            beside: false,
            pushes: Vec::new(),
        };
        let data = WorkerData::Whole(&data);
        let report = train_until(&mut shard, model.as_mut(), data, &cfg, &|| false).unwrap();
        let pushes = &shard.pushes;
        assert_eq!(pushes.len(), 12, "{pushes:?}");
        // Overlapped until a pull brought version 6: each gradient computed beside the link
        // on weights a push behind (its own last gradient was still on its way) ...
        assert!(
            pushes[..6].iter().all(|&(_, _, beside)| beside),
            "{pushes:?}"
        );
        assert!(pushes[1..7].iter().all(|&(base, at, _)| base + 1 == at));
        // ... the last of them pushed on its own, then exact rounds: pushed, pulled, computed
        // on the weights its own push made.
        assert_eq!(pushes[6], (5, 6, false));
        let exact = &pushes[7..];
        assert!(
            exact
                .iter()
                .all(|&(base, at, beside)| base == at && !beside),
            "{exact:?}"
        );
        // One report over both loops, every gradient counted once.
        assert_eq!((report.steps, report.samples), (12, 12 * 8));
    }

    #[test]
    fn lookahead_extrapolates_the_last_rounds_move_per_step() {
        let mut params = [0.0; 2];
        let mut off = Lookahead::new(0.0);
        off.place(&[1.0, 2.0], 3, 0, &mut params);
        off.place(&[2.0, 0.0], 5, 1, &mut params);
        assert_eq!(params, [2.0, 0.0], "rounds 0: the pulled weights");

        let mut one = Lookahead::new(1.0);
        one.place(&[1.0, 2.0], 3, 0, &mut params);
        assert_eq!(params, [1.0, 2.0], "nothing to extrapolate from yet");
        one.place(&[2.0, 1.0], 5, 1, &mut params);
        assert_eq!(params, [3.0, 0.0], "one round's move ahead");
        // Two steps since the last placement (a pull that brought nothing newer): the move
        // is spread over them.
        one.place(&[4.0, 1.0], 9, 3, &mut params);
        assert_eq!(params, [5.0, 1.0]);
    }

    #[test]
    fn weights_that_went_back_are_not_extrapolated() {
        let mut params = [0.0; 1];
        let mut two = Lookahead::new(2.0);
        two.place(&[1.0], 10, 0, &mut params);
        two.place(&[2.0], 12, 1, &mut params);
        assert_eq!(params, [4.0]);
        // Restarted shards serve version 4: the weights as pulled, and the next move is
        // measured from them.
        two.place(&[0.5], 4, 2, &mut params);
        assert_eq!(params, [0.5]);
        two.place(&[1.0], 6, 3, &mut params);
        assert_eq!(params, [2.0]);
    }
}
