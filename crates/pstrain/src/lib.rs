//! pstrain's engine: workers, the embedded parameter server, the training driver, MNIST
//! download and the benchmark. The `pstrain` binary is a thin clap front over this crate.

pub mod bench;
pub mod cluster;
pub mod download;
pub mod inproc;
pub mod metrics;
pub mod monitor;
pub mod netbench;
pub mod sampler;
pub mod train;
pub mod worker;

pub use pstrain_core::client::{ClientError, ParameterClient, PullReply};
pub use train::{train, Observer, Quiet, Schedule, TrainConfig, TrainError, TrainOutcome};
