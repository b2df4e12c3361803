//! Between the wire types and the `wsa` core's types. Wire → core conversions validate, since
//! the wire side is untrusted.

use wsa::{HeadSpec, Scope, ScopeSelection, Sgd, TrainConfig, WsaTerm};

use crate::message::{HeadShape, TrainSpec, WireScope, WsaSpec};

impl From<&HeadSpec> for HeadShape {
    fn from(spec: &HeadSpec) -> Self {
        Self {
            input: spec.input as u32,
            hidden: spec.hidden.iter().map(|&h| h as u32).collect(),
            classes: spec.classes as u32,
        }
    }
}

impl HeadShape {
    /// The core's head spec, validated.
    pub fn to_spec(&self) -> wsa::Result<HeadSpec> {
        let spec = HeadSpec {
            input: self.input as usize,
            hidden: self.hidden.iter().map(|&h| h as usize).collect(),
            classes: self.classes as usize,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<Scope> for WireScope {
    fn from(s: Scope) -> Self {
        Self {
            mean: s.mean,
            std: s.std,
        }
    }
}

impl WireScope {
    /// The core's scope, validated (finite, σ > 0).
    pub fn to_scope(self) -> wsa::Result<Scope> {
        Scope::new(self.mean, self.std)
    }

    /// Converts a list, validating each.
    pub fn to_scopes(scopes: &[WireScope]) -> wsa::Result<Vec<Scope>> {
        scopes.iter().map(|s| s.to_scope()).collect()
    }
}

impl From<&TrainConfig> for TrainSpec {
    fn from(c: &TrainConfig) -> Self {
        // A batch larger than the wire's u32 trains on the whole local set either way.
        Self {
            epochs: c.sgd.epochs,
            batch_size: u32::try_from(c.sgd.batch_size).unwrap_or(u32::MAX),
            lr: c.sgd.lr,
            momentum: c.sgd.momentum,
            weight_decay: c.sgd.weight_decay,
            seed: c.seed,
            prox_mu: c.prox_mu,
            wsa: c.wsa.as_ref().map(|w| WsaSpec {
                lambda: w.lambda,
                include_biases: w.selection.include_biases,
                eps: w.eps,
            }),
        }
    }
}

impl TrainSpec {
    /// The core's training config with the WSA `targets` of the task; `wsa::train` validates
    /// the numbers before it runs.
    pub fn to_config(&self, targets: &[WireScope]) -> wsa::Result<TrainConfig> {
        let wsa = match self.wsa {
            Some(w) => Some(WsaTerm {
                lambda: w.lambda,
                targets: WireScope::to_scopes(targets)?,
                selection: ScopeSelection {
                    include_biases: w.include_biases,
                },
                eps: w.eps,
            }),
            None => None,
        };
        Ok(TrainConfig {
            sgd: Sgd {
                epochs: self.epochs,
                batch_size: self.batch_size as usize,
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
            seed: self.seed,
            prox_mu: self.prox_mu,
            wsa,
        })
    }
}
