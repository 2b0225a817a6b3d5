//! A training run as one process carries it out: its configuration (`TrainConfig`), what can
//! end it (`TrainError`), the worker loop, the embedded server and the in-process driver
//! (`train`), and the monitor that evaluates and summarises, whatever the transport.

pub mod compute_gate;
pub mod config;
pub mod device_speed;
pub mod embedded;
pub mod error;
pub mod inproc;
pub mod memory_fit;
pub mod monitor;
mod overlapped;
pub mod push_answer;
pub mod saved_model;
pub mod speed_trace;
pub mod worker;

pub use config::{CheckpointPolicy, TrainConfig, DEFAULT_LOOKAHEAD, DEFAULT_OVERLAP_UNTIL};
pub use embedded::train;
pub use error::TrainError;
pub use monitor::TrainOutcome;
