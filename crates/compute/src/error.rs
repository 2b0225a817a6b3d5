//! Errors of the compute layer: data files that cannot be used, and mis-shaped inputs.

use std::path::PathBuf;
use thiserror::Error;

/// A data file or folder that cannot be used; every variant names the file and the problem.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt or truncated gzip stream: {source}")]
    Gzip {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: decompressed data exceeds the {limit}-byte limit")]
    TooLarge { path: PathBuf, limit: u64 },
    /// The header's dimensions promise more data than any set this loader takes.
    #[error("{path}: its header promises {dims} ({bytes} bytes), past the {limit}-byte limit")]
    PromisesTooMuch {
        path: PathBuf,
        dims: String,
        bytes: u64,
        limit: u64,
    },
    #[error("{path}: not an IDX file: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("{path}: expected magic {expected} ({what}), found {found}")]
    WrongMagic {
        path: PathBuf,
        expected: u32,
        found: u32,
        what: &'static str,
    },
    #[error("{path}: header promises {expected} data bytes but the file holds {found}{hint}")]
    WrongSize {
        path: PathBuf,
        expected: u64,
        found: u64,
        hint: &'static str,
    },
    #[error(
        "{path}: images are {rows}x{cols}; the models take {min} to {max} pixels a side",
        min = crate::data::shape::MIN_SIDE,
        max = crate::data::shape::MAX_SIDE
    )]
    WrongImageSize {
        path: PathBuf,
        rows: usize,
        cols: usize,
    },
    #[error("{images} holds {image_count} images but {labels} holds {label_count} labels")]
    CountMismatch {
        images: PathBuf,
        labels: PathBuf,
        image_count: usize,
        label_count: usize,
    },
    #[error("{test} holds {test_size} images but {train} holds {train_size}")]
    SplitsDisagree {
        train: PathBuf,
        test: PathBuf,
        train_size: String,
        test_size: String,
    },
    #[error(
        "{path}: label {largest} (first at index {index}) but no sample of class {missing}: \
         a damaged file, or classes that are not numbered 0 (or 1) to {largest}"
    )]
    LabelGap {
        path: PathBuf,
        missing: usize,
        largest: usize,
        index: usize,
    },
    #[error("{path}: label {label} at index {index} is outside the training labels' 0..{classes}")]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: u8,
        classes: usize,
    },
    #[error("{path}: the set is empty")]
    Empty { path: PathBuf },
    #[error(
        "MNIST files missing in {dir}: {missing}. Put the IDX files there (gzipped or not), \
         run `pstrain download --data-dir {dir}`, or name another folder with --data-dir or \
         PSTRAIN_DATA_DIR"
    )]
    Missing { dir: PathBuf, missing: String },
    #[error("{path} is a file, not a folder: --data-dir (or PSTRAIN_DATA_DIR) names the folder that holds the IDX files")]
    NotAFolder { path: PathBuf },
}

impl DataError {
    /// A body of `found` bytes where the header promised `expected`.
    pub fn wrong_size(path: &std::path::Path, expected: u64, found: u64) -> Self {
        DataError::WrongSize {
            path: path.to_owned(),
            expected,
            found,
            hint: if found < expected {
                " (truncated?)"
            } else {
                " (trailing bytes)"
            },
        }
    }
}

/// An input whose shape does not fit the model.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ComputeError {
    #[error("{what}: expected {expected} values, got {got}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("label {label} at index {index} is outside 0..{classes}")]
    Label {
        index: usize,
        label: u8,
        classes: usize,
    },
    #[error("empty batch")]
    EmptyBatch,
}
