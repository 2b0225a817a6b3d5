//! Watching a pstrain run over HTTP: `GET /metrics` in the Prometheus (OpenMetrics) text
//! format, `GET /` a live page served by pstrain itself, and `GET /api/run` the JSON the page
//! draws. A shard or `pstrain train` hands it a `Source` of `RunSnapshot`s; the server runs on
//! a thread of its own, so watching never blocks training.

mod exposition;
mod families;
mod http;
mod log_line;
mod snapshot;
mod worker_numbers;

pub use exposition::{render_metrics, Latencies};
pub use http::{Source, WatchError, Watcher};
pub use log_line::{stderr_line, stdout_line};
pub use snapshot::{plan_fields, EvalPoint, HistoryPoint, RunSnapshot, ShardView, WorkerView};
pub use worker_numbers::{WorkerColumns, WorkerNumbers};
