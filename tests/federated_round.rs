//! One federated round across the crates: edge clients train locally, the aggregator folds
//! their updates; the next global head is the sample-weighted mean of the client heads and the
//! next targets are the fused client scopes (as the aggregator measures them), both checked
//! against direct computations.

use aggregator_core::backend::{CpuBackend, FoldShape};
use aggregator_core::strategy::{
    Aggregation, FoldPolicy, RoundFold, Strategy, TargetFusion, TargetPolicy,
};
use edge_client::{TrainingTask, local_round};
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
use wsa::{
    DEFAULT_SCOPE_EPS, FusionRule, Head, HeadSpec, Init, ScopeSelection, Sgd, Weighting, kl,
};

#[test]
fn a_wsa_round_averages_heads_and_fuses_scopes() {
    let problem = SyntheticProblem::new(SyntheticSpec::default(), 4).unwrap();
    let shards: Vec<_> = (0..4)
        .map(|c| problem.sample(200 + 150 * c, 10 + c as u64).unwrap())
        .collect();
    let spec = HeadSpec::mlp(32, &[24], 10);
    let global = Head::<f32>::init(&spec, Init::Standard, 1).unwrap();
    let targets = global
        .scopes(ScopeSelection::default(), wsa::DEFAULT_SCOPE_EPS)
        .unwrap();
    let strategy = Strategy::wsa(5.0, FusionRule::Mixture);
    let sgd = Sgd {
        epochs: 2,
        batch_size: 16,
        ..Sgd::default()
    };
    let selection = ScopeSelection::default();
    let shape = FoldShape::of_head(&spec, selection, DEFAULT_SCOPE_EPS);
    let task = TrainingTask {
        round: 0,
        global: global.clone(),
        train: strategy.client_config(&sgd, 0, 0, &targets, selection, &shape),
    };
    assert!(task.train.wsa.is_some());

    // The plain definition: no share cap, the paper's weighted fusion, and bounds wide enough
    // not to bind.
    let policy = FoldPolicy {
        weighting: Weighting::SampleCount,
        max_share: 1.0,
        max_weight: f64::INFINITY,
        targets: TargetPolicy {
            fusion: TargetFusion::FollowRule,
            max_std_ratio: 1e6,
            max_mean_shift: 1e6,
            std_floor: 0.0,
            align_head: false,
        },
        floors: vec![0.0; targets.len()],
        dp: None,
    };
    let mut fold = RoundFold::open(
        &CpuBackend::default(),
        &shape,
        &global.to_flat(),
        &targets,
        strategy,
        Aggregation::Mean,
        policy,
        shards.len(),
    )
    .unwrap();
    let updates: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(c, d)| local_round(&task, d, c as u64).unwrap())
        .collect();
    for (c, u) in updates.iter().enumerate() {
        let measured = fold.measure(&u.params).unwrap();
        fold.add(
            &protocol::client_id(c),
            &u.params,
            &measured,
            u.metrics.n_samples,
        )
        .unwrap();
    }
    // A malformed update is refused and changes nothing.
    assert!(fold.measure(&updates[0].params[1..]).is_err());
    let measured = fold.measure(&updates[0].params).unwrap();
    assert!(
        fold.add(&protocol::client_id(0), &updates[0].params, &measured, 10)
            .is_err(),
        "one update per client"
    );
    assert_eq!(fold.accepted(), 4);
    let folded = fold.finish().unwrap();
    let next = Head::from_flat(&spec, &folded.params).unwrap();
    let fused = folded.targets.clone();
    check_drift(&folded, &global.to_flat(), &updates);

    let total: f64 = updates.iter().map(|u| u.metrics.n_samples as f64).sum();
    for (i, &got) in next.to_flat().iter().enumerate() {
        let want: f64 = updates
            .iter()
            .map(|u| u.metrics.n_samples as f64 * f64::from(u.params[i]))
            .sum::<f64>()
            / total;
        assert!(
            (f64::from(got) - want).abs() < 1e-6,
            "param {i}: {got} vs {want}"
        );
    }
    for (t, s) in fused.iter().enumerate() {
        let p = |u: &edge_client::ClientUpdate| u.metrics.n_samples as f64 / total;
        let mean: f64 = updates.iter().map(|u| p(u) * u.scopes[t].mean).sum();
        let second: f64 = updates
            .iter()
            .map(|u| p(u) * (u.scopes[t].std.powi(2) + u.scopes[t].mean.powi(2)))
            .sum();
        // The fold fuses the scopes it measured, which agree with the clients' own to the
        // rounding of its f32 sums.
        let std = (second - mean * mean).sqrt();
        assert!((s.mean - mean).abs() < 1e-6 * std);
        assert!((s.std - std).abs() < 1e-6 * std);
    }
    assert_ne!(next, global, "the round must move the global head");
    // The fused target is not the scope of the averaged head: averaging shrinks σ.
    let averaged_scopes = next
        .scopes(ScopeSelection::default(), wsa::DEFAULT_SCOPE_EPS)
        .unwrap();
    assert!(
        averaged_scopes
            .iter()
            .zip(&fused)
            .any(|(a, f)| kl(*a, *f) > 0.0)
    );
}

/// The fold's drift figures against a direct computation from the updates.
fn check_drift(
    folded: &aggregator_core::strategy::Folded,
    global: &[f32],
    updates: &[edge_client::ClientUpdate],
) {
    let step = |w: &[f32]| -> Vec<f64> {
        w.iter()
            .zip(global)
            .map(|(&w, &g)| f64::from(w) - f64::from(g))
            .collect()
    };
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let round_step = step(&folded.params);
    let cosines: Vec<f64> = updates
        .iter()
        .map(|u| {
            let s = step(&u.params);
            let dot: f64 = s.iter().zip(&round_step).map(|(a, b)| a * b).sum();
            dot / (norm(&s) * norm(&round_step))
        })
        .collect();
    let want_cosine = cosines.iter().sum::<f64>() / cosines.len() as f64;
    let mean_norm =
        updates.iter().map(|u| norm(&step(&u.params))).sum::<f64>() / updates.len() as f64;
    let want_agreement = norm(&round_step) / mean_norm;
    let drift = &folded.drift;
    let cosine = drift.step_cosine.unwrap();
    let agreement = drift.step_agreement.unwrap();
    assert!(
        (cosine - want_cosine).abs() < 1e-6,
        "{cosine} vs {want_cosine}"
    );
    assert!(
        (agreement - want_agreement).abs() < 1e-6,
        "{agreement} vs {want_agreement}"
    );
    // Non-IID shards: the clients neither agree fully nor cancel.
    assert!(cosine > 0.0 && cosine < 1.0, "{cosine}");
    for (t, (&m, &s)) in drift.mean_spread.iter().zip(&drift.std_spread).enumerate() {
        let means: Vec<f64> = updates.iter().map(|u| u.scopes[t].mean).collect();
        let stds: Vec<f64> = updates.iter().map(|u| u.scopes[t].std).collect();
        let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let sd = |v: &[f64]| {
            let a = avg(v);
            (v.iter().map(|x| (x - a) * (x - a)).sum::<f64>() / v.len() as f64).sqrt()
        };
        // The fold measures scopes in f32 sums; the clients in f64.
        assert!((m - sd(&means) / avg(&stds)).abs() < 1e-4, "tensor {t}");
        assert!((s - sd(&stds) / avg(&stds)).abs() < 1e-4, "tensor {t}");
    }
    assert_eq!(drift.mean_spread.len(), updates[0].scopes.len());
}
