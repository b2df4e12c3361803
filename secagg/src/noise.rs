//! A client's share of a round's DP noise (distributed DP under secure aggregation): its step
//! clipped to an L2 norm and Gaussian noise added, drawn from the operating system's entropy
//! through ChaCha20. With `m` inputs summed, each with noise of std `σ/√m`, the sum carries
//! noise of std `σ`, and no party ever sees an un-noised sum.

use protocol::LocalNoise;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::error::SecAggError;

/// Scales `step` down to L2 norm at most `noise.clip`, then adds N(0, std²) to every value.
/// Returns whether the clip left the step whole; refuses settings that would leave the step
/// unclipped or un-noised (a non-finite or non-positive clip, a non-finite or negative std).
pub fn privatize(step: &mut [f64], noise: &LocalNoise) -> Result<bool, SecAggError> {
    privatize_with(step, noise, &mut ChaCha20Rng::from_os_rng())
}

/// [`privatize`] with the noise drawn from `rng` (tests).
pub fn privatize_with(
    step: &mut [f64],
    noise: &LocalNoise,
    rng: &mut ChaCha20Rng,
) -> Result<bool, SecAggError> {
    let normal = match Normal::new(0.0, noise.std) {
        Ok(n)
            if noise.clip.is_finite()
                && noise.clip > 0.0
                && noise.std.is_finite()
                && noise.std >= 0.0 =>
        {
            n
        }
        _ => {
            return Err(SecAggError::BadParams(format!(
                "local noise with clip {} and std {}",
                noise.clip, noise.std
            )));
        }
    };
    let norm = step.iter().map(|v| v * v).sum::<f64>().sqrt();
    let whole = norm <= noise.clip;
    if !whole {
        let scale = noise.clip / norm;
        step.iter_mut().for_each(|v| *v *= scale);
    }
    step.iter_mut().for_each(|v| *v += normal.sample(rng));
    Ok(whole)
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
        assert!(!privatize_with(&mut long, &quiet, &mut rng).unwrap());
        assert!((long[0] - 0.6).abs() < 1e-12 && (long[1] - 0.8).abs() < 1e-12);
        let mut short = vec![0.3, 0.4];
        assert!(privatize_with(&mut short, &quiet, &mut rng).unwrap());
        assert_eq!(short, vec![0.3, 0.4]);
        let noisy = LocalNoise {
            clip: 1.0,
            std: 0.5,
        };
        let mut zeros = vec![0.0; 100_000];
        privatize_with(&mut zeros, &noisy, &mut rng).unwrap();
        for bad in [
            (f64::NAN, 1.0),
            (0.0, 1.0),
            (1.0, f64::INFINITY),
            (1.0, -1.0),
        ] {
            let noise = LocalNoise {
                clip: bad.0,
                std: bad.1,
            };
            assert!(
                privatize_with(&mut [1.0], &noise, &mut rng).is_err(),
                "{bad:?}"
            );
        }
        let var = zeros.iter().map(|v| v * v).sum::<f64>() / zeros.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.005, "{}", var.sqrt());
    }
}
