//! `wsa-fl`: the fleet simulator. Many real edge clients against a real aggregator in one
//! process over loopback QUIC, on real Fashion-MNIST features (or the synthetic problem),
//! comparing FedAvg, FedProx and WSA on the same non-IID partition, with a centralized
//! reference run. The defaults are the main job's demo: 20 clients, Dirichlet α = 0.1, FedAvg vs WSA,
//! 20 rounds on a subset, a few minutes on 2 cores.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use aggregator::backends::BackendChoice;
use aggregator_core::engine::{SecureAggregation, UpdateBounds};
use aggregator_core::privacy::{Clip, Privacy};
use aggregator_core::strategy::{Aggregation, Strategy, TargetFusion, TargetPolicy};
use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use edge_client::Adversary;
use protocol::Encoding;
use wsa::{Sgd, Weighting};
use wsa_fl::partition::PartitionKind;
use wsa_fl::sim::{
    Byzantine, DataSource, FleetConfig, FleetSummary, Pool, markdown_table, run_fleet,
};

#[derive(Debug, Parser)]
#[command(
    name = "wsa-fl",
    about = "Fleet simulator: real edge clients and a real aggregator over QUIC, FedAvg vs FedProx vs WSA",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Args,
    #[command(flatten)]
    log: support::logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A client process of a run with `--client-processes` (started by the simulator): hosts
    /// clients i with i % groups == group until the run ends.
    Clients(ClientGroup),
    /// A worker of a run with `--workers` (started by the simulator, or by hand on any
    /// machine with the run folder): acts as its share of every round's sampled clients until
    /// the run ends.
    Worker(Worker),
    /// Classify the first test images with a run's final model through `edge-client predict`
    /// and draw them with their predicted and true labels (`<out>/predictions.png`, the
    /// images and predictions in `<out>/showcase/`).
    Showcase(Showcase),
}

#[derive(Debug, clap::Args)]
struct Showcase {
    /// The model folder (a run's `models/<strategy>-seed<k>`).
    #[arg(long)]
    model: PathBuf,
    /// The data's format (as --dataset).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// The data's folder; its test split is used.
    #[arg(long, default_value = "data/fashion-mnist")]
    data: PathBuf,
    /// Images shown.
    #[arg(long, default_value_t = 12)]
    count: usize,
    /// The folder to write into.
    #[arg(long, default_value = "runs/fleet")]
    out: PathBuf,
    /// The edge-client binary [default: beside this one].
    #[arg(long)]
    edge_client: Option<PathBuf>,
}

/// Writes the first test images as PNGs, runs `edge-client predict --json` on them, and
/// draws the grid.
fn showcase(args: Showcase) -> Result<()> {
    let format: datasets::DataFormat = args.dataset.parse().map_err(anyhow::Error::msg)?;
    let mut set = datasets::read_set(
        format,
        &args.data,
        datasets::Split::Test,
        &datasets::Limits::default(),
    )
    .with_context(|| format!("reading {}", args.data.display()))?;
    set.images.truncate(args.count);
    let dir = args.out.join("showcase");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut truth = std::collections::HashMap::new();
    for (i, (image, &label)) in set.images.iter().zip(&set.labels).enumerate() {
        let path = dir.join(format!("{i:02}.png"));
        let (w, h) = (image.width, image.height);
        let written = if image.channels == 1 {
            image::GrayImage::from_raw(w, h, image.pixels.clone()).map(|im| im.save(&path))
        } else {
            image::RgbImage::from_raw(w, h, image.pixels.clone()).map(|im| im.save(&path))
        };
        written
            .context("image size")?
            .with_context(|| format!("writing {}", path.display()))?;
        truth.insert(path, (i, set.class_names[label as usize].clone()));
    }
    let edge_client = match args.edge_client {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("edge-client"),
    };
    let output = std::process::Command::new(&edge_client)
        .arg("predict")
        .arg("--model")
        .arg(&args.model)
        .args(["--json", "--top", "1"])
        .arg(&dir)
        .output()
        .with_context(|| format!("running {}", edge_client.display()))?;
    ensure!(
        output.status.success(),
        "edge-client predict failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(dir.join("predictions.jsonl"), &output.stdout)?;
    let mut cells = Vec::new();
    let mut right = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let path = PathBuf::from(v["path"].as_str().context("a prediction without a path")?);
        let (i, true_class) = truth.get(&path).cloned().context("an unknown image")?;
        let predicted = v["top"][0]["class"].as_str().unwrap_or("?").to_owned();
        let probability = v["top"][0]["probability"].as_f64().unwrap_or(f64::NAN);
        let correct = predicted == true_class;
        right += usize::from(correct);
        println!(
            "{}: {predicted} ({probability:.2}), true {true_class}",
            path.display()
        );
        cells.push(wsa_fl::plot::GridCell {
            image: set.images[i].clone(),
            predicted: format!("{predicted} ({probability:.2})"),
            truth: true_class,
            correct,
        });
    }
    let grid = args.out.join("predictions.png");
    wsa_fl::plot::prediction_grid(&cells, 6, &grid)?;
    println!("{right} of {} right; grid: {}", cells.len(), grid.display());
    Ok(())
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Simulated clients.
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Clients asked per round.
    #[arg(long, default_value_t = 10)]
    per_round: usize,
    /// Rounds per strategy.
    #[arg(long, default_value_t = 40)]
    rounds: u64,
    /// `dirichlet`, `shards`, `iid`, or `recipe` (each client's rows drawn from a seeded
    /// recipe with replacement, for fleets with more clients than rows).
    #[arg(long, default_value = "dirichlet")]
    partition: PartitionKind,
    /// Dirichlet and recipe α (smaller: more label skew).
    #[arg(long, default_value_t = 0.1)]
    alpha: f64,
    /// Dirichlet: fewest samples a client may get.
    #[arg(long, default_value_t = 10)]
    min_size: usize,
    /// Shards: classes per client.
    #[arg(long, default_value_t = 2)]
    classes_per_client: usize,
    /// Recipe: a client's typical row count (its size is uniform in [rows/2, 3·rows/2]).
    #[arg(long, default_value_t = 600)]
    rows: usize,
    /// Strategies, comma-separated (`none` or empty: only the centralized bound): `fedavg`,
    /// `fedprox:MU`,
    /// `wsa:LAMBDA[:mean-std|root-mean-var|mixture][:mu=MU][:warmup=ROUNDS][:only=K|:curvature]`
    /// (`mu` adds FedProx's term to WSA's; `warmup` trains the first rounds without WSA's;
    /// `only` puts λ on scoped tensor K alone, `curvature` scales it per tensor).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fedavg,fedprox:0.1,wsa:100:mean-std:mu=0.1"
    )]
    strategies: Vec<StrategyChoice>,
    /// How each round's target scopes are formed: `median` of the clients' scopes,
    /// `trimmed:TRIM`, `follow-rule` (the strategy's σ̃ rule, weighted; under DP the noised
    /// mean), `global-head` (the new head's own scopes) or `fixed` (the initial head's)
    /// [default: median, global-head under --dp-noise].
    #[arg(long)]
    target_fusion: Option<TargetFusion>,
    /// Rescale the merged head's tensors to the new targets before broadcasting
    /// (server-side scope alignment).
    #[arg(long)]
    align_head: bool,
    /// Aggregation rules, comma-separated; every strategy runs with each: `mean`, `median`,
    /// `trimmed:TRIM` (the fraction cut from each end), `clip:MAX_NORM` (each step's L2 bound).
    #[arg(long, value_delimiter = ',', default_value = "mean")]
    aggregations: Vec<Aggregation>,
    /// Where the aggregator folds updates: auto (CUDA when built in and present), cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Accepted updates a round needs to count (default: every client asked).
    #[arg(long)]
    quorum: Option<usize>,
    /// The most a client's measured σ of a tensor may differ from the global head's, as a
    /// factor, before its update is refused (the run config's `bounds.max_scope_ratio`).
    /// Round 0 under strong label skew can take an honest logits layer past the shipped 4.
    #[arg(long, default_value_t = UpdateBounds::default().max_scope_ratio)]
    max_scope_ratio: f64,
    /// Every endpoint's UDP socket buffers in bytes (0: the OS default); the shipped default
    /// when absent (8 MiB, capped by the kernel's net.core.rmem_max).
    #[arg(long)]
    udp_buffer: Option<usize>,
    /// Client-level differential privacy (docs/privacy.md) with this noise multiplier z: each
    /// round clips every client's step and scope offsets, adds Gaussian noise to their sums
    /// and charges the RDP accountant (ε in rounds.csv). Off when not given.
    #[arg(long)]
    dp_noise: Option<f64>,
    /// The DP clip norm: a number (fixed) or `adaptive:INITIAL` (moved each round toward the
    /// median client step, with noise on the count of unclipped clients of
    /// max(per-round/20, z) as Andrew et al. suggest).
    #[arg(long, default_value = "adaptive:1")]
    dp_clip: String,
    /// The δ that ε is stated at [default: 1/clients].
    #[arg(long)]
    dp_delta: Option<f64>,
    /// End each federated run before a round that would take ε past this.
    #[arg(long)]
    dp_budget: Option<f64>,
    /// The clip of a client's scope offsets, as a share of the step's clip.
    #[arg(long, default_value_t = 0.1)]
    dp_scope_share: f64,
    /// How clients are weighted: `sample-count` (FedAvg's) or `uniform` [default:
    /// sample-count; uniform under `--dp-noise` or `--secure`].
    #[arg(long)]
    weighting: Option<Weighting>,
    /// Secure aggregation (SecAgg+; docs/privacy.md): the aggregator sees only each round's
    /// sum, and runs none of its per-update checks.
    #[arg(long)]
    secure: bool,
    /// Under `--secure`: every value a client masks is clipped to ±this.
    #[arg(long, default_value_t = SecureAggregation::default().clip)]
    secure_clip: f64,
    /// Under `--secure`: the share of a round's clients the masking must survive losing.
    #[arg(long, default_value_t = SecureAggregation::default().dropout)]
    secure_dropout: f64,
    /// The share of clients that attack (robustness experiments), with `--attack`.
    #[arg(long, default_value_t = 0.0)]
    byzantine: f64,
    /// What attacking clients do, attacks joined by `+` (`claim:10000000+sign-flip:1`):
    /// `sign-flip:SCALE` (send `g − SCALE·(w − g)`), `scale:FACTOR` (`g + FACTOR·(w − g)`),
    /// where `w` is their honestly trained head; `claim:N` (claim N samples);
    /// `scope-collapse` (last weight tensor flattened to its mean); `scope-inflate:FACTOR`
    /// (last weight tensor stretched around its mean).
    #[arg(long, default_value = "sign-flip:1")]
    attack: Adversary,
    /// Skip the centralized reference run.
    #[arg(long)]
    no_centralized: bool,
    /// Seeds (one full comparison each; tables give mean ± std).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Hidden widths of the MLP head (empty for linear: `--hidden ''`).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    hidden: Vec<String>,
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    epochs: u32,
    /// Local batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Local momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Local weight decay.
    #[arg(long, default_value_t = 1e-5)]
    weight_decay: f64,
    /// Update encoding: `f32`, `f16` or `int8`.
    #[arg(long, default_value = "f32")]
    encoding: Encoding,
    /// The encoding round tasks carry the global head in: `f32`, `f16` or `int8` (steps are
    /// measured from what each client decodes and applied to the exact head).
    #[arg(long, default_value = "f32")]
    downlink_encoding: Encoding,
    /// With a lossy downlink, send every client the quantized head, never the change from the
    /// head its last task gave it.
    #[arg(long)]
    no_downlink_deltas: bool,
    /// Test accuracy for the "rounds to reach" column.
    #[arg(long, default_value_t = 0.75)]
    target: f64,
    /// Fraction of the training images held out as the validation split (for choosing λ).
    #[arg(long, default_value_t = 0.0)]
    validation_fraction: f64,
    /// The share of its rows each client holds out of training to measure each round's
    /// global head on (federated evaluation; at most 0.5).
    #[arg(long, default_value_t = 0.0)]
    eval_fraction: f64,
    /// Run the clients in this many separate processes (0: all in this process).
    #[arg(long, default_value_t = 0)]
    client_processes: usize,
    /// Virtual clients: register all `--clients` but keep none alive; this many worker
    /// processes act as each round's sampled clients (0: every client stays connected).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// With --workers: do not start them; print the `wsa-fl worker` command for each (to run
    /// here or on other machines) and wait for them.
    #[arg(long)]
    external_workers: bool,
    /// With --workers: how long a worker's client waits for its task before asking again
    /// where the run stands (ms).
    #[arg(long, default_value_t = 10_000)]
    worker_patience_ms: u64,
    /// With --workers: the aggregator's address (default: a free loopback port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// With --workers: a name the aggregator's certificate also carries, for workers on other
    /// machines.
    #[arg(long)]
    server_name: Option<String>,
    /// Use the synthetic problem instead of images (no model needed).
    #[arg(long)]
    synthetic: bool,
    /// The data's format: fashion-mnist, mnist, cifar10, cifar100 or image-folder (a
    /// `class/*.png|jpg` tree, with `train/` and `test/` or split by --test-fraction).
    #[arg(long, default_value = "fashion-mnist", value_parser = ["fashion-mnist", "mnist", "cifar10", "cifar100", "image-folder"])]
    dataset: String,
    /// Training images (the first N; 0: all).
    #[arg(long, default_value_t = 6000)]
    train_limit: usize,
    /// Test images (the first N; 0: all).
    #[arg(long, default_value_t = 2000)]
    test_limit: usize,
    /// The data's folder (scripts/fetch-fashion-mnist.sh fills the default).
    #[arg(long, default_value = "data/fashion-mnist")]
    data: PathBuf,
    /// For an image folder without train/ and test/: the share of each class held out as the
    /// test set.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// The features ONNX (scripts/fetch-model.sh).
    #[arg(long, default_value = "models/mobilenet_v2_features.onnx")]
    model: PathBuf,
    /// Backbone input side.
    #[arg(long, default_value_t = 96)]
    side: usize,
    /// Feature caches.
    #[arg(long, default_value = "cache")]
    cache_dir: PathBuf,
    /// Threads for feature extraction.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
    /// The run folder [default: runs/fleet, or the rerun configuration's].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rerun a run exactly (same data, partition, seeds and settings) from its run folder's
    /// `config.json`; the other run flags are ignored, but --out, which defaults to the
    /// configuration's own folder.
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Continue the sweep in this run folder where it stopped: runs whose every round is in
    /// its rounds.csv are kept, the others run again; the other run flags are ignored.
    #[arg(long)]
    resume: Option<PathBuf>,
}

/// One `--strategies` entry, checked as the command line is read: a strategy, or none (`none`
/// or empty) for the centralized bound alone.
#[derive(Debug, Clone, Copy)]
struct StrategyChoice(Option<Strategy>);

impl std::str::FromStr for StrategyChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "none" => Ok(Self(None)),
            s => s.parse().map(|strategy| Self(Some(strategy))),
        }
    }
}

/// The run's DP settings from the `--dp-*` flags (none without `--dp-noise`), checked.
fn privacy(args: &Args) -> Result<Option<Privacy>> {
    let Some(z) = args.dp_noise else {
        return Ok(None);
    };
    let number = |s: &str| -> Result<f64> {
        s.parse::<f64>()
            .map_err(|_| anyhow::anyhow!("--dp-clip {:?}: {s:?} is not a number", args.dp_clip))
    };
    let clip = match args.dp_clip.strip_prefix("adaptive:") {
        Some(initial) => Clip::Adaptive {
            initial: number(initial)?,
            quantile: 0.5,
            learning_rate: 0.2,
            count_noise: (args.per_round.min(args.clients) as f64 / 20.0).max(z),
        },
        None => Clip::Fixed {
            norm: number(&args.dp_clip)?,
        },
    };
    let privacy = Privacy {
        noise_multiplier: z,
        clip,
        delta: args.dp_delta.unwrap_or(1.0 / args.clients.max(1) as f64),
        scope_share: args.dp_scope_share,
        epsilon_budget: args.dp_budget,
    };
    privacy.check().map_err(anyhow::Error::msg)?;
    Ok(Some(privacy))
}

fn byzantine(fraction: f64, attack: Adversary) -> Result<Option<Byzantine>> {
    if fraction == 0.0 {
        return Ok(None);
    }
    ensure!(
        (0.0..1.0).contains(&fraction),
        "--byzantine must be in [0, 1), got {fraction}"
    );
    Ok(Some(Byzantine { fraction, attack }))
}

fn config(args: Args) -> Result<FleetConfig> {
    let privacy = privacy(&args)?;
    let partition = args.partition.scheme(
        args.alpha,
        args.min_size,
        args.classes_per_client,
        args.rows,
    );
    let hidden = args
        .hidden
        .iter()
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.parse::<usize>()
                .with_context(|| format!("bad hidden width {h:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = if args.synthetic {
        DataSource::Synthetic {
            dim: 64,
            classes: 10,
            train: if args.train_limit > 0 {
                args.train_limit
            } else {
                6000
            },
            test: if args.test_limit > 0 {
                args.test_limit
            } else {
                2000
            },
        }
    } else {
        DataSource::Images {
            format: args.dataset,
            test_fraction: args.test_fraction,
            data: args.data,
            model: args.model,
            side: args.side,
            cache_dir: args.cache_dir,
            train_limit: args.train_limit,
            test_limit: args.test_limit,
            threads: args.threads,
        }
    };
    Ok(FleetConfig {
        data,
        clients: args.clients,
        per_round: args.per_round.min(args.clients),
        partition,
        rounds: args.rounds,
        strategies: args.strategies.iter().filter_map(|s| s.0).collect(),
        aggregations: args.aggregations,
        targets: TargetPolicy {
            fusion: args.target_fusion.unwrap_or(if privacy.is_some() {
                TargetFusion::GlobalHead
            } else if args.secure {
                // Fused from the securely summed scopes: a median needs them one by one.
                TargetFusion::FollowRule
            } else {
                TargetFusion::Median
            }),
            align_head: args.align_head,
            ..TargetPolicy::default()
        },
        backend: args.backend,
        byzantine: byzantine(args.byzantine, args.attack)?,
        privacy,
        weighting: args.weighting,
        secure: args.secure.then_some(SecureAggregation {
            clip: args.secure_clip,
            dropout: args.secure_dropout,
            ..SecureAggregation::default()
        }),
        quorum: args.quorum,
        max_scope_ratio: args.max_scope_ratio,
        udp_buffer: args.udp_buffer,
        centralized: !args.no_centralized,
        seeds: args.seeds,
        hidden,
        train: Sgd {
            epochs: args.epochs,
            batch_size: args.batch_size,
            lr: args.lr,
            momentum: args.momentum,
            weight_decay: args.weight_decay,
        },
        update_encoding: args.encoding,
        downlink_encoding: args.downlink_encoding,
        downlink_deltas: !args.no_downlink_deltas,
        target_accuracy: args.target,
        validation_fraction: args.validation_fraction,
        eval_fraction: args.eval_fraction,
        client_processes: args.client_processes,
        pool: (args.workers > 0).then(|| Pool {
            workers: args.workers,
            patience_ms: args.worker_patience_ms,
            spawn: !args.external_workers,
            listen: args.listen,
            server_name: args.server_name.clone(),
        }),
        out: args.out.unwrap_or_else(|| "runs/fleet".into()),
    })
}

#[derive(Debug, clap::Args)]
struct ClientGroup {
    /// The run's config.json.
    #[arg(long)]
    config: PathBuf,
    /// The aggregator.
    #[arg(long)]
    server: std::net::SocketAddr,
    /// The seed whose partition to use.
    #[arg(long)]
    seed: u64,
    /// This process hosts clients i with i % groups == group.
    #[arg(long)]
    group: usize,
    /// Number of client processes.
    #[arg(long)]
    groups: usize,
}

#[derive(Debug, clap::Args)]
struct Worker {
    /// The run folder (its config.json and creds/, copied as they are to another machine;
    /// the features' cache and data paths in config.json must exist there too).
    #[arg(long)]
    fleet: PathBuf,
    /// The aggregator.
    #[arg(long)]
    server: std::net::SocketAddr,
    /// The name the aggregator's certificate carries.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The seed of the run.
    #[arg(long)]
    seed: u64,
    /// This worker's index.
    #[arg(long)]
    index: usize,
    /// Number of workers.
    #[arg(long)]
    workers: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log
        .init("warn,wsa_fl=info,edge_client=info,edge_client::session=warn");
    match cli.command {
        Some(Command::Clients(g)) => {
            return wsa_fl::sim::run_client_group(&g.config, g.server, g.seed, g.group, g.groups);
        }
        Some(Command::Worker(w)) => {
            return wsa_fl::sim::run_worker(
                &w.fleet,
                w.server,
                &w.server_name,
                w.seed,
                w.index,
                w.workers,
            );
        }
        Some(Command::Showcase(s)) => return showcase(s),
        None => {}
    }
    if let Some(out) = &cli.run.resume {
        let summary = wsa_fl::sim::resume_fleet(out)?;
        return report(&summary);
    }
    let cfg = match cli.run.config.clone() {
        Some(path) => {
            let mut cfg = FleetConfig::load(&path)?;
            if let Some(out) = cli.run.out {
                cfg.out = out;
            }
            cfg
        }
        None => config(cli.run)?,
    };
    anyhow::ensure!(cfg.clients > 0, "need at least one client");
    report(&run_fleet(&cfg)?)
}

/// Prints a finished sweep's table and where its files are.
fn report(summary: &FleetSummary) -> Result<()> {
    println!("{}", markdown_table(summary));
    println!(
        "{} train / {} test rows × {} features; partition skew {:?}; {:.0} s in all ({:.0} s features)",
        summary.data_shape.0,
        summary.data_shape.1,
        summary.data_shape.2,
        summary
            .partition_skew
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>(),
        summary.total_seconds,
        summary.feature_seconds
    );
    if let Some(rss) = summary.peak_rss_mib {
        println!("peak RSS of this process: {rss:.0} MiB");
    }
    if !summary.workers_peak_rss_mib.is_empty() {
        println!(
            "peak RSS of the workers: {} MiB; {:.1} s to set up the fleet",
            summary
                .workers_peak_rss_mib
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" + "),
            summary.setup_seconds
        );
    }
    println!("plot: {}", summary.plot.display());
    println!("run folder: {}", summary.config.out.display());
    Ok(())
}
