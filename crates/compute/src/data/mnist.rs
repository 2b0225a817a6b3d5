//! MNIST-style data sets: a folder with train/test image and label IDX files of 28x28 images
//! in 10 classes, normalised as the PyTorch MNIST example does.

use super::idx::{IMAGES_MAGIC, LABELS_MAGIC};
use super::idx_reader::IdxReader;
use crate::error::{ComputeError, DataError};
use crate::model::{EvalStats, Model};
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

/// Images as their raw bytes, `PIXELS` per sample (a quarter of the memory of `f32`; the
/// data set is held once per process), and their labels. `copy_image` normalises one image
/// into a model's input buffer as the PyTorch MNIST example does.
#[derive(Debug, Clone)]
pub struct Split {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

/// Samples converted to `f32` at a time by `Split::evaluate`.
const EVAL_SAMPLES: usize = 64;

/// Every byte's normalised value.
fn normalised() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|p| (p as f32 / 255.0 - MEAN) / STD))
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Writes image `i`, normalised, into `out` (`PIXELS` values).
    pub fn copy_image(&self, i: usize, out: &mut [f32]) {
        let table = normalised();
        let src = &self.pixels[i * PIXELS..(i + 1) * PIXELS];
        for (o, &p) in out.iter_mut().zip(src) {
            *o = table[usize::from(p)];
        }
    }

    /// Every image normalised, in order (for tools and tests; training copies per batch).
    pub fn images(&self) -> Vec<f32> {
        let table = normalised();
        self.pixels.iter().map(|&p| table[usize::from(p)]).collect()
    }

    /// Builds a split from raw 0..=255 pixels.
    pub fn from_pixels(pixels: &[u8], labels: Vec<u8>) -> Split {
        Split {
            pixels: pixels.to_vec(),
            labels,
        }
    }

    /// Cuts this split into consecutive parts of `sizes` samples (a process holding several
    /// workers' shards as one block hands each its own); samples past their sum are dropped,
    /// and a part past the end is empty.
    pub fn into_parts(self, sizes: &[usize]) -> Vec<Split> {
        let mut start = 0;
        sizes
            .iter()
            .map(|&size| {
                let (a, b) = (start.min(self.len()), (start + size).min(self.len()));
                start += size;
                Split {
                    pixels: self.pixels[a * PIXELS..b * PIXELS].to_vec(),
                    labels: self.labels[a..b].to_vec(),
                }
            })
            .collect()
    }

    /// `model`'s loss and accuracy with `params` on this split, converting a few samples at a
    /// time (no `f32` copy of the whole split).
    pub fn evaluate(
        &self,
        model: &mut dyn Model,
        params: &[f32],
    ) -> Result<EvalStats, ComputeError> {
        let mut images = vec![0.0; EVAL_SAMPLES * PIXELS];
        let mut total = EvalStats {
            loss: 0.0,
            correct: 0,
            samples: 0,
        };
        for (chunk, labels) in self.labels.chunks(EVAL_SAMPLES).enumerate() {
            let first = chunk * EVAL_SAMPLES;
            for j in 0..labels.len() {
                self.copy_image(first + j, &mut images[j * PIXELS..(j + 1) * PIXELS]);
            }
            let e = model.evaluate(params, &images[..labels.len() * PIXELS], labels)?;
            total.loss += e.loss * e.samples as f64;
            total.correct += e.correct;
            total.samples += e.samples;
        }
        if total.samples > 0 {
            total.loss /= total.samples as f64;
        }
        Ok(total)
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
    Ok(load_split_picked(images, labels, |count| (0..count).collect())?.0)
}

/// How many training images the folder holds, from the image file's header alone.
pub fn train_count(dir: &Path) -> Result<usize, DataError> {
    let path = find_file(dir, FILES[0]).unwrap_or_else(|| dir.join(FILES[0]));
    let img = IdxReader::open(&path, IMAGES_MAGIC, "images: unsigned bytes, 3 dimensions")?;
    Ok(img.dims[0])
}

/// Loads the training images `pick(count)` names, in that order, from a folder holding
/// `count` training images; returns them and `count`. What a worker holding only its own
/// shard loads: the other images are read past, never kept.
pub fn load_train_picked(
    dir: &Path,
    pick: impl FnOnce(usize) -> Vec<usize>,
) -> Result<(Split, usize), DataError> {
    let missing: Vec<_> = FILES[..2]
        .iter()
        .filter(|stem| find_file(dir, stem).is_none())
        .map(|m| format!("{m}[.gz]"))
        .collect();
    if !missing.is_empty() {
        return Err(DataError::Missing {
            dir: dir.to_owned(),
            missing: missing.join(", "),
        });
    }
    let path = |stem| find_file(dir, stem).unwrap_or_else(|| dir.join(stem));
    load_split_picked(&path(FILES[0]), &path(FILES[1]), pick)
}

/// Loads the images `pick(count)` names (and their labels) from an image file of `count`
/// images and its label file. Headers are checked before any image is read; every label is
/// checked, kept or not, so a damaged file is refused whichever shard reads it.
pub fn load_split_picked(
    images: &Path,
    labels: &Path,
    pick: impl FnOnce(usize) -> Vec<usize>,
) -> Result<(Split, usize), DataError> {
    let img = IdxReader::open(images, IMAGES_MAGIC, "images: unsigned bytes, 3 dimensions")?;
    let lab = IdxReader::open(labels, LABELS_MAGIC, "labels: unsigned bytes, 1 dimension")?;
    let bad_dims = |path: &Path, dims: &[usize], want: usize| DataError::BadHeader {
        path: path.to_owned(),
        reason: format!("{} dimensions, expected {want}", dims.len()),
    };
    if img.dims.len() != 3 {
        return Err(bad_dims(images, &img.dims, 3));
    }
    if lab.dims.len() != 1 {
        return Err(bad_dims(labels, &lab.dims, 1));
    }
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
    let all_labels = lab.read_all()?;
    if let Some((index, &label)) = all_labels
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
    let picked = pick(count);
    let pixels = if picked.len() == count && picked.iter().enumerate().all(|(i, &p)| i == p) {
        img.read_all()?
    } else {
        img.read_picked(PIXELS, &picked)?
    };
    let labels = picked.iter().map(|&i| all_labels[i]).collect();
    Ok((Split { pixels, labels }, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelKind;
    use pstrain_core::Rng;

    #[test]
    fn images_are_normalised_from_bytes_and_evaluated_in_chunks_alike() {
        let n = 150; // more than two evaluation chunks
        let mut rng = Rng::new(3);
        let pixels: Vec<u8> = (0..n * PIXELS)
            .map(|_| (rng.next_u64() % 256) as u8)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % CLASSES) as u8).collect();
        let split = Split::from_pixels(&pixels, labels.clone());
        let mut one = vec![0.0; PIXELS];
        split.copy_image(7, &mut one);
        let expect = (f32::from(pixels[7 * PIXELS + 5]) / 255.0 - MEAN) / STD;
        assert_eq!(one[5], expect);
        assert_eq!(&split.images()[7 * PIXELS..8 * PIXELS], &one[..]);

        let mut model = ModelKind::Convnet.build(Default::default());
        let mut params = vec![0.0; model.layout().len()];
        model.init_params(&mut params, &mut Rng::new(1));
        let chunked = split.evaluate(model.as_mut(), &params).unwrap();
        let whole = model.evaluate(&params, &split.images(), &labels).unwrap();
        assert_eq!(chunked.samples, n);
        assert_eq!(chunked.correct, whole.correct);
        assert!(
            (chunked.loss - whole.loss).abs() < 1e-5,
            "{chunked:?} {whole:?}"
        );
    }
}
