//! The fleet simulation: one partition of a training set among N clients, then, per seed and
//! strategy, a real aggregator and N real edge clients over loopback QUIC in this process for
//! R rounds, the global head evaluated on the test set after every round; plus a centralized
//! reference run on the union of the client data. Results go to a run folder.
//!
//! The backbone is frozen, so features are extracted once (through the cache) and every client
//! gets its rows of the shared feature matrix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::Strategy;
use aggregator::backend::{Aggregation, BackendChoice};
use aggregator::engine::{Engine, EngineConfig, LocalTraining, Sampling};
use aggregator::server::RoundLine;
use anyhow::{Context, Result, ensure};
use edge_client::Adversary;
use indicatif::{ProgressBar, ProgressStyle};
use protocol::Encoding;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
use wsa::{Head, HeadSpec, LabelledFeatures, TrainConfig};

use crate::fleet::{Deployment, client_id, spawn_server};
use crate::partition::{Scheme, partition};
use crate::plot::{Series, line_plot};

/// Where the features come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum DataSource {
    /// Fashion-MNIST through the MobileNetV2 backbone (features cached on disk).
    FashionMnist {
        /// Folder with the IDX files.
        data: PathBuf,
        /// The features ONNX.
        model: PathBuf,
        /// Backbone input side.
        side: usize,
        /// Feature caches.
        cache_dir: PathBuf,
        /// Use the first N training images (0: all 60k).
        train_limit: usize,
        /// Use the first N test images (0: all 10k).
        test_limit: usize,
        /// Threads for extraction.
        threads: usize,
    },
    /// The built-in synthetic problem (no model needed): for tests and quick checks.
    Synthetic {
        /// Feature width.
        dim: usize,
        /// Classes.
        classes: usize,
        /// Training rows.
        train: usize,
        /// Test rows.
        test: usize,
    },
}

/// The attacking part of a fleet: the first `⌊fraction · clients⌋` clients (the partition is
/// random, so which ones does not matter) corrupt every update with `attack`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Byzantine {
    /// The share of clients that attack, in [0, 1).
    pub fraction: f64,
    /// What they do.
    pub attack: Adversary,
}

impl Byzantine {
    /// How many of `clients` attack.
    pub fn count(&self, clients: usize) -> usize {
        (self.fraction * clients as f64).floor() as usize
    }
}

/// Everything a fleet run does; written to the run folder as `config.json`.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetConfig {
    /// The data.
    pub data: DataSource,
    /// Simulated clients.
    pub clients: usize,
    /// Clients asked per round.
    pub per_round: usize,
    /// How the training set is split.
    pub partition: Scheme,
    /// Rounds per strategy.
    pub rounds: u64,
    /// Strategies compared on the same partition and seed.
    pub strategies: Vec<Strategy>,
    /// Aggregation rules: every strategy runs with each (empty: the plain mean).
    #[serde(default)]
    pub aggregations: Vec<Aggregation>,
    /// Where the aggregator folds updates.
    #[serde(default)]
    pub backend: BackendChoice,
    /// Accepted updates a round needs (default: `per_round`, every asked client).
    #[serde(default)]
    pub quorum: Option<usize>,
    /// Clients that attack (robustness experiments); none by default.
    #[serde(default)]
    pub byzantine: Option<Byzantine>,
    /// Also train centrally on the union of the client data.
    pub centralized: bool,
    /// One full comparison per seed (partition, initial head, sampling, shuffles).
    pub seeds: Vec<u64>,
    /// Hidden widths of the MLP head (empty: linear).
    pub hidden: Vec<usize>,
    /// Local training.
    pub train: LocalTraining,
    /// How clients encode updates.
    pub update_encoding: Encoding,
    /// For "rounds to reach": the test accuracy a strategy must reach.
    pub target_accuracy: f64,
    /// Fraction of the training set held out (per seed, before partitioning) as the
    /// validation split that choices like λ are made on; 0: none.
    #[serde(default)]
    pub validation_fraction: f64,
    /// Run the clients in this many separate processes (0: in this process). The aggregator
    /// then has this process to itself, and its memory can be measured apart.
    #[serde(default)]
    pub client_processes: usize,
    /// The run folder.
    pub out: PathBuf,
}

/// One round of one run, as written to `rounds.csv`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRow {
    /// Strategy label.
    pub strategy: String,
    /// Seed.
    pub seed: u64,
    /// Round (0-based).
    pub round: u64,
    /// Test accuracy of the global head after the round.
    pub test_accuracy: f64,
    /// Validation accuracy (NaN without a validation split).
    pub validation_accuracy: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Mean local training loss of the accepted updates.
    pub train_loss: f64,
    /// Mean Σ KL of the client heads to their targets.
    pub mean_kl: f64,
    /// Accepted updates.
    pub accepted: usize,
    /// Wall time of the round.
    pub wall_ms: u64,
    /// Update bytes received.
    pub bytes_in: u64,
}

/// A strategy's figures over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StrategySummary {
    /// Strategy label.
    pub strategy: String,
    /// Test accuracy after the last round: mean, std over seeds.
    pub final_accuracy: (f64, f64),
    /// Best test accuracy over the rounds.
    pub best_accuracy: (f64, f64),
    /// Mean test accuracy of the last 10 rounds (or all, if fewer): the headline under skew.
    pub last10_accuracy: (f64, f64),
    /// First round (1-based count) reaching the target, per seed; `None`: never.
    pub rounds_to_target: Vec<Option<u64>>,
    /// Mean validation accuracy of the last 10 rounds (NaN without a validation split).
    pub last10_validation_accuracy: (f64, f64),
    /// Median round wall time, ms.
    pub median_round_ms: f64,
}

/// What a fleet run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSummary {
    /// The configuration.
    pub config: FleetConfig,
    /// Per strategy (and "centralized").
    pub strategies: Vec<StrategySummary>,
    /// Label skew of each seed's partition (0: IID).
    pub partition_skew: Vec<f64>,
    /// Training rows, test rows, feature width.
    pub data_shape: (usize, usize, usize),
    /// Seconds spent getting the features.
    pub feature_seconds: f64,
    /// Seconds of the whole run.
    pub total_seconds: f64,
    /// Peak resident memory of the simulator's process, MiB: the aggregator (and the shared
    /// feature matrix), plus every client unless they ran in their own processes.
    pub peak_rss_mib: Option<f64>,
    /// The plot.
    pub plot: PathBuf,
}

fn load_data(source: &DataSource) -> Result<(LabelledFeatures, LabelledFeatures)> {
    match source {
        DataSource::Synthetic {
            dim,
            classes,
            train,
            test,
        } => {
            let problem = SyntheticProblem::new(
                SyntheticSpec {
                    classes: *classes,
                    dim: *dim,
                    ..SyntheticSpec::default()
                },
                0,
            )?;
            Ok((problem.sample(*train, 1)?, problem.sample(*test, 2)?))
        }
        DataSource::FashionMnist {
            data,
            model,
            side,
            cache_dir,
            train_limit,
            test_limit,
            threads,
        } => {
            let backbone = edge_client::Backbone::load(model, *side).with_context(|| {
                format!("loading {} (run scripts/fetch-model.sh)", model.display())
            })?;
            let split = |split: datasets::Split, limit: usize| -> Result<LabelledFeatures> {
                let name = split.name();
                let mut set = datasets::read_fashion_mnist(
                    data,
                    split,
                    &datasets::Limits::default(),
                )
                .with_context(|| {
                    format!(
                        "reading Fashion-MNIST from {} (run scripts/fetch-fashion-mnist.sh)",
                        data.display()
                    )
                })?;
                if limit > 0 && limit < set.len() {
                    set.images.truncate(limit);
                    set.labels.truncate(limit);
                }
                let cache =
                    cache_dir.join(format!("fashion-mnist-{name}-{side}-{}.feat", set.len()));
                tracing::info!(
                    split = name,
                    images = set.len(),
                    "features (cached in {})",
                    cache.display()
                );
                let (features, outcome) =
                    edge_client::cached_features(&backbone, &set, &cache, *threads, true)?;
                tracing::info!(split = name, ?outcome, "features ready");
                Ok(features)
            };
            Ok((
                split(datasets::Split::Train, *train_limit)?,
                split(datasets::Split::Test, *test_limit)?,
            ))
        }
    }
}

fn engine_config(
    cfg: &FleetConfig,
    head: &HeadSpec,
    strategy: Strategy,
    aggregation: Aggregation,
    seed: u64,
) -> EngineConfig {
    let mut c = EngineConfig::new(seed.wrapping_add(1), head.clone(), strategy);
    c.aggregation = aggregation;
    c.seed = seed;
    c.rounds = cfg.rounds;
    c.train = cfg.train.clone();
    c.update_encoding = cfg.update_encoding;
    c.sampling = Sampling {
        fraction: cfg.per_round as f64 / cfg.clients as f64,
        min_clients: cfg.per_round,
        over_selection: 1.0,
    };
    // Every client is online in a simulation: wait for all, and count a round only when all
    // asked clients answered, so strategies see the same number of updates.
    c.min_connected = cfg.clients;
    c.quorum = cfg.quorum.unwrap_or(cfg.per_round).clamp(1, cfg.per_round);
    c.round_timeout_ms = 600_000;
    c
}

/// Runs one strategy on one seed's shards; returns one row per round.
async fn run_strategy(
    cfg: &FleetConfig,
    deployment: &Deployment,
    engine: Engine,
    label: &str,
    seed: u64,
    shards: &[Arc<LabelledFeatures>],
    progress: &ProgressBar,
) -> Result<Vec<RoundRow>> {
    let (observer, mut lines) = mpsc::unbounded_channel::<RoundLine>();
    let mut options = deployment.server_options(
        "127.0.0.1:0".parse().expect("literal"),
        None,
        Some(cfg.out.join("aggregator-rounds.jsonl")),
    )?;
    options.round_observer = Some(observer);
    // Every simulated client stays connected, and thousands of TLS handshakes on a couple of
    // cores take a while.
    options.max_connections = options.max_connections.max(cfg.clients + 16);
    options.hello_timeout = Duration::from_secs(120);
    let server = deployment.bind(options)?;
    let addr = server.local_addr()?;
    let (handle, _stop_server) = spawn_server(server, engine);
    let (_keep_clients, stop) = watch::channel(false);
    let mut clients = Vec::new();
    let mut children = Vec::new();
    if cfg.client_processes == 0 {
        let named = shards
            .iter()
            .enumerate()
            .map(|(i, s)| (client_id(i), Arc::clone(s)))
            .collect();
        clients = deployment.spawn_clients_with(addr, named, &stop, adversaries(cfg))?;
    } else {
        let exe = std::env::current_exe()?;
        for group in 0..cfg.client_processes {
            let child = std::process::Command::new(&exe)
                .arg("clients")
                .arg("--config")
                .arg(cfg.out.join("config.json"))
                .args(["--server", &addr.to_string()])
                .args(["--seed", &seed.to_string()])
                .args(["--group", &group.to_string()])
                .args(["--groups", &cfg.client_processes.to_string()])
                .spawn()
                .with_context(|| format!("starting client process {group}"))?;
            children.push(child);
        }
    }
    let progress_task = {
        let progress = progress.clone();
        let label = label.to_owned();
        tokio::spawn(async move {
            while let Some(line) = lines.recv().await {
                if let Some(eval) = line.report.test_eval {
                    progress.set_message(format!(
                        "{label} seed {seed} round {}: test acc {:.4}",
                        line.report.round, eval.accuracy
                    ));
                }
                progress.inc(1);
            }
        })
    };
    let summary = handle.await.context("aggregator task")??;
    for c in clients {
        c.await.context("client task")?.context("client")?;
    }
    for mut child in children {
        let status = tokio::task::spawn_blocking(move || child.wait()).await??;
        ensure!(status.success(), "a client process failed: {status}");
    }
    progress_task.await?;
    ensure!(summary.finished, "{label}: the run did not finish");
    Ok(summary
        .rounds
        .iter()
        .filter(|l| l.report.test_eval.is_some())
        .map(|l| {
            let eval = l.report.test_eval.expect("filtered");
            RoundRow {
                strategy: label.to_owned(),
                seed,
                round: l.report.round,
                test_accuracy: eval.accuracy,
                validation_accuracy: l.report.eval.map_or(f64::NAN, |e| e.accuracy),
                test_loss: eval.loss,
                train_loss: l.report.train_loss.unwrap_or(f64::NAN),
                mean_kl: l.report.mean_kl.unwrap_or(f64::NAN),
                accepted: l.report.accepted.len(),
                wall_ms: l.report.duration_ms,
                bytes_in: l.report.wire_bytes_in,
            }
        })
        .collect())
}

/// The centralized reference: the same head, optimizer and initial weights trained on the
/// union of the client data, one "round" = one epoch over all of it. A federated round of the
/// experiment passes about half as many samples (10 clients × 5 epochs × ~1% of the data), so
/// the bound gets twice the federated budget and still converges; the local epoch count is
/// deliberately not reused, since 5 epochs a round would be 10× the budget and the run's
/// slowest part. With that optimizer (no decay) it is not an upper bound: averaged federated
/// heads end above it on IID splits (docs/results.md §5).
fn run_centralized(
    cfg: &FleetConfig,
    head: &HeadSpec,
    train: &LabelledFeatures,
    test: &LabelledFeatures,
    validation: Option<&LabelledFeatures>,
    seed: u64,
    progress: &ProgressBar,
) -> Result<Vec<RoundRow>> {
    let init = engine_config(cfg, head, Strategy::FedAvg, Aggregation::Mean, seed);
    let mut model: Head<f32> = Head::init(&init.head, init.init, init.seed)?;
    let mut rows = Vec::new();
    for round in 0..cfg.rounds {
        let started = Instant::now();
        let tc = TrainConfig {
            epochs: 1,
            batch_size: cfg.train.batch_size as usize,
            lr: cfg.train.lr,
            momentum: cfg.train.momentum,
            weight_decay: cfg.train.weight_decay,
            seed: seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            prox_mu: None,
            wsa: None,
        };
        let out = wsa::train(&model, train, &tc)?;
        model = out.head;
        let eval = model.evaluate(test.x(), test.labels())?;
        let validation_accuracy = match validation {
            Some(v) => model.evaluate(v.x(), v.labels())?.accuracy,
            None => f64::NAN,
        };
        rows.push(RoundRow {
            strategy: "centralized".into(),
            seed,
            round,
            test_accuracy: eval.accuracy,
            validation_accuracy,
            test_loss: eval.loss,
            train_loss: out.metrics.loss,
            mean_kl: f64::NAN,
            accepted: 1,
            wall_ms: started.elapsed().as_millis() as u64,
            bytes_in: 0,
        });
        progress.set_message(format!(
            "centralized seed {seed} round {round}: test acc {:.4}",
            eval.accuracy
        ));
        progress.inc(1);
    }
    Ok(rows)
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn summarize(label: &str, rows: &[RoundRow], seeds: &[u64], target: f64) -> StrategySummary {
    let per_seed: Vec<Vec<&RoundRow>> = seeds
        .iter()
        .map(|s| {
            rows.iter()
                .filter(|r| r.seed == *s && r.strategy == label)
                .collect()
        })
        .collect();
    let finals: Vec<f64> = per_seed
        .iter()
        .filter_map(|r| r.last().map(|r| r.test_accuracy))
        .collect();
    let bests: Vec<f64> = per_seed
        .iter()
        .map(|r| r.iter().map(|r| r.test_accuracy).fold(0.0, f64::max))
        .collect();
    let last10: Vec<f64> = per_seed
        .iter()
        .map(|r| {
            let tail = &r[r.len().saturating_sub(10)..];
            tail.iter().map(|r| r.test_accuracy).sum::<f64>() / tail.len().max(1) as f64
        })
        .collect();
    let last10_val: Vec<f64> = per_seed
        .iter()
        .map(|r| {
            let tail = &r[r.len().saturating_sub(10)..];
            tail.iter().map(|r| r.validation_accuracy).sum::<f64>() / tail.len().max(1) as f64
        })
        .collect();
    let mut walls: Vec<f64> = per_seed
        .iter()
        .flatten()
        .map(|r| r.wall_ms as f64)
        .collect();
    walls.sort_by(f64::total_cmp);
    StrategySummary {
        strategy: label.to_owned(),
        final_accuracy: mean_std(&finals),
        best_accuracy: mean_std(&bests),
        last10_accuracy: mean_std(&last10),
        last10_validation_accuracy: mean_std(&last10_val),
        rounds_to_target: per_seed
            .iter()
            .map(|r| {
                r.iter()
                    .find(|r| r.test_accuracy >= target)
                    .map(|r| r.round + 1)
            })
            .collect(),
        median_round_ms: walls.get(walls.len() / 2).copied().unwrap_or(f64::NAN),
    }
}

/// The markdown table of a run.
pub fn markdown_table(summary: &FleetSummary) -> String {
    let pm = |(m, s): (f64, f64)| {
        if summary.config.seeds.len() > 1 {
            format!("{:.4} ± {:.4}", m, s)
        } else {
            format!("{m:.4}")
        }
    };
    let mut t = format!(
        "| strategy | final | best | mean of last 10 | rounds to {:.0}% | median round ms | validation, last 10 |\n|---|---|---|---|---|---|---|\n",
        summary.config.target_accuracy * 100.0
    );
    for s in &summary.strategies {
        let reach: Vec<String> = s
            .rounds_to_target
            .iter()
            .map(|r| r.map_or("—".into(), |r| r.to_string()))
            .collect();
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {} |\n",
            s.strategy,
            pm(s.final_accuracy),
            pm(s.best_accuracy),
            pm(s.last10_accuracy),
            reach.join(", "),
            s.median_round_ms,
            if s.last10_validation_accuracy.0.is_nan() {
                "—".to_owned()
            } else {
                pm(s.last10_validation_accuracy)
            }
        ));
    }
    t
}

fn write_csv(path: &Path, rows: &[RoundRow]) -> Result<()> {
    let mut out = String::from(
        "strategy,seed,round,test_accuracy,validation_accuracy,test_loss,train_loss,mean_kl,accepted,wall_ms,bytes_in\n",
    );
    for r in rows {
        out.push_str(&format!(
            "\"{}\",{},{},{},{},{},{},{},{},{},{}\n",
            // Labels hold commas ("wsa(lambda=10,MeanStd)"): quoted, as CSV wants.
            r.strategy.replace('"', "\"\""),
            r.seed,
            r.round,
            r.test_accuracy,
            r.validation_accuracy,
            r.test_loss,
            r.train_loss,
            r.mean_kl,
            r.accepted,
            r.wall_ms,
            r.bytes_in
        ));
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// One seed's view of the training set: the validation hold-out, the partition of the rest and
/// each client's rows. Deterministic from the seed, so client processes rebuild it exactly.
struct SeedData {
    train: LabelledFeatures,
    validation: Option<LabelledFeatures>,
    split: crate::partition::Partition,
    shards: Vec<Arc<LabelledFeatures>>,
}

fn seed_data(cfg: &FleetConfig, all_train: &LabelledFeatures, seed: u64) -> Result<SeedData> {
    let (train, validation) = hold_out(all_train, cfg.validation_fraction, seed)?;
    let split = partition(
        train.labels(),
        train.classes(),
        cfg.clients,
        &cfg.partition,
        seed,
    )?;
    let shards = split
        .clients
        .iter()
        .map(|idx| train.select(idx).map(Arc::new))
        .collect::<wsa::Result<_>>()?;
    Ok(SeedData {
        train,
        validation,
        split,
        shards,
    })
}

/// The body of a client process (`wsa-fl clients ...`): rebuilds the run's data for `seed`
/// and runs clients `i` with `i % groups == group` against `server` until the run ends.
pub fn run_client_group(
    config: &Path,
    server: std::net::SocketAddr,
    seed: u64,
    group: usize,
    groups: usize,
) -> Result<()> {
    let cfg: FleetConfig = serde_json::from_str(
        &std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?,
    )?;
    ensure!(groups > 0 && group < groups, "group {group} of {groups}");
    let (train, _) = load_data(&cfg.data)?;
    let data = seed_data(&cfg, &train, seed)?;
    drop(train);
    let deployment = Deployment::open(&cfg.out.join("creds"));
    let mine = data
        .shards
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % groups == group)
        .map(|(i, s)| (client_id(i), s))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (_keep, stop) = watch::channel(false);
        for client in deployment.spawn_clients_with(server, mine, &stop, adversaries(&cfg))? {
            let report = client.await.context("client task")??;
            ensure!(
                report.end == edge_client::net::RunEnd::RunFinished,
                "a client ended with {:?}",
                report.end
            );
        }
        Ok(())
    })
}

/// Which clients attack: `client_id(i)` for `i` below the Byzantine count.
fn adversaries(cfg: &FleetConfig) -> impl Fn(&str) -> Option<Adversary> + use<> {
    let count = cfg.byzantine.map_or(0, |b| b.count(cfg.clients));
    let attackers: Vec<String> = (0..count).map(client_id).collect();
    let attack = cfg.byzantine.map(|b| b.attack);
    move |id| attack.filter(|_| attackers.iter().any(|a| a == id))
}

/// This process's peak resident memory (VmHWM), in MiB; `None` off Linux.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Splits `fraction` of `data` off at random (seeded) as a validation set.
fn hold_out(
    data: &LabelledFeatures,
    fraction: f64,
    seed: u64,
) -> Result<(LabelledFeatures, Option<LabelledFeatures>)> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let n_val = (data.len() as f64 * fraction).round() as usize;
    if n_val == 0 {
        return Ok((data.clone(), None));
    }
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ 0x7661_6c69_6461_7465,
    ));
    let (val, rest) = order.split_at(n_val);
    let mut rest = rest.to_vec();
    rest.sort_unstable();
    Ok((data.select(&rest)?, Some(data.select(val)?)))
}

/// Runs the whole comparison and writes the run folder.
pub fn run_fleet(cfg: &FleetConfig) -> Result<FleetSummary> {
    ensure!(
        cfg.clients > 0 && cfg.per_round > 0 && cfg.per_round <= cfg.clients,
        "need 0 < per_round ≤ clients"
    );
    ensure!(
        cfg.rounds > 0 && !cfg.seeds.is_empty(),
        "need rounds and at least one seed"
    );
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    std::fs::write(
        cfg.out.join("config.json"),
        serde_json::to_string_pretty(cfg)? + "\n",
    )?;
    let _ = std::fs::remove_file(cfg.out.join("aggregator-rounds.jsonl"));

    let (train, test) = load_data(&cfg.data)?;
    let feature_seconds = started.elapsed().as_secs_f64();
    let head = HeadSpec::mlp(train.dim(), &cfg.hidden, train.classes());
    let ids: Vec<String> = (0..cfg.clients).map(client_id).collect();
    let deployment = Deployment::generate(&cfg.out.join("creds"), &ids)?;

    let aggregations = if cfg.aggregations.is_empty() {
        vec![Aggregation::Mean]
    } else {
        cfg.aggregations.clone()
    };
    let plans: Vec<(Strategy, Aggregation)> = cfg
        .strategies
        .iter()
        .flat_map(|&s| aggregations.iter().map(move |&a| (s, a)))
        .collect();
    let backend = aggregator::backend::open_backend(cfg.backend)?;
    tracing::info!(backend = backend.name(), "aggregator backend");
    let runs_per_seed = plans.len() as u64 + u64::from(cfg.centralized);
    let progress = ProgressBar::new(runs_per_seed * cfg.seeds.len() as u64 * cfg.rounds);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} rounds {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let mut skews = Vec::new();
    let mut labels = Vec::new();
    ensure!(
        (0.0..0.9).contains(&cfg.validation_fraction),
        "validation fraction must be in [0, 0.9)"
    );
    for &seed in &cfg.seeds {
        let SeedData {
            train,
            validation,
            split,
            shards,
        } = seed_data(cfg, &train, seed)?;
        split.write_json(
            &cfg.out.join(format!("partition-seed{seed}.json")),
            train.labels(),
            train.classes(),
        )?;
        skews.push(split.skew(train.labels(), train.classes()));
        for &(strategy, aggregation) in &plans {
            let config = engine_config(cfg, &head, strategy, aggregation, seed);
            let label = config.label();
            if !labels.contains(&label) {
                labels.push(label.clone());
            }
            let mut engine = Engine::with_backend(config, Arc::clone(&backend))?;
            engine.set_test(test.clone())?;
            if let Some(v) = &validation {
                engine.set_validation(v.clone())?;
            }
            let r = runtime.block_on(run_strategy(
                cfg,
                &deployment,
                engine,
                &label,
                seed,
                &shards,
                &progress,
            ))?;
            rows.extend(r);
        }
        if cfg.centralized {
            if !labels.contains(&"centralized".to_owned()) {
                labels.push("centralized".into());
            }
            let union: Vec<usize> = split.clients.iter().flatten().copied().collect();
            let all = train.select(&union)?;
            rows.extend(run_centralized(
                cfg,
                &head,
                &all,
                &test,
                validation.as_ref(),
                seed,
                &progress,
            )?);
        }
    }
    progress.finish();
    // Runtime teardown may wait for idle QUIC tasks; bound it.
    runtime.shutdown_timeout(Duration::from_secs(2));

    write_csv(&cfg.out.join("rounds.csv"), &rows)?;
    std::fs::write(
        cfg.out.join("rounds.json"),
        serde_json::to_string(&rows)? + "\n",
    )?;
    let mut series = Vec::new();
    for label in &labels {
        // The mean over seeds, round by round.
        let mut by_round: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for r in rows.iter().filter(|r| &r.strategy == label) {
            by_round.entry(r.round).or_default().push(r.test_accuracy);
        }
        series.push(Series {
            name: label.clone(),
            points: by_round
                .iter()
                .map(|(round, accs)| {
                    (
                        (round + 1) as f64,
                        accs.iter().sum::<f64>() / accs.len() as f64,
                    )
                })
                .collect(),
        });
    }
    let plot = cfg.out.join("accuracy.png");
    line_plot(
        &plot,
        &format!(
            "{} clients, {} per round, {:?}",
            cfg.clients, cfg.per_round, cfg.partition
        ),
        "round",
        "test accuracy",
        &series,
    )?;
    let summary = FleetSummary {
        config: cfg.clone(),
        strategies: labels
            .iter()
            .map(|l| summarize(l, &rows, &cfg.seeds, cfg.target_accuracy))
            .collect(),
        partition_skew: skews,
        data_shape: (train.len(), test.len(), train.dim()),
        feature_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
        plot,
    };
    std::fs::write(
        cfg.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    std::fs::write(cfg.out.join("table.md"), markdown_table(&summary))?;
    Ok(summary)
}
