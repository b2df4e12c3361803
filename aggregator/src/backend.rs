//! The compute seam for the heavy part of a round: folding client parameter vectors into a
//! weighted sum as they arrive, and measuring each candidate (its per-tensor scopes and its
//! distance from the round's global head) before it is folded.
//!
//! A [`Backend`] is chosen at start-up and hands out one [`Accumulator`] per round. The
//! [`CpuBackend`] here is the reference: it accumulates in f64 through [`wsa::ParamSum`] and
//! measures scopes with the same formula as [`wsa::Scope::of`]. A GPU backend implements the
//! same two traits and is tested against this one. Partial sums travel between backends (and
//! between tiers of aggregators) as a [`ParamSum`], so `merge` never needs to know which
//! backend produced the other side.

use std::fmt::Debug;
use std::ops::Range;

use wsa::{HeadSpec, ParamSum, Scope, ScopeSelection};

/// What a backend can refuse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// A length, weight or value check of the core failed (the same checks on every backend).
    #[error(transparent)]
    Core(#[from] wsa::Error),
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
}

/// What [`Accumulator::measure`] finds in a candidate vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The scope of every scoped tensor. Not validated: σ is 0 for a constant tensor when
    /// ε = 0, and the caller decides what that means.
    pub scopes: Vec<Scope>,
    /// `‖w − reference‖₂` over all parameters.
    pub distance: f64,
}

/// Hands out accumulators. Object-safe, so the engine holds a `Box<dyn Backend>` chosen at
/// start-up.
pub trait Backend: Send + Sync + Debug {
    /// A short name for logs and reports.
    fn name(&self) -> &'static str;

    /// An empty accumulator for vectors of `shape`, measuring distances from `reference` (the
    /// round's global parameters, `shape.len` of them).
    fn accumulator(
        &self,
        shape: &FoldShape,
        reference: &[f32],
    ) -> Result<Box<dyn Accumulator>, BackendError>;
}

/// A running `Σ p` and `Σ p·w` over one round's accepted parameter vectors.
///
/// `measure` never changes the sum, and `add` either folds the whole vector or, on error,
/// nothing, so a rejected update leaves the round as it was.
pub trait Accumulator: Send + Debug {
    /// Checks `w` (length, every value finite) and measures it without folding it. A
    /// non-finite value is `BackendError::Core(wsa::Error::NonFinite { .. })`.
    fn measure(&mut self, w: &[f32]) -> Result<Measurement, BackendError>;

    /// Adds `p·w` (`p` finite and ≥ 0; `w` finite).
    fn add(&mut self, w: &[f32], p: f64) -> Result<(), BackendError>;

    /// Folds in a partial sum from elsewhere (another accumulator, another aggregator).
    fn merge(&mut self, partial: &ParamSum) -> Result<(), BackendError>;

    /// The sum so far in the portable form.
    fn partial(&self) -> Result<ParamSum, BackendError>;

    /// `Σ p` so far.
    fn total_weight(&self) -> f64;

    /// The weighted mean `Σ p·w / Σ p`, rounded to f32; an error while `Σ p` is 0.
    fn finish(&self) -> Result<Vec<f32>, BackendError>;
}

/// The reference backend: f64 accumulation on the CPU, one thread. Measurements sum in f32
/// blocks flushed into f64 (see `segment_sums`): they feed checks with tolerances, not the fold.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn accumulator(
        &self,
        shape: &FoldShape,
        reference: &[f32],
    ) -> Result<Box<dyn Accumulator>, BackendError> {
        if reference.len() != shape.len {
            return Err(wsa::Error::ShapeMismatch {
                what: "reference parameters",
                expected: shape.len,
                found: reference.len(),
            }
            .into());
        }
        let mut end = 0;
        for t in &shape.tensors {
            if t.is_empty() || t.start < end || t.end > shape.len {
                return Err(wsa::Error::InvalidConfig(format!(
                    "scoped tensors must be non-empty, in order, disjoint and inside {} \
                     parameters; got {:?}",
                    shape.len, shape.tensors
                ))
                .into());
            }
            end = t.end;
        }
        Ok(Box::new(CpuAccumulator {
            shape: shape.clone(),
            reference: reference.to_vec(),
            sum: ParamSum::new(shape.len),
        }))
    }
}

/// The CPU accumulator: a [`ParamSum`] plus the round's reference vector.
#[derive(Debug, Clone)]
struct CpuAccumulator {
    shape: FoldShape,
    reference: Vec<f32>,
    sum: ParamSum,
}

impl Accumulator for CpuAccumulator {
    fn measure(&mut self, w: &[f32]) -> Result<Measurement, BackendError> {
        if w.len() != self.shape.len {
            return Err(wsa::Error::ShapeMismatch {
                what: "parameter vector",
                expected: self.shape.len,
                found: w.len(),
            }
            .into());
        }
        // One pass: the scoped tensors give their scope sums and their part of the distance,
        // the stretches between them (unscoped biases) only their part of the distance.
        let mut distance_sq = 0.0;
        let mut scopes = Vec::with_capacity(self.shape.tensors.len());
        let mut at = 0;
        for t in &self.shape.tensors {
            distance_sq +=
                segment_sums(&w[at..t.start], &self.reference[at..t.start], 0.0).distance_sq;
            // Sums are shifted by the first value, as in the core, so a large common offset
            // does not cancel the variance away.
            let shift = w[t.start];
            let sums = segment_sums(&w[t.clone()], &self.reference[t.clone()], shift);
            distance_sq += sums.distance_sq;
            let n = t.len() as f64;
            let mean_shift = sums.shifted / n;
            let var = (sums.shifted_sq / n - mean_shift * mean_shift).max(0.0);
            scopes.push(Scope {
                mean: f64::from(shift) + mean_shift,
                std: (var + self.shape.eps).sqrt(),
            });
            at = t.end;
        }
        distance_sq += segment_sums(&w[at..], &self.reference[at..], 0.0).distance_sq;
        let distance = distance_sq.sqrt();
        // A NaN or an infinity anywhere in `w` makes the distance non-finite (the reference is
        // finite), so it doubles as the finiteness check.
        if !distance.is_finite() {
            return Err(wsa::Error::NonFinite { what: "parameters" }.into());
        }
        Ok(Measurement { scopes, distance })
    }

    fn add(&mut self, w: &[f32], p: f64) -> Result<(), BackendError> {
        Ok(self.sum.add(w, p)?)
    }

    fn merge(&mut self, partial: &ParamSum) -> Result<(), BackendError> {
        Ok(self.sum.merge(partial)?)
    }

    fn partial(&self) -> Result<ParamSum, BackendError> {
        Ok(self.sum.clone())
    }

    fn total_weight(&self) -> f64 {
        self.sum.total_weight()
    }

    fn finish(&self) -> Result<Vec<f32>, BackendError> {
        Ok(self.sum.finish::<f32>()?)
    }
}

/// Sums over one segment of a candidate: `Σd`, `Σd²` with `d = w − shift`, and `Σ(w − r)²`.
#[derive(Debug, Clone, Copy, Default)]
struct SegmentSums {
    shifted: f64,
    shifted_sq: f64,
    distance_sq: f64,
}

/// Lanes of the f32 partial sums: independent accumulators the compiler keeps in SIMD
/// registers. 16 is deliberate: with 8 (or 4) lanes rustc 1.90 vectorizes this loop only
/// partly and the pass runs ~3× slower (measured on x86-64 with SSE2; see the engine bench).
const LANES: usize = 16;
/// Values per f32 partial sum before it is flushed into f64: 64 terms per lane keep the
/// relative rounding error of a block near 1e-6, far inside what the sums are used for
/// (scope checks with a tolerance of a few percent, a norm bound).
const BLOCK: usize = LANES * 64;

/// One pass over `w` and the reference `r`, in f32 blocks flushed into f64. A block whose f32
/// sums are not finite (a NaN or infinity in `w`, or a finite value above ~1e19 whose square
/// overflows f32) is summed again in f64, so the result is non-finite exactly when `w` holds a
/// non-finite value.
fn segment_sums(w: &[f32], r: &[f32], shift: f32) -> SegmentSums {
    let mut total = SegmentSums::default();
    for (wb, rb) in w.chunks(BLOCK).zip(r.chunks(BLOCK)) {
        let (mut s, mut s2, mut d2) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let (wc, w_rest) = wb.as_chunks::<LANES>();
        let (rc, r_rest) = rb.as_chunks::<LANES>();
        for (x, y) in wc.iter().zip(rc) {
            for k in 0..LANES {
                let d = x[k] - shift;
                s[k] += d;
                s2[k] += d * d;
                let e = x[k] - y[k];
                d2[k] += e * e;
            }
        }
        for (k, (&x, &y)) in w_rest.iter().zip(r_rest).enumerate() {
            let d = x - shift;
            s[k] += d;
            s2[k] += d * d;
            d2[k] += (x - y) * (x - y);
        }
        let flush = |v: [f32; LANES]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
        let block = SegmentSums {
            shifted: flush(s),
            shifted_sq: flush(s2),
            distance_sq: flush(d2),
        };
        let block = if block.shifted_sq.is_finite() && block.distance_sq.is_finite() {
            block
        } else {
            segment_sums_f64(wb, rb, shift)
        };
        total.shifted += block.shifted;
        total.shifted_sq += block.shifted_sq;
        total.distance_sq += block.distance_sq;
    }
    total
}

/// The same sums in f64 throughout: the slow path for blocks with huge or non-finite values.
fn segment_sums_f64(w: &[f32], r: &[f32], shift: f32) -> SegmentSums {
    let mut out = SegmentSums::default();
    for (&x, &y) in w.iter().zip(r) {
        let d = f64::from(x) - f64::from(shift);
        out.shifted += d;
        out.shifted_sq += d * d;
        let e = f64::from(x) - f64::from(y);
        out.distance_sq += e * e;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsa::{DEFAULT_SCOPE_EPS, Head, Init};

    fn spec() -> HeadSpec {
        HeadSpec::mlp(8, &[6], 3)
    }

    #[test]
    fn fold_shape_matches_the_heads_tensors() {
        for include_biases in [false, true] {
            let selection = ScopeSelection { include_biases };
            let head = Head::<f32>::init(&spec(), Init::Standard, 3).unwrap();
            let flat = head.to_flat();
            let shape = FoldShape::of_head(&spec(), selection, DEFAULT_SCOPE_EPS);
            assert_eq!(shape.len, spec().param_count());
            let tensors = head.tensors(selection);
            assert_eq!(shape.tensors.len(), tensors.len());
            for (r, t) in shape.tensors.iter().zip(tensors) {
                assert_eq!(&flat[r.clone()], t);
            }
        }
    }

    #[test]
    fn measured_scopes_agree_with_the_core() {
        let selection = ScopeSelection {
            include_biases: false,
        };
        let head = Head::<f32>::init(&spec(), Init::Standard, 5).unwrap();
        let flat = head.to_flat();
        let shape = FoldShape::of_head(&spec(), selection, DEFAULT_SCOPE_EPS);
        let reference = vec![0.0; shape.len];
        let mut acc = CpuBackend.accumulator(&shape, &reference).unwrap();
        let m = acc.measure(&flat).unwrap();
        let core = head.scopes(selection, DEFAULT_SCOPE_EPS).unwrap();
        for (a, b) in m.scopes.iter().zip(&core) {
            assert!((a.mean - b.mean).abs() <= 1e-6 * b.std, "{a:?} vs {b:?}");
            assert!((a.std - b.std).abs() <= 1e-6 * b.std, "{a:?} vs {b:?}");
        }
        let norm: f64 = flat
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((m.distance - norm).abs() <= 1e-6 * norm);
    }

    /// One tensor of `w.len()` values (a linear head `n → 1` without bias scope).
    fn measure_one(w: &[f32], reference: &[f32]) -> Measurement {
        let shape = FoldShape {
            len: w.len(),
            tensors: std::iter::once(0..w.len()).collect(),
            eps: 0.0,
        };
        let mut acc = CpuBackend.accumulator(&shape, reference).unwrap();
        acc.measure(w).unwrap()
    }

    #[test]
    fn measurements_hold_up_against_f64_on_large_offsets_and_many_blocks() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (n, offset, spread) in [(100_003, 0.0, 0.05), (50_000, 1000.0, 0.01), (7, -3.0, 1.0)] {
            let w: Vec<f32> = (0..n)
                .map(|_| offset + spread * rng.random_range(-1.0f32..1.0))
                .collect();
            let r: Vec<f32> = w.iter().map(|x| x * 0.9).collect();
            let m = measure_one(&w, &r);
            let core = Scope::of(&w, 0.0).unwrap();
            assert!(
                (m.scopes[0].mean - core.mean).abs() <= 1e-5 * core.std,
                "{n}"
            );
            assert!((m.scopes[0].std - core.std).abs() <= 1e-5 * core.std, "{n}");
            let exact = w
                .iter()
                .zip(&r)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((m.distance - exact).abs() <= 1e-5 * exact);
        }
    }

    #[test]
    fn huge_finite_values_are_measured_not_called_non_finite() {
        let mut w = vec![0.1f32; 3000];
        w[1500] = 1e30;
        let m = measure_one(&w, &vec![0.0; 3000]);
        assert!(m.distance.is_finite());
        assert!((m.distance - 1e30).abs() <= 1e24);
    }

    #[test]
    fn measure_refuses_non_finite_and_wrong_length() {
        let shape = FoldShape::of_head(&spec(), ScopeSelection::default(), 0.0);
        let mut acc = CpuBackend
            .accumulator(&shape, &vec![0.0; shape.len])
            .unwrap();
        let mut w = vec![0.5f32; shape.len];
        // ε = 0 on a constant tensor: σ = 0 is reported, not refused.
        assert_eq!(acc.measure(&w).unwrap().scopes[0].std, 0.0);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            w[shape.len - 1] = bad;
            assert!(matches!(
                acc.measure(&w),
                Err(BackendError::Core(wsa::Error::NonFinite { .. }))
            ));
        }
        assert!(acc.measure(&w[1..]).is_err());
        assert!(acc.add(&w, 1.0).is_err());
        assert_eq!(acc.total_weight(), 0.0);
        assert!(acc.finish().is_err());
    }

    #[test]
    fn add_merge_finish_is_the_weighted_mean() {
        let shape = FoldShape::of_head(&HeadSpec::linear(2, 2), ScopeSelection::default(), 0.0);
        let reference = vec![0.0; shape.len];
        let mut a = CpuBackend.accumulator(&shape, &reference).unwrap();
        let mut b = CpuBackend.accumulator(&shape, &reference).unwrap();
        a.add(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1.0).unwrap();
        b.add(&[4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 2.0).unwrap();
        a.merge(&b.partial().unwrap()).unwrap();
        assert_eq!(a.total_weight(), 3.0);
        assert_eq!(a.finish().unwrap(), vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert!(CpuBackend.accumulator(&shape, &reference[1..]).is_err());
    }
}
