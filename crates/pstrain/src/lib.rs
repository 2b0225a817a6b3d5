//! pstrain's engine: workers, the embedded parameter server, the training driver, the run
//! plan as flags, the supervisor of multi-process runs, MNIST download, the benchmarks and
//! the command line itself (`cli`). Front ends other than the binary (the Python package)
//! use the library modules: `shard_setup`, `remote_worker`, `supervisor`, `plan_flags`.

pub mod bench;
pub mod bench_memory;
pub mod cli;
pub mod cluster;
pub mod data;
pub mod download;
pub mod flags;
pub mod inproc;
pub mod metrics;
pub mod monitor;
pub mod netbench;
pub mod plan_flags;
pub mod plot;
pub mod process;
pub mod remote_worker;
pub mod reporter;
pub mod run_id;
pub mod sampler;
pub mod shard_setup;
pub mod supervisor;
pub mod token;
pub mod train;
pub mod train_flags;
pub mod usage;
pub mod worker;

pub use pstrain_core::client::{ClientError, ParameterClient, PullReply};
pub use pstrain_core::{RunPlan, Schedule};
pub use train::{train, Observer, Quiet, TrainConfig, TrainError, TrainOutcome};
