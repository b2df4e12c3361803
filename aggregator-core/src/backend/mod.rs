//! The compute seam for the heavy part of a round: measuring each candidate update (its
//! per-tensor scopes and its distance from the round's global head) and folding the accepted
//! ones into the next global head as the run's [`Aggregation`] rule's [`Plan`] says.
//!
//! A [`Backend`] is chosen at start-up and hands out one [`Accumulator`] per round. The
//! [`CpuBackend`] accumulates in f64 on every core and runs every plan; the CUDA backend (crate
//! `aggregator-cuda`) implements the same two traits and is tested against the CPU one.
//! Partial sums of the weighted-sum plans travel between backends (and between tiers of
//! aggregators) as a [`ParamSum`], so `merge` never needs to know which backend produced the
//! other side. The [`contract`] functions are the checks every backend makes the same way.

pub mod contract;
mod cpu;

use std::fmt::Debug;
use std::ops::Range;

use wsa::{HeadSpec, ParamSum, Scope, ScopeSelection};

pub use cpu::CpuBackend;

use crate::strategy::{Aggregation, Plan};

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
    /// The shape of `spec`'s flat vector ([`HeadSpec::flat_layout`]), with the tensors
    /// `selection` scopes.
    pub fn of_head(spec: &HeadSpec, selection: ScopeSelection, eps: f64) -> Self {
        Self {
            len: spec.param_count(),
            tensors: spec
                .scoped_tensors(selection)
                .iter()
                .map(|t| t.range())
                .collect(),
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
    staged: u64,
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

    /// A measurement whose candidate the backend keeps as its staged copy `ticket` (non-zero,
    /// unique among the backend's copies), so a fold with it need not upload it again.
    pub fn staged_as(self, ticket: u64) -> Self {
        Self {
            staged: ticket,
            ..self
        }
    }

    /// The staged copy this measurement names (0: none).
    pub fn staged(&self) -> u64 {
        self.staged
    }
}

/// Hands out accumulators. Object-safe, so the engine holds a `Arc<dyn Backend>` chosen at
/// start-up.
pub trait Backend: Send + Sync + Debug {
    /// A short name for logs and reports.
    fn name(&self) -> &'static str;

    /// Whether this backend can carry out `plan` (the CPU runs every plan; a device backend
    /// runs the column rules it has kernels for). A run checks this when it starts.
    fn supports(&self, plan: &Plan) -> bool {
        let _ = plan;
        true
    }

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
