//! pstrain as a library: a run's flags (`flags`), carrying a run out in one process (`run`),
//! its records and reports (`report`), runs of several processes (`launch`), the data set
//! (`data`), the benchmarks (`bench`) and the command line (`cli`). Front ends other than the
//! binary (the Python package) use the façade below, not the modules behind it.

pub mod bench;
pub mod cli;
pub mod data;
pub mod flags;
pub mod launch;
pub mod report;
pub mod run;

pub use pstrain_core::client::{ClientError, ParameterClient, PullReply};
pub use pstrain_core::{RunPlan, ScheduleKind};
pub use report::{Observer, Quiet};
pub use run::{train, TrainConfig, TrainError, TrainOutcome};

/// What the Python package (and any other front end) builds on: the shard and worker
/// processes as the binary's flags define them, the supervisor of a multi-process run,
/// the run token and the commands' help.
pub mod facade {
    pub use crate::cli::help;
    pub use crate::flags::server::ServerArgs;
    pub use crate::flags::token::token_from_env;
    pub use crate::flags::{parse_flags, seconds};
    pub use crate::launch::remote_worker::run_worker_from;
    pub use crate::launch::shard::{log_shard_report, shard_setup, CustomModel};
    pub use crate::launch::supervisor;
    pub use crate::report::error_text::one_line;
}
