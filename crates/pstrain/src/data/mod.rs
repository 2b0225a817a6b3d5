//! Where a process finds its data set: `--data-dir` (or `PSTRAIN_DATA_DIR`), else
//! `./data/mnist`, downloaded there (checksum-verified) when files are missing.

pub mod download;
pub mod sampler;

use anyhow::Result;
use clap::Args;
use download::{download_mnist, FileStatus, DEFAULT_MIRRORS};
use pstrain_compute::mnist::{self, Mnist, Split};
use pstrain_compute::DataShape;
use sampler::{shard_indices, shard_sizes, shards_indices};
use std::io::IsTerminal;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The data folder used when neither --data-dir nor PSTRAIN_DATA_DIR names one.
const DEFAULT_DATA_DIR: &str = "data/mnist";

#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Folder with the IDX files [default: ./data/mnist, downloaded there if missing]
    #[arg(long, env = "PSTRAIN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Mirror base URLs to download from, tried in order (repeat or comma-separate)
    #[arg(long = "mirror", env = "PSTRAIN_MNIST_MIRRORS", value_delimiter = ',')]
    pub mirrors: Vec<String>,
}

impl DataArgs {
    pub fn dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }
}

/// Downloads the four MNIST files into `dir` (from `mirrors`, or the built-in list).
pub fn download(dir: &Path, mirrors: &[String]) -> Result<()> {
    let mirrors: Vec<String> = if mirrors.is_empty() {
        DEFAULT_MIRRORS.iter().map(|m| m.to_string()).collect()
    } else {
        mirrors.to_vec()
    };
    let progress = std::io::stderr().is_terminal();
    for status in download_mnist(dir, &mirrors, progress)? {
        match status {
            FileStatus::Present(p) => {
                pstrain_observe::log_line!("present, checksum ok: {}", p.display())
            }
            FileStatus::Downloaded { path, mirror } => {
                pstrain_observe::log_line!(
                    "downloaded, checksum ok: {} (from {mirror})",
                    path.display()
                )
            }
        }
    }
    Ok(())
}

/// The training set's size and shape, from its headers and labels (a worker checks them
/// against the run plan before it joins); the default folder is filled by a download first,
/// as `load_data` does.
pub fn train_shape(args: &DataArgs) -> Result<(usize, DataShape)> {
    let dir = args.dir();
    if args.data_dir.is_none() && !mnist::missing_files(&dir).is_empty() {
        pstrain_observe::log_line!("MNIST not found in {}; downloading", dir.display());
        download(&dir, &args.mirrors)?;
    }
    Ok(mnist::train_shape(&dir)?)
}

/// Loads worker `rank`'s shard of the training set (of `workers`, drawn with `seed`) and
/// nothing else, as `sampler::shard_indices` orders it; returns it and the training set's
/// size.
pub fn load_own_shard(
    args: &DataArgs,
    workers: usize,
    rank: usize,
    seed: u64,
) -> Result<(Split, usize)> {
    let dir = args.dir();
    let started = Instant::now();
    let (shard, total) =
        mnist::load_train_picked(&dir, |count| shard_indices(count, workers, rank, seed))?;
    pstrain_observe::log_line!(
        "loaded worker {rank}'s {} of {total} training images from {} in {:.1} s",
        shard.len(),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok((shard, total))
}

/// Loads the shards of a block of worker ranks (one process running several workers) with
/// one pass over the files: one split per rank, in rank order, and the training set's size.
pub fn load_own_shards(
    args: &DataArgs,
    workers: usize,
    ranks: Range<usize>,
    seed: u64,
) -> Result<(Vec<Split>, usize)> {
    let dir = args.dir();
    let started = Instant::now();
    let (block, total) = mnist::load_train_picked(&dir, |count| {
        shards_indices(count, workers, ranks.clone(), seed)
    })?;
    let held = block.len();
    let shards = block.into_parts(&shard_sizes(total, workers, ranks.clone()));
    pstrain_observe::log_line!(
        "loaded workers {}-{}'s {held} of {total} training images from {} in {:.1} s",
        ranks.start,
        ranks.end.saturating_sub(1),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok((shards, total))
}

/// Loads the data set; the default folder is filled by a download first when files are
/// missing, as torchvision does, so that a fresh machine needs no extra step.
pub fn load_data(args: &DataArgs) -> Result<Mnist> {
    let dir = args.dir();
    if args.data_dir.is_none() && !mnist::missing_files(&dir).is_empty() {
        pstrain_observe::log_line!("MNIST not found in {}; downloading", dir.display());
        download(&dir, &args.mirrors)?;
    }
    let started = Instant::now();
    let data = mnist::load_dir(&dir)?;
    let shape = data.shape();
    pstrain_observe::log_line!(
        "loaded {} training and {} test images ({}x{}, {} classes) from {} in {:.1} s",
        data.train.len(),
        data.test.len(),
        shape.rows,
        shape.cols,
        shape.classes,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(data)
}
