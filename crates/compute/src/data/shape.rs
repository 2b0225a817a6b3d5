//! `DataShape`: what a data set's samples are (image rows and columns, number of classes),
//! from which the shipped models size their layers.

use std::fmt;
use std::str::FromStr;

/// The smallest image side the shipped models can take (the cnn's two 3x3 convolutions and
/// 2x2 pooling need 6; the convnet's 3x3 convolution and 3x3 pooling, 5).
pub const MIN_SIDE: usize = 6;
/// The largest image side: the cnn's first linear layer grows with the image (`64 x
/// (rows-4)/2 x (cols-4)/2 x 128` weights, about 130 million at 256x256).
pub const MAX_SIDE: usize = 256;

/// Image rows and columns (one channel of bytes, as IDX image files hold them) and the number
/// of classes (labels `0..classes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataShape {
    pub rows: usize,
    pub cols: usize,
    pub classes: usize,
}

impl DataShape {
    /// MNIST's: 28x28 images, 10 classes (what a model name with no shape means).
    pub const MNIST: DataShape = DataShape {
        rows: 28,
        cols: 28,
        classes: 10,
    };

    /// Values per image.
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the shipped models take images of `rows` x `cols`.
    pub fn sides_fit(rows: usize, cols: usize) -> bool {
        let side = MIN_SIDE..=MAX_SIDE;
        side.contains(&rows) && side.contains(&cols)
    }

    /// Whether the shipped models can be built for it; the reason if not.
    pub fn check(&self) -> Result<(), String> {
        if !DataShape::sides_fit(self.rows, self.cols) {
            return Err(format!(
                "images of {}x{}: the models take {MIN_SIDE} to {MAX_SIDE} pixels a side",
                self.rows, self.cols
            ));
        }
        if !(2..=256).contains(&self.classes) {
            return Err(format!(
                "{} classes: the models take 2 to 256 (labels are bytes)",
                self.classes
            ));
        }
        Ok(())
    }
}

impl fmt::Display for DataShape {
    /// `ROWSxCOLS:CLASSES`, as `FromStr` reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}:{}", self.rows, self.cols, self.classes)
    }
}

impl FromStr for DataShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not ROWSxCOLS:CLASSES (e.g. 28x28:10)");
        let (size, classes) = s.split_once(':').ok_or_else(bad)?;
        let (rows, cols) = size.split_once('x').ok_or_else(bad)?;
        let number = |v: &str| v.parse::<usize>().map_err(|_| bad());
        let shape = DataShape {
            rows: number(rows)?,
            cols: number(cols)?,
            classes: number(classes)?,
        };
        shape.check()?;
        Ok(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes_and_refuses_what_no_model_takes() {
        let shape: DataShape = "32x20:47".parse().unwrap();
        assert_eq!(
            shape,
            DataShape {
                rows: 32,
                cols: 20,
                classes: 47
            }
        );
        assert_eq!(shape.to_string().parse::<DataShape>().unwrap(), shape);
        assert_eq!(DataShape::MNIST.to_string(), "28x28:10");
        for bad in [
            "28x28",
            "28:10",
            "ax28:10",
            "28x28:",
            "5x28:10",
            "28x257:10",
            "28x28:1",
        ] {
            assert!(bad.parse::<DataShape>().is_err(), "{bad}");
        }
        assert!("28x28:300".parse::<DataShape>().is_err());
    }
}
