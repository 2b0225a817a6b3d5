//! What `pstrain bench-net` measures: the shard counts, the synthetic layout's size and the
//! training comparisons, checked before anything starts (or any data is downloaded).

use crate::run::TrainError;
use pstrain_core::ConfigError;

#[derive(Debug, Clone)]
pub struct NetBenchConfig {
    pub shard_counts: Vec<usize>,
    /// Values of the synthetic layout (100M in the benchmark).
    pub synthetic_values: usize,
    pub train_updates: u64,
    /// Shard counts of the TCP training comparison.
    pub train_shard_counts: Vec<usize>,
}

impl Default for NetBenchConfig {
    fn default() -> Self {
        NetBenchConfig {
            shard_counts: vec![1, 4],
            synthetic_values: 100_000_000,
            train_updates: 300,
            train_shard_counts: vec![1, 2],
        }
    }
}

impl NetBenchConfig {
    /// Shard counts of at least one, and a synthetic layout this machine can hold.
    pub fn validate(&self) -> Result<(), TrainError> {
        let refuse = |field, requirement, value: String| {
            TrainError::Config(ConfigError::OutOfRange {
                field,
                requirement,
                value,
            })
        };
        for (field, counts) in [
            ("--shards", &self.shard_counts),
            ("--train-shards", &self.train_shard_counts),
        ] {
            if counts.contains(&0) {
                return Err(refuse(
                    field,
                    "shard counts of at least 1",
                    format!("{counts:?}"),
                ));
            }
        }
        if self.synthetic_values == 0 {
            return Err(refuse("--synthetic-values", "at least 1", "0".into()));
        }
        // The shards' weights, the client's pulled copy and its gradient, at the least.
        crate::run::memory_fit::check_bytes_fit(
            &format!("a synthetic layout of {} values", self.synthetic_values),
            12 * self.synthetic_values as u128,
            "lower --synthetic-values",
        )
    }
}
