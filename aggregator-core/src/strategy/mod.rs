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

pub use aggregation::{Aggregation, ColumnRule, Plan, column_median, column_trimmed_mean};
pub use fold::{FoldError, FoldPolicy, Folded, RoundFold, capped_weights};
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
    /// Local SGD with `λ·Σ KL` toward the fused target scopes; weighted averaging.
    Wsa {
        /// λ.
        lambda: f64,
        /// How σ̃ is fused.
        rule: FusionRule,
    },
}

impl Strategy {
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
    pub fn validate(&self, selection: ScopeSelection) -> Result<(), String> {
        match *self {
            Strategy::FedProx { mu } if !(mu.is_finite() && mu >= 0.0) => {
                return Err(format!("FedProx mu must be finite and >= 0, got {mu}"));
            }
            Strategy::Wsa { lambda, .. } if !(lambda.is_finite() && lambda >= 0.0) => {
                return Err(format!("WSA lambda must be finite and >= 0, got {lambda}"));
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

    /// What a client trains with this round: `sgd`, the shuffles' `seed`, and this strategy's
    /// term (WSA toward `targets` over the tensors `selection` scopes, with the scopes' `eps`).
    pub fn client_config(
        &self,
        sgd: &Sgd,
        seed: u64,
        targets: &[Scope],
        selection: ScopeSelection,
        eps: f64,
    ) -> TrainConfig {
        let mut cfg = TrainConfig {
            seed,
            ..TrainConfig::new(sgd.clone())
        };
        match *self {
            Strategy::FedAvg => {}
            Strategy::FedProx { mu } => cfg.prox_mu = Some(mu),
            Strategy::Wsa { lambda, .. } => {
                cfg.wsa = Some(WsaTerm {
                    lambda,
                    targets: targets.to_vec(),
                    selection,
                    eps,
                });
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
            Strategy::Wsa { lambda, rule } => write!(f, "wsa:{lambda}:{rule}"),
        }
    }
}

impl FromStr for Strategy {
    type Err = String;

    /// `fedavg`, `fedprox:MU` or `wsa:LAMBDA[:RULE]` (RULE: `mean-std`, the default,
    /// `root-mean-var` or `mixture`).
    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.trim().split(':').collect();
        let number = |s: &str| -> Result<f64, String> {
            s.parse::<f64>()
                .map_err(|e| format!("bad number {s:?} in strategy {text:?}: {e}"))
        };
        let strategy = match parts.as_slice() {
            ["fedavg"] => Strategy::FedAvg,
            ["fedprox", mu] => Strategy::FedProx { mu: number(mu)? },
            ["wsa", lambda] => Strategy::Wsa {
                lambda: number(lambda)?,
                rule: FusionRule::default(),
            },
            ["wsa", lambda, rule] => Strategy::Wsa {
                lambda: number(lambda)?,
                rule: rule.parse()?,
            },
            _ => {
                return Err(format!(
                    "unknown strategy {text:?}: fedavg, fedprox:MU or wsa:LAMBDA[:RULE]"
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
        ] {
            let s: Strategy = text.parse().unwrap();
            assert_eq!(s.to_string(), text);
        }
        assert_eq!(
            "wsa:100".parse::<Strategy>().unwrap(),
            Strategy::Wsa {
                lambda: 100.0,
                rule: FusionRule::MeanStd
            }
        );
        for bad in [
            "fedprox",
            "fedprox:-1",
            "wsa:x",
            "wsa:1:median",
            "sgd",
            "wsa:1:mixture:2",
        ] {
            assert!(bad.parse::<Strategy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn each_strategy_sets_its_own_term_only() {
        let sgd = Sgd::default();
        let targets = [Scope::new(0.0, 0.1).unwrap()];
        let selection = ScopeSelection::default();
        let plain = Strategy::FedAvg.client_config(&sgd, 7, &targets, selection, 1e-8);
        assert_eq!((plain.seed, plain.prox_mu, plain.wsa), (7, None, None));
        let prox = Strategy::FedProx { mu: 0.1 }.client_config(&sgd, 7, &targets, selection, 1e-8);
        assert_eq!((prox.prox_mu, prox.wsa), (Some(0.1), None));
        let wsa = Strategy::Wsa {
            lambda: 3.0,
            rule: FusionRule::Mixture,
        }
        .client_config(&sgd, 7, &targets, selection, 1e-8);
        let term = wsa.wsa.unwrap();
        assert_eq!((term.lambda, term.targets.as_slice()), (3.0, &targets[..]));
        assert!(wsa.prox_mu.is_none());
        assert!(
            Strategy::FedAvg
                .validate(ScopeSelection {
                    include_biases: true
                })
                .is_err()
        );
    }
}
