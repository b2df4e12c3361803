//! The aggregator's round logic, free of sockets and clocks.
//!
//! A [`Strategy`] decides what clients optimise (plain cross-entropy, a FedProx term, or the
//! WSA term toward the current target scopes) and how the fused target is formed. A
//! [`RoundFold`] takes the accepted updates of one round, one at a time, and yields the next
//! global head (the weighted average) and the next target scopes (the fused client scopes).
//! The QUIC server, the round engine with deadlines and quorum, and checkpoints build on these.
#![warn(missing_docs, unreachable_pub)]

pub mod auth;
pub mod backend;
pub use backend::Aggregation;
pub mod checkpoint;
pub mod engine;
pub mod server;
pub mod tls;

use serde::{Deserialize, Serialize};
use wsa::{
    FusionRule, Head, HeadSpec, ParamSum, Scope, ScopeFusion, ScopeSelection, TrainConfig,
    Weighting, WsaTerm,
};

/// How a round trains and aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Strategy {
    /// Plain local SGD and weighted averaging.
    FedAvg,
    /// Local SGD with the proximal term `μ/2·‖w − w_global‖²`, weighted averaging.
    FedProx {
        /// μ.
        mu: f64,
    },
    /// Local SGD with `λ·Σ KL` toward the fused target scopes; weighted averaging.
    Wsa {
        /// λ.
        lambda: f64,
        /// How σ̃ is fused.
        rule: FusionRule,
    },
}

impl Strategy {
    /// A short name for tables and file names.
    pub fn label(&self) -> String {
        match self {
            Strategy::FedAvg => "fedavg".into(),
            Strategy::FedProx { mu } => format!("fedprox(mu={mu})"),
            Strategy::Wsa { lambda, rule } => format!("wsa(lambda={lambda},{rule:?})"),
        }
    }

    /// The fusion rule used for the target scopes (reported for every strategy, used by WSA).
    pub fn fusion_rule(&self) -> FusionRule {
        match self {
            Strategy::Wsa { rule, .. } => *rule,
            _ => FusionRule::default(),
        }
    }

    /// The training configuration a client gets this round: `base` plus this strategy's term.
    pub fn client_config(&self, base: &TrainConfig, targets: &[Scope]) -> TrainConfig {
        let mut cfg = base.clone();
        match *self {
            Strategy::FedAvg => {}
            Strategy::FedProx { mu } => cfg.prox_mu = Some(mu),
            Strategy::Wsa { lambda, .. } => cfg.wsa = Some(WsaTerm::new(lambda, targets.to_vec())),
        }
        cfg
    }
}

/// The accepted updates of one round, folded as they arrive.
#[derive(Debug, Clone)]
pub struct RoundFold {
    spec: HeadSpec,
    weighting: Weighting,
    params: ParamSum,
    scopes: ScopeFusion,
    accepted: usize,
}

impl RoundFold {
    /// An empty round for heads of `spec`, scopes over `selection`.
    pub fn new(spec: &HeadSpec, selection: ScopeSelection, weighting: Weighting) -> Self {
        Self {
            spec: spec.clone(),
            weighting,
            params: ParamSum::new(spec.param_count()),
            scopes: ScopeFusion::new(spec.scoped_tensor_count(selection)),
            accepted: 0,
        }
    }

    /// Folds one client's flat parameters and scopes. Checked in full before anything is
    /// added, so a rejected update leaves the round as it was.
    pub fn add(&mut self, params: &[f32], scopes: &[Scope], n_samples: u64) -> wsa::Result<()> {
        let p = self.weighting.weight(n_samples);
        let mut scopes_after = self.scopes.clone();
        scopes_after.add(scopes, p)?;
        self.params.add(params, p)?;
        self.scopes = scopes_after;
        self.accepted += 1;
        Ok(())
    }

    /// Updates folded so far.
    pub fn accepted(&self) -> usize {
        self.accepted
    }

    /// The next global head and the fused target scopes.
    pub fn finish(&self, rule: FusionRule) -> wsa::Result<(Head<f32>, Vec<Scope>)> {
        let head = Head::from_flat(&self.spec, &self.params.finish::<f32>()?)?;
        Ok((head, self.scopes.finish(rule)?))
    }
}
