//! Scope fusion and parameter averaging: fixed points, order independence, grouped = flat, and
//! a second, direct implementation of each formula as the reference.

mod common;

use common::{normal_vec, rng};
use proptest::prelude::*;
use rand::Rng;
use rand::seq::SliceRandom;
use wsa::{Error, FusionRule, ParamSum, Scope, ScopeFusion, Weighting};

const RULES: [FusionRule; 3] = [
    FusionRule::MeanStd,
    FusionRule::RootMeanVar,
    FusionRule::Mixture,
];

struct Client {
    scopes: Vec<Scope>,
    params: Vec<f32>,
    n_samples: u64,
}

fn clients(seed: u64, k: usize, tensors: usize, params: usize) -> Vec<Client> {
    let mut r = rng(seed);
    (0..k)
        .map(|_| Client {
            scopes: (0..tensors)
                .map(|_| Scope::new(r.random_range(-1.0..1.0), r.random_range(0.01..2.0)).unwrap())
                .collect(),
            params: normal_vec(&mut r, params, 0.0, 1.0)
                .iter()
                .map(|&v| v as f32)
                .collect(),
            n_samples: r.random_range(1..5000),
        })
        .collect()
}

fn fuse(cs: &[Client], weighting: Weighting, tensors: usize) -> ScopeFusion {
    let mut f = ScopeFusion::new(tensors);
    for c in cs {
        f.add(&c.scopes, weighting.weight(c.n_samples)).unwrap();
    }
    f
}

fn average(cs: &[Client], weighting: Weighting, len: usize) -> ParamSum {
    let mut s = ParamSum::new(len);
    for c in cs {
        s.add(&c.params, weighting.weight(c.n_samples)).unwrap();
    }
    s
}

/// The formulas of design.md written out directly over normalised weights.
fn reference_fusion(cs: &[Client], weighting: Weighting, t: usize, rule: FusionRule) -> Scope {
    let total: f64 = cs.iter().map(|c| weighting.weight(c.n_samples)).sum();
    let p = |c: &Client| weighting.weight(c.n_samples) / total;
    let mean: f64 = cs.iter().map(|c| p(c) * c.scopes[t].mean).sum();
    let std = match rule {
        FusionRule::MeanStd => cs.iter().map(|c| p(c) * c.scopes[t].std).sum(),
        FusionRule::RootMeanVar => cs
            .iter()
            .map(|c| p(c) * c.scopes[t].std.powi(2))
            .sum::<f64>()
            .sqrt(),
        FusionRule::Mixture => (cs
            .iter()
            .map(|c| p(c) * (c.scopes[t].std.powi(2) + c.scopes[t].mean.powi(2)))
            .sum::<f64>()
            - mean * mean)
            .sqrt(),
    };
    Scope { mean, std }
}

fn close(a: Scope, b: Scope) -> bool {
    (a.mean - b.mean).abs() <= 1e-12 * a.mean.abs().max(1.0)
        && (a.std - b.std).abs() <= 1e-12 * a.std.abs().max(1.0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fusion_matches_the_formulas(seed in any::<u64>(), k in 1usize..20, tensors in 1usize..5,
                                   uniform: bool) {
        let weighting = if uniform { Weighting::Uniform } else { Weighting::SampleCount };
        let cs = clients(seed, k, tensors, 1);
        let fused = fuse(&cs, weighting, tensors);
        for rule in RULES {
            let got = fused.finish(rule).unwrap();
            for (t, &s) in got.iter().enumerate() {
                let want = reference_fusion(&cs, weighting, t, rule);
                prop_assert!(close(s, want), "{rule:?}: {s:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn identical_scopes_fuse_to_themselves(mean in -1.0..1.0f64, std in 1e-4..3.0f64,
                                           k in 1usize..30, seed in any::<u64>()) {
        let s = Scope::new(mean, std).unwrap();
        let mut f = ScopeFusion::new(1);
        let mut r = rng(seed);
        for _ in 0..k {
            f.add(&[s], r.random_range(0.1..100.0)).unwrap();
        }
        for rule in RULES {
            let got = f.finish(rule).unwrap()[0];
            prop_assert!((got.mean - mean).abs() < 1e-12 && (got.std - std).abs() < 1e-9 * std.max(1.0),
                "{rule:?}: {got:?} vs {s:?}");
        }
    }

    #[test]
    fn fusion_and_averaging_ignore_client_order(seed in any::<u64>(), k in 2usize..20) {
        let mut cs = clients(seed, k, 3, 17);
        let fused = fuse(&cs, Weighting::SampleCount, 3);
        let avg = average(&cs, Weighting::SampleCount, 17).finish::<f64>().unwrap();
        cs.shuffle(&mut rng(seed ^ 77));
        let fused2 = fuse(&cs, Weighting::SampleCount, 3);
        let avg2 = average(&cs, Weighting::SampleCount, 17).finish::<f64>().unwrap();
        for rule in RULES {
            for (a, b) in fused.finish(rule).unwrap().into_iter().zip(fused2.finish(rule).unwrap()) {
                prop_assert!(close(a, b));
            }
        }
        for (a, b) in avg.iter().zip(&avg2) {
            prop_assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0));
        }
    }

    #[test]
    fn grouped_fusion_and_averaging_equal_flat(seed in any::<u64>(), k in 2usize..30,
                                               groups in 1usize..6, uniform: bool) {
        let weighting = if uniform { Weighting::Uniform } else { Weighting::SampleCount };
        let cs = clients(seed, k, 2, 9);
        let flat_f = fuse(&cs, weighting, 2);
        let flat_a = average(&cs, weighting, 9);
        // Split the clients into consecutive groups (some may be empty) and pre-fuse each one,
        // as a lower tier of aggregators would; then carry the sums up and merge them.
        let mut cuts: Vec<usize> = (0..groups.saturating_sub(1)).map(|i| (seed as usize >> i) % (k + 1)).collect();
        cuts.sort_unstable();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(k);
        let mut top_f = ScopeFusion::new(2);
        let mut top_a = ParamSum::new(9);
        for w in bounds.windows(2) {
            let group = &cs[w[0]..w[1]];
            let sums = fuse(group, weighting, 2).sums().to_vec();
            top_f.merge(&ScopeFusion::from_sums(sums)).unwrap();
            let a = average(group, weighting, 9);
            top_a.merge(&ParamSum::from_parts(a.total_weight(), a.weighted().to_vec()).unwrap()).unwrap();
        }
        for rule in RULES {
            for (a, b) in flat_f.finish(rule).unwrap().into_iter().zip(top_f.finish(rule).unwrap()) {
                prop_assert!(close(a, b), "{rule:?}: {a:?} vs {b:?}");
            }
        }
        let (fa, ta) = (flat_a.finish::<f64>().unwrap(), top_a.finish::<f64>().unwrap());
        for (a, b) in fa.iter().zip(&ta) {
            prop_assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0));
        }
    }

    #[test]
    fn averaging_matches_a_direct_weighted_mean(seed in any::<u64>(), k in 1usize..20, len in 0usize..40) {
        let cs = clients(seed, k, 1, len);
        let got = average(&cs, Weighting::SampleCount, len).finish::<f64>().unwrap();
        let total: f64 = cs.iter().map(|c| c.n_samples as f64).sum();
        for (i, g) in got.iter().enumerate() {
            let want: f64 = cs.iter().map(|c| c.n_samples as f64 * f64::from(c.params[i])).sum::<f64>() / total;
            prop_assert!((g - want).abs() <= 1e-12 * want.abs().max(1.0));
        }
    }
}

#[test]
fn mixture_rule_widens_for_disagreeing_means() {
    let mut f = ScopeFusion::new(1);
    f.add(&[Scope::new(-1.0, 0.5).unwrap()], 1.0).unwrap();
    f.add(&[Scope::new(1.0, 0.5).unwrap()], 1.0).unwrap();
    assert!(close(
        f.finish(FusionRule::MeanStd).unwrap()[0],
        Scope {
            mean: 0.0,
            std: 0.5
        }
    ));
    assert!(close(
        f.finish(FusionRule::RootMeanVar).unwrap()[0],
        Scope {
            mean: 0.0,
            std: 0.5
        }
    ));
    assert!(close(
        f.finish(FusionRule::Mixture).unwrap()[0],
        Scope {
            mean: 0.0,
            std: 1.25f64.sqrt()
        }
    ));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let s = Scope::new(0.0, 1.0).unwrap();
    let mut f = ScopeFusion::new(2);
    assert!(matches!(f.add(&[s], 1.0), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(
        f.add(&[s, s], f64::NAN),
        Err(Error::ZeroTotalWeight { .. })
    ));
    assert!(matches!(
        f.add(&[s, s], -1.0),
        Err(Error::ZeroTotalWeight { .. })
    ));
    assert!(matches!(
        f.add(
            &[
                s,
                Scope {
                    mean: 0.0,
                    std: -2.0
                }
            ],
            1.0
        ),
        Err(Error::InvalidScope { .. })
    ));
    assert!(matches!(
        f.finish(FusionRule::MeanStd),
        Err(Error::ZeroTotalWeight { .. })
    ));
    f.add(&[s, s], 0.0).unwrap();
    assert!(
        matches!(f.finish(FusionRule::MeanStd), Err(Error::ZeroTotalWeight { total }) if total == 0.0)
    );
    assert!(matches!(
        ScopeFusion::new(0).finish(FusionRule::MeanStd),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        f.merge(&ScopeFusion::new(3)),
        Err(Error::ShapeMismatch { .. })
    ));

    let mut a = ParamSum::new(3);
    assert!(matches!(
        a.add(&[1.0f32, 2.0], 1.0),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        a.add(&[1.0f32, f32::NAN, 0.0], 1.0),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        a.finish::<f32>(),
        Err(Error::ZeroTotalWeight { .. })
    ));
    assert!(matches!(
        a.merge(&ParamSum::new(4)),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        ParamSum::from_parts(-1.0, vec![]),
        Err(Error::ZeroTotalWeight { .. })
    ));
    assert!(matches!(
        ParamSum::from_parts(1.0, vec![f64::INFINITY]),
        Err(Error::NonFinite { .. })
    ));
    // A rejected update leaves the accepted sum untouched.
    a.add(&[1.0f32, 2.0, 3.0], 2.0).unwrap();
    let before = a.clone();
    assert!(a.add(&[1.0f32, f32::NAN, 3.0], 1.0).is_err());
    assert_eq!(a, before);
}
