//! pstrain's engine: workers, the embedded parameter server, the training driver, MNIST
//! download, the benchmark and the command line itself (`cli`), which the `pstrain` binary and
//! the Python package share.

pub mod bench;
pub mod cli;
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
