//! Classifier heads on frozen features: a linear layer, or an MLP with ReLU hidden layers,
//! trained with softmax cross-entropy.
//!
//! Weights are stored `[in, out]` so a batch `X [B, in]` maps to `X·W + b`. Every flat
//! parameter vector (averaging, scopes, the wire's rows) follows [`HeadSpec::flat_layout`]:
//! layer by layer, `W` in row-major order, then `b`.

use std::ops::Range;

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis, linalg::general_mat_mul, s};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};

use crate::Real;
use crate::error::{Error, Result, ensure_finite, ensure_len};
use crate::scope::{Scope, ScopeSelection};

/// The shape of a head: input width, hidden widths (none for a linear head), classes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSpec {
    /// Width of the feature vectors it reads.
    pub input: usize,
    /// Widths of the ReLU hidden layers, input side first; empty for a linear head.
    pub hidden: Vec<usize>,
    /// Number of classes (width of the logits).
    pub classes: usize,
}

impl HeadSpec {
    /// A single linear layer.
    pub fn linear(input: usize, classes: usize) -> Self {
        Self {
            input,
            hidden: Vec::new(),
            classes,
        }
    }

    /// An MLP with ReLU after every hidden layer.
    pub fn mlp(input: usize, hidden: &[usize], classes: usize) -> Self {
        Self {
            input,
            hidden: hidden.to_vec(),
            classes,
        }
    }

    /// Every width must be at least 1, and a classifier needs two classes.
    pub fn validate(&self) -> Result<()> {
        if self.input == 0 || self.hidden.contains(&0) {
            return Err(Error::InvalidConfig(format!(
                "head widths must be positive, got {self:?}"
            )));
        }
        if self.classes < 2 {
            return Err(Error::InvalidConfig(format!(
                "a classifier head needs at least 2 classes, got {}",
                self.classes
            )));
        }
        let count = self.layer_dims().iter().try_fold(0usize, |n, &(i, o)| {
            i.checked_mul(o)?.checked_add(o)?.checked_add(n)
        });
        if count.is_none() {
            return Err(Error::InvalidConfig(format!(
                "head {self:?} has more parameters than this machine can address"
            )));
        }
        Ok(())
    }

    /// Where each tensor lies in a flat parameter vector: the one definition of the layout.
    /// Layer by layer, input side first: the weights `[in, out]` in row-major order, then the
    /// bias `[out]`. Offsets saturate, so a spec that [`HeadSpec::validate`] refuses gives a
    /// layout that matches no real vector instead of overflowing.
    pub fn flat_layout(&self) -> Vec<FlatTensor> {
        let mut out = Vec::with_capacity(2 * (self.hidden.len() + 1));
        let mut offset = 0usize;
        for (layer, (i, o)) in self.layer_dims().into_iter().enumerate() {
            for (kind, rows) in [(TensorKind::Weight, i), (TensorKind::Bias, 1)] {
                let t = FlatTensor {
                    layer,
                    kind,
                    offset,
                    rows,
                    cols: o,
                };
                offset = offset.saturating_add(t.len());
                out.push(t);
            }
        }
        out
    }

    /// `(in, out)` of every layer, input side first.
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        let mut widths = Vec::with_capacity(self.hidden.len() + 2);
        widths.push(self.input);
        widths.extend_from_slice(&self.hidden);
        widths.push(self.classes);
        widths.windows(2).map(|p| (p[0], p[1])).collect()
    }

    /// Number of scalars in all weights and biases.
    pub fn param_count(&self) -> usize {
        self.flat_layout()
            .iter()
            .fold(0usize, |n, t| n.saturating_add(t.len()))
    }

    /// The tensors that carry a scope under `selection`, in layout order (the order of scopes
    /// everywhere).
    pub fn scoped_tensors(&self, selection: ScopeSelection) -> Vec<FlatTensor> {
        self.flat_layout()
            .into_iter()
            .filter(|t| selection.scopes(t.kind))
            .collect()
    }

    /// Number of tensors that carry a scope under `selection`.
    pub fn scoped_tensor_count(&self, selection: ScopeSelection) -> usize {
        self.scoped_tensors(selection).len()
    }
}

/// A layer's weights or its bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// The weight matrix `[in, out]`.
    Weight,
    /// The bias vector `[out]`.
    Bias,
}

/// One tensor of the flat layout ([`HeadSpec::flat_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatTensor {
    /// Its layer, input side first.
    pub layer: usize,
    /// Weights or bias.
    pub kind: TensorKind,
    /// Index of its first value in the flat vector.
    pub offset: usize,
    /// Rows: the layer's input width for weights, 1 for a bias (int8 scales are per row).
    pub rows: usize,
    /// Columns: the layer's output width.
    pub cols: usize,
}

impl FlatTensor {
    /// Its number of values (saturating).
    pub fn len(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }

    /// True for a tensor without values (never, in a valid spec).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its place in the flat vector.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset.saturating_add(self.len())
    }
}

/// How a head's weights are drawn at the start. Biases always start at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// He (normal, `std = sqrt(2/in)`) for layers followed by ReLU, Xavier for the logits layer.
    #[default]
    Standard,
    /// He normal everywhere.
    He,
    /// Xavier/Glorot uniform (`±sqrt(6/(in+out))`) everywhere.
    Xavier,
}

/// A layer's weights and bias, each lent out once.
type LayerSlots<'a, F> = [Option<&'a mut [F]>; 2];

/// One affine layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense<F> {
    /// Weights, `[in, out]`.
    pub w: Array2<F>,
    /// Bias, `[out]`.
    pub b: Array1<F>,
}

/// A head's parameters (also used for gradients and momentum, which have the same shape).
#[derive(Debug, Clone, PartialEq)]
pub struct Head<F> {
    spec: HeadSpec,
    layers: Vec<Dense<F>>,
}

/// Mean cross-entropy and accuracy of a head on a labelled set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean softmax cross-entropy.
    pub loss: f64,
    /// Fraction of argmax predictions equal to the label.
    pub accuracy: f64,
}

impl<F: Real> Head<F> {
    /// All parameters zero.
    pub fn zeros(spec: &HeadSpec) -> Result<Self> {
        spec.validate()?;
        let layers = spec
            .layer_dims()
            .into_iter()
            .map(|(i, o)| Dense {
                w: Array2::zeros((i, o)),
                b: Array1::zeros(o),
            })
            .collect();
        Ok(Self {
            spec: spec.clone(),
            layers,
        })
    }

    /// Fresh weights drawn from `seed` under `init`; the same seed gives the same head.
    pub fn init(spec: &HeadSpec, init: Init, seed: u64) -> Result<Self> {
        let mut head = Self::zeros(spec)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let last = head.layers.len() - 1;
        for (l, layer) in head.layers.iter_mut().enumerate() {
            let (fan_in, fan_out) = layer.w.dim();
            let he = match init {
                Init::Standard => l != last,
                Init::He => true,
                Init::Xavier => false,
            };
            if he {
                let normal = Normal::new(0.0, (2.0 / fan_in as f64).sqrt())
                    .map_err(|e| Error::InvalidConfig(e.to_string()))?;
                layer.w.mapv_inplace(|_| F::of_f64(normal.sample(&mut rng)));
            } else {
                let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
                let uniform =
                    Uniform::new(-a, a).map_err(|e| Error::InvalidConfig(e.to_string()))?;
                layer
                    .w
                    .mapv_inplace(|_| F::of_f64(uniform.sample(&mut rng)));
            }
        }
        Ok(head)
    }

    /// Rebuilds a head from its flat parameter vector.
    pub fn from_flat(spec: &HeadSpec, flat: &[F]) -> Result<Self> {
        let mut head = Self::zeros(spec)?;
        ensure_len("flat parameters", spec.param_count(), flat.len())?;
        ensure_finite("parameters", flat)?;
        for t in spec.flat_layout() {
            head.tensor_mut(t).copy_from_slice(&flat[t.range()]);
        }
        Ok(head)
    }

    /// The flat parameter vector ([`HeadSpec::flat_layout`]).
    pub fn to_flat(&self) -> Vec<F> {
        let mut flat = Vec::with_capacity(self.spec.param_count());
        for t in self.spec.flat_layout() {
            flat.extend_from_slice(self.tensor(t));
        }
        flat
    }

    /// The values of one tensor of the layout.
    fn tensor(&self, t: FlatTensor) -> &[F] {
        let layer = &self.layers[t.layer];
        match t.kind {
            TensorKind::Weight => layer.w.as_slice(),
            TensorKind::Bias => layer.b.as_slice(),
        }
        .expect("head arrays are contiguous")
    }

    fn tensor_mut(&mut self, t: FlatTensor) -> &mut [F] {
        let layer = &mut self.layers[t.layer];
        match t.kind {
            TensorKind::Weight => layer.w.as_slice_mut(),
            TensorKind::Bias => layer.b.as_slice_mut(),
        }
        .expect("head arrays are contiguous")
    }

    /// The same head in another scalar type.
    pub fn cast<G: Real>(&self) -> Head<G> {
        Head {
            spec: self.spec.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| Dense {
                    w: l.w.mapv(|x| G::of_f64(x.as_f64())),
                    b: l.b.mapv(|x| G::of_f64(x.as_f64())),
                })
                .collect(),
        }
    }

    /// The head's shape.
    pub fn spec(&self) -> &HeadSpec {
        &self.spec
    }

    /// Layers, input side first.
    pub fn layers(&self) -> &[Dense<F>] {
        &self.layers
    }

    /// Layers, input side first, for in-place updates.
    pub fn layers_mut(&mut self) -> &mut [Dense<F>] {
        &mut self.layers
    }

    /// The scoped tensors in layout order ([`HeadSpec::scoped_tensors`]).
    pub fn tensors(&self, selection: ScopeSelection) -> Vec<&[F]> {
        self.spec
            .scoped_tensors(selection)
            .into_iter()
            .map(|t| self.tensor(t))
            .collect()
    }

    /// Mutable views of the scoped tensors, in the order of [`Head::tensors`].
    pub fn tensors_mut(&mut self, selection: ScopeSelection) -> Vec<&mut [F]> {
        let scoped = self.spec.scoped_tensors(selection);
        let mut out = Vec::with_capacity(scoped.len());
        // Each layer's weights and bias are disjoint borrows; the layout visits each once.
        let mut slots: Vec<LayerSlots<'_, F>> = self
            .layers
            .iter_mut()
            .map(|l| {
                [
                    Some(l.w.as_slice_mut().expect("head arrays are contiguous")),
                    Some(l.b.as_slice_mut().expect("head arrays are contiguous")),
                ]
            })
            .collect();
        for t in scoped {
            let slot = match t.kind {
                TensorKind::Weight => 0,
                TensorKind::Bias => 1,
            };
            out.extend(slots[t.layer][slot].take());
        }
        out
    }

    /// The scope of every scoped tensor.
    pub fn scopes(&self, selection: ScopeSelection, eps: f64) -> Result<Vec<Scope>> {
        self.tensors(selection)
            .into_iter()
            .map(|t| Scope::of(t, eps))
            .collect()
    }

    /// Logits for a batch of feature rows.
    pub fn logits(&self, x: ArrayView2<'_, F>) -> Result<Array2<F>> {
        ensure_len("feature width", self.spec.input, x.ncols())?;
        let mut ws = Workspace::new(&self.spec, x.nrows().max(1));
        ws.input_mut(x.nrows()).assign(&x);
        self.forward(&mut ws, x.nrows());
        Ok(ws.acts[self.layers.len()]
            .slice(s![..x.nrows(), ..])
            .to_owned())
    }

    /// Mean cross-entropy and accuracy over `x`, in chunks so memory stays bounded.
    pub fn evaluate(&self, x: ArrayView2<'_, F>, labels: &[u32]) -> Result<Evaluation> {
        self.evaluation_pass(x, labels, |_, _| {})
    }

    /// [`Head::evaluate`] and each class's accuracy (`None` for a class `labels` lacks), in
    /// one pass and memory linear in the classes.
    pub fn evaluate_by_class(
        &self,
        x: ArrayView2<'_, F>,
        labels: &[u32],
    ) -> Result<(Evaluation, Vec<Option<f64>>)> {
        let mut hits = vec![0u64; self.spec.classes];
        let mut totals = vec![0u64; self.spec.classes];
        let evaluation = self.evaluation_pass(x, labels, |label, predicted| {
            totals[label] += 1;
            hits[label] += u64::from(predicted == label);
        })?;
        let per_class = hits
            .iter()
            .zip(&totals)
            .map(|(&h, &t)| (t > 0).then(|| h as f64 / t as f64))
            .collect();
        Ok((evaluation, per_class))
    }

    /// `counts[true class][predicted class]` over `x` (argmax of the logits), in chunks;
    /// quadratic in the classes.
    pub fn confusion(&self, x: ArrayView2<'_, F>, labels: &[u32]) -> Result<Vec<Vec<u64>>> {
        let mut counts = vec![vec![0u64; self.spec.classes]; self.spec.classes];
        self.evaluation_pass(x, labels, |label, predicted| {
            counts[label][predicted] += 1;
        })?;
        Ok(counts)
    }

    /// Runs `x` through the head in chunks, calling `on_prediction(label, predicted)` for
    /// every row (the first largest logit, as accuracy counts it); returns loss and accuracy.
    fn evaluation_pass(
        &self,
        x: ArrayView2<'_, F>,
        labels: &[u32],
        mut on_prediction: impl FnMut(usize, usize),
    ) -> Result<Evaluation> {
        check_batch(&self.spec, x, labels)?;
        const CHUNK: usize = 1024;
        let mut ws = Workspace::new(&self.spec, CHUNK.min(x.nrows()));
        let (mut loss, mut correct) = (0.0, 0usize);
        for start in (0..x.nrows()).step_by(CHUNK) {
            let end = (start + CHUNK).min(x.nrows());
            let b = end - start;
            ws.input_mut(b).assign(&x.slice(s![start..end, ..]));
            self.forward(&mut ws, b);
            let logits = ws.acts[self.layers.len()].slice(s![..b, ..]);
            for (row, &label) in logits.rows().into_iter().zip(&labels[start..end]) {
                let (mut predicted, mut max) = (0, row[0]);
                for (k, &z) in row.iter().enumerate() {
                    if z > max {
                        max = z;
                        predicted = k;
                    }
                }
                on_prediction(label as usize, predicted);
            }
            let (l, c) = ws.softmax_xent(self.layers.len(), &labels[start..end]);
            loss += l;
            correct += c;
        }
        let n = x.nrows() as f64;
        Ok(Evaluation {
            loss: loss / n,
            accuracy: correct as f64 / n,
        })
    }

    /// Mean cross-entropy over the batch and its gradient (allocating; the trainer uses a
    /// reusable [`Workspace`] instead).
    pub fn loss_and_grad(&self, x: ArrayView2<'_, F>, labels: &[u32]) -> Result<(f64, Head<F>)> {
        check_batch(&self.spec, x, labels)?;
        let mut ws = Workspace::new(&self.spec, x.nrows());
        let mut grad = Head::zeros(&self.spec)?;
        ws.input_mut(x.nrows()).assign(&x);
        let (loss_sum, _) = self.forward_backward(&mut ws, labels, &mut grad);
        Ok((loss_sum / x.nrows() as f64, grad))
    }

    /// Runs the batch of `b` rows already in `ws`'s input through the head.
    pub(crate) fn forward(&self, ws: &mut Workspace<F>, b: usize) {
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (before, after) = ws.acts.split_at_mut(l + 1);
            let input = before[l].slice(s![..b, ..]);
            let mut out = after[0].slice_mut(s![..b, ..]);
            // out = b (broadcast) then out += X·W: the bias rides in GEMM's accumulate.
            out.assign(
                &layer
                    .b
                    .broadcast((b, layer.b.len()))
                    .expect("bias fits its layer"),
            );
            general_mat_mul(F::one(), &input, &layer.w, F::one(), &mut out);
            if l != last {
                out.mapv_inplace(|z| z.max(F::zero()));
            }
        }
    }

    /// Forward and backward for the `labels.len()` rows in `ws`'s input. Overwrites `grad`
    /// with the gradient of the batch's mean cross-entropy; returns (summed loss, correct).
    pub(crate) fn forward_backward(
        &self,
        ws: &mut Workspace<F>,
        labels: &[u32],
        grad: &mut Head<F>,
    ) -> (f64, usize) {
        let b = labels.len();
        let depth = self.layers.len();
        self.forward(ws, b);
        let (loss, correct) = ws.softmax_xent(depth, labels);
        // dZ_last = (softmax − onehot)/B, built in place over the probabilities.
        {
            let inv_b = F::of_f64(1.0 / b as f64);
            let mut d = ws.acts[depth].slice_mut(s![..b, ..]);
            for (mut row, &y) in d.rows_mut().into_iter().zip(labels) {
                row[y as usize] = row[y as usize] - F::one();
                row.mapv_inplace(|p| p * inv_b);
            }
        }
        for l in (0..depth).rev() {
            let (before, after) = ws.acts.split_at_mut(l + 1);
            let input = before[l].slice(s![..b, ..]);
            let delta = after[0].slice(s![..b, ..]);
            let g = &mut grad.layers[l];
            general_mat_mul(F::one(), &input.t(), &delta, F::zero(), &mut g.w);
            g.b.assign(&delta.sum_axis(Axis(0)));
            if l > 0 {
                // The features are frozen, so the input layer's dX is never formed.
                let mut back = ws.back.slice_mut(s![..b, ..self.layers[l].w.nrows()]);
                general_mat_mul(
                    F::one(),
                    &delta,
                    &self.layers[l].w.t(),
                    F::zero(),
                    &mut back,
                );
                // ReLU: pass the gradient where the activation was positive; the activation
                // buffer then becomes this layer's delta.
                ndarray::Zip::from(before[l].slice_mut(s![..b, ..]))
                    .and(&back)
                    .for_each(|a, &g| *a = if *a > F::zero() { g } else { F::zero() });
            }
        }
        (loss, correct)
    }
}

fn check_batch<F: Real>(spec: &HeadSpec, x: ArrayView2<'_, F>, labels: &[u32]) -> Result<()> {
    if x.nrows() == 0 {
        return Err(Error::Empty { what: "batch" });
    }
    ensure_len("feature width", spec.input, x.ncols())?;
    ensure_len("labels", x.nrows(), labels.len())?;
    if let Some(&label) = labels.iter().find(|&&y| y as usize >= spec.classes) {
        return Err(Error::LabelOutOfRange {
            label,
            classes: spec.classes,
        });
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "features" });
    }
    Ok(())
}

/// Buffers for one batch, reused across steps so the training loop does not allocate.
pub struct Workspace<F> {
    /// `acts[0]` is the input batch; `acts[l+1]` is layer l's output (post-ReLU for hidden
    /// layers, logits then probabilities then dZ for the last). In backward, hidden
    /// activations are overwritten by their deltas.
    acts: Vec<Array2<F>>,
    /// `dZ·Wᵀ` scratch, as wide as the widest hidden layer.
    back: Array2<F>,
}

impl<F: Real> Workspace<F> {
    /// Buffers for batches of up to `max_batch` rows.
    pub fn new(spec: &HeadSpec, max_batch: usize) -> Self {
        let mut acts = vec![Array2::zeros((max_batch, spec.input))];
        acts.extend(
            spec.layer_dims()
                .iter()
                .map(|&(_, o)| Array2::zeros((max_batch, o))),
        );
        let widest_hidden = spec.hidden.iter().copied().max().unwrap_or(0);
        Self {
            acts,
            back: Array2::zeros((max_batch, widest_hidden)),
        }
    }

    /// The input rows of a batch of `b`, to be filled by the caller.
    pub fn input_mut(&mut self, b: usize) -> ArrayViewMut2<'_, F> {
        self.acts[0].slice_mut(s![..b, ..])
    }

    /// Turns the logits in `acts[depth]` into probabilities in place; returns the summed
    /// cross-entropy and the number of correct argmax predictions.
    fn softmax_xent(&mut self, depth: usize, labels: &[u32]) -> (f64, usize) {
        let b = labels.len();
        let (mut loss, mut correct) = (0.0, 0);
        let mut logits = self.acts[depth].slice_mut(s![..b, ..]);
        for (mut row, &y) in logits.rows_mut().into_iter().zip(labels) {
            let y = y as usize;
            let (mut argmax, mut max) = (0, row[0]);
            for (k, &z) in row.iter().enumerate() {
                if z > max {
                    max = z;
                    argmax = k;
                }
            }
            correct += usize::from(argmax == y);
            let shifted_target = (row[y] - max).as_f64();
            let mut sum = F::zero();
            row.mapv_inplace(|z| {
                let e = (z - max).exp();
                sum = sum + e;
                e
            });
            // −log softmax_y = log Σ exp(z − max) − (z_y − max); never ln of an underflowed 0.
            loss += sum.as_f64().ln() - shifted_target;
            let inv = F::one() / sum;
            row.mapv_inplace(|e| e * inv);
        }
        (loss, correct)
    }
}
