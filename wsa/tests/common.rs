//! Helpers shared by the core's test files.
#![allow(dead_code, unreachable_pub)]

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64) -> Vec<f64> {
    (0..n)
        .map(|_| mean + std * rng.sample::<f64, _>(StandardNormal))
        .collect()
}

pub fn normal_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f64> {
    Array2::from_shape_simple_fn((rows, cols), || rng.sample(StandardNormal))
}

/// Central differences of `f` at `x`, step `h`.
pub fn numeric_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let up = f(&probe);
            probe[i] = x[i] - h;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `‖a − b‖ / max(‖a‖, ‖b‖, 1e-2)`, the norm-wise relative error of two gradients.
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    // Measured against at least GRADIENT_SCALE_FLOOR: a saturated softmax gives gradients
    // near 1e-8, where the central difference's own noise (about 2e-10 at H = 1e-6) is a
    // large share of the gradient. A scan of 400k random heads found 3 failures of a 1e-6
    // tolerance, all with ‖g‖ ≤ 1.5e-4 and an absolute error near 2e-10; with the floor a
    // wrong gradient must still be off by 1e-8 to pass unseen.
    let scale = norm(a).max(norm(b)).max(GRADIENT_SCALE_FLOOR);
    norm(&diff) / scale
}

/// The smallest norm [`relative_error`] divides by.
const GRADIENT_SCALE_FLOOR: f64 = 1e-2;
