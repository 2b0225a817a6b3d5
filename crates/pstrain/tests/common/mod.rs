//! Shared helpers for the integration tests: where real MNIST is, one training run at a time,
//! and small IDX data sets made on the spot.
#![allow(dead_code)]

use pstrain::{RunPlan, ScheduleKind, TrainConfig};
use pstrain_compute::idx::encode_idx;
use pstrain_compute::mnist::{self, Mnist};
use pstrain_compute::ModelKind;
use pstrain_core::{Aggregate, Mode, OptimizerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The report of a `pstrain worker` process that exited successfully (its stderr if not).
pub fn worker_report(out: &std::process::Output) -> pstrain::run::worker::WorkerReport {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pstrain::launch::supervisor::parse_report(&String::from_utf8_lossy(&out.stdout))
        .expect("a report")
}

/// Real MNIST: `PSTRAIN_DATA_DIR`, else the shared folder beside the checkout, else
/// `./data/mnist` at the workspace root (where `pstrain train` downloads it).
pub fn mnist_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = std::env::var_os("PSTRAIN_DATA_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([root.join("../shared/data/mnist"), root.join("data/mnist")]);
    for dir in candidates {
        if mnist::missing_files(&dir).is_empty() {
            return dir;
        }
    }
    panic!(
        "real MNIST not found: set PSTRAIN_DATA_DIR to a folder with the four IDX files, \
         or run `pstrain download` at the workspace root"
    );
}

pub fn mnist() -> &'static Mnist {
    static DATA: OnceLock<Mnist> = OnceLock::new();
    DATA.get_or_init(|| mnist::load_dir(&mnist_dir()).expect("real MNIST loads"))
}

/// Runs `run` on a thread of its own and fails the test if it takes longer than `bound` (a
/// stall, not a speed claim: bounds are several times what a run needs).
pub fn within<T: Send + 'static>(
    bound: std::time::Duration,
    run: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run());
    });
    rx.recv_timeout(bound)
        .unwrap_or_else(|_| panic!("the run did not finish within {bound:?}"))
}

/// Training runs use both cores; running two at once would only make each slower.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes an IDX data set of `train` and `test` images of `rows` x `cols` in `classes`
/// classes into `dir`: each class a bright block in a cell of its own of a grid over the
/// image (easy to learn), the labels cycling through every class.
pub fn write_synthetic_shaped(
    dir: &Path,
    (train, test): (usize, usize),
    (rows, cols): (usize, usize),
    classes: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    let grid = (1..).find(|g| g * g >= classes).unwrap();
    let (cell_h, cell_w) = (rows / grid, cols / grid);
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut pixels = vec![0u8; n * rows * cols];
        let labels: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % classes) as u8).collect();
        for (i, &class) in labels.iter().enumerate() {
            let (r0, c0) = (
                usize::from(class) / grid * cell_h,
                usize::from(class) % grid * cell_w,
            );
            for r in r0..r0 + cell_h - 1 {
                for c in c0..c0 + cell_w - 1 {
                    pixels[(i * rows + r) * cols + c] = 200 + (i % 50) as u8;
                }
            }
        }
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            encode_idx(&[n as u32, rows as u32, cols as u32], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            encode_idx(&[n as u32], &labels),
        )
        .unwrap();
    }
}

/// Writes an IDX data set of `train` and `test` 28x28 images in 10 classes into `dir`,
/// where each class is a distinct bright square, so that a model can learn it.
pub fn write_synthetic_set(dir: &Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut pixels = vec![0u8; n * 784];
        let mut labels = vec![0u8; n];
        for i in 0..n {
            let class = (i * 7 + 3) % 10;
            labels[i] = class as u8;
            let (r0, c0) = (2 + (class / 5) * 12, 1 + (class % 5) * 5);
            for r in r0..r0 + 10 {
                for c in c0..c0 + 5 {
                    pixels[i * 784 + r * 28 + c] = 200 + (i % 50) as u8;
                }
            }
        }
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            encode_idx(&[n as u32, 28, 28], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            encode_idx(&[n as u32], &labels),
        )
        .unwrap();
    }
}

pub fn pstrain_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pstrain")
}

/// One epoch's worth of samples for `cnn`, 2 workers pushing 16-sample gradients. A sync
/// update averages both workers' 32 samples, so it takes twice the rate (linear scaling).
pub fn cnn_one_epoch(mode: Mode) -> TrainConfig {
    let lr = if mode.lockstep() { 2e-3 } else { 1e-3 };
    TrainConfig {
        plan: RunPlan {
            mode,
            workers: 2,
            model: ModelKind::Cnn.name().into(),
            epochs: 1,
            batch_size: 16,
            optimizer: OptimizerConfig::adam(lr),
            ..RunPlan::default()
        },
        eval_every: Some(0),
        ..TrainConfig::default()
    }
}

/// The original Ray example: plain SGD lr 0.01, batch 128, 2 workers; its sync server summed
/// the workers' gradients.
pub fn convnet_as_original(mode: Mode, iterations: u64) -> TrainConfig {
    TrainConfig {
        plan: RunPlan {
            mode,
            workers: 2,
            model: ModelKind::Convnet.name().into(),
            iterations: Some(iterations),
            batch_size: 128,
            optimizer: OptimizerConfig::sgd(0.01),
            schedule: ScheduleKind::Constant,
            aggregate: Aggregate::Sum,
            ..RunPlan::default()
        },
        eval_every: Some(0),
        ..TrainConfig::default()
    }
}

/// A child process killed when dropped, so a failing test leaves no process behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// A `pstrain server` process on 127.0.0.1 (a free port), killed when dropped.
pub struct Shard {
    pub child: KillOnDrop,
    pub addr: String,
}

/// Starts `pstrain server --listen 127.0.0.1:0 FLAGS...` and reads the address it bound.
pub fn shard(flags: &[&str]) -> Shard {
    let mut child = std::process::Command::new(pstrain_bin())
        .args(["server", "--listen", "127.0.0.1:0"])
        .args(flags)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = listening_address(&mut child);
    Shard {
        child: KillOnDrop(child),
        addr,
    }
}

/// The address a `pstrain server` child bound, from the first line of its (piped) stdout.
pub fn listening_address(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader};
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the shard said {line:?}"))
        .to_string()
}
