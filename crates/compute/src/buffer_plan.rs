//! A chain's memory plan: which buffer holds each activation, made once from what each
//! layer's backward reads, so that an elementwise layer whose input nobody reads again
//! writes over it, and an activation no backward reads lends its buffer to the gradients.

use crate::layers::Layer;

/// Where activations live and which buffers backward may borrow: the chain's memory plan,
/// made once from what each layer's backward reads.
#[derive(Debug, Clone)]
pub(crate) struct BufferPlan {
    pub slot: Vec<usize>,
    /// Per gradient buffer, an activation buffer no backward reads that it borrows during
    /// backward (the largest dead one for the gradient buffer that needs the most).
    pub lend: [Option<usize>; 2],
    /// Per buffer, its values per sample of a batch (buffer 0, the images, is the caller's).
    pub sizes: Vec<usize>,
}

impl BufferPlan {
    /// How many buffers the chain uses (the images' included).
    pub fn buffers(&self) -> usize {
        self.sizes.len()
    }

    pub fn new(layers: &[Box<dyn Layer>]) -> Self {
        let n = layers.len();
        let mut slot = vec![0usize; n + 1];
        let mut buffers = 1;
        for i in 0..n {
            // Writing over layer i's input is safe when no backward reads it: not layer i
            // (its x) and not layer i - 1 (its y). The images' buffer is never written.
            let overwrite = i > 0
                && layers[i].elementwise()
                && !layers[i].reads().x
                && !layers[i - 1].reads().y;
            slot[i + 1] = if overwrite {
                slot[i]
            } else {
                buffers += 1;
                buffers - 1
            };
        }
        // A buffer is dead during backward when no activation it holds is read there. The
        // logits' buffer is kept too: the loss reads it while the gradient buffers are lent.
        let mut read = vec![false; buffers];
        read[slot[n]] = true;
        for (j, &b) in slot.iter().enumerate() {
            read[b] |= (j < n && layers[j].reads().x) || (j > 0 && layers[j - 1].reads().y);
        }
        // Per sample, the size each gradient buffer takes at its largest: buffer 0 holds the
        // logits' gradient first, then the two alternate receiving each layer's input gradient.
        let mut need = [layers.last().map_or(0, |l| l.output_shape().len()), 0];
        for (k, i) in (1..n).rev().enumerate() {
            let which = (k + 1) % 2;
            need[which] = need[which].max(layers[i].input_shape().len());
        }
        let size = |b: usize| {
            (0..=n)
                .filter(|&j| slot[j] == b)
                .map(|j| {
                    if j == 0 {
                        0
                    } else {
                        layers[j - 1].output_shape().len()
                    }
                })
                .max()
                .unwrap_or(0)
        };
        let mut dead: Vec<usize> = (1..buffers).filter(|&b| !read[b]).collect();
        dead.sort_by_key(|&b| std::cmp::Reverse(size(b)));
        let mut order = [0usize, 1];
        order.sort_by_key(|&g| std::cmp::Reverse(need[g]));
        let mut lend = [None, None];
        for (g, b) in order.into_iter().zip(dead) {
            lend[g] = Some(b);
        }
        BufferPlan {
            sizes: (0..buffers).map(size).collect(),
            slot,
            lend,
        }
    }
}
