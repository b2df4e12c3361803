//! `wsa-fl demo`: an in-process federated run on the built-in synthetic problem, comparing
//! FedAvg, FedProx and WSA on the same label-skewed split. No network and no backbone yet: the
//! fleet simulator over real QUIC and real features replaces this as the main job.

use std::path::PathBuf;

use aggregator::{RoundFold, Strategy};
use anyhow::{Context, Result};
use clap::Parser;
use edge_client::{RoundTask, local_round};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
use wsa::{
    FusionRule, Head, HeadSpec, Init, LabelledFeatures, ScopeSelection, TrainConfig, Weighting,
};

/// Flags of the demo run; the defaults finish in well under a minute on 2 cores.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(
    name = "wsa-fl",
    about = "In-process federated demo on synthetic features: FedAvg vs FedProx vs WSA"
)]
struct Args {
    /// Number of simulated clients (all take part every round).
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Classes per client (label skew: each client sees only this many classes).
    #[arg(long, default_value_t = 2)]
    classes_per_client: usize,
    /// Federated rounds per strategy.
    #[arg(long, default_value_t = 30)]
    rounds: u64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    local_epochs: u32,
    /// Hidden width of the MLP head.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// WSA λ.
    #[arg(long, default_value_t = 10.0)]
    lambda: f64,
    /// FedProx μ.
    #[arg(long, default_value_t = 0.01)]
    prox_mu: f64,
    /// Training samples (split among the clients).
    #[arg(long, default_value_t = 20_000)]
    train_samples: usize,
    /// Seed of the data, the split, the initial head and the shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the results go.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
}

#[derive(Serialize)]
struct StrategyResult {
    strategy: String,
    test_accuracy: Vec<f64>,
    mean_client_kl: Vec<f64>,
}

/// Label-skew shards (McMahan et al.): sort by label, cut into `clients·k` shards, deal `k`
/// random shards to each client.
fn shard_split(data: &LabelledFeatures, clients: usize, k: usize, seed: u64) -> Vec<Vec<usize>> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data.labels()[i]);
    let shards = clients * k;
    let size = data.len() / shards;
    let mut ids: Vec<usize> = (0..shards).collect();
    ids.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    ids.chunks(k)
        .map(|mine| {
            mine.iter()
                .flat_map(|&s| order[s * size..(s + 1) * size].iter().copied())
                .collect()
        })
        .collect()
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        args.clients > 0 && args.classes_per_client > 0,
        "need at least one client and one class per client"
    );
    anyhow::ensure!(
        args.train_samples >= args.clients * args.classes_per_client,
        "--train-samples must be at least clients × classes-per-client"
    );

    let problem = SyntheticProblem::new(SyntheticSpec::default(), args.seed)?;
    let train_set = problem.sample(args.train_samples, args.seed + 1)?;
    let test_set = problem.sample(4000, args.seed + 2)?;
    let shards: Vec<LabelledFeatures> =
        shard_split(&train_set, args.clients, args.classes_per_client, args.seed)
            .iter()
            .map(|idx| train_set.select(idx))
            .collect::<wsa::Result<_>>()?;
    let spec = HeadSpec::mlp(train_set.dim(), &[args.hidden], train_set.classes());
    let start = Head::<f32>::init(&spec, Init::Standard, args.seed)?;
    let base = TrainConfig {
        epochs: args.local_epochs,
        batch_size: 32,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-5,
        seed: args.seed,
        prox_mu: None,
        wsa: None,
    };
    let strategies = [
        Strategy::FedAvg,
        Strategy::FedProx { mu: args.prox_mu },
        Strategy::Wsa {
            lambda: args.lambda,
            rule: FusionRule::MeanStd,
        },
    ];
    tracing::info!(
        clients = args.clients,
        classes_per_client = args.classes_per_client,
        rounds = args.rounds,
        "synthetic federated demo: {} train / {} test samples, head {:?}",
        train_set.len(),
        test_set.len(),
        spec.layer_dims()
    );

    let bar = ProgressBar::new(args.rounds * strategies.len() as u64).with_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} rounds ({eta})")?
            .progress_chars("=> "),
    );
    let mut results = Vec::new();
    for strategy in strategies {
        bar.set_message(strategy.label());
        let mut global = start.clone();
        let mut targets = start.scopes(ScopeSelection::default(), wsa::DEFAULT_SCOPE_EPS)?;
        let mut result = StrategyResult {
            strategy: strategy.label(),
            test_accuracy: vec![],
            mean_client_kl: vec![],
        };
        for round in 0..args.rounds {
            let task = RoundTask {
                round,
                global: global.clone(),
                train: strategy.client_config(&base, &targets),
            };
            let mut fold = RoundFold::new(&spec, ScopeSelection::default(), Weighting::SampleCount);
            let mut kl_sum = 0.0;
            for (client, data) in shards.iter().enumerate() {
                let update = local_round(&task, data, client as u64)?;
                kl_sum += update
                    .scopes
                    .iter()
                    .zip(&targets)
                    .map(|(&s, &t)| wsa::kl(s, t))
                    .sum::<f64>();
                fold.add(&update.params, &update.scopes, update.metrics.n_samples)?;
            }
            (global, targets) = fold.finish(strategy.fusion_rule())?;
            let acc = global.evaluate(test_set.x(), test_set.labels())?.accuracy;
            tracing::debug!(strategy = %strategy.label(), round, acc, "round closed");
            result.test_accuracy.push(acc);
            result.mean_client_kl.push(kl_sum / shards.len() as f64);
            bar.inc(1);
        }
        results.push(result);
    }
    bar.finish_and_clear();

    // A centralized run on the union of the client data, for the upper bound.
    let central_cfg = TrainConfig {
        epochs: args.local_epochs * 5,
        ..base
    };
    let central = wsa::train(&start, &train_set, &central_cfg)?
        .head
        .evaluate(test_set.x(), test_set.labels())?
        .accuracy;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::json!({ "config": args, "centralized_accuracy": central, "strategies": results });
    let path = args.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;

    let tail = 5.min(args.rounds as usize);
    println!(
        "| strategy | final acc | best acc | mean of last {tail} | mean client KL to target (last round) |"
    );
    println!("|---|---|---|---|---|");
    for r in &results {
        let acc = &r.test_accuracy;
        let best = acc.iter().copied().fold(0.0, f64::max);
        let last = acc[acc.len() - tail..].iter().sum::<f64>() / tail as f64;
        println!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} |",
            r.strategy,
            acc[acc.len() - 1],
            best,
            last,
            r.mean_client_kl[r.mean_client_kl.len() - 1]
        );
    }
    println!(
        "| centralized ({} epochs) | {central:.4} | | | |",
        central_cfg.epochs
    );
    println!("\nresults: {}", path.display());
    Ok(())
}
