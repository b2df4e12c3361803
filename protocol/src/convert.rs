//! Between the wire types and the `wsa` core's types. Wire → core conversions validate, since
//! the wire side is untrusted.

use wsa::{HeadSpec, Scope, ScopeSelection, Sgd, TrainConfig, WsaTerm};

use crate::encoding::{EncodedParams, Encoding, RowLayout};
use crate::message::{FinalModel, HeadShape, TrainSpec, WireScope, WsaSpec};

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
                tensor_lambdas: w.tensor_lambdas.clone(),
            }),
        }
    }
}

impl TrainSpec {
    /// The core's training config with the WSA `targets` of the task; `wsa::train` validates
    /// the numbers before it runs.
    pub fn to_config(&self, targets: &[WireScope]) -> wsa::Result<TrainConfig> {
        let wsa = match &self.wsa {
            Some(w) => Some(WsaTerm {
                lambda: w.lambda,
                targets: WireScope::to_scopes(targets)?,
                selection: ScopeSelection {
                    include_biases: w.include_biases,
                },
                eps: w.eps,
                tensor_lambdas: w.tensor_lambdas.clone(),
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

impl FinalModel {
    /// The wire form of a saved model, its parameters in f32.
    pub fn from_saved(model: &wsa::saved::SavedModel) -> Result<Self, crate::EncodingError> {
        let spec = model.head.spec();
        let card = &model.card;
        Ok(Self {
            run_id: card.provenance.run_id,
            rounds: card.provenance.rounds,
            strategy: card.provenance.strategy.clone(),
            shape: HeadShape::from(spec),
            params: EncodedParams::encode(
                &model.head.to_flat(),
                &RowLayout::of_head(spec),
                Encoding::F32,
            )?,
            classes: card.classes.clone(),
            backbone_sha256: card.backbone.sha256.clone(),
            side: card.backbone.side,
            preprocessing: card.backbone.preprocessing.id.clone(),
        })
    }

    /// The saved model this describes, checked: its shape, parameters, one class name per
    /// output, and a preprocessing recipe this build knows.
    pub fn to_saved(&self) -> Result<wsa::saved::SavedModel, String> {
        use wsa::saved::{BackboneCard, Preprocessing, Provenance, SavedModel};
        let spec = self.shape.to_spec().map_err(|e| format!("head: {e}"))?;
        let flat = self
            .params
            .decode(&RowLayout::of_head(&spec))
            .map_err(|e| format!("parameters: {e}"))?;
        let head = wsa::Head::from_flat(&spec, &flat).map_err(|e| format!("parameters: {e}"))?;
        if self.classes.len() != spec.classes {
            return Err(format!(
                "{} class names for a head of {} outputs",
                self.classes.len(),
                spec.classes
            ));
        }
        let preprocessing = Preprocessing::imagenet();
        if self.preprocessing != preprocessing.id {
            return Err(format!("unknown preprocessing {:?}", self.preprocessing));
        }
        Ok(SavedModel::new(
            head,
            self.classes.clone(),
            BackboneCard {
                sha256: self.backbone_sha256.clone(),
                side: self.side,
                preprocessing,
            },
            Provenance {
                run_id: self.run_id,
                rounds: self.rounds,
                strategy: self.strategy.clone(),
            },
        ))
    }
}
