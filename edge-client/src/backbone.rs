//! The frozen feature extractor: MobileNetV2 run with tract. Everything tract-specific lives in
//! this file, so an API change in tract touches nothing else.
//!
//! Two formats load: the features ONNX (with the `onnx` feature, on by default) and tract's
//! NNEF archive converted from it offline by [`convert_onnx_to_nnef`]. The NNEF reader is a
//! fraction of the ONNX front end's code (no protobuf, no inference rules), so the ARM builds
//! ship without `onnx` and load the NNEF; the features are the same (tests/nnef.rs).
//!
//! The input shape is fixed to `[1, 3, side, side]` when the model is loaded: tract plans a
//! fixed shape far better than a symbolic batch (4–6× faster measured), and batching gains
//! nothing per image on CPU. Throughput comes from threads instead: one optimized plan is
//! shared, and every worker thread runs its own state over different images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datasets::Image;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, ArrayView1, Axis};
use sha2::{Digest, Sha256};
use tract_nnef::prelude::*;
use tract_nnef::tract_core::transform::get_transform;

use crate::error::BackboneError;
use crate::preprocess::preprocess_into;

/// The input sides the backbone accepts (MobileNetV2 downsamples by 32; below 32 the last
/// feature map would vanish).
pub const INPUT_SIDES: std::ops::RangeInclusive<usize> = 32..=1024;

/// The symbol an NNEF backbone's input side is stored as; bound to the side at load time.
const SIDE_SYMBOL: &str = "side";

/// A loaded, optimized backbone for one input side.
pub struct Backbone {
    plan: Arc<TypedSimplePlan>,
    path: PathBuf,
    side: usize,
    dim: usize,
    sha256: [u8; 32],
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone")
            .field("path", &self.path)
            .field("side", &self.side)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl Backbone {
    /// Loads the backbone at `path` (the features ONNX, or its NNEF archive, told apart by
    /// content) for `side × side` inputs and probes its output width.
    pub fn load(path: &Path, side: usize) -> Result<Self, BackboneError> {
        if !INPUT_SIDES.contains(&side) {
            return Err(BackboneError::BadInputSide {
                side,
                min: *INPUT_SIDES.start(),
                max: *INPUT_SIDES.end(),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| BackboneError::Io {
            path: path.to_owned(),
            source,
        })?;
        let sha256 = Sha256::digest(&bytes).into();
        let model_err = |e: TractError| BackboneError::Model {
            path: path.to_owned(),
            message: format!("{e:#}"),
        };
        let typed = if is_nnef_archive(&bytes) {
            nnef_for_side(&bytes, side).map_err(model_err)?
        } else {
            onnx_for_side(path, &bytes, side)?
        };
        let plan = optimize(typed).map_err(model_err)?;
        let mut backbone = Self {
            plan,
            path: path.to_owned(),
            side,
            dim: 0,
            sha256,
        };
        let mut state = backbone.state()?;
        backbone.dim = backbone.run(&mut state, &vec![0.0; 3 * side * side])?.len();
        Ok(backbone)
    }

    /// The input side.
    pub fn side(&self) -> usize {
        self.side
    }

    /// Width of a feature vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// sha256 of the model file, for cache headers.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// The same, in hex: how run configs and model folders name a backbone.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    fn state(&self) -> Result<TypedSimpleState, BackboneError> {
        TypedSimpleState::new(&self.plan).map_err(|e| self.model_error(e))
    }

    fn model_error(&self, e: TractError) -> BackboneError {
        BackboneError::Model {
            path: self.path.clone(),
            message: format!("{e:#}"),
        }
    }

    /// Features of one preprocessed `3 × side × side` NCHW input.
    fn run(&self, state: &mut TypedSimpleState, input: &[f32]) -> Result<Vec<f32>, BackboneError> {
        let tensor = Tensor::from_shape(&[1, 3, self.side, self.side], input)
            .map_err(|e| self.model_error(e))?;
        let outputs = state
            .run(std::iter::once(tensor.into_tvalue()).collect())
            .map_err(|e| self.model_error(e))?;
        let view = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| self.model_error(e))?;
        if view.ndim() != 2 || view.shape()[0] != 1 {
            return Err(BackboneError::UnexpectedOutput {
                path: self.path.clone(),
                shape: view.shape().to_vec(),
            });
        }
        Ok(view.iter().copied().collect())
    }

    /// Features of already-preprocessed inputs (`n × 3·side²` floats, NCHW per input) on
    /// `threads` worker threads.
    pub fn features_of_inputs(
        &self,
        inputs: &[f32],
        threads: usize,
    ) -> Result<Array2<f32>, BackboneError> {
        let per = 3 * self.side * self.side;
        if !inputs.len().is_multiple_of(per) {
            return Err(BackboneError::InvalidImage {
                reason: format!(
                    "{} floats is not a whole number of {per}-float inputs",
                    inputs.len()
                ),
            });
        }
        self.run_parallel(
            inputs.len() / per,
            threads,
            ProgressBar::hidden(),
            |i, input| {
                input.copy_from_slice(&inputs[i * per..(i + 1) * per]);
                Ok(())
            },
        )
    }

    /// Preprocesses and embeds `images` on `threads` worker threads, one tract state each,
    /// with a progress bar when `progress` is set. Row `i` of the result belongs to image `i`.
    pub fn extract(
        &self,
        images: &[Image],
        threads: usize,
        progress: bool,
    ) -> Result<Array2<f32>, BackboneError> {
        let bar = if progress {
            ProgressBar::new(images.len() as u64).with_style(
                ProgressStyle::with_template(
                    "features {wide_bar} {pos}/{len} images ({per_sec}, {eta} left)",
                )
                .expect("static template"),
            )
        } else {
            ProgressBar::hidden()
        };
        let result = self.run_parallel(images.len(), threads, bar.clone(), |i, input| {
            preprocess_into(&images[i], self.side, input)
        });
        bar.finish_and_clear();
        result
    }

    /// Runs `n` inputs, each written by `fill(i, buffer)`, over `threads` workers.
    fn run_parallel(
        &self,
        n: usize,
        threads: usize,
        bar: ProgressBar,
        fill: impl Fn(usize, &mut [f32]) -> Result<(), BackboneError> + Sync,
    ) -> Result<Array2<f32>, BackboneError> {
        let mut out = Array2::zeros((n, self.dim));
        let chunk = n.div_ceil(threads.clamp(1, n.max(1))).max(1);
        // A static split: inputs of one data set cost the same, and each worker writes
        // straight into its own rows of the result, so nothing is held twice.
        let results: Vec<Result<(), BackboneError>> = std::thread::scope(|s| {
            let workers: Vec<_> = out
                .axis_chunks_iter_mut(Axis(0), chunk)
                .enumerate()
                .map(|(c, mut rows)| {
                    let (bar, fill) = (&bar, &fill);
                    s.spawn(move || {
                        let mut state = self.state()?;
                        let mut input = vec![0.0; 3 * self.side * self.side];
                        for (k, mut row) in rows.rows_mut().into_iter().enumerate() {
                            fill(c * chunk + k, &mut input)?;
                            row.assign(&ArrayView1::from(&self.run(&mut state, &input)?[..]));
                            bar.inc(1);
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("feature worker panicked"))
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(out)
    }
}

/// NNEF archives are tar files, plain or gzipped (ONNX is a protobuf, which starts with neither).
fn is_nnef_archive(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b]) || bytes.get(257..262) == Some(b"ustar".as_slice())
}

/// Reads the NNEF archive and binds its symbolic side.
fn nnef_for_side(bytes: &[u8], side: usize) -> TractResult<TypedModel> {
    let model = tract_nnef::nnef().model_for_read(&mut &*bytes)?;
    let symbol = model.sym(SIDE_SYMBOL);
    let side = TDim::Val(side as i64);
    model.set_symbols(&[(symbol, side)].into_iter().collect())
}

#[cfg(feature = "onnx")]
fn onnx_for_side(path: &Path, bytes: &[u8], side: usize) -> Result<TypedModel, BackboneError> {
    use tract_onnx::prelude::*;
    tract_onnx::onnx()
        .model_for_read(&mut &*bytes)
        .and_then(|m| m.with_input_fact(0, f32::fact([1, 3, side, side]).into()))
        .and_then(|m| m.into_typed())
        .map_err(|e| BackboneError::Model {
            path: path.to_owned(),
            message: format!("{e:#}"),
        })
}

#[cfg(not(feature = "onnx"))]
fn onnx_for_side(path: &Path, _: &[u8], _: usize) -> Result<TypedModel, BackboneError> {
    Err(BackboneError::Model {
        path: path.to_owned(),
        message: "not an NNEF archive, and this build reads NNEF only (built without the \
                  `onnx` feature); convert the ONNX with `edge-client convert-model` on a \
                  full build"
            .into(),
    })
}

/// The plan both formats end in.
fn optimize(mut model: TypedModel) -> TractResult<Arc<TypedSimplePlan>> {
    // ONNX convs are NCHW, where tract's depthwise kernel walks one plane at a time;
    // channel-last it vectorises over channels. Measured at 96²: depthwise convs 3.2× faster,
    // the whole image ~23% faster, same features.
    let nhwc = get_transform("conv_nhwc")?
        .ok_or_else(|| anyhow::anyhow!("tract has no conv_nhwc transform"))?;
    model.transform(&*nhwc)?;
    model.into_optimized()?.into_runnable()
}

/// Converts the features ONNX at `onnx_path` into an NNEF archive (gzipped tar) at `out`, with the
/// input side left symbolic so one archive serves every side. The graph is stored decluttered
/// and before the layout transform, the same graph the ONNX path hands to [`optimize`].
#[cfg(feature = "onnx")]
pub fn convert_onnx_to_nnef(onnx_path: &Path, out: &Path) -> Result<(), BackboneError> {
    let bytes = std::fs::read(onnx_path).map_err(|source| BackboneError::Io {
        path: onnx_path.to_owned(),
        source,
    })?;
    write_nnef(onnx_path, &bytes, out, &[])
}

/// Writes the ONNX model `bytes` (read from `source`, named in errors) as an NNEF archive at
/// `out` as [`convert_onnx_to_nnef`] does, with `extra` files (name, contents) beside the graph:
/// NNEF readers skip files they do not know.
#[cfg(feature = "onnx")]
pub(crate) fn write_nnef(
    source: &Path,
    bytes: &[u8],
    out: &Path,
    extra: &[(&str, &[u8])],
) -> Result<(), BackboneError> {
    use tract_onnx::prelude::*;
    let model_err = |e: TractError| BackboneError::Model {
        path: source.to_owned(),
        message: format!("{e:#}"),
    };
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut &*bytes)
        .map_err(model_err)?;
    let side = model.symbols.sym(SIDE_SYMBOL);
    let typed = model
        .set_input_fact(
            0,
            f32::fact(tract_onnx::tract_core::dims!(1, 3, side.clone(), side)).into(),
        )
        .and_then(|()| model.into_typed())
        .and_then(|m| m.into_decluttered())
        .map_err(model_err)?;
    // Deterministic: the same model gives the same archive, whose sha256 names it.
    let graph = tract_nnef::nnef()
        .write_to_tar_with_config(&typed, Vec::new(), false, true)
        .map_err(model_err)?;
    let io_err = |source| BackboneError::Io {
        path: out.to_owned(),
        source,
    };
    // Atomically: a converter stopped half-way leaves no truncated archive behind.
    let file = support::fs::AtomicFile::create(out).map_err(io_err)?;
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::best(),
    ));
    let copied = (|| {
        let mut mtime = 0;
        // Raw: a long file name's own GNU entry is copied as it is, not cut to 100 bytes.
        for entry in tar::Archive::new(graph.as_slice()).entries()?.raw(true) {
            let mut entry = entry?;
            let header = entry.header().clone();
            mtime = header.mtime()?;
            archive.append(&header, &mut entry)?;
        }
        for (name, contents) in extra {
            let mut header = tar::Header::new_gnu();
            header.set_path(name)?;
            header.set_size(contents.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(mtime);
            header.set_cksum();
            archive.append(&header, *contents)?;
        }
        archive.into_inner()?.finish()
    })();
    copied.and_then(|f| f.commit()).map_err(io_err)
}
