//! A built-in, seeded classification problem for tests, benchmarks and the demo job: each class
//! is a mixture of Gaussian clusters at random centres, so classes overlap and no single
//! hyperplane separates them (an MLP head can do better than a linear one).

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::data::LabelledFeatures;
use crate::error::{Error, Result};

/// The shape of a synthetic problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    /// Number of classes.
    pub classes: usize,
    /// Feature width.
    pub dim: usize,
    /// Gaussian clusters per class.
    pub clusters_per_class: usize,
    /// Std of every cluster around its centre (centres are standard normal).
    pub noise: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            classes: 10,
            dim: 32,
            clusters_per_class: 4,
            noise: 1.2,
        }
    }
}

/// A drawn problem: fixed cluster centres from which any number of samples can be drawn.
#[derive(Debug, Clone)]
pub struct SyntheticProblem {
    spec: SyntheticSpec,
    centres: Array2<f64>,
}

impl SyntheticProblem {
    /// Draws the cluster centres from `seed`.
    pub fn new(spec: SyntheticSpec, seed: u64) -> Result<Self> {
        if spec.classes < 2 || spec.dim == 0 || spec.clusters_per_class == 0 {
            return Err(Error::InvalidConfig(format!(
                "synthetic problem needs >= 2 classes, dim >= 1, >= 1 cluster: {spec:?}"
            )));
        }
        if !(spec.noise.is_finite() && spec.noise >= 0.0) {
            return Err(Error::InvalidConfig(format!(
                "noise must be finite and >= 0, got {}",
                spec.noise
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres = Array2::from_shape_simple_fn(
            (spec.classes * spec.clusters_per_class, spec.dim),
            || rng.sample(StandardNormal),
        );
        Ok(Self { spec, centres })
    }

    /// `n` samples with balanced-in-expectation labels, from `seed`.
    pub fn sample(&self, n: usize, seed: u64) -> Result<LabelledFeatures> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Array2::zeros((n, self.spec.dim));
        let mut labels = Vec::with_capacity(n);
        for mut row in x.rows_mut() {
            let cluster = rng.random_range(0..self.centres.nrows());
            labels.push((cluster / self.spec.clusters_per_class) as u32);
            for (v, &c) in row.iter_mut().zip(self.centres.row(cluster)) {
                let z: f64 = rng.sample(StandardNormal);
                *v = (c + self.spec.noise * z) as f32;
            }
        }
        LabelledFeatures::new(x, labels, self.spec.classes)
    }
}
