//! Storage: the safetensors format (so Python tools can open what pstrain writes), atomic
//! file replacement, and checkpoints of a server shard with its optimizer state.

pub mod atomic;
pub mod checkpoint;
pub mod folder;
pub mod safetensors;
pub mod saver;

pub use checkpoint::{Checkpoint, ShardIdentity, StoreError};
pub use folder::{assemble, Assembled, CheckpointDir};
pub use saver::{CheckpointPolicy, Restored, ResumeError, Saver};
