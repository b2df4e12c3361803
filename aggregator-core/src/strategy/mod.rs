//! Strategies: what a round asks of its clients and how their results are combined.
//!
//! A [`Strategy`] (FedAvg, FedProx or WSA) decides the term each client adds to its local loss
//! ([`Strategy::client_config`]) and how the clients' scopes fuse into the next targets
//! ([`Strategy::fusion_rule`]). An [`Aggregation`] rule decides how their parameters become the
//! next global head. A [`RoundFold`] carries out both for one round: parameters through a
//! compute backend's accumulator, the scopes the aggregator measured through scope fusion (or
//! the aggregation's column rule), finished together; each client's weight capped at a share
//! of the round ([`capped_weights`]) and the targets fused and kept within bounds as the [`TargetPolicy`] says.
//!
//! Every type here parses from and prints as the one spelling the run config, the simulator's
//! flags and the reports share (`wsa:10:mean-std`, `fedprox:0.1`, `trimmed:0.2`).

mod aggregation;
mod fold;
mod targets;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use wsa::{FusionRule, Scope, ScopeSelection, Sgd, TrainConfig, WsaTerm};

use crate::backend::FoldShape;

pub use aggregation::{Aggregation, ColumnRule, Plan, column_median, column_trimmed_mean};
pub use fold::{
    DpFolded, DpRound, Drift, FoldError, FoldPolicy, Folded, RoundFold, capped_weights,
};
pub use targets::{TargetFusion, TargetPolicy, layer_scales};

/// How a round trains: the term a client adds to its cross-entropy, and how scopes fuse.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum Strategy {
    /// Plain local SGD and weighted averaging.
    FedAvg,
    /// Local SGD with the proximal term `μ/2·‖w − w_global‖²`, weighted averaging.
    FedProx {
        /// μ.
        mu: f64,
    },
    /// Local SGD with `λ·Σ KL` toward the fused target scopes; weighted averaging. With
    /// `mu > 0` the client adds FedProx's proximal term as well (WSA aligns each layer's
    /// scope, the proximal term the direction of its weights); for the first `warmup` rounds
    /// the WSA term is off (targets fused from an untrained head say least about the layers).
    Wsa {
        /// λ.
        lambda: f64,
        /// How σ̃ is fused.
        rule: FusionRule,
        /// FedProx μ added to the WSA term (0: none).
        #[serde(default, skip_serializing_if = "is_zero")]
        mu: f64,
        /// Rounds, from round 0, that train without the WSA term.
        #[serde(default, skip_serializing_if = "is_zero_rounds")]
        warmup: u64,
        /// How λ is spread over the scoped tensors.
        #[serde(default, skip_serializing_if = "TensorLambdas::is_uniform")]
        tensors: TensorLambdas,
    },
}

/// How WSA's λ is spread over the scoped tensors. The term's gradient on a weight is
/// `λ/(n·σ̃²)` times a shape factor, so one λ pulls a small tensor (the last layer: 2,560
/// weights) far harder per weight than a large one (the first: 327,680).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum TensorLambdas {
    /// λ on every scoped tensor.
    #[default]
    Uniform,
    /// λ on scoped tensor `index` only, 0 on the others (the per-layer ablation).
    Only {
        /// The tensor, in the head's order of scoped tensors.
        index: u32,
    },
    /// `λ_l = λ·n_l·σ̃_l²` (n_l weights, target σ̃_l): the same pull per weight on every
    /// tensor, in units of its own target spread.
    Curvature,
}

impl TensorLambdas {
    fn is_uniform(&self) -> bool {
        *self == TensorLambdas::Uniform
    }

    /// Each scoped tensor's λ for `lambda`, the tensors' sizes and targets; empty for
    /// uniform (every tensor takes `lambda`).
    pub fn resolve(&self, lambda: f64, sizes: &[usize], targets: &[Scope]) -> Vec<f64> {
        match *self {
            TensorLambdas::Uniform => Vec::new(),
            TensorLambdas::Only { index } => (0..sizes.len())
                .map(|t| if t == index as usize { lambda } else { 0.0 })
                .collect(),
            TensorLambdas::Curvature => sizes
                .iter()
                .zip(targets)
                .map(|(&n, t)| lambda * n as f64 * t.std * t.std)
                .collect(),
        }
    }
}

// Absent modifiers are not serialized, so a config written before they existed keeps its
// digest (a checkpoint names the digest of the config it was trained under).
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_zero_rounds(v: &u64) -> bool {
    *v == 0
}

impl Strategy {
    /// WSA with `lambda` and `rule`, without modifiers.
    pub fn wsa(lambda: f64, rule: FusionRule) -> Self {
        Strategy::Wsa {
            lambda,
            rule,
            mu: 0.0,
            warmup: 0,
            tensors: TensorLambdas::Uniform,
        }
    }

    /// A short name for tables and file names: the grammar's spelling (see [`FromStr`]).
    pub fn label(&self) -> String {
        self.to_string()
    }

    /// The fusion rule used for the target scopes (reported for every strategy, used by WSA).
    pub fn fusion_rule(&self) -> FusionRule {
        match self {
            Strategy::Wsa { rule, .. } => *rule,
            _ => FusionRule::default(),
        }
    }

    /// Checks the strategy's parameter, and that `selection` is one its clients can follow:
    /// biases carry scopes only under WSA, since only its term tells clients to scope them.
    /// (A per-tensor λ naming a tensor is checked against the head by the run's config.)
    pub fn validate(&self, selection: ScopeSelection) -> Result<(), String> {
        match *self {
            Strategy::FedProx { mu } if !(mu.is_finite() && mu >= 0.0) => {
                return Err(format!("FedProx mu must be finite and >= 0, got {mu}"));
            }
            Strategy::Wsa { lambda, .. } if !(lambda.is_finite() && lambda >= 0.0) => {
                return Err(format!("WSA lambda must be finite and >= 0, got {lambda}"));
            }
            Strategy::Wsa { mu, .. } if !(mu.is_finite() && mu >= 0.0) => {
                return Err(format!(
                    "WSA's FedProx mu must be finite and >= 0, got {mu}"
                ));
            }
            _ => {}
        }
        if selection.include_biases && !matches!(self, Strategy::Wsa { .. }) {
            return Err(
                "scope_selection.include_biases needs the WSA strategy (only its term tells \
                 clients to scope biases); turn it off for FedAvg and FedProx"
                    .into(),
            );
        }
        Ok(())
    }

    /// What a client trains with in `round`: `sgd`, the shuffles' `seed`, and this strategy's
    /// terms (WSA toward `targets` over the tensors `selection` scopes, which lie in `shape`,
    /// once its warm-up is over; the proximal term toward the task's head).
    pub fn client_config(
        &self,
        sgd: &Sgd,
        seed: u64,
        round: u64,
        targets: &[Scope],
        selection: ScopeSelection,
        shape: &FoldShape,
    ) -> TrainConfig {
        let mut cfg = TrainConfig {
            seed,
            ..TrainConfig::new(sgd.clone())
        };
        match *self {
            Strategy::FedAvg => {}
            Strategy::FedProx { mu } => cfg.prox_mu = Some(mu),
            Strategy::Wsa {
                lambda,
                mu,
                warmup,
                tensors,
                ..
            } => {
                cfg.prox_mu = (mu > 0.0).then_some(mu);
                if round >= warmup {
                    let sizes: Vec<usize> = shape.tensors.iter().map(|r| r.len()).collect();
                    cfg.wsa = Some(WsaTerm {
                        lambda,
                        targets: targets.to_vec(),
                        selection,
                        eps: shape.eps,
                        tensor_lambdas: tensors.resolve(lambda, &sizes, targets),
                    });
                }
            }
        }
        cfg
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::FedAvg => f.write_str("fedavg"),
            Strategy::FedProx { mu } => write!(f, "fedprox:{mu}"),
            Strategy::Wsa {
                lambda,
                rule,
                mu,
                warmup,
                tensors,
            } => {
                write!(f, "wsa:{lambda}:{rule}")?;
                if *mu > 0.0 {
                    write!(f, ":mu={mu}")?;
                }
                if *warmup > 0 {
                    write!(f, ":warmup={warmup}")?;
                }
                match tensors {
                    TensorLambdas::Uniform => Ok(()),
                    TensorLambdas::Only { index } => write!(f, ":only={index}"),
                    TensorLambdas::Curvature => f.write_str(":curvature"),
                }
            }
        }
    }
}

impl FromStr for Strategy {
    type Err = String;

    /// `fedavg`, `fedprox:MU` or
    /// `wsa:LAMBDA[:RULE][:mu=MU][:warmup=ROUNDS][:only=TENSOR|:curvature]` (RULE:
    /// `mean-std`, the default, `root-mean-var` or `mixture`; `mu` adds FedProx's term,
    /// `warmup` trains the first rounds without the WSA term; `only` puts λ on one scoped
    /// tensor, `curvature` spreads it as [`TensorLambdas::Curvature`]).
    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.trim().split(':').collect();
        let number = |s: &str| -> Result<f64, String> {
            s.parse::<f64>()
                .map_err(|e| format!("bad number {s:?} in strategy {text:?}: {e}"))
        };
        let strategy = match parts.as_slice() {
            ["fedavg"] => Strategy::FedAvg,
            ["fedprox", mu] => Strategy::FedProx { mu: number(mu)? },
            ["wsa", lambda, rest @ ..] => {
                let mut strategy = Strategy::wsa(number(lambda)?, FusionRule::default());
                let Strategy::Wsa {
                    rule,
                    mu,
                    warmup,
                    tensors,
                    ..
                } = &mut strategy
                else {
                    unreachable!("built as WSA above")
                };
                let mut modifiers = rest;
                if let [first, tail @ ..] = rest
                    && !first.contains('=')
                {
                    *rule = first.parse()?;
                    modifiers = tail;
                }
                let (mut seen_mu, mut seen_warmup) = (false, false);
                for modifier in modifiers {
                    if *modifier == "curvature" && tensors.is_uniform() {
                        *tensors = TensorLambdas::Curvature;
                        continue;
                    }
                    match modifier.split_once('=') {
                        Some(("only", v)) if tensors.is_uniform() => {
                            *tensors = TensorLambdas::Only {
                                index: v.parse().map_err(|e| {
                                    format!("bad tensor index {v:?} in strategy {text:?}: {e}")
                                })?,
                            };
                        }
                        Some(("mu", v)) if !seen_mu => {
                            *mu = number(v)?;
                            seen_mu = true;
                        }
                        Some(("warmup", v)) if !seen_warmup => {
                            *warmup = v.parse().map_err(|e| {
                                format!("bad round count {v:?} in strategy {text:?}: {e}")
                            })?;
                            seen_warmup = true;
                        }
                        _ => {
                            return Err(format!(
                                "unknown or repeated modifier {modifier:?} in strategy {text:?}: \
                                 wsa:LAMBDA[:RULE][:mu=MU][:warmup=ROUNDS][:only=TENSOR|:curvature]"
                            ));
                        }
                    }
                }
                strategy
            }
            _ => {
                return Err(format!(
                    "unknown strategy {text:?}: fedavg, fedprox:MU or \
                     wsa:LAMBDA[:RULE][:mu=MU][:warmup=ROUNDS][:only=TENSOR|:curvature]"
                ));
            }
        };
        strategy.validate(ScopeSelection::default())?;
        Ok(strategy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_round_trips_through_the_label() {
        for text in [
            "fedavg",
            "fedprox:0.01",
            "wsa:10:mean-std",
            "wsa:0.5:mixture",
            "wsa:100:mean-std:mu=0.1",
            "wsa:30:mixture:warmup=2",
            "wsa:100:mean-std:mu=0.03:warmup=1",
            "wsa:100:mean-std:only=0",
            "wsa:1:mean-std:mu=0.1:curvature",
        ] {
            let s: Strategy = text.parse().unwrap();
            assert_eq!(s.to_string(), text);
        }
        assert_eq!(
            "wsa:100".parse::<Strategy>().unwrap(),
            Strategy::wsa(100.0, FusionRule::MeanStd)
        );
        for bad in [
            "fedprox",
            "fedprox:-1",
            "wsa:x",
            "wsa:1:median",
            "sgd",
            "wsa:1:mixture:2",
            "wsa:1:mu=-0.1",
            "wsa:1:mu=0.1:mu=0.2",
            "wsa:1:warmup=1.5",
            "wsa:1:lr=3",
            "wsa:1:mu=0.1:mixture",
            "wsa:1:only=0:curvature",
            "wsa:1:only=-1",
            "wsa:1:curvature:curvature",
        ] {
            assert!(bad.parse::<Strategy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn each_strategy_sets_its_own_term_only() {
        let sgd = Sgd::default();
        let targets = [Scope::new(0.0, 0.1).unwrap(), Scope::new(0.0, 0.5).unwrap()];
        let selection = ScopeSelection::default();
        let shape = FoldShape {
            len: 130,
            tensors: vec![0..100, 100..120],
            eps: 1e-8,
        };
        let config =
            |s: &Strategy, round| s.client_config(&sgd, 7, round, &targets, selection, &shape);
        let plain = config(&Strategy::FedAvg, 0);
        assert_eq!((plain.seed, plain.prox_mu, plain.wsa), (7, None, None));
        let prox = config(&Strategy::FedProx { mu: 0.1 }, 0);
        assert_eq!((prox.prox_mu, prox.wsa), (Some(0.1), None));
        let wsa = config(&Strategy::wsa(3.0, FusionRule::Mixture), 0);
        let term = wsa.wsa.unwrap();
        assert_eq!((term.lambda, term.targets.as_slice()), (3.0, &targets[..]));
        assert!(term.tensor_lambdas.is_empty(), "uniform: λ for all");
        assert!(wsa.prox_mu.is_none());
        // Both terms; none of WSA's during the warm-up, the proximal term throughout.
        let both: Strategy = "wsa:3:mean-std:mu=0.1:warmup=2".parse().unwrap();
        for (round, scoped) in [(0, false), (1, false), (2, true), (9, true)] {
            let cfg = config(&both, round);
            assert_eq!(cfg.prox_mu, Some(0.1), "round {round}");
            assert_eq!(cfg.wsa.is_some(), scoped, "round {round}");
        }
        let only: Strategy = "wsa:3:mean-std:only=1".parse().unwrap();
        assert_eq!(config(&only, 0).wsa.unwrap().tensor_lambdas, [0.0, 3.0]);
        let curvature: Strategy = "wsa:2:mean-std:curvature".parse().unwrap();
        let lambdas = config(&curvature, 0).wsa.unwrap().tensor_lambdas;
        // λ·n·σ̃²: 2·100·0.01 and 2·20·0.25.
        assert!((lambdas[0] - 2.0).abs() < 1e-12 && (lambdas[1] - 10.0).abs() < 1e-12);
        assert!(
            Strategy::FedAvg
                .validate(ScopeSelection {
                    include_biases: true
                })
                .is_err()
        );
    }
}
