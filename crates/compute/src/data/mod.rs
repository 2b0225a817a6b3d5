//! Data sets: the IDX container format and MNIST-style folders of IDX files.

pub mod idx;
pub mod idx_reader;
pub mod mnist;
