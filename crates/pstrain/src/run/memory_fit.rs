//! Whether a process's workers fit in the machine's memory, checked before any of them
//! allocates: a batch size or a number of workers the machine cannot hold is a clear error,
//! not an allocation failure that aborts the process (or the kernel's out-of-memory kill
//! partway through a run).
//!
//! The estimate is a lower bound (what a worker certainly allocates: a batch's images and
//! labels, the model's activations for it, the weights and the gradient), so a run it
//! refuses could not have run; one it lets through may still be tight.

use crate::run::error::TrainError;
use pstrain_compute::Model;

/// What one worker of `model` allocates at the least for batches of up to `batch` samples,
/// in bytes.
fn worker_bytes(model: &dyn Model, batch: usize) -> u128 {
    let values = model.layout().len() as u128;
    let per_sample = (model.input_len() + model.values_per_sample()) as u128;
    let batch = batch as u128;
    4 * (2 * values + batch * per_sample) + batch
}

/// Checks that `workers` workers of `model`, in this process or on this machine, fit in the
/// memory the kernel says is available (no check where it does not say: not Linux).
pub fn check_workers_fit(
    model: &dyn Model,
    workers: usize,
    batch: usize,
) -> Result<(), TrainError> {
    match available_bytes() {
        Some(available) => check_against(model, workers, batch, available),
        None => Ok(()),
    }
}

/// `check_workers_fit` against `available` bytes.
fn check_against(
    model: &dyn Model,
    workers: usize,
    batch: usize,
    available: u64,
) -> Result<(), TrainError> {
    let each = worker_bytes(model, batch);
    let what = format!(
        "{workers} worker{s} at a batch of {batch} need",
        s = if workers == 1 { "" } else { "s" }
    );
    let advice = format!(
        "lower --batch-size or the number of workers ({} each: the batch's images and \
         activations, the weights and the gradient)",
        gigabytes(each)
    );
    refuse_past(
        available,
        each.saturating_mul(workers as u128),
        &what,
        &advice,
    )
}

/// Checks that `bytes`, what `what` holds at the least, fit in the memory the kernel says is
/// available (no check where it does not say); the refusal ends with `advice`.
pub fn check_bytes_fit(what: &str, bytes: u128, advice: &str) -> Result<(), TrainError> {
    match available_bytes() {
        Some(available) => refuse_past(available, bytes, &format!("{what} needs"), advice),
        None => Ok(()),
    }
}

/// `needed` bytes against `available`: within, or a refusal saying who needs how much
/// (`what`, ending in its verb) and what to do (`advice`).
fn refuse_past(available: u64, needed: u128, what: &str, advice: &str) -> Result<(), TrainError> {
    if needed <= u128::from(available) {
        return Ok(());
    }
    Err(TrainError::Memory(format!(
        "{what} at least {} and this machine has {} available: {advice}",
        gigabytes(needed),
        gigabytes(u128::from(available)),
    )))
}

/// `bytes` in GB, or in MB below one GB.
fn gigabytes(bytes: u128) -> String {
    let bytes = bytes as f64;
    if bytes < 1e9 {
        format!("{:.1} MB", bytes / 1e6)
    } else {
        format!("{:.1} GB", bytes / 1e9)
    }
}

/// The kernel's estimate of memory available for new allocations (`MemAvailable`), in bytes.
fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&meminfo)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let amount: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => amount.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pstrain_compute::{ModelKind, ModelOptions};

    fn cnn() -> Box<dyn Model> {
        ModelKind::Cnn.build(ModelOptions::default())
    }

    #[test]
    fn meminfo_is_read_in_kilobytes_and_anything_else_is_no_answer() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   2000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(2_048_000));
        assert_eq!(parse_mem_available("MemAvailable: 12 MB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    /// The estimate counts the batch's images and the activations (the cnn's first
    /// convolution alone keeps 32 x 26 x 26 values a sample) besides weights and gradient.
    #[test]
    fn a_worker_needs_its_weights_gradient_and_a_batch_of_activations() {
        let model = cnn();
        let params = model.layout().len() as u128;
        let one = worker_bytes(model.as_ref(), 1);
        assert!(one > 4 * (2 * params + 784 + 32 * 26 * 26), "{one}");
        let sixty_four = worker_bytes(model.as_ref(), 64);
        assert_eq!(sixty_four - 8 * params, 64 * (one - 8 * params));
    }

    #[test]
    fn a_batch_or_a_worker_count_past_the_memory_is_refused_with_both_numbers() {
        let model = cnn();
        let gb = 1_000_000_000;
        assert!(check_against(model.as_ref(), 2, 64, 24 * gb).is_ok());
        let err = check_against(model.as_ref(), 2, 100_000_000, 24 * gb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 workers at a batch of 100000000"), "{err}");
        assert!(err.contains("24.0 GB available"), "{err}");
        assert!(err.contains("--batch-size"), "{err}");
        let err = check_against(model.as_ref(), 100_000, 64, 24 * gb)
            .unwrap_err()
            .to_string();
        assert!(err.contains("100000 workers"), "{err}");
        assert!(
            err.contains(" MB each"),
            "a cnn worker at 64 takes megabytes: {err}"
        );
    }
}
