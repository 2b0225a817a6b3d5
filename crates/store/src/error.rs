//! `StoreError`: what can go wrong with a checkpoint file, each naming the file.

use crate::safetensors::FormatError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable safetensors file: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error("{path}: checksum mismatch (stored {stored}, computed {computed}): damaged file")]
    Checksum {
        path: PathBuf,
        stored: String,
        computed: String,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(
        "{path}: not sealed with this run's key (forged, written by another run or without \
         its token, or by a launch of this run under another token: give the token it ran \
         with, --token-file): refused"
    )]
    Unsealed { path: PathBuf },
    #[error("{path}: belongs to another run ({why})")]
    Mismatch { path: PathBuf, why: String },
}
