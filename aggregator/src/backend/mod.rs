//! The compute seam for the heavy part of a round: measuring each candidate update (its
//! per-tensor scopes and its distance from the round's global head) and folding the accepted
//! ones into the next global head with the run's [`Aggregation`] rule.
//!
//! A [`Backend`] is chosen at start-up ([`open_backend`]) and hands out one [`Accumulator`]
//! per round. The [`CpuBackend`] accumulates in f64 on every core; the CUDA backend (cargo
//! feature `cuda`) implements the same two traits and is tested against the CPU one. Partial
//! sums of the mean rules travel between backends (and between tiers of aggregators) as a
//! [`ParamSum`], so `merge` never needs to know which backend produced the other side.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod robust;

use std::fmt::Debug;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use wsa::{HeadSpec, ParamSum, Scope, ScopeSelection};

pub use cpu::CpuBackend;
pub use robust::{column_median, column_trimmed_mean};

/// What a backend can refuse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// A length, weight or value check of the core failed (the same checks on every backend).
    #[error(transparent)]
    Core(#[from] wsa::Error),
    /// A bound of the accumulator was reached (candidates stored, bytes of device memory).
    #[error("capacity: {0}")]
    Capacity(String),
    /// The operation does not exist for this aggregation rule (a median has no partial sum).
    #[error("{op} is not defined for the {rule} aggregation")]
    Unsupported {
        /// The operation asked for.
        op: &'static str,
        /// The rule's label.
        rule: String,
    },
    /// The compute device failed (never produced by the CPU backend).
    #[error("compute device: {0}")]
    Device(String),
}

/// How the accepted updates of a round become the next global parameters.
///
/// `Mean` and `NormClipped` fold each update as it arrives into an f64 sum and weight clients
/// by the run's [`wsa::Weighting`]. `TrimmedMean` and `Median` are coordinate-wise and need
/// every update at once: the accumulator stores them (at most the round's selection, see
/// [`Backend::accumulator`]) and ignores the weights, so a client cannot buy influence over a
/// robust rule by claiming more samples.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Aggregation {
    /// The weighted mean `Σ p·w / Σ p` (FedAvg's average).
    #[default]
    Mean,
    /// The weighted mean of the updates with each one's step `w − g` from the round's global
    /// head `g` scaled down to at most `max_norm` (L2) first.
    NormClipped {
        /// The largest step kept, in parameter units.
        max_norm: f64,
    },
    /// Per coordinate: drop the `⌊trim·n⌋` smallest and largest values, average the rest.
    TrimmedMean {
        /// The fraction cut from each end, in `[0, 0.5)`.
        trim: f64,
    },
    /// Per coordinate: the median (the mean of the two middle values for an even count).
    Median,
}

impl Aggregation {
    /// A short name for tables and file names.
    pub fn label(&self) -> String {
        match self {
            Aggregation::Mean => "mean".into(),
            Aggregation::NormClipped { max_norm } => format!("clip({max_norm})"),
            Aggregation::TrimmedMean { trim } => format!("trimmed({trim})"),
            Aggregation::Median => "median".into(),
        }
    }

    /// Checks the rule's parameter against its domain.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Aggregation::NormClipped { max_norm } if !(max_norm.is_finite() && max_norm > 0.0) => {
                Err(format!(
                    "norm clipping needs a finite max_norm > 0, got {max_norm}"
                ))
            }
            Aggregation::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                Err(format!("trimmed mean needs trim in [0, 0.5), got {trim}"))
            }
            _ => Ok(()),
        }
    }

    /// Whether the rule needs every update at once (and stores them).
    pub fn stores_updates(&self) -> bool {
        matches!(self, Aggregation::TrimmedMean { .. } | Aggregation::Median)
    }

    /// Values cut from each end of a coordinate's `n` values: `⌊trim·n⌋`, at most `(n−1)/2`
    /// so at least one value is left.
    pub fn trimmed_per_end(trim: f64, n: usize) -> usize {
        ((trim * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
    }
}

impl FromStr for Aggregation {
    type Err = String;

    /// `mean`, `clip:MAX_NORM`, `trimmed:TRIM` or `median`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, arg) = match text.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (text, None),
        };
        let number = |what: &str| -> Result<f64, String> {
            arg.ok_or_else(|| format!("{name} needs {what}: {name}:{what}"))?
                .parse()
                .map_err(|e| format!("bad {what} in {text:?}: {e}"))
        };
        let rule = match (name, arg) {
            ("mean", None) => Aggregation::Mean,
            ("median", None) => Aggregation::Median,
            ("clip", _) => Aggregation::NormClipped {
                max_norm: number("MAX_NORM")?,
            },
            ("trimmed", _) => Aggregation::TrimmedMean {
                trim: number("TRIM")?,
            },
            _ => {
                return Err(format!(
                    "unknown aggregation {text:?}: mean, clip:MAX_NORM, trimmed:TRIM or median"
                ));
            }
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// Where a head's scoped tensors lie in its flat parameter vector.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldShape {
    /// Parameters per vector.
    pub len: usize,
    /// The scoped tensors, in the head's tensor order (the order of the scopes on the wire):
    /// non-empty, ascending and disjoint.
    pub tensors: Vec<Range<usize>>,
    /// ε in `σ = sqrt(var + ε)`.
    pub eps: f64,
}

impl FoldShape {
    /// The shape of `spec`'s flat vector (per layer `W [in, out]` row-major, then `b`; see
    /// `wsa::Head::to_flat`), with the tensors `selection` scopes.
    pub fn of_head(spec: &HeadSpec, selection: ScopeSelection, eps: f64) -> Self {
        let mut tensors = Vec::with_capacity(spec.scoped_tensor_count(selection));
        let mut offset = 0;
        for (i, o) in spec.layer_dims() {
            tensors.push(offset..offset + i * o);
            offset += i * o;
            if selection.include_biases {
                tensors.push(offset..offset + o);
            }
            offset += o;
        }
        Self {
            len: offset,
            tensors,
            eps,
        }
    }

    /// Checks the tensors (non-empty, ascending, disjoint, inside `len`), `eps` (finite,
    /// ≥ 0) and that `reference` has `len` values. Every backend calls this first.
    pub fn check(&self, reference: &[f32]) -> Result<(), BackendError> {
        if reference.len() != self.len {
            return Err(wsa::Error::ShapeMismatch {
                what: "reference parameters",
                expected: self.len,
                found: reference.len(),
            }
            .into());
        }
        let mut end = 0;
        for t in &self.tensors {
            if t.is_empty() || t.start < end || t.end > self.len {
                return Err(wsa::Error::InvalidConfig(format!(
                    "scoped tensors must be non-empty, in order, disjoint and inside {} \
                     parameters; got {:?}",
                    self.len, self.tensors
                ))
                .into());
            }
            end = t.end;
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(wsa::Error::InvalidConfig(format!(
                "scope eps must be finite and >= 0, got {}",
                self.eps
            ))
            .into());
        }
        Ok(())
    }
}

/// What [`Accumulator::measure`] finds in a candidate vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The scope of every scoped tensor. Not validated: σ is 0 for a constant tensor when
    /// ε = 0, and the caller decides what that means.
    pub scopes: Vec<Scope>,
    /// `‖w − reference‖₂` over all parameters.
    pub distance: f64,
    /// Which staged copy of the candidate this measurement belongs to, for backends that keep
    /// the measured vector on a device (0: none kept).
    pub(crate) staged: u64,
}

impl Measurement {
    /// A measurement that names no staged copy.
    pub fn new(scopes: Vec<Scope>, distance: f64) -> Self {
        Self {
            scopes,
            distance,
            staged: 0,
        }
    }
}

/// Hands out accumulators. Object-safe, so the engine holds a `Arc<dyn Backend>` chosen at
/// start-up.
pub trait Backend: Send + Sync + Debug {
    /// A short name for logs and reports.
    fn name(&self) -> &'static str;

    /// An empty accumulator for vectors of `shape` under `aggregation`, measuring distances
    /// from (and clipping toward) `reference`, the round's global parameters. `capacity` is
    /// the most updates it will be given (the round's selection): rules that store updates
    /// refuse to start when `capacity · shape.len` floats do not fit their bound, and refuse
    /// an update beyond `capacity`.
    fn accumulator(
        &self,
        shape: &FoldShape,
        reference: &[f32],
        aggregation: Aggregation,
        capacity: usize,
    ) -> Result<Box<dyn Accumulator>, BackendError>;
}

/// One round's accepted parameter vectors, folded under one [`Aggregation`].
///
/// `measure` never changes the fold, and `add` either folds the whole vector or, on error,
/// nothing, so a rejected update leaves the round as it was.
pub trait Accumulator: Send + Debug {
    /// Checks `w` (length, every value finite) and measures it without folding it. A
    /// non-finite value is `BackendError::Core(wsa::Error::NonFinite { .. })`.
    fn measure(&mut self, w: &[f32]) -> Result<Measurement, BackendError>;

    /// Folds `w` with weight `p` (finite, ≥ 0). With `measured`, the result of
    /// [`Accumulator::measure`] on this same, unchanged `w`, the backend skips the checks
    /// measure made and reuses what it kept (the distance for clipping, a device copy);
    /// without it, `w` is checked first.
    fn add(
        &mut self,
        w: &[f32],
        p: f64,
        measured: Option<&Measurement>,
    ) -> Result<(), BackendError>;

    /// Folds several vectors at once, as `add` would one after another (`measured`: one
    /// measurement per vector, as for `add`), faster where the backend can share passes over
    /// the sum. All or nothing: every vector is checked before any is folded.
    fn add_batch(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
    ) -> Result<(), BackendError>;

    /// Folds in a partial sum from elsewhere (another accumulator, another aggregator): the
    /// mean rules only.
    fn merge(&mut self, partial: &ParamSum) -> Result<(), BackendError>;

    /// The sum so far in the portable form: the mean rules only.
    fn partial(&self) -> Result<ParamSum, BackendError>;

    /// Updates folded so far.
    fn count(&self) -> usize;

    /// `Σ p` so far.
    fn total_weight(&self) -> f64;

    /// The aggregate, rounded to f32: the (clipped) weighted mean, the trimmed mean or the
    /// median. An error while nothing (or, for the means, only weight 0) was folded.
    fn finish(&mut self) -> Result<Vec<f32>, BackendError>;
}

/// Which backend `--backend` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// CUDA when the build has it and a driver and a device answer; else the CPU.
    #[default]
    Auto,
    /// The CPU, always.
    Cpu,
    /// CUDA or an error.
    Cuda,
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            _ => Err(format!("unknown backend {text:?}: auto, cpu or cuda")),
        }
    }
}

/// Opens the backend `choice` names. `Auto` never fails: without CUDA (not built in, no
/// driver library, no device, or a failing one) it logs why and returns the CPU backend.
/// The CUDA probe loads the driver library itself before any CUDA call, since cudarc's lazy
/// loader panics when the library is missing.
pub fn open_backend(choice: BackendChoice) -> Result<Arc<dyn Backend>, BackendError> {
    match choice {
        BackendChoice::Cpu => Ok(Arc::new(CpuBackend::default())),
        BackendChoice::Cuda => open_cuda(),
        BackendChoice::Auto => match open_cuda() {
            Ok(b) => {
                info!(backend = b.name(), "compute backend");
                Ok(b)
            }
            Err(e) => {
                let cpu = CpuBackend::default();
                warn!(reason = %e, threads = cpu.threads(), "no CUDA backend; folding on the CPU");
                Ok(Arc::new(cpu))
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(cuda::CudaBackend::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::Device(
        "this build has no CUDA backend (cargo feature `cuda`)".into(),
    ))
}

/// What every backend checks before it hands out an accumulator: the shape against the
/// reference, the rule's parameter.
pub(crate) fn check_request(
    shape: &FoldShape,
    reference: &[f32],
    aggregation: Aggregation,
) -> Result<(), BackendError> {
    shape.check(reference)?;
    aggregation.validate().map_err(wsa::Error::InvalidConfig)?;
    Ok(())
}

/// A fold weight: finite and ≥ 0 (the core's rule and error).
pub(crate) fn check_weight(p: f64) -> Result<(), BackendError> {
    if p.is_finite() && p >= 0.0 {
        Ok(())
    } else {
        Err(wsa::Error::ZeroTotalWeight { total: p }.into())
    }
}

/// A batch's weights (and measurements) are one per vector.
pub(crate) fn check_batch(
    ws: &[&[f32]],
    ps: &[f64],
    measured: Option<&[Measurement]>,
) -> Result<(), BackendError> {
    let found = match measured {
        _ if ps.len() != ws.len() => ps.len(),
        Some(m) => m.len(),
        None => ws.len(),
    };
    if found != ws.len() {
        return Err(wsa::Error::ShapeMismatch {
            what: "weights and measurements of a batch",
            expected: ws.len(),
            found,
        }
        .into());
    }
    Ok(())
}

/// A candidate's length against the shape's.
pub(crate) fn check_len(expected: usize, w: &[f32]) -> Result<(), BackendError> {
    if w.len() == expected {
        Ok(())
    } else {
        Err(wsa::Error::ShapeMismatch {
            what: "parameter vector",
            expected,
            found: w.len(),
        }
        .into())
    }
}

/// What `finish` says when a storing rule has nothing stored.
pub(crate) fn nothing_to_aggregate() -> BackendError {
    wsa::Error::Empty { what: "updates" }.into()
}

/// `1 / Σp` for the mean rules' finish, refusing a total that is not > 0 as the core does.
pub(crate) fn inverse_total(total: f64) -> Result<f64, BackendError> {
    if total.is_finite() && total > 0.0 {
        Ok(1.0 / total)
    } else {
        Err(wsa::Error::ZeroTotalWeight { total }.into())
    }
}

/// The factor a clipped step is scaled by: `min(1, max_norm / distance)`.
pub(crate) fn clip_factor(max_norm: f64, distance: f64) -> f64 {
    if distance > max_norm {
        max_norm / distance
    } else {
        1.0
    }
}
