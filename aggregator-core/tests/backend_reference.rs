//! The CPU backend against a naive second implementation of every operation (two-pass f64
//! statistics, whole-column sorts, one loop per update), on random inputs, with 1 and several
//! threads: the threaded, blocked and batched paths must agree with the obvious code.

use aggregator_core::backend::{Backend, BackendError, CpuBackend, FoldShape};
use aggregator_core::strategy::Aggregation;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wsa::{HeadSpec, ParamSum, ScopeSelection};

/// Shapes: a small MLP head with scoped biases (gaps none), one without (unscoped gaps), and
/// a longer one (305k values; the threaded backend below splits from 64k values a thread).
fn shapes() -> Vec<FoldShape> {
    let with_biases = ScopeSelection {
        include_biases: true,
    };
    vec![
        FoldShape::of_head(&HeadSpec::mlp(40, &[24], 10), with_biases, 1e-8),
        FoldShape::of_head(
            &HeadSpec::mlp(64, &[32], 10),
            ScopeSelection::default(),
            0.0,
        ),
        FoldShape::of_head(
            &HeadSpec::mlp(600, &[500], 10),
            ScopeSelection::default(),
            1e-8,
        ),
    ]
}

/// One thread, and three splitting every pass of more than 2 × 64k values, so the threaded
/// paths run on the test's sizes.
fn backends() -> [CpuBackend; 2] {
    [
        CpuBackend::new(1),
        CpuBackend::new(3).with_min_per_thread(1 << 16),
    ]
}

/// Values around `center` with a spread, as trained weights look.
fn vector(rng: &mut ChaCha8Rng, len: usize, center: f32) -> Vec<f32> {
    (0..len)
        .map(|_| center + 0.05 * rng.random_range(-1.0f32..1.0))
        .collect()
}

fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-12),
        "{what}: got {got}, want {want}"
    );
}

/// Within one f32 rounding of the naive f64 result.
fn assert_rounded(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = f64::from(f32::EPSILON) * w.abs().max(1e-30);
        assert!((f64::from(g) - w).abs() <= tol, "param {i}: {g} vs {w}");
    }
}

fn naive_mean(ws: &[Vec<f32>], ps: &[f64]) -> Vec<f64> {
    let total: f64 = ps.iter().sum();
    (0..ws[0].len())
        .map(|i| {
            ws.iter()
                .zip(ps)
                .map(|(w, p)| p * f64::from(w[i]))
                .sum::<f64>()
                / total
        })
        .collect()
}

fn naive_distance(w: &[f32], r: &[f32]) -> f64 {
    w.iter()
        .zip(r)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn sorted_column(ws: &[Vec<f32>], i: usize) -> Vec<f64> {
    let mut c: Vec<f64> = ws.iter().map(|w| f64::from(w[i])).collect();
    c.sort_by(f64::total_cmp);
    c
}

#[test]
fn measure_matches_two_pass_statistics() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for shape in shapes() {
        let reference = vector(&mut rng, shape.len, 0.0);
        // A large common offset: the shifted sums must keep the variance.
        for center in [0.0, 300.0] {
            let w = vector(&mut rng, shape.len, center);
            for backend in backends() {
                let mut acc = backend
                    .accumulator(&shape, &reference, Aggregation::Mean, 0)
                    .unwrap();
                let m = acc.measure(&w).unwrap();
                assert_eq!(m.scopes.len(), shape.tensors.len());
                for (t, s) in shape.tensors.iter().zip(&m.scopes) {
                    let x: Vec<f64> = w[t.clone()].iter().map(|&v| f64::from(v)).collect();
                    let n = x.len() as f64;
                    let mean = x.iter().sum::<f64>() / n;
                    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                    let std = (var + shape.eps).sqrt();
                    assert!((s.mean - mean).abs() <= 1e-5 * std, "{s:?} vs {mean}");
                    assert_close("std", s.std, std, 1e-5);
                }
                assert_close("distance", m.distance, naive_distance(&w, &reference), 1e-5);
            }
        }
    }
}

#[test]
fn measure_refuses_non_finite_anywhere_and_keeps_huge_values() {
    let shape = &shapes()[2];
    let reference = vec![0.0; shape.len];
    for backend in backends() {
        let mut acc = backend
            .accumulator(shape, &reference, Aggregation::Mean, 0)
            .unwrap();
        for at in [0, shape.len / 2, shape.len - 1] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut w = vec![0.1f32; shape.len];
                w[at] = bad;
                assert!(matches!(
                    acc.measure(&w),
                    Err(BackendError::Core(wsa::Error::NonFinite { .. }))
                ));
                assert!(acc.add(&w, 1.0, None).is_err());
                assert!(acc.add_batch(&[&w], &[1.0], None).is_err());
            }
        }
        let mut w = vec![0.1f32; shape.len];
        w[7] = 1e30;
        assert_close("huge", acc.measure(&w).unwrap().distance, 1e30, 1e-6);
        assert_eq!(acc.count(), 0);
        assert!(acc.measure(&w[1..]).is_err());
    }
}

#[test]
fn the_weighted_mean_matches_the_naive_sum_on_every_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for shape in shapes() {
        let reference = vector(&mut rng, shape.len, 0.0);
        let ws: Vec<Vec<f32>> = (0..7)
            .map(|k| vector(&mut rng, shape.len, k as f32 * 0.01))
            .collect();
        let ps: Vec<f64> = (0..7).map(|k| 1.0 + 13.0 * k as f64).collect();
        let want = naive_mean(&ws, &ps);
        let mut results = Vec::new();
        for backend in backends() {
            // One by one, with and without a measurement.
            let mut a = backend
                .accumulator(&shape, &reference, Aggregation::Mean, 0)
                .unwrap();
            for (k, (w, &p)) in ws.iter().zip(&ps).enumerate() {
                let m = a.measure(w).unwrap();
                a.add(w, p, (k % 2 == 0).then_some(&m)).unwrap();
            }
            assert_eq!(a.count(), 7);
            assert_close("total", a.total_weight(), ps.iter().sum(), 1e-15);
            let one_by_one = a.finish().unwrap();
            assert_rounded(&one_by_one, &want);
            // Batched: the same f64 sums, so the same f32 results bit for bit.
            let mut b = backend
                .accumulator(&shape, &reference, Aggregation::Mean, 0)
                .unwrap();
            let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
            b.add_batch(&refs[..3], &ps[..3], None).unwrap();
            b.add_batch(&refs[3..], &ps[3..], None).unwrap();
            assert_eq!(b.finish().unwrap(), one_by_one);
            // Split across two accumulators and merged through the portable sum.
            let mut c = backend
                .accumulator(&shape, &reference, Aggregation::Mean, 0)
                .unwrap();
            let mut d = backend
                .accumulator(&shape, &reference, Aggregation::Mean, 0)
                .unwrap();
            for (k, (w, &p)) in ws.iter().zip(&ps).enumerate() {
                let side = if k < 4 { &mut c } else { &mut d };
                side.add(w, p, None).unwrap();
            }
            c.merge(&d.partial().unwrap()).unwrap();
            assert_rounded(&c.finish().unwrap(), &want);
            results.push(one_by_one);
        }
        assert_eq!(
            results[0], results[1],
            "the thread count changed the result"
        );
    }
}

#[test]
fn norm_clipping_matches_clipping_each_step_by_hand() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for shape in shapes() {
        let reference = vector(&mut rng, shape.len, 0.0);
        // Steps of growing size: the first ones pass unclipped, the last are cut.
        let ws: Vec<Vec<f32>> = (0..6)
            .map(|k| {
                let scale = 0.5f32 * 4f32.powi(k);
                reference
                    .iter()
                    .map(|&r| r + scale * rng.random_range(-1.0f32..1.0))
                    .collect()
            })
            .collect();
        let ps = [3.0, 1.0, 2.0, 5.0, 1.0, 4.0];
        let distances: Vec<f64> = ws.iter().map(|w| naive_distance(w, &reference)).collect();
        let mut sorted = distances.clone();
        sorted.sort_by(f64::total_cmp);
        let max_norm = sorted[2];
        // Each clipped update, and the size of its clipped step per coordinate: the backend
        // measures the distance (and so the factor) to ~1e-6 relative, so a result may be off
        // by that much of the steps that were folded into it.
        let mut clipped: Vec<Vec<f64>> = Vec::new();
        let mut steps: Vec<Vec<f64>> = Vec::new();
        for (w, &d) in ws.iter().zip(&distances) {
            let c = if d > max_norm { max_norm / d } else { 1.0 };
            let step: Vec<f64> = w
                .iter()
                .zip(&reference)
                .map(|(&x, &r)| c * (f64::from(x) - f64::from(r)))
                .collect();
            clipped.push(
                step.iter()
                    .zip(&reference)
                    .map(|(s, &r)| f64::from(r) + s)
                    .collect(),
            );
            steps.push(step);
        }
        let total: f64 = ps.iter().sum();
        let weighted = |of: &Vec<Vec<f64>>, i: usize, f: fn(f64) -> f64| {
            of.iter().zip(&ps).map(|(v, p)| p * f(v[i])).sum::<f64>() / total
        };
        let want: Vec<f64> = (0..shape.len)
            .map(|i| weighted(&clipped, i, |x| x))
            .collect();
        let slack: Vec<f64> = (0..shape.len)
            .map(|i| 1e-5 * weighted(&steps, i, f64::abs))
            .collect();
        let rule = Aggregation::NormClipped { max_norm };
        for backend in backends() {
            let mut a = backend.accumulator(&shape, &reference, rule, 0).unwrap();
            for (k, (w, &p)) in ws.iter().zip(&ps).enumerate() {
                let m = a.measure(w).unwrap();
                a.add(w, p, (k % 2 == 1).then_some(&m)).unwrap();
            }
            let got = a.finish().unwrap();
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let tol = f64::from(f32::EPSILON) * w.abs() + slack[i];
                assert!((f64::from(g) - w).abs() <= tol, "param {i}: {g} vs {w}");
            }
            let mut b = backend.accumulator(&shape, &reference, rule, 0).unwrap();
            let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
            b.add_batch(&refs, &ps, None).unwrap();
            assert_eq!(b.finish().unwrap(), got);
        }
    }
}

#[test]
fn median_and_trimmed_mean_match_sorted_columns() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for shape in shapes() {
        let reference = vec![0.0; shape.len];
        for n in [1usize, 2, 5, 8] {
            let ws: Vec<Vec<f32>> = (0..n).map(|_| vector(&mut rng, shape.len, 0.0)).collect();
            let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
            let ps = vec![1.0; n];
            for (rule, trim) in [
                (Aggregation::Median, None),
                (Aggregation::TrimmedMean { trim: 0.0 }, Some(0.0)),
                (Aggregation::TrimmedMean { trim: 0.25 }, Some(0.25)),
                (Aggregation::TrimmedMean { trim: 0.4 }, Some(0.4)),
            ] {
                let want: Vec<f64> = (0..shape.len)
                    .map(|i| {
                        let c = sorted_column(&ws, i);
                        match trim {
                            None if n % 2 == 1 => c[n / 2],
                            None => (c[n / 2 - 1] + c[n / 2]) / 2.0,
                            Some(t) => {
                                let k = ((t * n as f64).floor() as usize).min((n - 1) / 2);
                                c[k..n - k].iter().sum::<f64>() / (n - 2 * k) as f64
                            }
                        }
                    })
                    .collect();
                for backend in backends() {
                    let mut a = backend.accumulator(&shape, &reference, rule, n).unwrap();
                    a.add_batch(&refs, &ps, None).unwrap();
                    let got = a.finish().unwrap();
                    assert_rounded(&got, &want);
                    let mut b = backend.accumulator(&shape, &reference, rule, n).unwrap();
                    for w in &ws {
                        let m = b.measure(w).unwrap();
                        b.add(w, 1.0, Some(&m)).unwrap();
                    }
                    assert_eq!(b.finish().unwrap(), got, "{rule:?}, {n} updates");
                }
            }
        }
    }
}

#[test]
fn robust_rules_ignore_weights_and_resist_one_outlier() {
    let shape = &shapes()[1];
    let reference = vec![0.0; shape.len];
    let honest = vec![1.0f32; shape.len];
    let attacker = vec![1e6f32; shape.len];
    for rule in [Aggregation::Median, Aggregation::TrimmedMean { trim: 0.2 }] {
        let mut a = CpuBackend::default()
            .accumulator(shape, &reference, rule, 5)
            .unwrap();
        for _ in 0..4 {
            a.add(&honest, 1.0, None).unwrap();
        }
        a.add(&attacker, 1e9, None).unwrap();
        assert!(a.finish().unwrap().iter().all(|&x| x == 1.0), "{rule:?}");
    }
}

#[test]
fn bounds_and_refusals_leave_the_fold_as_it_was() {
    let shape = &shapes()[0];
    let reference = vec![0.0; shape.len];
    let w = vec![0.5f32; shape.len];
    let backend = CpuBackend::default();
    for rule in [
        Aggregation::Mean,
        Aggregation::NormClipped { max_norm: 1.0 },
        Aggregation::Median,
        Aggregation::TrimmedMean { trim: 0.1 },
    ] {
        let mut a = backend.accumulator(shape, &reference, rule, 2).unwrap();
        assert!(a.finish().is_err(), "{rule:?}: finish with nothing folded");
        a.add(&w, 2.0, None).unwrap();
        let before = a.finish().unwrap();
        // Bad weight, wrong length, a batch with one bad member: nothing changes.
        for p in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(a.add(&w, p, None).is_err());
        }
        assert!(a.add(&w[1..], 1.0, None).is_err());
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        assert!(a.add_batch(&[&w, &bad], &[1.0, 1.0], None).is_err());
        assert!(a.add_batch(&[&w], &[1.0, 1.0], None).is_err());
        assert_eq!(a.count(), 1);
        assert_eq!(a.finish().unwrap(), before);
        if rule.stores_updates() {
            a.add(&w, 1.0, None).unwrap();
            assert!(matches!(
                a.add(&w, 1.0, None),
                Err(BackendError::Capacity(_))
            ));
            assert!(matches!(a.partial(), Err(BackendError::Unsupported { .. })));
            assert!(a.merge(&ParamSum::new(shape.len)).is_err());
        }
    }
    // A storing rule refuses a round that cannot fit its bound up front.
    let small = CpuBackend::new(1).with_max_stored_bytes(4 * shape.len * 3);
    assert!(
        small
            .accumulator(shape, &reference, Aggregation::Median, 3)
            .is_ok()
    );
    assert!(matches!(
        small.accumulator(shape, &reference, Aggregation::Median, 4),
        Err(BackendError::Capacity(_))
    ));
    assert!(
        backend
            .accumulator(shape, &reference, Aggregation::TrimmedMean { trim: 0.5 }, 2)
            .is_err()
    );
}
