//! Server configuration: `ServerConfig { .., ..Default::default() }` then `validate()`.

use crate::error::ConfigError;
use crate::optimizer::OptimizerConfig;

/// How the server turns pushed gradients into updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One update per step from the first `workers - backup_workers` gradients of that step,
    /// averaged by sample count; late gradients of a finished step are dropped.
    Sync { backup_workers: usize },
    /// Every gradient is applied on arrival; one computed from weights more than
    /// `max_staleness` updates old is dropped (the worker then pulls fresh weights).
    Async { max_staleness: Option<u64> },
}

impl Mode {
    pub fn is_sync(&self) -> bool {
        matches!(self, Mode::Sync { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Sync { .. } => "sync",
            Mode::Async { .. } => "async",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub mode: Mode,
    /// Number of worker ranks (0..workers) that may push.
    pub workers: usize,
    pub optimizer: OptimizerConfig,
    /// Stop accepting gradients after this many updates.
    pub max_updates: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            mode: Mode::Async {
                max_staleness: Some(32),
            },
            workers: 2,
            optimizer: OptimizerConfig::adam(1e-3),
            max_updates: None,
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 {
            return Err(ConfigError::out_of_range("workers", ">= 1", self.workers));
        }
        if let Mode::Sync { backup_workers } = self.mode {
            if backup_workers >= self.workers {
                return Err(ConfigError::out_of_range(
                    "backup_workers",
                    "smaller than the number of workers",
                    backup_workers,
                ));
            }
        }
        if self.max_updates == Some(0) {
            return Err(ConfigError::out_of_range("max_updates", ">= 1", 0));
        }
        self.optimizer.validate()
    }
}
