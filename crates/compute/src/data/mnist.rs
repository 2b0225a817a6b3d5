//! MNIST-style data sets: a folder with train/test image and label IDX files of 28x28 images
//! in 10 classes, normalised as the PyTorch MNIST example does.

use super::idx::{read_idx, IMAGES_MAGIC, LABELS_MAGIC};
use crate::error::DataError;
use std::path::{Path, PathBuf};

pub const ROWS: usize = 28;
pub const COLS: usize = 28;
pub const PIXELS: usize = ROWS * COLS;
pub const CLASSES: usize = 10;
/// Mean and standard deviation of MNIST's training pixels in [0, 1].
pub const MEAN: f32 = 0.1307;
pub const STD: f32 = 0.3081;

/// The four canonical file stems; each may also be found gzipped or with a dot before `idx`.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Images as normalised `f32`, `PIXELS` per sample, and their labels.
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// Builds a split from raw 0..=255 pixels.
    pub fn from_pixels(pixels: &[u8], labels: Vec<u8>) -> Split {
        let images = pixels
            .iter()
            .map(|&p| (f32::from(p) / 255.0 - MEAN) / STD)
            .collect();
        Split { images, labels }
    }
}

#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
}

/// The path under which `stem` exists in `dir`, trying `.gz` and the dotted spelling.
pub fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    let dotted = stem.replacen("-idx", ".idx", 1);
    [stem.to_string(), dotted]
        .iter()
        .flat_map(|s| [format!("{s}.gz"), s.clone()])
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Which of the four files are missing from `dir`.
pub fn missing_files(dir: &Path) -> Vec<&'static str> {
    FILES
        .iter()
        .copied()
        .filter(|stem| find_file(dir, stem).is_none())
        .collect()
}

/// Loads and validates both splits from `dir`.
pub fn load_dir(dir: &Path) -> Result<Mnist, DataError> {
    let missing = missing_files(dir);
    if !missing.is_empty() {
        return Err(DataError::Missing {
            dir: dir.to_owned(),
            missing: missing
                .iter()
                .map(|m| format!("{m}[.gz]"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let path = |stem| find_file(dir, stem).unwrap_or_else(|| dir.join(stem));
    Ok(Mnist {
        train: load_split(&path(FILES[0]), &path(FILES[1]))?,
        test: load_split(&path(FILES[2]), &path(FILES[3]))?,
    })
}

/// Loads one image file and its label file, checking that they describe one data set.
pub fn load_split(images: &Path, labels: &Path) -> Result<Split, DataError> {
    let img = read_idx(images, IMAGES_MAGIC, "images: unsigned bytes, 3 dimensions")?;
    let lab = read_idx(labels, LABELS_MAGIC, "labels: unsigned bytes, 1 dimension")?;
    let (count, rows, cols) = (img.dims[0], img.dims[1], img.dims[2]);
    if (rows, cols) != (ROWS, COLS) {
        return Err(DataError::WrongImageSize {
            path: images.to_owned(),
            rows,
            cols,
        });
    }
    if count == 0 {
        return Err(DataError::Empty {
            path: images.to_owned(),
        });
    }
    if lab.dims[0] != count {
        return Err(DataError::CountMismatch {
            images: images.to_owned(),
            labels: labels.to_owned(),
            image_count: count,
            label_count: lab.dims[0],
        });
    }
    if let Some((index, &label)) = lab
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= CLASSES)
    {
        return Err(DataError::LabelOutOfRange {
            path: labels.to_owned(),
            index,
            label,
            classes: CLASSES,
        });
    }
    Ok(Split::from_pixels(&img.data, lab.data))
}
