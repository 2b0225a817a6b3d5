//! What a run tells people and files: the records (progress, evaluations, per-worker numbers,
//! the summary), the observers that hear them, the progress bar and metrics file, each
//! process's memory and CPU, and the plots. Nothing here knows how a run is carried out.

pub mod error_text;
pub mod metrics_file;
pub mod observer;
pub mod plot;
pub mod records;
pub mod reporter;
pub mod usage;

pub use observer::{Observer, Quiet};
