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
    add_kl_grad_limited(w, target, eps, scale, None, grad)
}

/// How far past the target a limited step may land, as a fraction of the distance before it.
const OVERSHOOT: f64 = 0.5;

/// [`add_kl_grad`] for an SGD step of size `lr`, limited so that a step on the term alone
/// lands μ and σ at most half as far past the target as they were before it.
///
/// The term's curvature is `λ/(n·σ̃²)` above the target and `λ/(n·σ²)` below it: for a small
/// tensor (a bias, a narrow last layer) or a σ near zero (a zero-initialised bias starts at
/// `√ε`) a plain step overshoots further each time — training diverges in its first steps.
/// The limit makes every step on the term a contraction (by at least half), and leaves the
/// exact gradient wherever a plain step already contracts that much (`lr` times the curvature
/// up to 1.5, as for the weight tensors of the shipped heads).
pub fn add_kl_grad_for_step<F: Real>(
    w: &[F],
    target: Scope,
    eps: f64,
    scale: f64,
    lr: f64,
    grad: &mut [F],
) -> Result<f64> {
    if !(lr.is_finite() && lr > 0.0) {
        return Err(Error::InvalidConfig(format!(
            "the step size must be finite and > 0, got {lr}"
        )));
    }
    add_kl_grad_limited(w, target, eps, scale, Some(lr), grad)
}

fn add_kl_grad_limited<F: Real>(
    w: &[F],
    target: Scope,
    eps: f64,
    scale: f64,
    lr: Option<f64>,
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
    let mut shift = scale * (mean - target.mean) * inv_t2 / n;
    let mut stretch = scale * (inv_t2 - 1.0 / (scope.std * scope.std)) / n;
    if let Some(lr) = lr {
        // A step moves μ by −lr·shift: at most OVERSHOOT of the way past μ̃.
        let room = (1.0 + OVERSHOOT) * (mean - target.mean).abs() / lr;
        if shift.abs() > room {
            shift = room.copysign(shift);
        }
        // A step scales the deviations w_i − μ by f = 1 − lr·stretch, their std d to |f|·d:
        // at most OVERSHOOT of the way past the target's d̃ (σ̃² = d̃² + ε).
        let d = var.sqrt();
        if d > 0.0 {
            let d_target = (target.std * target.std - eps).max(0.0).sqrt();
            let limit = ((1.0 + OVERSHOOT) * d_target - OVERSHOOT * d) / d;
            let f = 1.0 - lr * stretch;
            if f < limit.min(1.0) || f > limit.max(1.0) {
                stretch = (1.0 - f.clamp(limit.min(1.0), limit.max(1.0))) / lr;
            }
        }
    }
    // g_i = shift + stretch·(w_i − μ) = (shift − stretch·μ) + stretch·w_i: one fused pass.
    let offset = F::of_f64(shift - stretch * mean);
    let stretch = F::of_f64(stretch);
    for (g, &x) in grad.iter_mut().zip(w) {
        *g = *g + offset + stretch * x;
    }
    Ok(kl(scope, target))
}
