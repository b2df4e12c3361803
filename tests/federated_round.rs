//! One federated round across the crates: edge clients train locally, the aggregator folds
//! their updates; the next global head is the sample-weighted mean of the client heads and the
//! next targets are the fused client scopes, both checked against direct computations.

use aggregator::{RoundFold, Strategy};
use edge_client::{RoundTask, local_round};
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
use wsa::{FusionRule, Head, HeadSpec, Init, ScopeSelection, TrainConfig, Weighting, kl};

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
    let strategy = Strategy::Wsa {
        lambda: 5.0,
        rule: FusionRule::Mixture,
    };
    let base = TrainConfig {
        epochs: 2,
        batch_size: 16,
        ..TrainConfig::default()
    };
    let task = RoundTask {
        round: 0,
        global: global.clone(),
        train: strategy.client_config(&base, &targets),
    };
    assert!(task.train.wsa.is_some());

    let mut fold = RoundFold::new(&spec, ScopeSelection::default(), Weighting::SampleCount);
    let updates: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(c, d)| local_round(&task, d, c as u64).unwrap())
        .collect();
    for u in &updates {
        fold.add(&u.params, &u.scopes, u.metrics.n_samples).unwrap();
    }
    // A malformed update is refused and changes nothing.
    assert!(
        fold.add(&updates[0].params[1..], &updates[0].scopes, 10)
            .is_err()
    );
    assert!(
        fold.add(&updates[0].params, &updates[0].scopes[1..], 10)
            .is_err()
    );
    assert_eq!(fold.accepted(), 4);
    let (next, fused) = fold.finish(strategy.fusion_rule()).unwrap();

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
        assert!((s.mean - mean).abs() < 1e-12);
        assert!((s.std - (second - mean * mean).sqrt()).abs() < 1e-9);
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
