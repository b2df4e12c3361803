//! A trained head in a folder other runtimes read: `head.safetensors` (the weights),
//! `labels.txt` (one class name per line) and `model.json` (what the head expects and
//! produces: its shape, classes, and the backbone and preprocessing its features come from).
//! `docs/model-format.md` describes the layout for readers in other languages.
//!
//! The safetensors file holds `layers.{i}.weight` as `[out, in]` and `layers.{i}.bias` as
//! `[out]`, f32 little-endian, layer 0 on the feature side: PyTorch's `nn.Linear` convention,
//! so the logits are `x·Wᵀ + b` with a ReLU between layers. Everything read is checked
//! (names, shapes, dtype, finiteness, the card against the weights), and a folder is replaced
//! whole or not at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::head::{Head, HeadSpec};

/// The format name in `model.json` and the safetensors metadata.
pub const MODEL_FORMAT: &str = "wsa-model-1";
/// The weights' file name.
pub const HEAD_FILE: &str = "head.safetensors";
/// The card's file name.
pub const CARD_FILE: &str = "model.json";
/// The class list's file name.
pub const LABELS_FILE: &str = "labels.txt";

/// The largest card or weights file read, so a hostile folder cannot exhaust memory.
const MAX_CARD_BYTES: u64 = 16 << 20;
const MAX_HEAD_BYTES: u64 = 1 << 30;

/// The backbone whose features a head was trained on, and how images become its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneCard {
    /// sha256 (hex) of each backbone file known to produce these features (the ONNX and its
    /// NNEF conversion, say); empty when the run did not name one, and nothing can be checked.
    pub sha256: Vec<String>,
    /// Square input side in pixels.
    pub side: u32,
    /// How an image becomes the backbone's input.
    pub preprocessing: Preprocessing,
}

/// Image to input: RGB (grey copied to three channels), a bilinear resize to `side × side`
/// with half-pixel centres and no antialiasing, scaled to [0, 1], `(x − mean) / std` per
/// channel, NCHW.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Names this recipe; a reader refuses one it does not know.
    pub id: String,
    /// Channel means, RGB.
    pub mean: [f32; 3],
    /// Channel stds, RGB.
    pub std: [f32; 3],
}

/// ImageNet channel means (RGB), as torchvision's MobileNetV2 was trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel stds (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Preprocessing {
    /// The recipe torchvision's ImageNet models were trained with, and what the edge client
    /// does.
    pub fn imagenet() -> Self {
        Self {
            id: "rgb-bilinear-imagenet-v1".into(),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The run's id.
    pub run_id: u64,
    /// Rounds the head was trained for.
    pub rounds: u64,
    /// The strategy's label (`wsa:10:mean-std+median`).
    pub strategy: String,
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// [`MODEL_FORMAT`].
    pub format: String,
    /// The head's widths.
    pub head: HeadSpec,
    /// Activation between layers.
    pub activation: String,
    /// The weights' file, relative to the folder.
    pub weights: String,
    /// Class names, by output index.
    pub classes: Vec<String>,
    /// The features' source.
    pub backbone: BackboneCard,
    /// Where the head came from.
    pub provenance: Provenance,
}

/// A head with what it needs to be used.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedModel {
    /// The weights.
    pub head: Head<f32>,
    /// The description.
    pub card: ModelCard,
}

/// Why a model folder cannot be written or read; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SavedModelError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not what the format says.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl SavedModelError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

impl SavedModel {
    /// A model of `head` with these classes, backbone and provenance.
    pub fn new(
        head: Head<f32>,
        classes: Vec<String>,
        backbone: BackboneCard,
        provenance: Provenance,
    ) -> Self {
        let card = ModelCard {
            format: MODEL_FORMAT.into(),
            head: head.spec().clone(),
            activation: "relu".into(),
            weights: HEAD_FILE.into(),
            classes,
            backbone,
            provenance,
        };
        Self { head, card }
    }

    /// Writes the folder `dir` whole: the files go to a sibling folder first, which then
    /// takes `dir`'s place, so a crash leaves the old model or the new one, never a mix.
    pub fn save(&self, dir: &Path) -> Result<(), SavedModelError> {
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| SavedModelError::io(parent, e))?;
        let name = dir
            .file_name()
            .ok_or_else(|| SavedModelError::invalid(dir, "not a folder name"))?
            .to_string_lossy();
        let staging = parent.join(format!(".{name}.new-{}", std::process::id()));
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(|e| SavedModelError::io(&staging, e))?;
        let write = |file: &str, bytes: &[u8]| {
            let path = staging.join(file);
            std::fs::write(&path, bytes).map_err(|e| SavedModelError::io(&path, e))
        };
        write(HEAD_FILE, &self.head_bytes(&staging)?)?;
        for (file, bytes) in self.card_files()? {
            write(file, &bytes)?;
        }
        for file in [HEAD_FILE, LABELS_FILE, CARD_FILE] {
            let path = staging.join(file);
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| SavedModelError::io(&path, e))?;
        }
        let had_old = dir.exists();
        if had_old {
            std::fs::rename(dir, &old).map_err(|e| SavedModelError::io(dir, e))?;
        }
        std::fs::rename(&staging, dir).map_err(|e| SavedModelError::io(dir, e))?;
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }

    /// `labels.txt` and `model.json` as they are saved: what a user of the head needs beside
    /// it (also packed into exported files).
    pub fn card_files(&self) -> Result<[(&'static str, Vec<u8>); 2], SavedModelError> {
        let card = serde_json::to_vec_pretty(&self.card)
            .map_err(|e| SavedModelError::invalid(Path::new(CARD_FILE), e.to_string()))?;
        Ok([
            (
                LABELS_FILE,
                (self.card.classes.join("\n") + "\n").into_bytes(),
            ),
            (CARD_FILE, card),
        ])
    }

    fn head_bytes(&self, dir: &Path) -> Result<Vec<u8>, SavedModelError> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, layer) in self.head.layers().iter().enumerate() {
            let (inputs, outputs) = layer.w.dim();
            let weight: Vec<u8> = layer.w.t().iter().flat_map(|v| v.to_le_bytes()).collect();
            let bias: Vec<u8> = layer.b.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("layers.{i}.weight"), vec![outputs, inputs], weight));
            tensors.push((format!("layers.{i}.bias"), vec![outputs], bias));
        }
        let views = tensors
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SavedModelError::invalid(&dir.join(HEAD_FILE), e.to_string()))?;
        let metadata = HashMap::from([("format".to_owned(), MODEL_FORMAT.to_owned())]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| SavedModelError::invalid(&dir.join(HEAD_FILE), e.to_string()))
    }

    /// Reads and checks the folder `dir`.
    pub fn load(dir: &Path) -> Result<Self, SavedModelError> {
        let card_path = dir.join(CARD_FILE);
        let card: ModelCard = serde_json::from_slice(&read_bounded(&card_path, MAX_CARD_BYTES)?)
            .map_err(|e| SavedModelError::invalid(&card_path, e.to_string()))?;
        let bad_card = |reason: String| Err(SavedModelError::invalid(&card_path, reason));
        if card.format != MODEL_FORMAT {
            return bad_card(format!(
                "format {:?}, this build reads {MODEL_FORMAT:?}",
                card.format
            ));
        }
        if let Err(e) = card.head.validate() {
            return bad_card(format!("head: {e}"));
        }
        if card.activation != "relu" {
            return bad_card(format!("activation {:?}: only relu", card.activation));
        }
        if card.classes.len() != card.head.classes {
            return bad_card(format!(
                "{} class names for a head of {} outputs",
                card.classes.len(),
                card.head.classes
            ));
        }
        let weights = Path::new(&card.weights);
        if weights.components().count() != 1 || weights.is_absolute() {
            return bad_card(format!(
                "weights {:?} must be a file in the model folder",
                card.weights
            ));
        }
        let head_path = dir.join(weights);
        let bytes = read_bounded(&head_path, MAX_HEAD_BYTES)?;
        let bad_head = |reason: String| SavedModelError::invalid(&head_path, reason);
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad_head(format!("not a safetensors file: {e}")))?;
        let layers = card.head.layer_dims();
        if file.len() != 2 * layers.len() {
            return Err(bad_head(format!(
                "{} tensors, the card's head has {}",
                file.len(),
                2 * layers.len()
            )));
        }
        let mut head = Head::<f32>::zeros(&card.head).map_err(|e| bad_head(e.to_string()))?;
        for (i, layer) in head.layers_mut().iter_mut().enumerate() {
            let (inputs, outputs) = layer.w.dim();
            let weight = read_tensor(&file, &format!("layers.{i}.weight"), &[outputs, inputs])
                .map_err(&bad_head)?;
            // Stored [out, in]; held [in, out].
            for (k, v) in weight.into_iter().enumerate() {
                layer.w[[k % inputs, k / inputs]] = v;
            }
            let bias =
                read_tensor(&file, &format!("layers.{i}.bias"), &[outputs]).map_err(&bad_head)?;
            layer.b.iter_mut().zip(bias).for_each(|(b, v)| *b = v);
        }
        Ok(Self { head, card })
    }
}

fn read_tensor(
    file: &safetensors::SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, String> {
    let view = file
        .tensor(name)
        .map_err(|_| format!("no tensor {name:?}"))?;
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(format!("{name} is {:?}, not F32", view.dtype()));
    }
    if view.shape() != shape {
        return Err(format!(
            "{name} has shape {:?}, the card's head needs {shape:?}",
            view.shape()
        ));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(format!("{name} holds non-finite values"));
    }
    Ok(values)
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, SavedModelError> {
    let len = std::fs::metadata(path)
        .map_err(|e| SavedModelError::io(path, e))?
        .len();
    if len > max {
        return Err(SavedModelError::invalid(
            path,
            format!("{len} bytes, more than the {max} a model file may have"),
        ));
    }
    std::fs::read(path).map_err(|e| SavedModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::Init;

    fn model() -> SavedModel {
        let spec = HeadSpec::mlp(5, &[4], 3);
        SavedModel::new(
            Head::init(&spec, Init::Standard, 7).unwrap(),
            vec!["cat".into(), "dog".into(), "fox".into()],
            BackboneCard {
                sha256: vec!["ab".repeat(32)],
                side: 96,
                preprocessing: Preprocessing::imagenet(),
            },
            Provenance {
                run_id: 1,
                rounds: 20,
                strategy: "wsa:10:mean-std".into(),
            },
        )
    }

    #[test]
    fn a_saved_model_loads_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        let saved = model();
        saved.save(&path).unwrap();
        assert_eq!(SavedModel::load(&path).unwrap(), saved);
        // Saving again replaces the folder whole, and leaves nothing else behind.
        saved.save(&path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let labels = std::fs::read_to_string(path.join(LABELS_FILE)).unwrap();
        assert_eq!(labels, "cat\ndog\nfox\n");
    }

    #[test]
    fn weights_are_stored_out_by_in() {
        let dir = tempfile::tempdir().unwrap();
        let saved = model();
        let path = dir.path().join("m");
        saved.save(&path).unwrap();
        let bytes = std::fs::read(path.join(HEAD_FILE)).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w0 = file.tensor("layers.0.weight").unwrap();
        assert_eq!(w0.shape(), [4, 5]);
        let first_row: Vec<f32> = w0.data()[..20]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let column: Vec<f32> = saved.head.layers()[0].w.column(0).to_vec();
        assert_eq!(first_row, column);
    }

    #[test]
    fn damaged_folders_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        model().save(&path).unwrap();
        let head = path.join(HEAD_FILE);
        let bytes = std::fs::read(&head).unwrap();
        std::fs::write(&head, &bytes[..bytes.len() - 7]).unwrap();
        let err = SavedModel::load(&path).unwrap_err().to_string();
        assert!(err.contains(HEAD_FILE), "{err}");

        model().save(&path).unwrap();
        let card = path.join(CARD_FILE);
        let text = std::fs::read_to_string(&card).unwrap();
        std::fs::write(&card, text.replace("\"fox\"", "\"fox\", \"owl\"")).unwrap();
        let err = SavedModel::load(&path).unwrap_err().to_string();
        assert!(err.contains("4 class names for a head of 3"), "{err}");

        std::fs::write(&card, text.replace(HEAD_FILE, "../../etc/passwd")).unwrap();
        let err = SavedModel::load(&path).unwrap_err().to_string();
        assert!(err.contains("must be a file in the model folder"), "{err}");
    }
}
