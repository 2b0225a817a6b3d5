//! Opening a file from a folder others may write: only a regular file (not a link, FIFO or
//! device) of at most a given size, so a planted name cannot hang or flood a reader.

use crate::error::StoreError;
use std::path::Path;

/// Opens `path` for reading only if it is a regular file (not a link, FIFO or device, which
/// could hang a reader or feed it without end) of at most `max` bytes.
pub(crate) fn open_regular(path: &Path, max: u64) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let invalid = |why: String| StoreError::Invalid {
        path: path.to_owned(),
        why,
    };
    let kind = std::fs::symlink_metadata(path).map_err(io)?.file_type();
    if !kind.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    // No-follow and non-blocking: if the name changed into a link or a FIFO after the check,
    // the open fails or returns at once instead of following it or waiting for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > max {
        return Err(invalid(format!(
            "{} bytes, more than a checkpoint of this layout can hold ({max})",
            meta.len()
        )));
    }
    Ok(file)
}
