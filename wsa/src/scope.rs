use serde::{Deserialize, Serialize};

use crate::Real;
use crate::error::{Error, Result, ensure_finite};

/// Default ε in `σ = sqrt(var + ε)`: keeps σ > 0 for constant tensors (zero-initialised
/// biases) and is negligible against the variances of trained layers (~1e-4 and up).
pub const DEFAULT_SCOPE_EPS: f64 = 1e-8;

/// The weight scope of a tensor: the mean and std of its scalars, seen as one Gaussian.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    /// `μ = mean(w)`.
    pub mean: f64,
    /// `σ = sqrt(var(w) + ε)` with the population variance.
    pub std: f64,
}

impl Scope {
    /// A scope from its parts, checked: `mean` finite, `std` finite and positive.
    pub fn new(mean: f64, std: f64) -> Result<Self> {
        let scope = Self { mean, std };
        scope.validate()?;
        Ok(scope)
    }

    /// Measures the scope of `w` with accumulation in f64 (two passes, so the variance does not
    /// cancel catastrophically for tensors with a large mean).
    pub fn of<F: Real>(w: &[F], eps: f64) -> Result<Self> {
        if w.is_empty() {
            return Err(Error::Empty { what: "tensor" });
        }
        ensure_finite("tensor", w)?;
        let (mean, var) = mean_and_variance(w);
        Scope::new(mean, (var + eps).sqrt())
    }

    /// Checks the invariants a scope from the wire must hold.
    pub fn validate(&self) -> Result<()> {
        if self.mean.is_finite() && self.std.is_finite() && self.std > 0.0 {
            Ok(())
        } else {
            Err(Error::InvalidScope {
                mean: self.mean,
                std: self.std,
            })
        }
    }
}

/// Population mean and variance in f64, in one pass. Sums are taken around the first element
/// so that a large common offset does not cancel the variance away. The caller guarantees `w`
/// is non-empty; a non-finite element makes the result non-finite.
pub(crate) fn mean_and_variance<F: Real>(w: &[F]) -> (f64, f64) {
    let n = w.len() as f64;
    let shift = w[0].as_f64();
    let (mut sum, mut sum_sq) = (0.0, 0.0);
    for x in w {
        let d = x.as_f64() - shift;
        sum += d;
        sum_sq += d * d;
    }
    let mean_shift = sum / n;
    (
        (shift + mean_shift),
        (sum_sq / n - mean_shift * mean_shift).max(0.0),
    )
}

/// Which of a head's tensors carry a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScopeSelection {
    /// Also give every bias vector its own scope. Off by default: biases start at zero and are
    /// few, so their scope says little and a tight target σ̃ would dominate the regularizer.
    pub include_biases: bool,
}

impl ScopeSelection {
    /// Whether tensors of `kind` carry a scope.
    pub fn scopes(&self, kind: crate::TensorKind) -> bool {
        match kind {
            crate::TensorKind::Weight => true,
            crate::TensorKind::Bias => self.include_biases,
        }
    }
}
