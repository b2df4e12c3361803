//! Scope fusion: one target scope per tensor from the scopes of K client models.
//!
//! Fusion is carried as weighted sums (`Σp, Σpμ, Σpσ, Σpσ², Σpμ²`), so partial groups fused by
//! different aggregators combine exactly: fusing the groups' sums equals fusing everything at
//! once, for every σ̃ rule. `Σpμ²` joins the design's list because the mixture rule needs it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, ensure_len};
use crate::scope::Scope;

/// How the fused σ̃ is formed from the client σ's (μ̃ is always the weighted mean of the μ's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FusionRule {
    /// (a) `σ̃ = Σ p σ`: the mean of the stds.
    #[default]
    MeanStd,
    /// (b) `σ̃ = sqrt(Σ p σ²)`: the root of the mean variance.
    RootMeanVar,
    /// (c) `σ̃ = sqrt(Σ p (σ² + μ²) − μ̃²)`: the std of the mixture of the client Gaussians.
    Mixture,
}

impl fmt::Display for FusionRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FusionRule::MeanStd => "mean-std",
            FusionRule::RootMeanVar => "root-mean-var",
            FusionRule::Mixture => "mixture",
        })
    }
}

impl FromStr for FusionRule {
    type Err = String;

    /// `mean-std`, `root-mean-var` or `mixture` (the config files' spelling too).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "mean-std" => Ok(FusionRule::MeanStd),
            "root-mean-var" => Ok(FusionRule::RootMeanVar),
            "mixture" => Ok(FusionRule::Mixture),
            other => Err(format!(
                "unknown fusion rule {other:?}: mean-std, root-mean-var or mixture"
            )),
        }
    }
}

/// How much each client counts in fusion and averaging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Weighting {
    /// Every client counts the same.
    Uniform,
    /// A client counts in proportion to its number of training samples (FedAvg's choice).
    #[default]
    SampleCount,
}

impl FromStr for Weighting {
    type Err = String;

    /// `uniform` or `sample-count` (the config files' spelling too).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "uniform" => Ok(Weighting::Uniform),
            "sample-count" => Ok(Weighting::SampleCount),
            other => Err(format!(
                "unknown weighting {other:?}: uniform or sample-count"
            )),
        }
    }
}

impl Weighting {
    /// The unnormalized weight of a client that trained on `n_samples`.
    pub fn weight(self, n_samples: u64) -> f64 {
        match self {
            Weighting::Uniform => 1.0,
            Weighting::SampleCount => n_samples as f64,
        }
    }
}

/// The weighted sums of one tensor's scopes.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ScopeSums {
    /// `Σ p`.
    pub p: f64,
    /// `Σ p·μ`.
    pub p_mean: f64,
    /// `Σ p·σ`.
    pub p_std: f64,
    /// `Σ p·σ²`.
    pub p_var: f64,
    /// `Σ p·μ²`.
    pub p_mean_sq: f64,
}

impl ScopeSums {
    fn add(&mut self, s: Scope, p: f64) {
        self.p += p;
        self.p_mean += p * s.mean;
        self.p_std += p * s.std;
        self.p_var += p * s.std * s.std;
        self.p_mean_sq += p * s.mean * s.mean;
    }

    fn merge(&mut self, o: &ScopeSums) {
        self.p += o.p;
        self.p_mean += o.p_mean;
        self.p_std += o.p_std;
        self.p_var += o.p_var;
        self.p_mean_sq += o.p_mean_sq;
    }

    fn finish(&self, rule: FusionRule) -> Result<Scope> {
        ensure_positive_weight(self.p)?;
        let mean = self.p_mean / self.p;
        let std = match rule {
            FusionRule::MeanStd => self.p_std / self.p,
            FusionRule::RootMeanVar => (self.p_var / self.p).sqrt(),
            // Rounding can leave a hair below zero when all clients agree; σ̃ then falls back
            // to the root mean variance, which the mixture variance can never be below.
            FusionRule::Mixture => {
                let mixture = (self.p_var + self.p_mean_sq) / self.p - mean * mean;
                mixture.max(self.p_var / self.p).sqrt()
            }
        };
        Scope::new(mean, std)
    }
}

pub(crate) fn ensure_positive_weight(total: f64) -> Result<()> {
    if total.is_finite() && total > 0.0 {
        Ok(())
    } else {
        Err(Error::ZeroTotalWeight { total })
    }
}

pub(crate) fn ensure_weight(p: f64) -> Result<()> {
    if p.is_finite() && p >= 0.0 {
        Ok(())
    } else {
        Err(Error::ZeroTotalWeight { total: p })
    }
}

/// Fuses the per-tensor scopes of many models, one model at a time or group by group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeFusion {
    tensors: Vec<ScopeSums>,
}

impl ScopeFusion {
    /// An empty fusion over `tensors` scoped tensors.
    pub fn new(tensors: usize) -> Self {
        Self {
            tensors: vec![ScopeSums::default(); tensors],
        }
    }

    /// Adds one model's scopes (one per tensor, in the head's tensor order) with weight `p`.
    pub fn add(&mut self, scopes: &[Scope], p: f64) -> Result<()> {
        ensure_len("scopes per model", self.tensors.len(), scopes.len())?;
        ensure_weight(p)?;
        for s in scopes {
            s.validate()?;
        }
        for (sums, &s) in self.tensors.iter_mut().zip(scopes) {
            sums.add(s, p);
        }
        Ok(())
    }

    /// Folds in the sums of another group of models.
    pub fn merge(&mut self, other: &ScopeFusion) -> Result<()> {
        ensure_len("scoped tensors", self.tensors.len(), other.tensors.len())?;
        for (a, b) in self.tensors.iter_mut().zip(&other.tensors) {
            a.merge(b);
        }
        Ok(())
    }

    /// The per-tensor sums, as carried between tiers of aggregators.
    pub fn sums(&self) -> &[ScopeSums] {
        &self.tensors
    }

    /// Rebuilds a fusion from sums received from another aggregator.
    pub fn from_sums(tensors: Vec<ScopeSums>) -> Self {
        Self { tensors }
    }

    /// The fused target scope of every tensor.
    pub fn finish(&self, rule: FusionRule) -> Result<Vec<Scope>> {
        if self.tensors.is_empty() {
            return Err(Error::Empty {
                what: "scope fusion",
            });
        }
        self.tensors.iter().map(|s| s.finish(rule)).collect()
    }
}
