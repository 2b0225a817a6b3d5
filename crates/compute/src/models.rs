//! The two shipped architectures, with PyTorch's parameter names, and `ModelKind`: one of
//! them by name, built for a number of threads.

use crate::layers::{Conv2d, Dropout, Layer, Linear, MaxPool2d, Relu, Shape};
use crate::model::{Model, ModelOptions};
use crate::replicated::Replicated;
use crate::sequential::Sequential;
use std::fmt;
use std::str::FromStr;

const MNIST: Shape = Shape::new(1, 28, 28);

fn boxed(layer: impl Layer + 'static) -> Box<dyn Layer> {
    Box::new(layer)
}

/// The PyTorch MNIST example: conv(1->32, 3) ReLU conv(32->64, 3) ReLU maxpool(2)
/// dropout(0.25) fc(9216->128) ReLU dropout(0.5) fc(128->10) log-softmax. The second ReLU
/// runs after the pooling: max(relu(x)) = relu(max(x)), with the same gradient (where the
/// window's maximum is <= 0 both give 0), on a quarter of the values.
pub fn cnn(options: ModelOptions) -> Sequential {
    let drop = |p: f32| if options.dropout { p } else { 0.0 };
    let s1 = Shape::new(32, 26, 26);
    let s2 = Shape::new(64, 24, 24);
    let s3 = Shape::new(64, 12, 12);
    let h = Shape::new(128, 1, 1);
    Sequential::new(
        MNIST,
        vec![
            ("conv1", boxed(Conv2d::new(MNIST, 32, 3))),
            ("relu1", boxed(Relu::new(s1))),
            ("conv2", boxed(Conv2d::new(s1, 64, 3))),
            ("pool", boxed(MaxPool2d::new(s2, 2))),
            ("relu2", boxed(Relu::new(s3))),
            ("dropout1", boxed(Dropout::new(s3, drop(0.25)))),
            ("fc1", boxed(Linear::new(s3, 128))),
            ("relu3", boxed(Relu::new(h))),
            ("dropout2", boxed(Dropout::new(h, drop(0.5)))),
            ("fc2", boxed(Linear::new(h, 10))),
        ],
    )
}

/// The original Ray parameter-server example: conv(1->3, 3) maxpool(3) ReLU fc(192->10)
/// log-softmax.
pub fn convnet(_options: ModelOptions) -> Sequential {
    let s1 = Shape::new(3, 26, 26);
    let s2 = Shape::new(3, 8, 8);
    Sequential::new(
        MNIST,
        vec![
            ("conv1", boxed(Conv2d::new(MNIST, 3, 3))),
            ("pool", boxed(MaxPool2d::new(s1, 3))),
            ("relu", boxed(Relu::new(s2))),
            ("fc", boxed(Linear::new(s2, 10))),
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

    /// The model; with `options.threads` > 1, one replica per thread, each taking a part
    /// of every batch.
    pub fn build(&self, options: ModelOptions) -> Box<dyn Model> {
        let kind = *self;
        let build = move || match kind {
            ModelKind::Cnn => cnn(options),
            ModelKind::Convnet => convnet(options),
        };
        if options.threads > 1 {
            Box::new(Replicated::new(options.threads, build))
        } else {
            Box::new(build())
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
            .ok_or_else(|| format!("unknown model `{s}` (choose cnn or convnet)"))
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
}
