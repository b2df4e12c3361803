//! The local trainer: mini-batch SGD with momentum and weight decay over a head, with the
//! optional FedProx proximal term and the optional WSA regularizer.

use ndarray::Zip;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Real;
use crate::data::LabelledFeatures;
use crate::error::{Error, Result, ensure_len};
use crate::head::{Head, Workspace};
use crate::regularizer::{add_kl_grad, add_kl_grad_for_step};
use crate::scope::{DEFAULT_SCOPE_EPS, Scope, ScopeSelection};

/// The WSA term: `λ · Σ_l KL(N(μ_l,σ_l²) ‖ N(μ̃_l,σ̃_l²))` over the selected tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WsaTerm {
    /// λ, the weight of the regularizer against the mean cross-entropy.
    pub lambda: f64,
    /// One target per scoped tensor, in the head's tensor order.
    pub targets: Vec<Scope>,
    /// Which tensors carry a scope.
    pub selection: ScopeSelection,
    /// ε in `σ = sqrt(var + ε)`.
    pub eps: f64,
    /// A λ per scoped tensor, in place of `lambda`; empty: `lambda` for every tensor.
    #[serde(default)]
    pub tensor_lambdas: Vec<f64>,
}

impl WsaTerm {
    /// A term over the weight tensors only, with the default ε.
    pub fn new(lambda: f64, targets: Vec<Scope>) -> Self {
        Self {
            lambda,
            targets,
            selection: ScopeSelection::default(),
            eps: DEFAULT_SCOPE_EPS,
            tensor_lambdas: Vec::new(),
        }
    }

    /// The λ of scoped tensor `t`.
    pub fn lambda_of(&self, t: usize) -> f64 {
        self.tensor_lambdas.get(t).copied().unwrap_or(self.lambda)
    }
}

/// Everything added to the cross-entropy: L2 weight decay, the FedProx term around an anchor
/// (the round's global head) and the WSA term.
#[derive(Debug, Clone, Copy)]
pub struct Regularizers<'a, F> {
    /// `wd/2 · ‖w‖²` over all parameters.
    pub weight_decay: f64,
    /// `μ/2 · ‖w − anchor‖²` over all parameters.
    pub prox: Option<(f64, &'a Head<F>)>,
    /// The WSA term.
    pub wsa: Option<&'a WsaTerm>,
    /// The learning rate of the SGD step the gradient is for: the WSA term's gradient is then
    /// limited so that its step does not overshoot ([`add_kl_grad_for_step`]); `None` for the
    /// exact gradient.
    pub step: Option<f64>,
}

/// The parts of a regularizer's value, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RegularizerValue {
    /// `wd/2 · ‖w‖²`.
    pub weight_decay: f64,
    /// `μ/2 · ‖w − anchor‖²`.
    pub prox: f64,
    /// `Σ_l KL_l` (not yet multiplied by λ).
    pub kl: f64,
    /// `λ · Σ_l KL_l`.
    pub wsa: f64,
}

impl RegularizerValue {
    /// The total added to the loss.
    pub fn total(&self) -> f64 {
        self.weight_decay + self.prox + self.wsa
    }
}

impl<F: Real> Regularizers<'_, F> {
    /// Checks shapes and values against `head`.
    pub fn validate(&self, head: &Head<F>) -> Result<()> {
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::InvalidConfig(format!(
                "weight decay must be finite and >= 0, got {}",
                self.weight_decay
            )));
        }
        if let Some((mu, anchor)) = self.prox {
            if !(mu.is_finite() && mu >= 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "FedProx μ must be finite and >= 0, got {mu}"
                )));
            }
            if anchor.spec() != head.spec() {
                return Err(Error::InvalidConfig(
                    "FedProx anchor has a different head shape".into(),
                ));
            }
        }
        if let Some(wsa) = self.wsa {
            if !(wsa.lambda.is_finite() && wsa.lambda >= 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "WSA λ must be finite and >= 0, got {}",
                    wsa.lambda
                )));
            }
            if !(wsa.eps.is_finite() && wsa.eps >= 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "scope ε must be finite and >= 0, got {}",
                    wsa.eps
                )));
            }
            ensure_len(
                "WSA targets",
                head.spec().scoped_tensor_count(wsa.selection),
                wsa.targets.len(),
            )?;
            for t in &wsa.targets {
                t.validate()?;
            }
            if !wsa.tensor_lambdas.is_empty() {
                ensure_len(
                    "WSA per-tensor λ",
                    wsa.targets.len(),
                    wsa.tensor_lambdas.len(),
                )?;
            }
            if let Some(bad) = wsa
                .tensor_lambdas
                .iter()
                .find(|l| !(l.is_finite() && **l >= 0.0))
            {
                return Err(Error::InvalidConfig(format!(
                    "a tensor's WSA λ must be finite and >= 0, got {bad}"
                )));
            }
        }
        Ok(())
    }

    /// Adds the regularizers' gradient at `head` to `grad`; returns their value.
    pub fn add_grad(&self, head: &Head<F>, grad: &mut Head<F>) -> Result<RegularizerValue> {
        self.apply(head, grad, true)
    }

    /// [`Regularizers::add_grad`]; with `measure` false the weight-decay and prox values are
    /// left at 0, which saves the training loop two f64 passes over the parameters per step.
    pub(crate) fn apply(
        &self,
        head: &Head<F>,
        grad: &mut Head<F>,
        measure: bool,
    ) -> Result<RegularizerValue> {
        let mut value = RegularizerValue::default();
        let wd = F::of_f64(self.weight_decay);
        let prox = self.prox.map(|(mu, anchor)| (F::of_f64(mu), mu, anchor));
        for (l, (p, g)) in head.layers().iter().zip(grad.layers_mut()).enumerate() {
            if measure {
                value.weight_decay += 0.5
                    * self.weight_decay
                    * (p.w.iter().chain(&p.b))
                        .map(|x| x.as_f64() * x.as_f64())
                        .sum::<f64>();
            }
            Zip::from(&mut g.w)
                .and(&p.w)
                .for_each(|g, &w| *g = *g + wd * w);
            Zip::from(&mut g.b)
                .and(&p.b)
                .for_each(|g, &w| *g = *g + wd * w);
            if let Some((mu, mu64, anchor)) = prox {
                let a = &anchor.layers()[l];
                let mut sq = 0.0;
                Zip::from(&mut g.w)
                    .and(&p.w)
                    .and(&a.w)
                    .for_each(|g, &w, &a| {
                        let d = w - a;
                        sq += d.as_f64() * d.as_f64();
                        *g = *g + mu * d;
                    });
                Zip::from(&mut g.b)
                    .and(&p.b)
                    .and(&a.b)
                    .for_each(|g, &w, &a| {
                        let d = w - a;
                        sq += d.as_f64() * d.as_f64();
                        *g = *g + mu * d;
                    });
                value.prox += 0.5 * mu64 * sq;
            }
        }
        if let Some(wsa) = self.wsa {
            for (t, ((w, g), &target)) in head
                .tensors(wsa.selection)
                .into_iter()
                .zip(grad.tensors_mut(wsa.selection))
                .zip(&wsa.targets)
                .enumerate()
            {
                let lambda = wsa.lambda_of(t);
                let kl = match self.step {
                    Some(lr) => add_kl_grad_for_step(w, target, wsa.eps, lambda, lr, g)?,
                    None => add_kl_grad(w, target, wsa.eps, lambda, g)?,
                };
                value.kl += kl;
                value.wsa += lambda * kl;
            }
        }
        Ok(value)
    }
}

/// Local SGD: how many passes, in what steps, how fast. The one home of these settings: a
/// run configuration holds them, a round task carries them (with the strategy's terms), and
/// [`train`] runs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sgd {
    /// Passes over the local data.
    pub epochs: u32,
    /// Rows per SGD step (the last step of an epoch may be smaller).
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f64,
    /// Heavy-ball momentum in `[0, 1)`: `v ← m·v + g`, `w ← w − lr·v`.
    pub momentum: f64,
    /// Coupled L2 weight decay over all parameters.
    pub weight_decay: f64,
}

impl Default for Sgd {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 64,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-5,
        }
    }
}

impl Sgd {
    /// Checks every value against its domain, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be finite and > 0, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// Settings of one local training run: the SGD settings, the shuffles' seed and the
/// strategy's terms.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs, batch size, learning rate, momentum, weight decay.
    pub sgd: Sgd,
    /// Seeds the per-epoch shuffles.
    pub seed: u64,
    /// FedProx μ; the anchor is the head training starts from.
    pub prox_mu: Option<f64>,
    /// The WSA term.
    pub wsa: Option<WsaTerm>,
}

impl TrainConfig {
    /// Plain local SGD with `sgd`, no strategy term, seed 0.
    pub fn new(sgd: Sgd) -> Self {
        Self {
            sgd,
            ..Self::default()
        }
    }
}

/// What a local run reports with its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Mean cross-entropy over the last epoch's steps (measured before each step's update).
    pub loss: f64,
    /// Training accuracy over the last epoch (same measurement).
    pub accuracy: f64,
    /// The regularizers at the final parameters.
    pub regularizer: RegularizerValue,
    /// SGD steps taken.
    pub steps: u64,
    /// Rows processed over all epochs.
    pub samples_seen: u64,
    /// Rows of local data (the weight a sample-count fusion gives this client).
    pub n_samples: u64,
}

/// The result of local training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The trained head.
    pub head: Head<f32>,
    /// The trained head's scopes (over the WSA selection, or the weights alone without WSA).
    pub scopes: Vec<Scope>,
    /// Loss, accuracy, regularizers and counts.
    pub metrics: TrainMetrics,
}

/// Trains a copy of `start` on `data`. The FedProx anchor, when used, is `start`.
pub fn train(
    start: &Head<f32>,
    data: &LabelledFeatures,
    cfg: &TrainConfig,
) -> Result<TrainOutcome> {
    cfg.sgd.validate()?;
    let spec = start.spec();
    ensure_len("feature width", spec.input, data.dim())?;
    if data.classes() > spec.classes {
        return Err(Error::ShapeMismatch {
            what: "classes of the data vs the head",
            expected: spec.classes,
            found: data.classes(),
        });
    }
    let regs = Regularizers {
        weight_decay: cfg.sgd.weight_decay,
        prox: cfg.prox_mu.map(|mu| (mu, start)),
        wsa: cfg.wsa.as_ref(),
        step: Some(cfg.sgd.lr),
    };
    regs.validate(start)?;

    let n = data.len();
    let batch = cfg.sgd.batch_size.min(n);
    let mut head = start.clone();
    let mut grad = Head::zeros(spec)?;
    let mut velocity = Head::<f32>::zeros(spec)?;
    let mut ws = Workspace::new(spec, batch);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (lr, momentum) = (cfg.sgd.lr as f32, cfg.sgd.momentum as f32);
    let x = data.x();
    let mut metrics = TrainMetrics {
        n_samples: n as u64,
        ..TrainMetrics::default()
    };
    let mut labels = vec![0u32; batch];

    for _ in 0..cfg.sgd.epochs {
        order.shuffle(&mut rng);
        let (mut loss, mut correct) = (0.0, 0usize);
        for chunk in order.chunks(batch) {
            let b = chunk.len();
            {
                let mut input = ws.input_mut(b);
                for (mut row, &i) in input.rows_mut().into_iter().zip(chunk) {
                    row.assign(&x.row(i));
                }
            }
            for (slot, &i) in labels.iter_mut().zip(chunk) {
                *slot = data.labels()[i];
            }
            let (l, c) = head.forward_backward(&mut ws, &labels[..b], &mut grad);
            loss += l;
            correct += c;
            regs.apply(&head, &mut grad, false)?;
            for (p, (v, g)) in head
                .layers_mut()
                .iter_mut()
                .zip(velocity.layers_mut().iter_mut().zip(grad.layers()))
            {
                Zip::from(&mut p.w)
                    .and(&mut v.w)
                    .and(&g.w)
                    .for_each(|w, v, &g| {
                        *v = momentum * *v + g;
                        *w -= lr * *v;
                    });
                Zip::from(&mut p.b)
                    .and(&mut v.b)
                    .and(&g.b)
                    .for_each(|w, v, &g| {
                        *v = momentum * *v + g;
                        *w -= lr * *v;
                    });
            }
            metrics.steps += 1;
        }
        metrics.loss = loss / n as f64;
        metrics.accuracy = correct as f64 / n as f64;
        metrics.samples_seen += n as u64;
    }
    if head
        .layers()
        .iter()
        .any(|l| l.w.iter().chain(&l.b).any(|v| !v.is_finite()))
    {
        return Err(Error::NonFinite {
            what: "trained parameters (training diverged: lower the learning rate or λ)",
        });
    }
    metrics.regularizer = regs.add_grad(&head, &mut grad)?;
    let selection = cfg.wsa.as_ref().map(|w| w.selection).unwrap_or_default();
    let eps = cfg.wsa.as_ref().map_or(DEFAULT_SCOPE_EPS, |w| w.eps);
    let scopes = head.scopes(selection, eps)?;
    Ok(TrainOutcome {
        head,
        scopes,
        metrics,
    })
}
