//! Data sets: the IDX container format, MNIST-style folders of IDX files and their shape.

pub mod idx;
pub mod idx_reader;
pub mod mnist;
pub mod shape;
