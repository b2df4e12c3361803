//! The WSA regularizer: the KL divergence from a tensor's Gaussian `N(μ, σ²)` to a target
//! `N(μ̃, σ̃²)`, and its gradient with respect to every scalar of the tensor.

use crate::Real;
use crate::error::{Error, Result};
use crate::scope::{Scope, mean_and_variance};

/// `KL(N(μ,σ²) ‖ N(μ̃,σ̃²)) = ln(σ̃/σ) + (σ² + (μ − μ̃)²) / (2σ̃²) − 1/2`.
pub fn kl(scope: Scope, target: Scope) -> f64 {
    let d = scope.mean - target.mean;
    let t2 = target.std * target.std;
    (target.std / scope.std).ln() + (scope.std * scope.std + d * d) / (2.0 * t2) - 0.5
}

/// Adds `scale · ∂KL/∂w` to `grad` and returns the tensor's KL.
///
/// `∂KL/∂w_i = (1/n)·[(μ − μ̃)/σ̃² + (1/σ̃² − 1/σ²)·(w_i − μ)]`, which already holds μ's and σ's
/// dependence on `w`; the target is a constant. Statistics are taken in f64.
pub fn add_kl_grad<F: Real>(
    w: &[F],
    target: Scope,
    eps: f64,
    scale: f64,
    grad: &mut [F],
) -> Result<f64> {
    if w.is_empty() {
        return Err(Error::Empty { what: "tensor" });
    }
    if grad.len() != w.len() {
        return Err(Error::ShapeMismatch {
            what: "KL gradient buffer",
            expected: w.len(),
            found: grad.len(),
        });
    }
    target.validate()?;
    // Any NaN or infinity in `w` shows up in the sums: no separate pass over the tensor.
    let (mean, var) = mean_and_variance(w);
    if !(mean.is_finite() && var.is_finite()) {
        return Err(Error::NonFinite { what: "tensor" });
    }
    let scope = Scope {
        mean,
        std: (var + eps).sqrt(),
    };
    let n = w.len() as f64;
    let inv_t2 = 1.0 / (target.std * target.std);
    let shift = scale * (mean - target.mean) * inv_t2 / n;
    let stretch = scale * (inv_t2 - 1.0 / (scope.std * scope.std)) / n;
    // g_i = shift + stretch·(w_i − μ) = (shift − stretch·μ) + stretch·w_i: one fused pass.
    let offset = F::of_f64(shift - stretch * mean);
    let stretch = F::of_f64(stretch);
    for (g, &x) in grad.iter_mut().zip(w) {
        *g = *g + offset + stretch * x;
    }
    Ok(kl(scope, target))
}
