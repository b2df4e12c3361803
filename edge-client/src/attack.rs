//! Clients that attack the federation, for robustness experiments. An attacking client trains
//! honestly, then rewrites what it sends — its step, one tensor's scale, the sample count it
//! claims — and reports the scopes of what it sends, so the aggregator's consistency checks
//! pass and only what the aggregator measures and caps stands between it and the global head.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use wsa::{Head, ScopeSelection};

use crate::round::{ClientUpdate, TrainingTask};

/// One way to lie.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Attack {
    /// Sends `g − scale·(w − g)`: its step reversed and stretched.
    SignFlip {
        /// How far the reversed step reaches.
        scale: f32,
    },
    /// Sends `g + factor·(w − g)`: its step stretched.
    Scale {
        /// The stretch.
        factor: f32,
    },
    /// Claims `n_samples` training rows, in its hello and its updates.
    Claim {
        /// The claimed count.
        n_samples: u64,
    },
    /// Sets its last weight tensor to that tensor's mean (σ → √ε), the rest honest: a pull of
    /// the WSA targets toward σ̃ = 0.
    ScopeCollapse,
    /// Stretches its last weight tensor around its mean by `factor` (the direction of each
    /// value kept): a pull of the targets toward a large σ̃.
    ScopeInflate {
        /// The stretch.
        factor: f32,
    },
}

/// A client's attacks, applied in order (`claim:10000000+sign-flip:1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Adversary(pub Vec<Attack>);

impl Adversary {
    /// A short name for tables: the grammar's spelling.
    pub fn label(&self) -> String {
        self.to_string()
    }

    /// The sample count it claims, if it lies about it.
    pub fn claim(&self) -> Option<u64> {
        self.0.iter().rev().find_map(|a| match a {
            Attack::Claim { n_samples } => Some(*n_samples),
            _ => None,
        })
    }

    /// Rewrites `update` (trained from `task`) into the attack, scopes included.
    pub fn corrupt(&self, task: &TrainingTask, update: &mut ClientUpdate) -> wsa::Result<()> {
        let global = task.global.to_flat();
        let spec = task.global.spec();
        // The last weight tensor: the output layer's.
        let last = spec.scoped_tensors(ScopeSelection::default())[spec.hidden.len()];
        for attack in &self.0 {
            match *attack {
                Attack::SignFlip { scale } => stretch_step(&mut update.params, &global, -scale),
                Attack::Scale { factor } => stretch_step(&mut update.params, &global, factor),
                Attack::Claim { n_samples } => update.metrics.n_samples = n_samples,
                Attack::ScopeCollapse | Attack::ScopeInflate { .. } => {
                    let tensor = &mut update.params[last.range()];
                    let mean = (tensor.iter().map(|&x| f64::from(x)).sum::<f64>()
                        / tensor.len() as f64) as f32;
                    let k = match *attack {
                        Attack::ScopeInflate { factor } => factor,
                        _ => 0.0,
                    };
                    for w in tensor {
                        *w = mean + k * (*w - mean);
                    }
                }
            }
        }
        let wsa_term = task.train.wsa.as_ref();
        let selection = wsa_term.map(|w| w.selection).unwrap_or_default();
        let eps = wsa_term.map_or(wsa::DEFAULT_SCOPE_EPS, |w| w.eps);
        update.scopes = Head::from_flat(spec, &update.params)?.scopes(selection, eps)?;
        Ok(())
    }
}

/// `w ← g + k·(w − g)`.
fn stretch_step(params: &mut [f32], global: &[f32], k: f32) {
    for (w, g) in params.iter_mut().zip(global) {
        *w = g + k * (*w - g);
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attack::SignFlip { scale } => write!(f, "sign-flip:{scale}"),
            Attack::Scale { factor } => write!(f, "scale:{factor}"),
            Attack::Claim { n_samples } => write!(f, "claim:{n_samples}"),
            Attack::ScopeCollapse => f.write_str("scope-collapse"),
            Attack::ScopeInflate { factor } => write!(f, "scope-inflate:{factor}"),
        }
    }
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(Attack::to_string).collect();
        f.write_str(&parts.join("+"))
    }
}

const USAGE: &str =
    "sign-flip:SCALE, scale:FACTOR, claim:N, scope-collapse or scope-inflate:FACTOR, joined by +";

impl FromStr for Attack {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (kind, value) = match text.split_once(':') {
            Some((k, v)) => (k, Some(v)),
            None => (text, None),
        };
        let number = || -> Result<f32, String> {
            let v: f32 = value
                .ok_or_else(|| format!("attack {text:?} needs a number: {USAGE}"))?
                .parse()
                .map_err(|e| format!("bad number in attack {text:?}: {e}"))?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(format!("the number in attack {text:?} must be finite"))
            }
        };
        match (kind, value) {
            ("sign-flip", _) => Ok(Attack::SignFlip { scale: number()? }),
            ("scale", _) => Ok(Attack::Scale { factor: number()? }),
            ("scope-inflate", _) => Ok(Attack::ScopeInflate { factor: number()? }),
            ("scope-collapse", None) => Ok(Attack::ScopeCollapse),
            ("claim", Some(v)) => {
                let n_samples: u64 = v
                    .parse()
                    .map_err(|e| format!("bad count in attack {text:?}: {e}"))?;
                if n_samples == 0 {
                    return Err(format!("attack {text:?} claims no samples"));
                }
                Ok(Attack::Claim { n_samples })
            }
            _ => Err(format!("unknown attack {text:?}: {USAGE}")),
        }
    }
}

impl FromStr for Adversary {
    type Err = String;

    /// Attacks joined by `+`, applied in order.
    fn from_str(text: &str) -> Result<Self, String> {
        text.split('+')
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(Adversary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::local_round;
    use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
    use wsa::{HeadSpec, Init, Scope, TrainConfig};

    fn setup() -> (TrainingTask, ClientUpdate) {
        let problem = SyntheticProblem::new(SyntheticSpec::default(), 1).unwrap();
        let data = problem.sample(200, 2).unwrap();
        let spec = HeadSpec::mlp(data.dim(), &[8], data.classes());
        let task = TrainingTask {
            round: 0,
            global: Head::init(&spec, Init::Standard, 3).unwrap(),
            train: TrainConfig::default(),
        };
        let honest = local_round(&task, &data, 5).unwrap();
        (task, honest)
    }

    fn scopes_of(task: &TrainingTask, params: &[f32]) -> Vec<Scope> {
        Head::from_flat(task.global.spec(), params)
            .unwrap()
            .scopes(ScopeSelection::default(), wsa::DEFAULT_SCOPE_EPS)
            .unwrap()
    }

    #[test]
    fn step_attacks_rewrite_the_step_and_scope_what_they_send() {
        let (task, honest) = setup();
        let g = task.global.to_flat();
        for (attack, k) in [("sign-flip:3", -3.0f32), ("scale:10", 10.0)] {
            let adversary: Adversary = attack.parse().unwrap();
            assert_eq!(adversary.label(), attack);
            let mut sent = honest.clone();
            adversary.corrupt(&task, &mut sent).unwrap();
            for ((&s, &w), &g) in sent.params.iter().zip(&honest.params).zip(&g) {
                assert!((s - (g + k * (w - g))).abs() <= 1e-6 * s.abs().max(1.0));
            }
            assert_eq!(sent.scopes, scopes_of(&task, &sent.params), "{attack}");
            assert_ne!(sent.scopes, honest.scopes);
        }
    }

    #[test]
    fn scope_attacks_change_the_last_tensor_only_and_claims_change_the_count() {
        let (task, honest) = setup();
        let adversary: Adversary = "claim:10000000+scope-collapse".parse().unwrap();
        assert_eq!(adversary.claim(), Some(10_000_000));
        let mut sent = honest.clone();
        adversary.corrupt(&task, &mut sent).unwrap();
        assert_eq!(sent.metrics.n_samples, 10_000_000);
        assert_eq!(
            sent.scopes[0], honest.scopes[0],
            "the first tensor is honest"
        );
        assert!(sent.scopes[1].std < 1e-3, "the last tensor is flat: σ = √ε");
        assert!((sent.scopes[1].mean - honest.scopes[1].mean).abs() < 1e-6);
        let mut inflated = honest.clone();
        "scope-inflate:20"
            .parse::<Adversary>()
            .unwrap()
            .corrupt(&task, &mut inflated)
            .unwrap();
        let ratio = inflated.scopes[1].std / honest.scopes[1].std;
        assert!((ratio - 20.0).abs() < 1e-3, "{ratio}");
        assert_eq!(inflated.scopes, scopes_of(&task, &inflated.params));
        for bad in [
            "claim:0",
            "claim",
            "sign-flip",
            "scope-collapse:2",
            "x",
            "scale:inf",
        ] {
            assert!(bad.parse::<Adversary>().is_err(), "{bad}");
        }
    }
}
