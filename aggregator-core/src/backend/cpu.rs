//! The CPU backend: f64 accumulation split across threads, measurements in f32 blocks
//! flushed into f64, the robust rules column by column. It is the reference the CUDA backend
//! is tested against, and is itself tested against a naive implementation
//! (`aggregator/tests/backend_reference.rs`).

use std::ops::Range;

use wsa::{ParamSum, Scope};

use super::contract::{
    batch_full, check_batch, check_len, check_request, check_weight, full, inverse_total,
    nothing_to_aggregate, unsupported,
};
use super::{Accumulator, Backend, BackendError, FoldShape, Measurement};
use crate::strategy::{Aggregation, Plan};

/// Values a thread is given at least. A pass over 1 Mi values takes ~0.5 ms; below that,
/// a second thread saves little and, on a busy machine, waits for a free core: splitting the
/// shipped head's 330k values over two threads made the engine's p90 per update 3.4 ms
/// instead of ~0.3 ms while another process held one of the two cores (engine bench).
const MIN_PER_THREAD: usize = 1 << 20;
/// Values per piece of a measurement: pieces are summed apart and combined in order, so the
/// result does not depend on the number of threads.
const MEASURE_PIECE: usize = 1 << 16;
/// Coordinates per tile when the storing rules gather columns: 64 floats is one 256-byte
/// read per stored update, and the tile of 1000 updates (256 KiB) stays in L2.
const COLUMN_TILE: usize = 64;
/// Coordinates per tile of a batched fold: the tile's f64 sums (16 KiB) stay in L1 while
/// every vector of the batch is added to them.
const BATCH_TILE: usize = 2048;

/// The CPU backend. Up to `threads` workers split each pass over a long enough vector; the
/// storing rules keep at most
/// `max_stored_bytes` of updates per round.
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    split: Split,
    max_stored_bytes: usize,
}

/// How a pass is split across threads: at most `threads`, each given at least
/// `min_per_thread` values.
#[derive(Debug, Clone, Copy)]
struct Split {
    threads: usize,
    min_per_thread: usize,
}

impl Split {
    /// Workers for a pass over `len` values.
    fn workers(self, len: usize) -> usize {
        self.threads.min(len / self.min_per_thread).max(1)
    }
}

impl Default for CpuBackend {
    /// Every available core; 8 GiB of stored updates.
    fn default() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl CpuBackend {
    /// A backend with `threads` workers (at least 1) and the default 8 GiB bound.
    pub fn new(threads: usize) -> Self {
        Self {
            split: Split {
                threads: threads.max(1),
                min_per_thread: MIN_PER_THREAD,
            },
            max_stored_bytes: 8 << 30,
        }
    }

    /// The same backend with another bound on the bytes of updates a storing rule keeps.
    pub fn with_max_stored_bytes(self, max_stored_bytes: usize) -> Self {
        Self {
            max_stored_bytes,
            ..self
        }
    }

    /// The same backend splitting passes from `values` per thread on (at least 1): for tests
    /// that exercise the threaded paths on small vectors.
    pub fn with_min_per_thread(self, values: usize) -> Self {
        Self {
            split: Split {
                min_per_thread: values.max(1),
                ..self.split
            },
            ..self
        }
    }

    /// Worker threads per pass (for vectors long enough to split).
    pub fn threads(&self) -> usize {
        self.split.threads
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn accumulator(
        &self,
        shape: &FoldShape,
        reference: &[f32],
        aggregation: Aggregation,
        capacity: usize,
    ) -> Result<Box<dyn Accumulator>, BackendError> {
        check_request(shape, reference, aggregation)?;
        let plan = aggregation.plan();
        let stores = plan.stores_updates();
        if stores {
            let bytes = capacity.saturating_mul(shape.len).saturating_mul(4);
            if bytes > self.max_stored_bytes {
                return Err(BackendError::Capacity(format!(
                    "{capacity} updates of {} parameters need {bytes} bytes, more than the \
                     {} the {} rule may keep",
                    shape.len,
                    self.max_stored_bytes,
                    aggregation.label()
                )));
            }
        }
        Ok(Box::new(CpuAccumulator {
            shape: shape.clone(),
            reference: reference.to_vec(),
            aggregation,
            plan,
            capacity,
            split: self.split,
            sum: if stores {
                Vec::new()
            } else {
                vec![0.0; shape.len]
            },
            stored: Vec::new(),
            total_weight: 0.0,
            count: 0,
        }))
    }
}

/// One round's fold on the CPU: an f64 sum for the mean rules, the updates themselves
/// (row-major, `count × len`) for the storing rules.
#[derive(Debug, Clone)]
struct CpuAccumulator {
    shape: FoldShape,
    reference: Vec<f32>,
    aggregation: Aggregation,
    plan: Plan,
    capacity: usize,
    split: Split,
    sum: Vec<f64>,
    stored: Vec<f32>,
    total_weight: f64,
    count: usize,
}

impl CpuAccumulator {
    /// Checks `w` for an add without a measurement; returns the distance when the plan needs
    /// it (clipping), which the measurement's pass gives for free.
    fn check_unmeasured(&mut self, w: &[f32]) -> Result<f64, BackendError> {
        if matches!(self.plan, Plan::WeightedSum { max_step: Some(_) }) {
            return Ok(self.measure(w)?.distance);
        }
        check_len(self.shape.len, w)?;
        if !all_finite(w, self.split) {
            return Err(wsa::Error::NonFinite { what: "parameters" }.into());
        }
        Ok(0.0)
    }

    /// Folds a checked `w`; `distance` is `‖w − reference‖` (used by clipping only).
    fn fold_checked(&mut self, w: &[f32], p: f64, distance: f64) -> Result<(), BackendError> {
        match self.plan {
            Plan::WeightedSum { .. } => {
                let c = self.plan.step_scale(distance);
                let pull = (c < 1.0).then_some((p * (1.0 - c), self.reference.as_slice()));
                fold_scaled(&mut self.sum, w, p * c, pull, self.split);
            }
            Plan::Columns(_) => {
                if self.count >= self.capacity {
                    return Err(full(self.aggregation, self.capacity));
                }
                self.stored.extend_from_slice(w);
            }
        }
        self.total_weight += p;
        self.count += 1;
        Ok(())
    }
}

impl Accumulator for CpuAccumulator {
    fn measure(&mut self, w: &[f32]) -> Result<Measurement, BackendError> {
        check_len(self.shape.len, w)?;
        let (scopes, distance) = measure(&self.shape, &self.reference, w, self.split);
        // A NaN or an infinity anywhere in `w` makes the distance non-finite (the reference is
        // finite), so it doubles as the finiteness check.
        if !distance.is_finite() {
            return Err(wsa::Error::NonFinite { what: "parameters" }.into());
        }
        Ok(Measurement::new(scopes, distance))
    }

    fn add(
        &mut self,
        w: &[f32],
        p: f64,
        measured: Option<&Measurement>,
    ) -> Result<(), BackendError> {
        check_weight(p)?;
        let distance = match measured {
            Some(m) => {
                check_len(self.shape.len, w)?;
                m.distance
            }
            None => self.check_unmeasured(w)?,
        };
        self.fold_checked(w, p, distance)
    }

    fn add_batch(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
    ) -> Result<(), BackendError> {
        check_batch(ws, ps, measured)?;
        let mut distances = Vec::with_capacity(ws.len());
        for (k, (w, &p)) in ws.iter().zip(ps).enumerate() {
            check_weight(p)?;
            distances.push(match measured {
                Some(m) => {
                    check_len(self.shape.len, w)?;
                    m[k].distance
                }
                None => self.check_unmeasured(w)?,
            });
        }
        if self.plan == (Plan::WeightedSum { max_step: None }) {
            fold_batch(&mut self.sum, ws, ps, self.split);
            self.total_weight += ps.iter().sum::<f64>();
            self.count += ws.len();
            return Ok(());
        }
        if self.plan.stores_updates() && self.count + ws.len() > self.capacity {
            return Err(batch_full(ws.len(), self.count, self.capacity));
        }
        for ((w, &p), d) in ws.iter().zip(ps).zip(distances) {
            self.fold_checked(w, p, d)?;
        }
        Ok(())
    }

    fn merge(&mut self, partial: &ParamSum) -> Result<(), BackendError> {
        if self.plan.stores_updates() {
            return Err(unsupported("merge", self.aggregation));
        }
        let other = partial.weighted();
        if other.len() != self.sum.len() {
            return Err(wsa::Error::ShapeMismatch {
                what: "partial sum",
                expected: self.sum.len(),
                found: other.len(),
            }
            .into());
        }
        check_weight(partial.total_weight())?;
        for_each_chunk(self.split, &mut self.sum, |at, chunk| {
            for (s, &o) in chunk.iter_mut().zip(&other[at..]) {
                *s += o;
            }
        });
        self.total_weight += partial.total_weight();
        Ok(())
    }

    fn partial(&self) -> Result<ParamSum, BackendError> {
        if self.plan.stores_updates() {
            return Err(unsupported("partial", self.aggregation));
        }
        Ok(ParamSum::from_parts(self.total_weight, self.sum.clone())?)
    }

    fn count(&self) -> usize {
        self.count
    }

    fn total_weight(&self) -> f64 {
        self.total_weight
    }

    fn finish(&mut self) -> Result<Vec<f32>, BackendError> {
        let mut out = vec![0f32; self.shape.len];
        match self.plan {
            Plan::WeightedSum { .. } => {
                let inv = inverse_total(self.total_weight)?;
                let sum = &self.sum;
                for_each_chunk(self.split, &mut out, |at, chunk| {
                    for (o, &s) in chunk.iter_mut().zip(&sum[at..]) {
                        *o = (s * inv) as f32;
                    }
                });
            }
            Plan::Columns(rule) => {
                let n = self.count;
                if n == 0 {
                    return Err(nothing_to_aggregate());
                }
                let (len, stored, reference) = (self.shape.len, &self.stored, &self.reference);
                for_each_chunk(self.split, &mut out, |at, chunk| {
                    // Columns are gathered a tile at a time: each update's stretch of the tile
                    // is one contiguous read, and the strided gather then runs in cache
                    // (a column read straight from the rows misses on every value).
                    let mut tile = vec![0f32; n * COLUMN_TILE];
                    let mut column = vec![0f32; n];
                    for (t, outs) in chunk.chunks_mut(COLUMN_TILE).enumerate() {
                        let start = at + t * COLUMN_TILE;
                        let width = outs.len();
                        for r in 0..n {
                            let row = &stored[r * len + start..r * len + start + width];
                            tile[r * width..(r + 1) * width].copy_from_slice(row);
                        }
                        for (j, o) in outs.iter_mut().enumerate() {
                            for (r, v) in column.iter_mut().enumerate() {
                                *v = tile[r * width + j];
                            }
                            *o = rule.reduce(&mut column, reference[start + j]);
                        }
                    }
                });
            }
        }
        Ok(out)
    }
}

/// Runs `f(offset, chunk)` over `data` cut into one chunk per thread (fewer when the data is
/// small), on scoped threads.
fn for_each_chunk<T: Send>(split: Split, data: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let workers = split.workers(data.len());
    if workers == 1 {
        f(0, data);
        return;
    }
    let chunk = data.len().div_ceil(workers).next_multiple_of(BATCH_TILE);
    std::thread::scope(|s| {
        let f = &f;
        for (i, c) in data.chunks_mut(chunk).enumerate() {
            s.spawn(move || f(i * chunk, c));
        }
    });
}

/// `sum += a·w (+ b·pull)` in f64, split across threads. The loop bodies are plain enough to
/// vectorize (f32 → f64 widening, multiply, add).
fn fold_scaled(sum: &mut [f64], w: &[f32], a: f64, pull: Option<(f64, &[f32])>, split: Split) {
    for_each_chunk(split, sum, |at, s| {
        let w = &w[at..at + s.len()];
        match pull {
            None => {
                for (s, &x) in s.iter_mut().zip(w) {
                    *s += a * f64::from(x);
                }
            }
            Some((b, r)) => {
                let r = &r[at..at + s.len()];
                for ((s, &x), &y) in s.iter_mut().zip(w).zip(r) {
                    *s += a * f64::from(x) + b * f64::from(y);
                }
            }
        }
    });
}

/// `sum += Σ_j p_j·w_j`, tile by tile, adding the vectors to each tile in order: the same
/// f64 result as folding them one after another, with the sum read and written once per
/// batch instead of once per vector.
fn fold_batch(sum: &mut [f64], ws: &[&[f32]], ps: &[f64], split: Split) {
    for_each_chunk(split, sum, |at, chunk| {
        for (t, tile) in chunk.chunks_mut(BATCH_TILE).enumerate() {
            let start = at + t * BATCH_TILE;
            let end = start + tile.len();
            for (w, &p) in ws.iter().zip(ps) {
                for (s, &x) in tile.iter_mut().zip(&w[start..end]) {
                    *s += p * f64::from(x);
                }
            }
        }
    });
}

/// Whether every value is finite: an OR of "exponent all ones" over the bits, which the
/// compiler vectorizes (a short-circuiting `all(is_finite)` does not), split across threads.
fn all_finite(w: &[f32], split: Split) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    let bad_in = |c: &[f32]| {
        c.iter()
            .map(|x| u32::from(x.to_bits() & EXPONENT == EXPONENT))
            .fold(0, |a, b| a | b)
            != 0
    };
    let workers = split.workers(w.len());
    if workers == 1 {
        return !bad_in(w);
    }
    let chunk = w.len().div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = w
            .chunks(chunk)
            .map(|c| s.spawn(move || bad_in(c)))
            .collect();
        handles
            .into_iter()
            .all(|h| !h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    })
}

/// Per-tensor scopes and `‖w − r‖` in one pass, cut into fixed pieces summed on `split`'s
/// workers and combined in piece order.
fn measure(shape: &FoldShape, r: &[f32], w: &[f32], split: Split) -> (Vec<Scope>, f64) {
    // Pieces: (range, scoped tensor index or None for an unscoped stretch). Sums in a scoped
    // tensor are shifted by its first value, as in the core, so a large common offset does
    // not cancel the variance away.
    let mut pieces: Vec<(Range<usize>, Option<usize>)> = Vec::new();
    let mut push = |range: Range<usize>, tensor: Option<usize>| {
        let mut at = range.start;
        while at < range.end {
            let end = (at + MEASURE_PIECE).min(range.end);
            pieces.push((at..end, tensor));
            at = end;
        }
    };
    let mut at = 0;
    for (i, t) in shape.tensors.iter().enumerate() {
        push(at..t.start, None);
        push(t.clone(), Some(i));
        at = t.end;
    }
    push(at..shape.len, None);
    let shifts: Vec<f32> = shape.tensors.iter().map(|t| w[t.start]).collect();
    let sums_of = |(range, tensor): &(Range<usize>, Option<usize>)| {
        let shift = tensor.map_or(0.0, |i| shifts[i]);
        segment_sums(&w[range.clone()], &r[range.clone()], shift)
    };
    let workers = split.workers(w.len()).min(pieces.len()).max(1);
    let sums: Vec<SegmentSums> = if workers == 1 {
        pieces.iter().map(sums_of).collect()
    } else {
        let per = pieces.len().div_ceil(workers);
        std::thread::scope(|s| {
            let handles: Vec<_> = pieces
                .chunks(per)
                .map(|group| s.spawn(move || group.iter().map(sums_of).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    };
    let mut per_tensor = vec![SegmentSums::default(); shape.tensors.len()];
    let mut distance_sq = 0.0;
    for ((_, tensor), s) in pieces.iter().zip(&sums) {
        distance_sq += s.distance_sq;
        if let Some(i) = tensor {
            per_tensor[*i].shifted += s.shifted;
            per_tensor[*i].shifted_sq += s.shifted_sq;
        }
    }
    let scopes = shape
        .tensors
        .iter()
        .zip(&per_tensor)
        .zip(&shifts)
        .map(|((t, sums), &shift)| {
            let n = t.len() as f64;
            let mean_shift = sums.shifted / n;
            let var = (sums.shifted_sq / n - mean_shift * mean_shift).max(0.0);
            Scope {
                mean: f64::from(shift) + mean_shift,
                std: (var + shape.eps).sqrt(),
            }
        })
        .collect();
    (scopes, distance_sq.sqrt())
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
    use wsa::{DEFAULT_SCOPE_EPS, Head, HeadSpec, Init, ScopeSelection};

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
        let mut acc = CpuBackend::default()
            .accumulator(&shape, &reference, Aggregation::Mean, 0)
            .unwrap();
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
        let mut acc = CpuBackend::default()
            .accumulator(&shape, reference, Aggregation::Mean, 0)
            .unwrap();
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
        let mut acc = CpuBackend::default()
            .accumulator(&shape, &vec![0.0; shape.len], Aggregation::Mean, 0)
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
        assert!(acc.add(&w, 1.0, None).is_err());
        assert_eq!(acc.total_weight(), 0.0);
        assert!(acc.finish().is_err());
    }

    #[test]
    fn add_merge_finish_is_the_weighted_mean() {
        let shape = FoldShape::of_head(&HeadSpec::linear(2, 2), ScopeSelection::default(), 0.0);
        let reference = vec![0.0; shape.len];
        let mut a = CpuBackend::default()
            .accumulator(&shape, &reference, Aggregation::Mean, 0)
            .unwrap();
        let mut b = CpuBackend::default()
            .accumulator(&shape, &reference, Aggregation::Mean, 0)
            .unwrap();
        a.add(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1.0, None).unwrap();
        b.add(&[4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 2.0, None).unwrap();
        a.merge(&b.partial().unwrap()).unwrap();
        assert_eq!(a.total_weight(), 3.0);
        assert_eq!(a.finish().unwrap(), vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert!(
            CpuBackend::default()
                .accumulator(&shape, &reference[1..], Aggregation::Mean, 0)
                .is_err()
        );
    }
}
