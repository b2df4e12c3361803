//! A client's share of a round's DP noise (distributed DP under secure aggregation): its step
//! clipped to an L2 norm and Gaussian noise added, drawn from the operating system's entropy
//! through ChaCha20. With `m` inputs summed, each with noise of std `σ/√m`, the sum carries
//! noise of std `σ`, and no party ever sees an un-noised sum.

use protocol::LocalNoise;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

/// Scales `step` down to L2 norm at most `noise.clip`, then adds N(0, std²) to every value.
/// Returns whether the clip left the step whole.
pub fn privatize(step: &mut [f64], noise: &LocalNoise) -> bool {
    privatize_with(step, noise, &mut ChaCha20Rng::from_os_rng())
}

/// [`privatize`] with the noise drawn from `rng` (tests).
pub fn privatize_with(step: &mut [f64], noise: &LocalNoise, rng: &mut ChaCha20Rng) -> bool {
    let norm = step.iter().map(|v| v * v).sum::<f64>().sqrt();
    let whole = norm <= noise.clip;
    if !whole {
        let scale = noise.clip / norm;
        step.iter_mut().for_each(|v| *v *= scale);
    }
    if let Ok(normal) = Normal::new(0.0, noise.std) {
        step.iter_mut().for_each(|v| *v += normal.sample(rng));
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_is_clipped_then_noised_with_the_stated_spread() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let quiet = LocalNoise {
            clip: 1.0,
            std: 0.0,
        };
        let mut long = vec![3.0, 4.0];
        assert!(!privatize_with(&mut long, &quiet, &mut rng));
        assert!((long[0] - 0.6).abs() < 1e-12 && (long[1] - 0.8).abs() < 1e-12);
        let mut short = vec![0.3, 0.4];
        assert!(privatize_with(&mut short, &quiet, &mut rng));
        assert_eq!(short, vec![0.3, 0.4]);
        let noisy = LocalNoise {
            clip: 1.0,
            std: 0.5,
        };
        let mut zeros = vec![0.0; 100_000];
        privatize_with(&mut zeros, &noisy, &mut rng);
        let var = zeros.iter().map(|v| v * v).sum::<f64>() / zeros.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.005, "{}", var.sqrt());
    }
}
