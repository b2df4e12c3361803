use ndarray::{Array2, ArrayView2, Axis};

use crate::error::{Error, Result, ensure_len};

/// Feature rows with their class labels, checked once on construction: at least one row,
/// finite features, labels below `classes`.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledFeatures {
    x: Array2<f32>,
    labels: Vec<u32>,
    classes: usize,
}

impl LabelledFeatures {
    /// Checks and wraps `x` (`[n, dim]`) with its `n` labels.
    pub fn new(x: Array2<f32>, labels: Vec<u32>, classes: usize) -> Result<Self> {
        if x.nrows() == 0 || x.ncols() == 0 {
            return Err(Error::Empty { what: "features" });
        }
        ensure_len("labels", x.nrows(), labels.len())?;
        if let Some(&label) = labels.iter().find(|&&y| y as usize >= classes) {
            return Err(Error::LabelOutOfRange { label, classes });
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "features" });
        }
        // Row gathers in the trainer copy whole rows; a standard layout keeps them contiguous.
        let x = x.as_standard_layout().into_owned();
        Ok(Self { x, labels, classes })
    }

    /// The feature rows, `[n, dim]`.
    pub fn x(&self) -> ArrayView2<'_, f32> {
        self.x.view()
    }

    /// One label per row.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Number of classes the labels range over.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Never true for a constructed value; present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Width of a feature row.
    pub fn dim(&self) -> usize {
        self.x.ncols()
    }

    /// The rows at `indices` (a client's shard, a validation split).
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::ShapeMismatch {
                what: "row index",
                expected: self.len(),
                found: i,
            });
        }
        Self::new(
            self.x.select(Axis(0), indices),
            indices.iter().map(|&i| self.labels[i]).collect(),
            self.classes,
        )
    }
}
