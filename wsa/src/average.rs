//! Weighted parameter averaging (FedAvg's `Σ p_k w_k / Σ p_k`), carried as partial sums in f64
//! so that groups averaged apart combine into exactly the flat average.

use serde::{Deserialize, Serialize};

use crate::Real;
use crate::error::{Error, Result, ensure_finite, ensure_len};
use crate::fusion::{ensure_positive_weight, ensure_weight};

/// A running `Σ p` and `Σ p·w` over flat parameter vectors of one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSum {
    total_weight: f64,
    weighted: Vec<f64>,
}

impl ParamSum {
    /// An empty sum over vectors of `len` parameters.
    pub fn new(len: usize) -> Self {
        Self {
            total_weight: 0.0,
            weighted: vec![0.0; len],
        }
    }

    /// Adds `p·w`.
    pub fn add<F: Real>(&mut self, w: &[F], p: f64) -> Result<()> {
        ensure_len("parameter vector", self.weighted.len(), w.len())?;
        ensure_weight(p)?;
        ensure_finite("parameters", w)?;
        self.total_weight += p;
        for (acc, &x) in self.weighted.iter_mut().zip(w) {
            *acc += p * x.as_f64();
        }
        Ok(())
    }

    /// Folds in another group's sum.
    pub fn merge(&mut self, other: &ParamSum) -> Result<()> {
        ensure_len(
            "parameter vector",
            self.weighted.len(),
            other.weighted.len(),
        )?;
        self.total_weight += other.total_weight;
        for (a, b) in self.weighted.iter_mut().zip(&other.weighted) {
            *a += b;
        }
        Ok(())
    }

    /// `Σ p` so far.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// `Σ p·w` so far, as carried between tiers of aggregators.
    pub fn weighted(&self) -> &[f64] {
        &self.weighted
    }

    /// Rebuilds a sum received from another aggregator.
    pub fn from_parts(total_weight: f64, weighted: Vec<f64>) -> Result<Self> {
        ensure_weight(total_weight)?;
        if weighted.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: "weighted parameter sum",
            });
        }
        Ok(Self {
            total_weight,
            weighted,
        })
    }

    /// The weighted mean.
    pub fn finish<F: Real>(&self) -> Result<Vec<F>> {
        ensure_positive_weight(self.total_weight)?;
        let inv = 1.0 / self.total_weight;
        Ok(self.weighted.iter().map(|&x| F::of_f64(x * inv)).collect())
    }
}
