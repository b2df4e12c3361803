//! The client's side of one round, free of sockets.

use wsa::{Head, LabelledFeatures, Scope, TrainConfig, TrainMetrics};

/// What a client trains in one round: the aggregator's round task (the wire's
/// [`protocol::RoundTask`]) decoded and checked ([`TrainingTask::from_wire`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingTask {
    /// The round number.
    pub round: u64,
    /// The global head to start from (and the FedProx anchor).
    pub global: Head<f32>,
    /// Local training settings, with the strategy's FedProx or WSA term already set.
    pub train: TrainConfig,
}

/// What a client returns for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// The round the update answers.
    pub round: u64,
    /// The trained head's flat parameters.
    pub params: Vec<f32>,
    /// The trained head's scopes, one per scoped tensor.
    pub scopes: Vec<Scope>,
    /// Loss, accuracy, regularizer values and sample counts.
    pub metrics: TrainMetrics,
}

/// Trains the task's head on `data` and packages the result. `client_seed` decorrelates the
/// shuffles of clients that share a round seed.
pub fn local_round(
    task: &TrainingTask,
    data: &LabelledFeatures,
    client_seed: u64,
) -> wsa::Result<ClientUpdate> {
    let mut cfg = task.train.clone();
    cfg.seed = cfg.seed ^ client_seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ task.round;
    let outcome = wsa::train(&task.global, data, &cfg)?;
    Ok(ClientUpdate {
        round: task.round,
        params: outcome.head.to_flat(),
        scopes: outcome.scopes,
        metrics: outcome.metrics,
    })
}

/// A client that attacks the federation, for robustness experiments: it trains honestly, then
/// replaces its step `w − g` from the global head `g` before sending, and reports the scopes
/// of what it sends, so the aggregator's consistency checks pass and only the aggregation
/// rule stands between it and the global head.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Adversary {
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
}

impl std::fmt::Display for Adversary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Adversary::SignFlip { scale } => write!(f, "sign-flip:{scale}"),
            Adversary::Scale { factor } => write!(f, "scale:{factor}"),
        }
    }
}

impl std::str::FromStr for Adversary {
    type Err = String;

    /// `sign-flip:SCALE` or `scale:FACTOR`, with a finite number.
    fn from_str(text: &str) -> Result<Self, String> {
        let usage = "sign-flip:SCALE or scale:FACTOR";
        let (kind, value) = text
            .split_once(':')
            .ok_or_else(|| format!("bad attack {text:?}: {usage}"))?;
        let value: f32 = value
            .parse()
            .map_err(|e| format!("bad number in attack {text:?}: {e}"))?;
        if !value.is_finite() {
            return Err(format!("the number in attack {text:?} must be finite"));
        }
        match kind {
            "sign-flip" => Ok(Adversary::SignFlip { scale: value }),
            "scale" => Ok(Adversary::Scale { factor: value }),
            other => Err(format!("unknown attack {other:?}: {usage}")),
        }
    }
}

impl Adversary {
    /// A short name for tables: the grammar's spelling.
    pub fn label(&self) -> String {
        self.to_string()
    }

    /// Rewrites `update` (trained from `task`) into the attack, scopes included.
    pub fn corrupt(&self, task: &TrainingTask, update: &mut ClientUpdate) -> wsa::Result<()> {
        let k = match *self {
            Adversary::SignFlip { scale } => -scale,
            Adversary::Scale { factor } => factor,
        };
        let global = task.global.to_flat();
        for (w, g) in update.params.iter_mut().zip(&global) {
            *w = g + k * (*w - g);
        }
        let wsa_term = task.train.wsa.as_ref();
        let selection = wsa_term.map(|w| w.selection).unwrap_or_default();
        let eps = wsa_term.map_or(wsa::DEFAULT_SCOPE_EPS, |w| w.eps);
        update.scopes =
            Head::from_flat(task.global.spec(), &update.params)?.scopes(selection, eps)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
    use wsa::{HeadSpec, Init, ScopeSelection};

    #[test]
    fn an_adversary_rewrites_the_step_and_scopes_what_it_sends() {
        let problem = SyntheticProblem::new(SyntheticSpec::default(), 1).unwrap();
        let data = problem.sample(200, 2).unwrap();
        let spec = HeadSpec::mlp(data.dim(), &[8], data.classes());
        let task = TrainingTask {
            round: 0,
            global: Head::init(&spec, Init::Standard, 3).unwrap(),
            train: TrainConfig::default(),
        };
        let honest = local_round(&task, &data, 5).unwrap();
        let g = task.global.to_flat();
        for (attack, k) in [
            (Adversary::SignFlip { scale: 3.0 }, -3.0f32),
            (Adversary::Scale { factor: 10.0 }, 10.0),
        ] {
            let mut sent = honest.clone();
            attack.corrupt(&task, &mut sent).unwrap();
            for ((&s, &w), &g) in sent.params.iter().zip(&honest.params).zip(&g) {
                assert!((s - (g + k * (w - g))).abs() <= 1e-6 * s.abs().max(1.0));
            }
            let scopes = Head::from_flat(&spec, &sent.params)
                .unwrap()
                .scopes(ScopeSelection::default(), wsa::DEFAULT_SCOPE_EPS)
                .unwrap();
            assert_eq!(sent.scopes, scopes, "{}", attack.label());
            assert_eq!(attack.label().parse::<Adversary>().unwrap(), attack);
            assert_ne!(sent.scopes, honest.scopes);
        }
    }
}
