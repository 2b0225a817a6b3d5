//! The worker loop with its link overlapped (`--overlap`): a helper thread pushes the last
//! gradient and pulls while the next one is computed, so a round takes about the longer of
//! the link and compute rather than their sum.

use super::device_speed::SpeedClock;
use super::worker::{
    continues, counted, first_step, goes_on, Buffers, WorkerConfig, WorkerData, WorkerError,
    WorkerReport,
};
use pstrain_compute::Model;
use pstrain_core::client::{ClientError, ParameterClient};
use pstrain_core::{PullReply, PushMeta, PushOutcome, Rng};
use std::time::Instant;

/// `train_until` with each step's link time hidden behind the next step's compute
/// (`WorkerConfig::overlap`): a helper thread pushes the gradient computed last and pulls
/// while this one computes the next on the weights it has. The pulls land in a buffer of
/// their own (a delta pull adds to what the last one left there), copied to the model's
/// weights between steps.
pub(super) fn train_overlapped(
    client: &mut dyn ParameterClient,
    model: &mut dyn Model,
    data: WorkerData<'_>,
    cfg: &WorkerConfig,
    stop: &dyn Fn() -> bool,
) -> Result<WorkerReport, WorkerError> {
    let mut sampler = data.sampler(cfg);
    let data = data.samples();
    let rank = cfg.rank;
    let client_err = |source| WorkerError::Client { rank, source };
    let mut buffers = Buffers::new(model, cfg.batch_size);
    let device = SpeedClock::start(cfg.speed.clone());
    let dropout_seed = Rng::new(cfg.seed).fork(0xd20f + rank as u64);
    let mut report = WorkerReport {
        rank,
        ..WorkerReport::default()
    };
    let mut pulled = vec![0.0; buffers.params.len()];
    let first = client.pull(&mut pulled, None, false).map_err(client_err)?;
    if first.done {
        return Ok(report);
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
    while total.is_none_or(|t| step < t) && !stop() {
        if params_version != Some(pulled_version) {
            buffers.params.copy_from_slice(&pulled);
            params_version = Some(pulled_version);
        }
        let computed_on = pulled_version;
        buffers.pick(sampler.batch_at(step));
        let mut rng = dropout_seed.fork(step);
        let (computed, seconds, exchanged) = std::thread::scope(|scope| {
            let link = unsent.take().map(|(meta, seconds)| {
                let (client, outgoing, pulled) = (&mut *client, &outgoing, &mut pulled);
                let last = (meta, seconds, &outgoing[..]);
                scope.spawn(move || exchange(client, last, pulled, pulled_version))
            });
            let started = Instant::now();
            let computed = buffers.compute(model, data, &mut rng, &device);
            let seconds = started.elapsed().as_secs_f64();
            let exchanged = link.map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            });
            (computed, seconds, exchanged)
        });
        if let Some((pushed, pull)) = exchanged {
            if !goes_on(pushed, &mut report).map_err(client_err)? {
                return Ok(report);
            }
            if let Some(reply) = pull {
                let reply = reply.map_err(client_err)?;
                pulled_version = reply.version;
                if reply.done {
                    return Ok(report);
                }
            }
        }
        unsent = Some((counted(computed, computed_on, cfg, &mut report)?, seconds));
        std::mem::swap(&mut buffers.grads, &mut outgoing);
        step += 1;
    }
    if let Some((meta, _)) = unsent {
        goes_on(client.push(meta, &outgoing), &mut report).map_err(client_err)?;
    }
    Ok(report)
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
