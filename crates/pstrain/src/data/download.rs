//! `pstrain download`: fetch the four MNIST files from public mirrors, verify each
//! uncompressed file's MD5, and store them gzipped, atomically, in the data folder.

use md5::{Digest, Md5};
use pstrain_compute::idx::gunzip_if_gzipped;
use pstrain_compute::mnist::find_file;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// A file of the data set and the MD5 of its uncompressed bytes.
#[derive(Debug, Clone, Copy)]
pub struct FileSpec {
    pub stem: &'static str,
    pub md5: &'static str,
}

pub const MNIST_FILES: [FileSpec; 4] = [
    FileSpec {
        stem: "train-images-idx3-ubyte",
        md5: "6bbc9ace898e44ae57da46a324031adb",
    },
    FileSpec {
        stem: "train-labels-idx1-ubyte",
        md5: "a25bea736e30d166cdddb491f175f624",
    },
    FileSpec {
        stem: "t10k-images-idx3-ubyte",
        md5: "2646ac647ad5339dbf082846283269ea",
    },
    FileSpec {
        stem: "t10k-labels-idx1-ubyte",
        md5: "27ae3e4e09519cfbb04c329615203637",
    },
];

/// Tried in order, as torchvision does; each serves `<stem>.gz`.
pub const DEFAULT_MIRRORS: [&str; 3] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
];

/// The largest compressed file accepted from a mirror (train images are ~9.9 MB).
const MAX_DOWNLOAD: u64 = 256 << 20;

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error(
        "could not download {file}:\n{attempts}\nOffline? Put the four MNIST IDX files \
         ({names}), gzipped or not, in {dir}"
    )]
    AllMirrorsFailed {
        file: String,
        attempts: String,
        names: String,
        dir: PathBuf,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileStatus {
    /// Already there with the right checksum.
    Present(PathBuf),
    Downloaded {
        path: PathBuf,
        mirror: String,
    },
}

/// Downloads what is missing or damaged in `dir`; files already there and verified are kept.
pub fn download_mnist(
    dir: &Path,
    mirrors: &[String],
    progress: bool,
) -> Result<Vec<FileStatus>, DownloadError> {
    std::fs::create_dir_all(dir).map_err(|source| DownloadError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_per_read(Some(Duration::from_secs(30)))
        .build()
        .into();
    MNIST_FILES
        .iter()
        .map(|spec| fetch_one(&agent, dir, spec, mirrors, progress))
        .collect()
}

/// The most read of a file already in the folder to verify it (MNIST's largest, its training
/// images, is 47 MB unpacked).
const MAX_EXISTING_BYTES: u64 = 256 << 20;

fn fetch_one(
    agent: &ureq::Agent,
    dir: &Path,
    spec: &FileSpec,
    mirrors: &[String],
    progress: bool,
) -> Result<FileStatus, DownloadError> {
    if let Some(existing) = find_file(dir, spec.stem) {
        // A file MNIST's size, not whatever the name leads to (a device reads without end).
        let verified = pstrain_store::read_at_most(&existing, MAX_EXISTING_BYTES)
            .ok()
            .and_then(|raw| gunzip_if_gzipped(&raw, &existing).ok().map(|d| md5_hex(&d)))
            .is_some_and(|sum| sum == spec.md5);
        if verified {
            return Ok(FileStatus::Present(existing));
        }
    }
    let mut attempts = Vec::new();
    for mirror in mirrors {
        let url = format!("{}/{}.gz", mirror.trim_end_matches('/'), spec.stem);
        match fetch_verified(agent, &url, spec, progress) {
            Ok(gz) => {
                let path = dir.join(format!("{}.gz", spec.stem));
                write_atomically(&path, &gz)?;
                return Ok(FileStatus::Downloaded {
                    path,
                    mirror: mirror.clone(),
                });
            }
            Err(why) => attempts.push(format!("  {url}: {why}")),
        }
    }
    if mirrors.is_empty() {
        attempts.push("  no mirrors given".into());
    }
    Err(DownloadError::AllMirrorsFailed {
        file: spec.stem.into(),
        attempts: attempts.join("\n"),
        names: MNIST_FILES
            .iter()
            .map(|f| f.stem)
            .collect::<Vec<_>>()
            .join(", "),
        dir: dir.to_owned(),
    })
}

/// The body of `url` if it decompresses to bytes with the expected MD5.
fn fetch_verified(
    agent: &ureq::Agent,
    url: &str,
    spec: &FileSpec,
    progress: bool,
) -> Result<Vec<u8>, String> {
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let body = response.into_body();
    let len = body.content_length();
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(len.unwrap_or(0));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(spec.stem);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reader = body.into_with_config().limit(MAX_DOWNLOAD).reader();
    let mut gz = Vec::with_capacity(len.unwrap_or(0).min(MAX_DOWNLOAD) as usize);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = reader.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        gz.extend_from_slice(&chunk[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if let Some(expected) = len {
        if gz.len() as u64 != expected {
            return Err(format!("got {} of {expected} bytes", gz.len()));
        }
    }
    let data = gunzip_if_gzipped(&gz, Path::new(url)).map_err(|e| e.to_string())?;
    let sum = md5_hex(&data);
    if sum != spec.md5 {
        return Err(format!(
            "checksum mismatch: MD5 of the uncompressed file is {sum}, expected {}",
            spec.md5
        ));
    }
    Ok(gz)
}

pub fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Temporary file, fsync, rename, fsync of the folder: a crash leaves the old file or the new.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DownloadError> {
    let err = |source| DownloadError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}.partial", name.unwrap_or_default()));
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_known_digest() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }
}
