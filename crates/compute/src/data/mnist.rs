//! MNIST-style data sets: a folder with train/test image and label IDX files (MNIST's 28x28
//! images in 10 classes, or any other size and number of classes the models take),
//! normalised as the PyTorch MNIST example does.

use super::idx::{IMAGES_MAGIC, LABELS_MAGIC};
use super::idx_reader::IdxReader;
use super::shape::DataShape;
use crate::error::{ComputeError, DataError};
use crate::model::{EvalStats, Model};
use std::path::{Path, PathBuf};

/// Mean and standard deviation of MNIST's training pixels in [0, 1] (used for every data
/// set, as the PyTorch MNIST example's users do for its look-alikes).
pub const MEAN: f32 = 0.1307;
pub const STD: f32 = 0.3081;

/// The four canonical file stems; each may also be found gzipped or with a dot before `idx`.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Images as their raw bytes, `shape.pixels()` per sample (a quarter of the memory of `f32`;
/// the data set is held once per process), and their labels. `copy_image` normalises one
/// image into a model's input buffer as the PyTorch MNIST example does. `shape.classes` is
/// one more than the largest label in the file the split came from (all of it, not only
/// the samples kept).
#[derive(Debug, Clone)]
pub struct Split {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub shape: DataShape,
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

    /// Writes image `i`, normalised, into `out` (`shape.pixels()` values).
    pub fn copy_image(&self, i: usize, out: &mut [f32]) {
        let table = normalised();
        let per = self.shape.pixels();
        let src = &self.pixels[i * per..(i + 1) * per];
        for (o, &p) in out.iter_mut().zip(src) {
            *o = table[usize::from(p)];
        }
    }

    /// Every image normalised, in order (for tools and tests; training copies per batch).
    pub fn images(&self) -> Vec<f32> {
        let table = normalised();
        self.pixels.iter().map(|&p| table[usize::from(p)]).collect()
    }

    /// Builds a split of `shape`'s images from raw 0..=255 pixels.
    pub fn from_pixels(shape: DataShape, pixels: &[u8], labels: Vec<u8>) -> Split {
        Split {
            pixels: pixels.to_vec(),
            labels,
            shape,
        }
    }

    /// Cuts this split into consecutive parts of `sizes` samples (a process holding several
    /// workers' shards as one block hands each its own); samples past their sum are dropped,
    /// and a part past the end is empty.
    pub fn into_parts(self, sizes: &[usize]) -> Vec<Split> {
        let (mut start, per) = (0, self.shape.pixels());
        sizes
            .iter()
            .map(|&size| {
                let (a, b) = (start.min(self.len()), (start + size).min(self.len()));
                start += size;
                Split {
                    pixels: self.pixels[a * per..b * per].to_vec(),
                    labels: self.labels[a..b].to_vec(),
                    shape: self.shape,
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
        let per = self.shape.pixels();
        let mut images = vec![0.0; EVAL_SAMPLES * per];
        let mut total = EvalStats {
            loss: 0.0,
            correct: 0,
            samples: 0,
        };
        for (chunk, labels) in self.labels.chunks(EVAL_SAMPLES).enumerate() {
            let first = chunk * EVAL_SAMPLES;
            for j in 0..labels.len() {
                self.copy_image(first + j, &mut images[j * per..(j + 1) * per]);
            }
            let e = model.evaluate(params, &images[..labels.len() * per], labels)?;
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

/// A training and a test split of one shape (`load_dir` checks that they agree).
#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
}

impl Mnist {
    /// The data set's shape: its images' size and the training set's classes.
    pub fn shape(&self) -> DataShape {
        self.train.shape
    }
}

/// The path under which `stem` exists in `dir`, trying `.gz` and the dotted spelling. A name
/// that exists but is no regular file (a folder, a device) is found, and refused by the
/// reader as what it is rather than called missing.
pub fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    let dotted = stem.replacen("-idx", ".idx", 1);
    [stem.to_string(), dotted]
        .iter()
        .flat_map(|s| [format!("{s}.gz"), s.clone()])
        .map(|name| dir.join(name))
        .find(|p| p.exists())
}

/// Which of the four files are missing from `dir`.
pub fn missing_files(dir: &Path) -> Vec<&'static str> {
    FILES
        .iter()
        .copied()
        .filter(|stem| find_file(dir, stem).is_none())
        .collect()
}

/// `NotAFolder` when `dir` is a file (its files would all be "missing" otherwise).
fn check_folder(dir: &Path) -> Result<(), DataError> {
    match dir.is_file() {
        true => Err(DataError::NotAFolder {
            path: dir.to_owned(),
        }),
        false => Ok(()),
    }
}

/// Loads and validates both splits from `dir`.
pub fn load_dir(dir: &Path) -> Result<Mnist, DataError> {
    check_folder(dir)?;
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
    let train = load_split(&path(FILES[0]), &path(FILES[1]), true)?;
    let test = load_split(&path(FILES[2]), &path(FILES[3]), false)?;
    let size = |s: &Split| format!("{}x{}", s.shape.rows, s.shape.cols);
    if size(&train) != size(&test) {
        return Err(DataError::SplitsDisagree {
            train: path(FILES[0]),
            test: path(FILES[2]),
            train_size: size(&train),
            test_size: size(&test),
        });
    }
    // The training labels name the classes; a test label past them is damage (or a
    // class no model of this run could learn).
    let classes = train.shape.classes;
    if let Some((index, &label)) = test
        .labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= classes)
    {
        return Err(DataError::LabelOutOfRange {
            path: path(FILES[3]),
            index,
            label,
            classes,
        });
    }
    Ok(Mnist { train, test })
}

/// Loads one image file and its label file, checking that they describe one data set (and,
/// for a training set, that its labels name every class below the largest: see
/// `label_classes`).
pub fn load_split(images: &Path, labels: &Path, training: bool) -> Result<Split, DataError> {
    let (img, labels, _, shape) = open_split(images, labels, training)?;
    Ok(Split {
        pixels: img.read_all()?,
        labels,
        shape,
    })
}

/// How many training images the folder holds and their shape, from the image file's header
/// and the label file (no image is read).
pub fn train_shape(dir: &Path) -> Result<(usize, DataShape), DataError> {
    check_folder(dir)?;
    let path = |stem| find_file(dir, stem).unwrap_or_else(|| dir.join(stem));
    let (_, _, count, shape) = open_split(&path(FILES[0]), &path(FILES[1]), true)?;
    Ok((count, shape))
}

/// Loads the training images `pick(count)` names, in that order, from a folder holding
/// `count` training images; returns them and `count`. What a worker holding only its own
/// shard loads: the other images are read past, never kept.
pub fn load_train_picked(
    dir: &Path,
    pick: impl FnOnce(usize) -> Vec<usize>,
) -> Result<(Split, usize), DataError> {
    check_folder(dir)?;
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

/// Loads the images `pick(count)` names (and their labels) from a training image file of
/// `count` images and its label file. Headers are checked before any image is read; every label is
/// checked, kept or not, so a damaged file is refused whichever shard reads it.
pub fn load_split_picked(
    images: &Path,
    labels: &Path,
    pick: impl FnOnce(usize) -> Vec<usize>,
) -> Result<(Split, usize), DataError> {
    let (img, all_labels, count, shape) = open_split(images, labels, true)?;
    let picked = pick(count);
    let pixels = img.read_picked(shape.pixels(), &picked)?;
    let labels = picked.iter().map(|&i| all_labels[i]).collect();
    Ok((
        Split {
            pixels,
            labels,
            shape,
        },
        count,
    ))
}

/// Checks an image file's and its label file's headers against each other and reads every
/// label: the image reader (positioned at the first image), the labels, the image count
/// and the split's shape.
fn open_split(
    images: &Path,
    labels: &Path,
    training: bool,
) -> Result<(IdxReader, Vec<u8>, usize, DataShape), DataError> {
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
    if !DataShape::sides_fit(rows, cols) {
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
    let classes = if training {
        label_classes(labels, &all_labels)?
    } else {
        all_labels.iter().max().map_or(0, |&l| usize::from(l) + 1)
    };
    let shape = DataShape {
        rows,
        cols,
        classes,
    };
    Ok((img, all_labels, count, shape))
}

/// The classes a label file names: one more than its largest label. A value below the
/// largest that no sample carries is refused as damage (one flipped byte would otherwise
/// make a model of 200 classes), except 0: sets like EMNIST's letters count from 1.
fn label_classes(path: &Path, labels: &[u8]) -> Result<usize, DataError> {
    let mut seen = [false; 256];
    for &l in labels {
        seen[usize::from(l)] = true;
    }
    let classes = seen
        .iter()
        .rposition(|&s| s)
        .map_or(0, |largest| largest + 1);
    if let Some(missing) = (1..classes).find(|&c| !seen[c]) {
        let index = labels
            .iter()
            .position(|&l| usize::from(l) == classes - 1)
            .unwrap_or(0);
        return Err(DataError::LabelGap {
            path: path.to_owned(),
            missing,
            largest: classes - 1,
            index,
        });
    }
    Ok(classes)
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
        let shape = DataShape::MNIST;
        let per = shape.pixels();
        let pixels: Vec<u8> = (0..n * per).map(|_| (rng.next_u64() % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % shape.classes) as u8).collect();
        let split = Split::from_pixels(shape, &pixels, labels.clone());
        let mut one = vec![0.0; per];
        split.copy_image(7, &mut one);
        let expect = (f32::from(pixels[7 * per + 5]) / 255.0 - MEAN) / STD;
        assert_eq!(one[5], expect);
        assert_eq!(&split.images()[7 * per..8 * per], &one[..]);

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

    #[test]
    fn classes_come_from_the_labels_and_a_gap_is_damage() {
        let path = Path::new("labels");
        assert_eq!(label_classes(path, &[0, 3, 1, 2, 3]).unwrap(), 4);
        // Counting from 1 (EMNIST's letters): class 0 has no samples, and is allowed to.
        assert_eq!(
            label_classes(
                path,
                &[
                    1, 2, 26, 13, 5, 3, 4, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21,
                    22, 23, 24, 25
                ]
            )
            .unwrap(),
            27
        );
        let err = label_classes(path, &[0, 1, 2, 200, 1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 200") && err.contains("index 3") && err.contains("class 3"),
            "{err}"
        );
    }
}
