//! The compute layer of pstrain: models as sequences of hand-written layers on the `gemm`
//! crate, working directly on the flat parameter and gradient buffers that go over the wire,
//! and the IDX/MNIST data loading they train on.

mod buffer_plan;
pub mod data;
pub mod dot_product;
pub mod error;
pub mod layers;
pub mod linalg;
pub mod model;
pub mod models;
pub mod replicated;
pub mod sequential;

pub use data::shape::DataShape;
pub use data::{idx, idx_reader, mnist};
pub use error::{ComputeError, DataError};
pub use model::{EvalStats, Model, ModelOptions, StepStats};
pub use models::{ModelKind, ModelSpec};
pub use replicated::Replicated;
pub use sequential::Sequential;
