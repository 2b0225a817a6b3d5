//! Storage: the safetensors format (so Python tools can open what pstrain writes), atomic
//! file replacement, and checkpoints of a server shard with its optimizer state.

pub mod assemble;
pub mod atomic;
pub mod beacon;
pub mod bounded_read;
pub mod checkpoint;
pub mod error;
pub mod folder;
pub mod manifest;
mod regular_file;
pub mod safetensors;
pub mod saver;
pub mod seal;

pub use assemble::{assemble, Assembled};
pub use beacon::{resume_from, Beacon, ResumeFrom};
pub use bounded_read::{read_at_most, read_text_at_most};
pub use checkpoint::CheckpointHeader;
pub use checkpoint::{Checkpoint, ShardIdentity, StoreError, TensorShapes};
pub use folder::{is_plain_run_id, CheckpointDir};
pub use manifest::{newest_header_of_run, runs_in, shard_counts_of_run, Manifest, ManifestEntry};
pub use saver::{CheckpointPolicy, Restored, ResumeError, Saver};
pub use seal::FileKey;
