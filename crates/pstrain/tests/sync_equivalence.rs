//! The sync invariant: N workers of batch b on the same samples give the same weights (within
//! float tolerance) as one worker with batch N*b, through the real server and clients.

use pstrain::run::inproc::InProcServer;
use pstrain_compute::{Model, ModelKind, ModelOptions};
use pstrain_core::ParameterClient;
use pstrain_core::{EngineConfig, Mode, OptimizerConfig, PushMeta, Rng, ServerConfig, ShardEngine};
use std::time::Duration;

fn server(
    workers: usize,
    optimizer: OptimizerConfig,
    init: &[f32],
) -> std::sync::Arc<InProcServer> {
    let cfg = ServerConfig {
        mode: Mode::Sync { backup_workers: 0 },
        workers,
        optimizer,
        ..Default::default()
    };
    let engine = ShardEngine::new(EngineConfig::single(cfg), init.to_vec(), Duration::ZERO);
    InProcServer::new(engine.unwrap())
}

/// Runs `steps` sync steps where worker w of `workers` takes its contiguous slice of each
/// step's samples; returns the final weights.
fn train_steps(
    model: &mut dyn Model,
    workers: usize,
    optimizer: OptimizerConfig,
    init: &[f32],
    batches: &[(Vec<f32>, Vec<u8>)],
) -> Vec<f32> {
    let server = server(workers, optimizer, init);
    let mut clients: Vec<_> = (0..workers).map(|r| server.client(r).unwrap()).collect();
    let mut params = vec![0.0; init.len()];
    let mut grads = vec![0.0; init.len()];
    let per = model.input_len();
    for (images, labels) in batches {
        let b = labels.len() / workers;
        let version = clients[0].pull(&mut params, None, false).unwrap().version;
        for (rank, client) in clients.iter_mut().enumerate() {
            let labs = &labels[rank * b..(rank + 1) * b];
            let imgs = &images[rank * b * per..(rank + 1) * b * per];
            let stats = model
                .train_step(&params, imgs, labs, &mut grads, &mut Rng::new(0))
                .unwrap();
            let meta = PushMeta {
                rank,
                base_version: version,
                samples: b as u32,
                loss: stats.loss,
                accumulated: false,
            };
            client.push(meta, &grads).unwrap();
        }
        assert_eq!(server.stats().version, version + 1, "one update per step");
    }
    server.snapshot().1
}

/// How close N workers' weights must be to one worker's.
#[derive(Clone, Copy)]
enum Tolerance {
    /// Each weight within this fraction of its size (plus 1e-3): SGD's update is linear in
    /// the gradient, so the sum order's rounding stays at rounding size.
    Relative(f32),
    /// Each weight within this fraction of the most Adam can move it (its rate per step, for
    /// the steps taken): Adam divides by the gradient's running size, so for a weight whose
    /// gradient is near zero a rounding difference moves it by a visible part of a step
    /// (seen on CPUs without AVX-512, whose GEMM kernels round differently: 1% of a step).
    /// A wrong combination of the workers' gradients moves weights by whole steps.
    AdamSteps { lr: f32, fraction: f32 },
}

fn check(kind: ModelKind, optimizer: OptimizerConfig, tolerance: Tolerance) {
    // Dropout draws its own masks per worker, so the invariant holds for the deterministic
    // network; everything else (layers, averaging, optimizer) is the production path.
    let mut model = kind.build(ModelOptions {
        dropout: false,
        threads: 1,
    });
    let mut rng = Rng::new(11);
    let mut init = vec![0.0; model.layout().len()];
    model.init_params(&mut init, &mut rng);
    let batches: Vec<(Vec<f32>, Vec<u8>)> = (0..4)
        .map(|_| {
            let images = (0..32 * 784).map(|_| rng.uniform(-0.4, 2.8)).collect();
            let labels = (0..32).map(|_| rng.below(10) as u8).collect();
            (images, labels)
        })
        .collect();
    let one = train_steps(model.as_mut(), 1, optimizer, &init, &batches);
    let two = train_steps(model.as_mut(), 2, optimizer, &init, &batches);
    let four = train_steps(model.as_mut(), 4, optimizer, &init, &batches);
    let moved: f32 = one.iter().zip(&init).map(|(a, b)| (a - b).abs()).sum();
    assert!(moved > 0.0, "training moved the weights");
    for (name, other) in [("2 workers", &two), ("4 workers", &four)] {
        let gaps = one.iter().zip(other.iter());
        match tolerance {
            Tolerance::Relative(bound) => {
                let worst = gaps
                    .map(|(a, b)| (a - b).abs() / (1e-3 + a.abs()))
                    .fold(0.0f32, f32::max);
                assert!(
                    worst < bound,
                    "{kind} {name}: worst relative difference {worst}"
                );
            }
            Tolerance::AdamSteps { lr, fraction } => {
                let worst = gaps.map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                let bound = fraction * lr * batches.len() as f32;
                assert!(
                    worst < bound,
                    "{kind} {name}: worst difference {worst}, over {bound}"
                );
            }
        }
    }
}

#[test]
fn convnet_sgd_momentum() {
    check(
        ModelKind::Convnet,
        OptimizerConfig::momentum(0.05, 0.9),
        Tolerance::Relative(1e-3),
    );
}

#[test]
fn cnn_sgd() {
    check(
        ModelKind::Cnn,
        OptimizerConfig::sgd(0.05),
        Tolerance::Relative(1e-3),
    );
}

#[test]
fn cnn_adam() {
    let lr = 1e-3;
    let tolerance = Tolerance::AdamSteps { lr, fraction: 0.02 };
    check(ModelKind::Cnn, OptimizerConfig::adam(lr), tolerance);
}
