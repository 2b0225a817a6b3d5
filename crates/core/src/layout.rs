//! Named tensors laid out over one flat `f32` buffer: the unit every other part speaks in.

use crate::error::LayoutError;

/// One named tensor inside the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Index of the tensor's first element in the flat buffer.
    pub offset: usize,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// An ordered list of tensors packed back to back, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    tensors: Vec<TensorSpec>,
    len: usize,
}

impl Layout {
    /// Packs the tensors in the given order. Names must be unique and non-empty, dims non-zero.
    pub fn new<'a, I, S>(tensors: I) -> Result<Self, LayoutError>
    where
        I: IntoIterator<Item = (S, &'a [usize])>,
        S: Into<String>,
    {
        let mut specs: Vec<TensorSpec> = Vec::new();
        // Linear, not quadratic: a peer's handshake may name many tensors.
        let mut seen = std::collections::HashSet::new();
        let mut offset = 0usize;
        for (name, shape) in tensors {
            let name = name.into();
            if name.is_empty() {
                return Err(LayoutError::EmptyName);
            }
            if !seen.insert(name.clone()) {
                return Err(LayoutError::DuplicateName(name));
            }
            if shape.contains(&0) {
                return Err(LayoutError::ZeroDimension {
                    name,
                    shape: shape.to_vec(),
                });
            }
            let len = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| LayoutError::TooLarge { name: name.clone() })?;
            let spec = TensorSpec {
                name,
                shape: shape.to_vec(),
                offset,
            };
            offset = offset
                .checked_add(len)
                .ok_or_else(|| LayoutError::TooLarge {
                    name: spec.name.clone(),
                })?;
            specs.push(spec);
        }
        Ok(Layout {
            tensors: specs,
            len: offset,
        })
    }

    /// Total number of `f32` elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Every tensor's name and shape, in layout order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A view of one tensor inside a flat buffer laid out by `self`.
    pub fn slice<'a>(&self, name: &str, flat: &'a [f32]) -> Option<&'a [f32]> {
        self.get(name).and_then(|t| flat.get(t.range()))
    }

    /// A stable 64-bit FNV-1a hash of names and shapes, so that peers can check they agree on
    /// the layout before any tensor moves.
    pub fn fingerprint(&self) -> u64 {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        for t in &self.tensors {
            feed(&(t.name.len() as u64).to_le_bytes());
            feed(t.name.as_bytes());
            feed(&(t.shape.len() as u64).to_le_bytes());
            for &d in &t.shape {
                feed(&(d as u64).to_le_bytes());
            }
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_tensors_back_to_back() {
        let layout = Layout::new([("w", &[3usize, 2][..]), ("b", &[3][..])]).unwrap();
        assert_eq!(layout.len(), 9);
        assert_eq!(layout.get("w").unwrap().range(), 0..6);
        assert_eq!(layout.get("b").unwrap().range(), 6..9);
        let flat: Vec<f32> = (0..9).map(|i| i as f32).collect();
        assert_eq!(layout.slice("b", &flat).unwrap(), &[6.0, 7.0, 8.0]);
    }

    #[test]
    fn rejects_bad_layouts() {
        assert_eq!(
            Layout::new([("a", &[1usize][..]), ("a", &[2][..])]).unwrap_err(),
            LayoutError::DuplicateName("a".into())
        );
        assert!(matches!(
            Layout::new([("a", &[0usize][..])]).unwrap_err(),
            LayoutError::ZeroDimension { .. }
        ));
        assert_eq!(
            Layout::new([("", &[1usize][..])]).unwrap_err(),
            LayoutError::EmptyName
        );
        assert!(matches!(
            Layout::new([("a", &[usize::MAX, 2][..])]).unwrap_err(),
            LayoutError::TooLarge { .. }
        ));
    }

    #[test]
    fn fingerprint_sees_names_shapes_and_order() {
        let a = Layout::new([("w", &[3usize, 2][..]), ("b", &[3][..])]).unwrap();
        let same = Layout::new([("w", &[3usize, 2][..]), ("b", &[3][..])]).unwrap();
        let reshaped = Layout::new([("w", &[2usize, 3][..]), ("b", &[3][..])]).unwrap();
        let renamed = Layout::new([("v", &[3usize, 2][..]), ("b", &[3][..])]).unwrap();
        let reordered = Layout::new([("b", &[3usize][..]), ("w", &[3, 2][..])]).unwrap();
        assert_eq!(a.fingerprint(), same.fingerprint());
        for other in [reshaped, renamed, reordered] {
            assert_ne!(a.fingerprint(), other.fingerprint());
        }
    }
}
