//! One round's fold: the accepted updates' parameters through a compute backend's accumulator
//! under the run's aggregation rule, and their scopes through scope fusion under the
//! strategy's rule, finished together into the next global head and targets.

use std::collections::BTreeMap;

use wsa::{FusionRule, Scope, ScopeFusion, Weighting};

use super::{Aggregation, Strategy};
use crate::backend::{Accumulator, Backend, BackendError, FoldShape, Measurement};

/// The accepted updates of one round, folded as they arrive.
#[derive(Debug)]
pub struct RoundFold {
    acc: Box<dyn Accumulator>,
    weighting: Weighting,
    fusion: FusionRule,
    tensors: usize,
    len: usize,
    /// Accepted scopes with their weights, by client: fused at the finish in client order, so
    /// the targets do not depend on the order updates arrived in (f64 sums are not
    /// associative, and a resumed run must reproduce an uninterrupted one bit for bit).
    scopes: BTreeMap<String, (Vec<Scope>, f64)>,
}

impl RoundFold {
    /// An empty fold on `backend` for vectors of `shape`: parameters under `aggregation`,
    /// measured against (and clipped toward) `global`, scopes fused by `strategy`'s rule,
    /// clients weighted by `weighting`; room for `capacity` updates (the round's selection).
    pub fn open(
        backend: &dyn Backend,
        shape: &FoldShape,
        global: &[f32],
        strategy: Strategy,
        aggregation: Aggregation,
        weighting: Weighting,
        capacity: usize,
    ) -> Result<Self, BackendError> {
        Ok(Self {
            acc: backend.accumulator(shape, global, aggregation, capacity)?,
            weighting,
            fusion: strategy.fusion_rule(),
            tensors: shape.tensors.len(),
            len: shape.len,
            scopes: BTreeMap::new(),
        })
    }

    /// Checks a candidate's parameters (length, finiteness) and measures them, folding
    /// nothing: its scopes and its distance from the round's global head.
    pub fn measure(&mut self, params: &[f32]) -> Result<Measurement, BackendError> {
        self.acc.measure(params)
    }

    /// Folds `client`'s update: `params` as `measured`, its reported `scopes`, its weight from
    /// `n_samples` under the run's weighting (returned). Checked in full before anything is
    /// added, so a refused update leaves the fold as it was. One update per client.
    pub fn add(
        &mut self,
        client: &str,
        params: &[f32],
        measured: &Measurement,
        scopes: &[Scope],
        n_samples: u64,
    ) -> Result<f64, BackendError> {
        if self.scopes.contains_key(client) {
            return Err(wsa::Error::InvalidConfig(format!("{client} was folded already")).into());
        }
        let p = self.weighting.weight(n_samples);
        // The scopes' checks (count, weight, values) on a scratch fusion first: a failure of
        // either part leaves both untouched.
        ScopeFusion::new(self.tensors).add(scopes, p)?;
        self.acc.add(params, p, Some(measured))?;
        self.scopes.insert(client.to_owned(), (scopes.to_vec(), p));
        Ok(p)
    }

    /// Updates folded so far.
    pub fn accepted(&self) -> usize {
        self.scopes.len()
    }

    /// The next global parameters and the fused target scopes.
    pub fn finish(&mut self) -> Result<(Vec<f32>, Vec<Scope>), FoldError> {
        let mut fusion = ScopeFusion::new(self.tensors);
        for (scopes, p) in self.scopes.values() {
            fusion.add(scopes, *p).map_err(FoldError::Scopes)?;
        }
        let targets = fusion.finish(self.fusion).map_err(FoldError::Scopes)?;
        let params = self.acc.finish().map_err(FoldError::Params)?;
        if params.len() != self.len || !params.iter().all(|v| v.is_finite()) {
            return Err(FoldError::Params(
                wsa::Error::NonFinite {
                    what: "aggregated parameters",
                }
                .into(),
            ));
        }
        Ok((params, targets))
    }
}

/// Why a round's fold did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FoldError {
    /// The parameters did not aggregate (nothing folded, weight 0, a device failure, or a
    /// non-finite result).
    #[error("parameters: {0}")]
    Params(BackendError),
    /// The scopes did not fuse.
    #[error("scopes: {0}")]
    Scopes(wsa::Error),
}
