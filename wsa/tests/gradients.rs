//! Finite-difference checks in f64 of the heads' cross-entropy gradients, the FedProx term,
//! weight decay and the whole training objective, over random shapes.

mod common;

use common::{normal_matrix, numeric_grad, relative_error, rng};
use ndarray::{Array2, Axis};
use proptest::prelude::*;
use rand::Rng;
use wsa::{Head, HeadSpec, Init, Regularizers, Scope, ScopeSelection, WsaTerm};

const H: f64 = 1e-6;
const TOLERANCE: f64 = 1e-6;

struct Case {
    head: Head<f64>,
    x: Array2<f64>,
    labels: Vec<u32>,
}

fn case(seed: u64, input: usize, hidden: Vec<usize>, classes: usize, batch: usize) -> Case {
    let spec = HeadSpec::mlp(input, &hidden, classes);
    let mut head = Head::<f64>::init(&spec, Init::Standard, seed).unwrap();
    let mut r = rng(seed ^ 0x5eed);
    // Non-zero biases so their gradients are exercised away from the initial point.
    for layer in head.layers_mut() {
        layer.b.mapv_inplace(|_| r.random_range(-0.5..0.5));
    }
    let x = normal_matrix(&mut r, batch, input);
    let labels = (0..batch)
        .map(|_| r.random_range(0..classes as u32))
        .collect();
    Case { head, x, labels }
}

/// The smallest |pre-activation| of any hidden unit: finite differences are only valid away
/// from ReLU's kink.
fn min_hidden_preactivation(head: &Head<f64>, x: &Array2<f64>) -> f64 {
    let mut a = x.clone();
    let mut smallest = f64::INFINITY;
    let last = head.layers().len() - 1;
    for layer in &head.layers()[..last] {
        let z = a.dot(&layer.w) + layer.b.view().insert_axis(Axis(0));
        smallest = z.iter().fold(smallest, |m, v| m.min(v.abs()));
        a = z.mapv(|v| v.max(0.0));
    }
    smallest
}

fn cross_entropy(spec: &HeadSpec, flat: &[f64], x: &Array2<f64>, labels: &[u32]) -> f64 {
    Head::from_flat(spec, flat)
        .unwrap()
        .evaluate(x.view(), labels)
        .unwrap()
        .loss
}

fn shapes() -> impl Strategy<Value = (u64, usize, Vec<usize>, usize, usize)> {
    (
        any::<u64>(),
        1usize..9,
        prop::collection::vec(1usize..9, 0..3),
        2usize..6,
        1usize..7,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn cross_entropy_gradient_matches_finite_differences(
        (seed, input, hidden, classes, batch) in shapes(),
    ) {
        let c = case(seed, input, hidden, classes, batch);
        prop_assume!(min_hidden_preactivation(&c.head, &c.x) > 1e-3);
        let (loss, grad) = c.head.loss_and_grad(c.x.view(), &c.labels).unwrap();
        let spec = c.head.spec().clone();
        let flat = c.head.to_flat();
        prop_assert!((loss - cross_entropy(&spec, &flat, &c.x, &c.labels)).abs() < 1e-12);
        let numeric = numeric_grad(&flat, H, |p| cross_entropy(&spec, p, &c.x, &c.labels));
        let err = relative_error(&grad.to_flat(), &numeric);
        prop_assert!(err < TOLERANCE, "relative error {err} for {spec:?}");
    }

    #[test]
    fn linear_head_gradient_matches_finite_differences(
        seed in any::<u64>(), input in 1usize..12, classes in 2usize..8, batch in 1usize..9,
    ) {
        let c = case(seed, input, vec![], classes, batch);
        let (_, grad) = c.head.loss_and_grad(c.x.view(), &c.labels).unwrap();
        let spec = c.head.spec().clone();
        let numeric =
            numeric_grad(&c.head.to_flat(), H, |p| cross_entropy(&spec, p, &c.x, &c.labels));
        let err = relative_error(&grad.to_flat(), &numeric);
        prop_assert!(err < TOLERANCE, "relative error {err}");
    }

    #[test]
    fn prox_term_gradient_matches_finite_differences(
        (seed, input, hidden, classes, _batch) in shapes(), mu in 0.001..10.0f64,
    ) {
        let spec = HeadSpec::mlp(input, &hidden, classes);
        let head = Head::<f64>::init(&spec, Init::Standard, seed).unwrap();
        let anchor = Head::<f64>::init(&spec, Init::He, seed.wrapping_add(1)).unwrap();
        let regs = Regularizers { weight_decay: 0.0, prox: Some((mu, &anchor)), wsa: None, step: None };
        let mut grad = Head::zeros(&spec).unwrap();
        let value = regs.add_grad(&head, &mut grad).unwrap();
        let prox_value = |p: &[f64]| {
            let h = Head::from_flat(&spec, p).unwrap();
            let mut scratch = Head::zeros(&spec).unwrap();
            regs.add_grad(&h, &mut scratch).unwrap().prox
        };
        let closed: f64 = 0.5 * mu * head.to_flat().iter().zip(anchor.to_flat())
            .map(|(w, a)| (w - a) * (w - a)).sum::<f64>();
        prop_assert!((value.prox - closed).abs() <= 1e-12 * closed.max(1.0));
        let numeric = numeric_grad(&head.to_flat(), H, prox_value);
        let err = relative_error(&grad.to_flat(), &numeric);
        prop_assert!(err < TOLERANCE, "relative error {err}");
    }

    #[test]
    fn full_objective_gradient_matches_finite_differences(
        (seed, input, hidden, classes, batch) in shapes(),
        lambda in 0.0..20.0f64, mu in 0.0..1.0f64, wd in 0.0..0.1f64, include_biases: bool,
        per_tensor: bool,
    ) {
        let c = case(seed, input, hidden, classes, batch);
        prop_assume!(min_hidden_preactivation(&c.head, &c.x) > 1e-3);
        let spec = c.head.spec().clone();
        let selection = ScopeSelection { include_biases };
        // A tensor of two or three nearly equal values has a tiny σ, and the KL's curvature
        // (∝ 1/σ²) then exceeds what a finite difference of step H resolves: the check is of
        // the gradient, not of that conditioning.
        let scopes = c.head.scopes(selection, 1e-8).unwrap();
        prop_assume!(scopes.iter().all(|s| s.std > 0.05));
        let mut r = rng(seed ^ 0xabc);
        let targets = (0..spec.scoped_tensor_count(selection))
            .map(|_| Scope::new(r.random_range(-0.3..0.3), r.random_range(0.1..1.0)).unwrap())
            .collect();
        // Per tensor: a λ of its own, zero for some (the per-layer ablations).
        let tensor_lambdas = if per_tensor {
            (0..spec.scoped_tensor_count(selection))
                .map(|t| if t % 3 == 1 { 0.0 } else { r.random_range(0.0..20.0) })
                .collect()
        } else {
            Vec::new()
        };
        let wsa = WsaTerm { lambda, targets, selection, eps: 1e-8, tensor_lambdas };
        let anchor = Head::<f64>::init(&spec, Init::Xavier, seed ^ 9).unwrap();
        let regs = Regularizers { weight_decay: wd, prox: Some((mu, &anchor)), wsa: Some(&wsa), step: None };
        let objective = |p: &[f64]| {
            let h = Head::from_flat(&spec, p).unwrap();
            let mut scratch = Head::zeros(&spec).unwrap();
            let reg = regs.add_grad(&h, &mut scratch).unwrap().total();
            cross_entropy(&spec, p, &c.x, &c.labels) + reg
        };
        let (_, mut grad) = c.head.loss_and_grad(c.x.view(), &c.labels).unwrap();
        regs.add_grad(&c.head, &mut grad).unwrap();
        let numeric = numeric_grad(&c.head.to_flat(), H, objective);
        let err = relative_error(&grad.to_flat(), &numeric);
        prop_assert!(err < TOLERANCE, "relative error {err}");
    }
}

#[test]
fn f32_head_agrees_with_its_f64_twin() {
    let c = case(11, 40, vec![16], 5, 8);
    let (loss64, grad64) = c.head.loss_and_grad(c.x.view(), &c.labels).unwrap();
    let head32: Head<f32> = c.head.cast();
    let x32 = c.x.mapv(|v| v as f32);
    let (loss32, grad32) = head32.loss_and_grad(x32.view(), &c.labels).unwrap();
    assert!((loss32 - loss64).abs() < 1e-5);
    let g32: Vec<f64> = grad32.to_flat().iter().map(|&v| f64::from(v)).collect();
    assert!(relative_error(&g32, &grad64.to_flat()) < 1e-5);
}
