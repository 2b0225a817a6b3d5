//! `pstrain bench`: compute-only throughput per model and thread count, and training
//! throughput with 1 and 2 workers in each mode, so the parameter server's overhead reads as a
//! fraction of what the same cores compute alone. Every number comes from one run.

use crate::report::Quiet;
use crate::run::{train, TrainConfig, TrainError};
use pstrain_compute::mnist::{Mnist, Split};
use pstrain_compute::{ModelKind, ModelOptions};
use pstrain_core::RunPlan;
use pstrain_core::{Mode, Rng};
use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub batch_size: usize,
    /// Seconds spent measuring each compute-only point.
    pub seconds: f64,
    pub models: Vec<ModelKind>,
    pub threads: Vec<usize>,
    pub workers: Vec<usize>,
    /// Server updates per training point (multiplied by the workers in async mode, so every
    /// point processes about the same number of samples per worker).
    pub train_updates: u64,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            batch_size: 64,
            seconds: 3.0,
            models: ModelKind::ALL.to_vec(),
            threads: vec![1, 2],
            workers: vec![1, 2],
            train_updates: 150,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ComputePoint {
    pub model: &'static str,
    pub threads: usize,
    pub batch_size: usize,
    pub samples_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainingPoint {
    pub model: &'static str,
    pub mode: &'static str,
    pub workers: usize,
    pub batch_size: usize,
    pub updates: u64,
    pub samples_per_s: f64,
    /// What `workers` single-threaded compute-only loops would do: the ceiling.
    pub compute_only_samples_per_s: f64,
    pub fraction_of_compute: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub cores: usize,
    /// The processor's model name, as the system gives it.
    pub cpu: String,
    pub compute: Vec<ComputePoint>,
    pub training: Vec<TrainingPoint>,
    /// Peak resident memory of the default run's processes (filled by the CLI, which runs
    /// them as children).
    pub memory: Vec<crate::bench::memory::MemoryRun>,
}

/// The CPU's model name from `/proc/cpuinfo` (empty where there is none).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Samples per second of forward + backward for one model at its initial weights, on the
/// first MNIST training images in turn. Real images, not noise: the convolution's backward
/// skips zero gradients (`sparse_grad`), so its speed depends on the data (and, as training
/// goes on, on the weights; the training points measure that).
pub fn compute_throughput(
    kind: ModelKind,
    threads: usize,
    batch: usize,
    seconds: f64,
    data: &Split,
) -> f64 {
    let mut model = kind.build(ModelOptions {
        dropout: true,
        threads,
    });
    let mut rng = Rng::new(7);
    let mut params = vec![0.0; model.layout().len()];
    model.init_params(&mut params, &mut rng);
    let mut grads = vec![0.0; params.len()];
    let per = model.input_len();
    // 16 batches (fewer if the data set is smaller), cycled.
    let batches = (data.len() / batch.max(1)).clamp(1, 16);
    let mut images = vec![0.0f32; batches * batch * per];
    let mut labels = vec![0u8; batches * batch];
    for (j, (image, label)) in images.chunks_exact_mut(per).zip(&mut labels).enumerate() {
        let i = j % data.len().max(1);
        data.copy_image(i, image);
        *label = data.labels[i];
    }
    let mut next = 0;
    let mut step = |rng: &mut Rng| {
        let b = next % batches;
        next += 1;
        model
            .train_step(
                &params,
                &images[b * batch * per..(b + 1) * batch * per],
                &labels[b * batch..(b + 1) * batch],
                &mut grads,
                rng,
            )
            .expect("shapes are built to fit")
    };
    for _ in 0..2 {
        step(&mut rng);
    }
    let start = Instant::now();
    let mut samples = 0usize;
    while samples == 0 || start.elapsed().as_secs_f64() < seconds {
        samples += step(&mut rng).samples;
    }
    samples as f64 / start.elapsed().as_secs_f64()
}

/// `workers` in-process workers training `model` under `mode`, beside the compute-only
/// ceiling of that many single-threaded workers (`single` samples/s each).
fn training_point(
    cfg: &BenchConfig,
    model: ModelKind,
    mode: Mode,
    workers: usize,
    single: f64,
    data: &Mnist,
) -> Result<TrainingPoint, TrainError> {
    let updates = if mode.lockstep() {
        cfg.train_updates
    } else {
        cfg.train_updates * workers as u64
    };
    let tc = TrainConfig {
        plan: RunPlan {
            mode,
            workers,
            model: model.name().into(),
            iterations: Some(updates),
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            train_samples: data.train.len(),
            ..RunPlan::default()
        },
        eval_every: Some(0),
        ..TrainConfig::default()
    };
    let s = train(&tc, data, &mut Quiet, &AtomicBool::new(false))?.summary;
    let ceiling = single * workers as f64;
    Ok(TrainingPoint {
        model: model.name(),
        mode: mode.name(),
        workers,
        batch_size: cfg.batch_size,
        updates: s.updates,
        samples_per_s: s.samples_per_s,
        compute_only_samples_per_s: ceiling,
        fraction_of_compute: s.samples_per_s / ceiling,
    })
}

/// Runs every point; `progress` hears a line per finished point.
pub fn run_bench(
    cfg: &BenchConfig,
    data: &Mnist,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport, TrainError> {
    // Its largest run's workers, all in this process, must fit before any allocates.
    let workers = cfg.workers.iter().copied().max().unwrap_or(1);
    for model in &cfg.models {
        let built = model.build(ModelOptions::default());
        crate::run::memory_fit::check_workers_fit(built.as_ref(), workers, cfg.batch_size)?;
    }
    let mut compute = Vec::new();
    for &model in &cfg.models {
        for &threads in &cfg.threads {
            let sps = compute_throughput(model, threads, cfg.batch_size, cfg.seconds, &data.train);
            progress(&format!(
                "compute {model} threads={threads}: {sps:.0} samples/s"
            ));
            compute.push(ComputePoint {
                model: model.name(),
                threads,
                batch_size: cfg.batch_size,
                samples_per_s: sps,
            });
        }
    }
    let mut training = Vec::new();
    for &model in cfg.models.iter().filter(|_| cfg.train_updates > 0) {
        let single = compute
            .iter()
            .find(|p| p.model == model.name() && p.threads == 1)
            .map(|p| p.samples_per_s)
            .unwrap_or_else(|| {
                compute_throughput(model, 1, cfg.batch_size, cfg.seconds, &data.train)
            });
        for mode in [
            Mode::Sync { backup_workers: 0 },
            Mode::Async {
                max_staleness: None,
            },
        ] {
            for &workers in &cfg.workers {
                let p = training_point(cfg, model, mode, workers, single, data)?;
                progress(&format!(
                    "train {model} {} workers={workers}: {:.0} samples/s ({:.2} of compute-only)",
                    mode.name(),
                    p.samples_per_s,
                    p.fraction_of_compute
                ));
                training.push(p);
            }
        }
    }
    Ok(BenchReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu: cpu_model(),
        compute,
        training,
        memory: Vec::new(),
    })
}
