//! The two shipped architectures, with PyTorch's parameter names, sized for a data set's
//! images and classes; `ModelKind`: one of them by name, and `ModelSpec`: one of them for a
//! data shape (`cnn` is MNIST's, `cnn:32x32:47` another's), built for a number of threads.

use crate::data::shape::DataShape;
use crate::layers::{Conv2d, Dropout, Layer, Linear, MaxPool2d, Relu, Shape};
use crate::model::{Model, ModelOptions};
use crate::replicated::Replicated;
use crate::sequential::Sequential;
use std::fmt;
use std::str::FromStr;

fn boxed(layer: impl Layer + 'static) -> Box<dyn Layer> {
    Box::new(layer)
}

/// The PyTorch MNIST example: conv(1->32, 3) ReLU conv(32->64, 3) ReLU maxpool(2)
/// dropout(0.25) fc(9216->128) ReLU dropout(0.5) fc(128->10) log-softmax, for MNIST.
pub fn cnn(options: ModelOptions) -> Sequential {
    cnn_for(DataShape::MNIST, options)
}

/// The cnn for `data`'s images and classes (the first linear layer takes what the pooling
/// leaves of them). The second ReLU runs after the pooling: max(relu(x)) = relu(max(x)),
/// with the same gradient (where the window's maximum is <= 0 both give 0), on a quarter of
/// the values.
pub fn cnn_for(data: DataShape, options: ModelOptions) -> Sequential {
    let drop = |p: f32| if options.dropout { p } else { 0.0 };
    let (rows, cols) = (data.rows, data.cols);
    let input = Shape::new(1, rows, cols);
    let s1 = Shape::new(32, rows - 2, cols - 2);
    let s2 = Shape::new(64, rows - 4, cols - 4);
    let s3 = Shape::new(64, (rows - 4) / 2, (cols - 4) / 2);
    let h = Shape::new(128, 1, 1);
    Sequential::new(
        input,
        vec![
            ("conv1", boxed(Conv2d::new(input, 32, 3))),
            ("relu1", boxed(Relu::new(s1))),
            ("conv2", boxed(Conv2d::new(s1, 64, 3))),
            ("pool", boxed(MaxPool2d::new(s2, 2))),
            ("relu2", boxed(Relu::new(s3))),
            ("dropout1", boxed(Dropout::new(s3, drop(0.25)))),
            ("fc1", boxed(Linear::new(s3, 128))),
            ("relu3", boxed(Relu::new(h))),
            ("dropout2", boxed(Dropout::new(h, drop(0.5)))),
            ("fc2", boxed(Linear::new(h, data.classes))),
        ],
    )
}

/// The original Ray parameter-server example: conv(1->3, 3) maxpool(3) ReLU fc(192->10)
/// log-softmax, for MNIST.
pub fn convnet(options: ModelOptions) -> Sequential {
    convnet_for(DataShape::MNIST, options)
}

/// The convnet for `data`'s images and classes.
pub fn convnet_for(data: DataShape, _options: ModelOptions) -> Sequential {
    let input = Shape::new(1, data.rows, data.cols);
    let s1 = Shape::new(3, data.rows - 2, data.cols - 2);
    let s2 = Shape::new(3, (data.rows - 2) / 3, (data.cols - 2) / 3);
    Sequential::new(
        input,
        vec![
            ("conv1", boxed(Conv2d::new(input, 3, 3))),
            ("pool", boxed(MaxPool2d::new(s1, 3))),
            ("relu", boxed(Relu::new(s2))),
            ("fc", boxed(Linear::new(s2, data.classes))),
        ],
    )
}

/// The models pstrain ships, selectable by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelKind {
    /// The PyTorch MNIST example's CNN (1,199,882 parameters).
    #[default]
    Cnn,
    /// The original Ray parameter-server example's tiny CNN (1,960 parameters).
    Convnet,
}

impl ModelKind {
    pub const ALL: [ModelKind; 2] = [ModelKind::Cnn, ModelKind::Convnet];

    pub fn name(&self) -> &'static str {
        match self {
            ModelKind::Cnn => "cnn",
            ModelKind::Convnet => "convnet",
        }
    }

    /// The model for MNIST; with `options.threads` > 1, one replica per thread, each taking a
    /// part of every batch.
    pub fn build(&self, options: ModelOptions) -> Box<dyn Model> {
        ModelSpec::mnist(*self).build(options)
    }
}

/// A shipped model sized for a data shape: what a run plan's model name says. Written
/// `cnn` for MNIST's shape and `cnn:ROWSxCOLS:CLASSES` for any other, so that shards and
/// workers of different data sets refuse each other by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub data: DataShape,
}

impl ModelSpec {
    pub fn mnist(kind: ModelKind) -> ModelSpec {
        ModelSpec {
            kind,
            data: DataShape::MNIST,
        }
    }

    /// `kind` for `data`, refused (with the reason) when the models cannot take it.
    pub fn new(kind: ModelKind, data: DataShape) -> Result<ModelSpec, String> {
        data.check()?;
        Ok(ModelSpec { kind, data })
    }

    /// The model; with `options.threads` > 1, one replica per thread, each taking a part
    /// of every batch.
    pub fn build(&self, options: ModelOptions) -> Box<dyn Model> {
        let ModelSpec { kind, data } = *self;
        let build = move || match kind {
            ModelKind::Cnn => cnn_for(data, options),
            ModelKind::Convnet => convnet_for(data, options),
        };
        if options.threads > 1 {
            Box::new(Replicated::new(options.threads, build))
        } else {
            Box::new(build())
        }
    }

    /// Whether a data set of `data`'s shape trains this model: the same image size, and
    /// labels inside its classes (a worker's files may hold fewer classes than the run).
    pub fn fits(&self, data: DataShape) -> Result<(), String> {
        let misfit = if (data.rows, data.cols) != (self.data.rows, self.data.cols) {
            format!(
                "the data set's images are {}x{}; the run's model `{self}` takes {}x{}",
                data.rows, data.cols, self.data.rows, self.data.cols
            )
        } else if data.classes > self.data.classes {
            format!(
                "the data set's labels go up to {}; the run's model `{self}` has {} classes",
                data.classes - 1,
                self.data.classes
            )
        } else {
            return Ok(());
        };
        let fitting = ModelSpec {
            kind: self.kind,
            data,
        };
        Err(format!("{misfit} (`--model {fitting}` fits this data)"))
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.data == DataShape::MNIST {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}:{}", self.kind, self.data)
        }
    }
}

impl FromStr for ModelSpec {
    type Err = String;
    /// `cnn`, `convnet`, or either with `:ROWSxCOLS:CLASSES`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None => Ok(ModelSpec::mnist(s.parse()?)),
            Some((kind, data)) => ModelSpec::new(kind.parse()?, data.parse()?),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ModelKind::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown model `{s}` (choose cnn or convnet; for other data sets \
                     `cnn:ROWSxCOLS:CLASSES`)"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn parameter_counts_and_names_match_pytorch() {
        let cnn = cnn(ModelOptions::default());
        assert_eq!(cnn.layout().len(), 1_199_882);
        let names: Vec<&str> = cnn
            .layout()
            .tensors()
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias"
            ]
        );
        assert_eq!(
            cnn.layout().get("fc1.weight").unwrap().shape,
            vec![128, 9216]
        );
        let small = convnet(ModelOptions::default());
        assert_eq!(small.layout().len(), 1_960);
        assert_eq!(
            small.layout().get("fc.weight").unwrap().shape,
            vec![10, 192]
        );
        assert_eq!((small.input_len(), small.classes()), (784, 10));
    }

    #[test]
    fn models_for_other_data_shapes_follow_the_images_and_classes() {
        let spec: ModelSpec = "cnn:32x30:47".parse().unwrap();
        let model = spec.build(ModelOptions::default());
        assert_eq!((model.input_len(), model.classes()), (32 * 30, 47));
        // Two 3x3 convolutions leave 28x26, the 2x2 pooling 14x13.
        assert_eq!(
            model.layout().get("fc1.weight").unwrap().shape,
            vec![128, 64 * 14 * 13]
        );
        assert_eq!(model.layout().get("fc2.bias").unwrap().shape, vec![47]);
        // An odd size: the pooling drops the ragged edge as PyTorch's floor mode does.
        let small: ModelSpec = "convnet:17x9:3".parse().unwrap();
        assert_eq!(
            small
                .build(ModelOptions::default())
                .layout()
                .get("fc.weight")
                .unwrap()
                .shape,
            vec![3, 3 * 5 * 2]
        );
        assert_eq!(spec.to_string(), "cnn:32x30:47");
        assert_eq!(ModelSpec::mnist(ModelKind::Cnn).to_string(), "cnn");
        assert_eq!("cnn".parse::<ModelSpec>().unwrap().data, DataShape::MNIST);
        for bad in [
            "cnn:",
            "cnn:28x28",
            "mlp:28x28:10",
            "cnn:4x28:10",
            "cnn:28x28:1",
        ] {
            assert!(bad.parse::<ModelSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_data_set_fits_a_model_of_its_size_and_at_least_its_classes() {
        let spec: ModelSpec = "cnn:28x28:47".parse().unwrap();
        let shape = |rows, cols, classes| DataShape {
            rows,
            cols,
            classes,
        };
        assert!(spec.fits(shape(28, 28, 47)).is_ok());
        assert!(spec.fits(shape(28, 28, 12)).is_ok());
        let more = spec.fits(shape(28, 28, 48)).unwrap_err();
        assert!(
            more.contains("up to 47") && more.contains("`--model cnn:28x28:48`"),
            "{more}"
        );
        let size = ModelSpec::mnist(ModelKind::Cnn)
            .fits(shape(32, 32, 10))
            .unwrap_err();
        assert!(
            size.contains("32x32") && size.contains("`--model cnn:32x32:10`"),
            "{size}"
        );
    }
}
