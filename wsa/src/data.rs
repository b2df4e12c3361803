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

    /// Splits `round(fraction · n)` rows off at random (seeded by `seed`) as a held-out set,
    /// leaving at least one row to train on: `(rest, held_out)`, `None` when the fraction
    /// rounds to no row. The same rows (in the same order), fraction and seed always give the
    /// same split, so reconnects and restarts on unchanged data never train on a held-out row;
    /// data that changes (new images, another limit) is split afresh.
    pub fn hold_out(&self, fraction: f64, seed: u64) -> Result<(Self, Option<Self>)> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::InvalidConfig(format!(
                "held-out fraction must be in [0, 1), got {fraction}"
            )));
        }
        let n_held = ((self.len() as f64 * fraction).round() as usize).min(self.len() - 1);
        if n_held == 0 {
            return Ok((self.clone(), None));
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let (held, rest) = order.split_at(n_held);
        let (mut held, mut rest) = (held.to_vec(), rest.to_vec());
        held.sort_unstable();
        rest.sort_unstable();
        Ok((self.select(&rest)?, Some(self.select(&held)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> LabelledFeatures {
        let x = Array2::from_shape_fn((n, 2), |(i, j)| (i * 2 + j) as f32);
        LabelledFeatures::new(x, (0..n as u32).map(|i| i % 3).collect(), 3).unwrap()
    }

    #[test]
    fn a_held_out_split_is_disjoint_complete_and_the_same_every_time() {
        let data = rows(50);
        let (rest, held) = data.hold_out(0.2, 7).unwrap();
        let held = held.unwrap();
        assert_eq!((rest.len(), held.len()), (40, 10));
        // Row i's first feature is 2i: the union of both sides is every row, once.
        let mut firsts: Vec<f32> = rest
            .x()
            .column(0)
            .iter()
            .chain(held.x().column(0))
            .copied()
            .collect();
        firsts.sort_by(f32::total_cmp);
        assert_eq!(firsts, (0..50).map(|i| (2 * i) as f32).collect::<Vec<_>>());
        assert_eq!(
            data.hold_out(0.2, 7).unwrap(),
            (rest.clone(), Some(held.clone()))
        );
        assert_ne!(data.hold_out(0.2, 8).unwrap().1.unwrap(), held);
    }

    #[test]
    fn a_hold_out_leaves_a_row_to_train_on_and_may_hold_none() {
        let (rest, held) = rows(2).hold_out(0.9, 1).unwrap();
        assert_eq!((rest.len(), held.map(|h| h.len())), (1, Some(1)));
        let (rest, held) = rows(4).hold_out(0.1, 1).unwrap();
        assert_eq!((rest.len(), held), (4, None));
        assert!(rows(4).hold_out(1.0, 1).is_err());
        assert!(rows(4).hold_out(f64::NAN, 1).is_err());
    }
}
