//! Classifying images with a trained model folder ([`wsa::saved`]): the device's backbone
//! turns each image into features, the saved head into class probabilities. The backbone must
//! be one the model names (by sha256) and run at the model's side and preprocessing; a head
//! on another backbone's features would answer confidently and wrongly.

use std::path::Path;

use datasets::Image;
use wsa::saved::{Preprocessing, SavedModel, SavedModelError};

use crate::Backbone;
use crate::error::BackboneError;

/// Why a model cannot classify on this device.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The model folder is missing or damaged.
    #[error(transparent)]
    Model(#[from] SavedModelError),
    /// The backbone failed to load or run.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// The device's backbone is not one the model was trained with.
    #[error(
        "the model in {model} was trained on features of the backbone with sha256 {expected}; \
         {backbone} has sha256 {found}: use the backbone the run used (see model.json)"
    )]
    WrongBackbone {
        /// The model folder.
        model: String,
        /// The hashes the model names.
        expected: String,
        /// The backbone file given.
        backbone: String,
        /// Its hash.
        found: String,
    },
    /// The model asks for preprocessing this build does not do.
    #[error("the model in {model} needs preprocessing {id:?}; this client does {ours:?}")]
    Preprocessing {
        /// The model folder.
        model: String,
        /// What it names.
        id: String,
        /// What this build does.
        ours: String,
    },
    /// The head rejected the features (their width differs from its input).
    #[error("the head cannot read these features: {0}")]
    Head(#[from] wsa::Error),
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scored {
    /// The class's index in the model.
    pub index: usize,
    /// Its name.
    pub class: String,
    /// Softmax probability.
    pub probability: f32,
}

/// A loaded model and the backbone it runs on.
pub struct Predictor {
    model: SavedModel,
    backbone: Backbone,
}

impl Predictor {
    /// Loads the model folder `model_dir` and the backbone at `backbone_path` at the model's
    /// input side, refusing a backbone the model does not name. A model that names none is
    /// used with a warning.
    pub fn open(model_dir: &Path, backbone_path: &Path) -> Result<Self, PredictError> {
        let model = SavedModel::load(model_dir)?;
        let backbone = Backbone::load(backbone_path, model.card.backbone.side as usize)?;
        check_backbone(model_dir, &model, backbone_path, &backbone.sha256())?;
        Ok(Self { model, backbone })
    }

    /// The model being run.
    pub fn model(&self) -> &SavedModel {
        &self.model
    }

    /// The `top` most probable classes of each image, most probable first.
    pub fn classify(
        &self,
        images: &[Image],
        top: usize,
        threads: usize,
    ) -> Result<Vec<Vec<Scored>>, PredictError> {
        let features = self.backbone.extract(images, threads, false)?;
        let logits = self.model.head.logits(features.view())?;
        Ok(logits
            .rows()
            .into_iter()
            .map(|row| {
                let probabilities = softmax(row.as_slice().expect("logit rows are contiguous"));
                let mut order: Vec<usize> = (0..probabilities.len()).collect();
                order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
                order
                    .into_iter()
                    .take(top)
                    .map(|index| Scored {
                        index,
                        class: self.model.card.classes[index].clone(),
                        probability: probabilities[index],
                    })
                    .collect()
            })
            .collect())
    }
}

/// Whether `model` (read from `model_dir`) may run on the backbone file at `backbone_path`,
/// whose sha256 is given: the model must name it, and ask for the preprocessing this build
/// does. A model that names no backbone passes with a warning.
pub fn check_backbone(
    model_dir: &Path,
    model: &SavedModel,
    backbone_path: &Path,
    sha256: &[u8; 32],
) -> Result<(), PredictError> {
    let card = &model.card.backbone;
    let ours = Preprocessing::imagenet();
    if card.preprocessing != ours {
        return Err(PredictError::Preprocessing {
            model: model_dir.display().to_string(),
            id: card.preprocessing.id.clone(),
            ours: ours.id,
        });
    }
    let found = hex::encode(sha256);
    if card.sha256.is_empty() {
        tracing::warn!(
            model = %model_dir.display(),
            "the model names no backbone; using {} unchecked",
            backbone_path.display()
        );
    } else if !names_backbone(&card.sha256, &found) {
        return Err(PredictError::WrongBackbone {
            model: model_dir.display().to_string(),
            expected: card.sha256.join(" or "),
            backbone: backbone_path.display().to_string(),
            found,
        });
    }
    Ok(())
}

/// Whether a list of backbone hashes (a run's `[backbone]`, a model's card) names the one
/// with `sha256_hex`; an empty list names none and checks nothing.
pub fn names_backbone(listed: &[String], sha256_hex: &str) -> bool {
    listed.is_empty() || listed.iter().any(|h| h.eq_ignore_ascii_case(sha256_hex))
}

/// Probabilities from logits, shifted by the largest so that no exponential overflows.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&z| (z - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_matches_its_closed_form_and_survives_large_logits() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        let z: f32 = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (p, l) in p.iter().zip([1.0f32, 2.0, 3.0]) {
            assert!((p - l.exp() / z).abs() < 1e-6);
        }
        let p = softmax(&[1000.0, 0.0]);
        assert!(p.iter().all(|v| v.is_finite()) && (p[0] - 1.0).abs() < 1e-6);
    }
}
