//! The KL regularizer against closed forms, quadrature and finite differences, and its pull on
//! a layer's scope under plain gradient descent.

mod common;

use common::{normal_vec, numeric_grad, relative_error, rng};
use proptest::prelude::*;
use wsa::{Error, Scope, add_kl_grad, add_kl_grad_for_step, kl};

/// `∫ p ln(p/q)` by the trapezoid rule over μ ± 14σ: an independent reference for [`kl`].
fn kl_by_quadrature(p: Scope, q: Scope) -> f64 {
    let pdf = |x: f64, s: Scope| {
        let z = (x - s.mean) / s.std;
        (-0.5 * z * z).exp() / (s.std * (2.0 * std::f64::consts::PI).sqrt())
    };
    let log_ratio = |x: f64| {
        let zp = (x - p.mean) / p.std;
        let zq = (x - q.mean) / q.std;
        (q.std / p.std).ln() - 0.5 * zp * zp + 0.5 * zq * zq
    };
    let (lo, hi, steps) = (p.mean - 14.0 * p.std, p.mean + 14.0 * p.std, 200_000);
    let h = (hi - lo) / steps as f64;
    let mut sum = 0.0;
    for i in 0..=steps {
        let x = lo + i as f64 * h;
        let w = if i == 0 || i == steps { 0.5 } else { 1.0 };
        sum += w * pdf(x, p) * log_ratio(x);
    }
    sum * h
}

#[test]
fn kl_is_zero_at_the_target() {
    for (m, s) in [(0.0, 1.0), (-0.3, 0.02), (5.0, 17.0)] {
        let t = Scope::new(m, s).unwrap();
        assert!(kl(t, t).abs() < 1e-15, "KL(t‖t) = {}", kl(t, t));
    }
}

#[test]
fn kl_gradient_vanishes_when_the_tensor_has_the_target_scope() {
    let w: Vec<f64> = normal_vec(&mut rng(7), 500, 0.1, 0.3);
    let target = Scope::of(&w, 0.0).unwrap();
    let mut g = vec![0.0; w.len()];
    let value = add_kl_grad(&w, target, 0.0, 1.0, &mut g).unwrap();
    assert!(value.abs() < 1e-12);
    assert!(g.iter().all(|x| x.abs() < 1e-12));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn kl_matches_the_closed_form_and_quadrature(
        mp in -2.0..2.0f64, sp in 0.05..3.0f64, mq in -2.0..2.0f64, sq in 0.05..3.0f64,
    ) {
        let (p, q) = (Scope::new(mp, sp).unwrap(), Scope::new(mq, sq).unwrap());
        let closed = (sq / sp).ln() + (sp * sp + (mp - mq).powi(2)) / (2.0 * sq * sq) - 0.5;
        prop_assert!((kl(p, q) - closed).abs() <= 1e-12 * closed.abs().max(1.0));
        let quad = kl_by_quadrature(p, q);
        prop_assert!((kl(p, q) - quad).abs() <= 1e-6 * quad.abs().max(1.0),
            "closed {} vs quadrature {}", kl(p, q), quad);
        prop_assert!(kl(p, q) >= -1e-15);
    }

    #[test]
    fn kl_value_from_a_tensor_matches_its_measured_scope(
        seed in any::<u64>(), n in 2usize..300, mq in -1.0..1.0f64, sq in 0.01..2.0f64,
    ) {
        let w = normal_vec(&mut rng(seed), n, 0.2, 0.5);
        let target = Scope::new(mq, sq).unwrap();
        let mut g = vec![0.0; n];
        let value = add_kl_grad(&w, target, 1e-8, 1.0, &mut g).unwrap();
        let scope = Scope::of(&w, 1e-8).unwrap();
        prop_assert!((value - kl(scope, target)).abs() <= 1e-12 * value.abs().max(1.0));
    }

    #[test]
    fn kl_gradient_matches_finite_differences(
        seed in any::<u64>(), n in 2usize..60, mean in -1.0..1.0f64, std in 0.05..2.0f64,
        mq in -1.0..1.0f64, sq in 0.05..2.0f64, scale in 0.1..50.0f64,
    ) {
        let w = normal_vec(&mut rng(seed), n, mean, std);
        let target = Scope::new(mq, sq).unwrap();
        let eps = 1e-8;
        // Gradients accumulate into the buffer: start from a non-zero one.
        let base = normal_vec(&mut rng(seed ^ 1), n, 0.0, 1.0);
        let mut g = base.clone();
        add_kl_grad(&w, target, eps, scale, &mut g).unwrap();
        let analytic: Vec<f64> = g.iter().zip(&base).map(|(a, b)| a - b).collect();
        let numeric = numeric_grad(&w, 1e-6, |v| scale * kl(Scope::of(v, eps).unwrap(), target));
        let err = relative_error(&analytic, &numeric);
        prop_assert!(err < 1e-6, "relative error {err}");
    }
}

#[test]
fn gradient_descent_on_kl_alone_reaches_the_target_scope() {
    let n = 4096;
    let mut w = normal_vec(&mut rng(3), n, 0.5, 0.05);
    let target = Scope::new(-0.1, 0.2).unwrap();
    let lambda = 1.0;
    // The 1/n normalisation makes the per-scalar gradient tiny; a step of n·σ̃²/2 halves the
    // distance to the target in both μ and σ every iteration.
    let lr = n as f64 * target.std * target.std / 2.0;
    let mut g = vec![0.0; n];
    let start = kl(Scope::of(&w, 0.0).unwrap(), target);
    for _ in 0..60 {
        g.iter_mut().for_each(|x| *x = 0.0);
        add_kl_grad(&w, target, 0.0, lambda, &mut g).unwrap();
        w.iter_mut().zip(&g).for_each(|(x, d)| *x -= lr * d);
    }
    let end = Scope::of(&w, 0.0).unwrap();
    assert!(
        start > 1.0,
        "the start must be far from the target: KL {start}"
    );
    assert!((end.mean - target.mean).abs() < 1e-9, "μ = {}", end.mean);
    assert!((end.std - target.std).abs() < 1e-9, "σ = {}", end.std);
    assert!(kl(end, target) < 1e-12);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let t = Scope::new(0.0, 1.0).unwrap();
    let mut g = vec![0.0f32; 3];
    assert_eq!(
        add_kl_grad::<f32>(&[], t, 1e-8, 1.0, &mut []),
        Err(Error::Empty { what: "tensor" })
    );
    assert!(matches!(
        add_kl_grad(&[1.0f32, 2.0], t, 1e-8, 1.0, &mut g),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        add_kl_grad(&[1.0f32, f32::NAN, 0.0], t, 1e-8, 1.0, &mut g),
        Err(Error::NonFinite { .. })
    ));
    let bad_target = Scope {
        mean: 0.0,
        std: 0.0,
    };
    assert!(matches!(
        add_kl_grad(&[1.0f32, 2.0, 3.0], bad_target, 1e-8, 1.0, &mut g),
        Err(Error::InvalidScope { .. })
    ));
    assert!(matches!(
        Scope::new(f64::NAN, 1.0),
        Err(Error::InvalidScope { .. })
    ));
    assert!(matches!(
        Scope::new(0.0, -1.0),
        Err(Error::InvalidScope { .. })
    ));
    assert!(matches!(
        Scope::of::<f32>(&[], 1e-8),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        Scope::of(&[f32::INFINITY], 1e-8),
        Err(Error::NonFinite { .. })
    ));
}

/// Where a plain step on the term is stable (`lr` times its curvature below 2 in μ and σ), the
/// step-limited gradient is the exact one; a 1280×256 layer at λ = 100, lr 0.05 is such a case.
#[test]
fn the_step_limited_gradient_is_exact_where_plain_steps_are_stable() {
    let n = 1280 * 256;
    let w = normal_vec(&mut rng(5), n, 0.001, 0.031);
    let target = Scope::new(0.0, 0.03).unwrap();
    let (mut exact, mut limited) = (vec![0.0f64; n], vec![0.0f64; n]);
    add_kl_grad(&w, target, 1e-8, 100.0, &mut exact).unwrap();
    add_kl_grad_for_step(&w, target, 1e-8, 100.0, 0.05, &mut limited).unwrap();
    assert_eq!(exact, limited);
}

/// A zero-initialised bias (σ = √ε) under λ = 100: the exact gradient's step throws σ orders of
/// magnitude past the target; the step-limited one lands at most half again past it, and
/// plain steps of it converge to the target from either side.
#[test]
fn step_limited_kl_steps_converge_where_plain_ones_explode() {
    let (lr, lambda, eps) = (0.05, 100.0, 1e-8);
    let target = Scope::new(0.0, 0.006).unwrap();
    let mut w = normal_vec(&mut rng(9), 10, 0.0, 1e-4);
    let step = |w: &mut Vec<f64>, limited: bool| {
        let mut g = vec![0.0f64; w.len()];
        if limited {
            add_kl_grad_for_step(w, target, eps, lambda, lr, &mut g).unwrap();
        } else {
            add_kl_grad(w, target, eps, lambda, &mut g).unwrap();
        }
        w.iter_mut().zip(&g).for_each(|(x, d)| *x -= lr * d);
    };
    let mut plain = w.clone();
    step(&mut plain, false);
    let exploded = Scope::of(&plain, eps).unwrap().std;
    assert!(exploded > 100.0 * target.std, "plain step: σ = {exploded}");
    step(&mut w, true);
    let first = Scope::of(&w, eps).unwrap().std;
    assert!(
        first <= 1.5 * target.std + 1e-9,
        "limited step: σ = {first}"
    );
    // 200 limited steps end on the target's σ, from below and from far above.
    let settle = |mut w: Vec<f64>| {
        for _ in 0..200 {
            step(&mut w, true);
        }
        let end = Scope::of(&w, eps).unwrap();
        assert!(
            (end.std - target.std).abs() < 1e-4 * target.std,
            "σ = {}",
            end.std
        );
        end
    };
    settle(w);
    let end = settle(normal_vec(&mut rng(10), 10, 0.5, 3.0));
    assert!(end.mean.abs() < 1e-4 * target.std, "μ = {}", end.mean);
    let mut g = vec![0.0f64; 3];
    assert!(add_kl_grad_for_step(&[1.0f64, 2.0, 3.0], target, eps, 1.0, 0.0, &mut g).is_err());
}
