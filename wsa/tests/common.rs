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

/// `‖a − b‖ / max(‖a‖, ‖b‖)`, the norm-wise relative error (0 when both are 0).
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let scale = norm(a).max(norm(b));
    if scale == 0.0 {
        0.0
    } else {
        norm(&diff) / scale
    }
}
