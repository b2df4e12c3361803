//! `aggregator`: makes and maintains credentials (`gen-certs`, `add-client`, `revoke-client`,
//! `renew-server-cert`) and runs federated rounds over QUIC (`serve`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aggregator::auth::Registry;
use aggregator::backends::{BackendChoice, open_backend};
use aggregator::server::{Server, ServerOptions};
use aggregator::tls::{self, Lifetimes, layout};
use aggregator_core::checkpoint::Checkpoint;
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::privacy::{Clip, Privacy};
use aggregator_core::strategy::{Aggregation, Strategy};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use wsa::HeadSpec;

#[derive(Parser)]
#[command(
    name = "aggregator",
    version,
    about = "WSA federated aggregator over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: support::logging::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Make a private CA, a server certificate and a token per client. Refuses to replace
    /// existing credentials (that would lock out every deployed device) unless --force.
    GenCerts {
        /// Credentials folder `serve` reads.
        #[arg(long, default_value = "creds")]
        out: PathBuf,
        /// Folder for the CA key, needed only to renew the server certificate: keep it off
        /// the aggregator host [default: the sibling `<out>-ca`].
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Names (DNS or IP) the server certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        server_names: Vec<String>,
        /// Make N clients named client-0000 … (ignored when --client-ids is given).
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Explicit client ids.
        #[arg(long, value_delimiter = ',')]
        client_ids: Vec<String>,
        /// Days the server certificate is valid (renew with renew-server-cert).
        #[arg(long, default_value_t = Lifetimes::default().server_days)]
        server_days: u32,
        /// Days the CA certificate is valid.
        #[arg(long, default_value_t = Lifetimes::default().ca_days)]
        ca_days: u32,
        /// Replace existing credentials: every deployed client needs its new token.
        #[arg(long)]
        force: bool,
    },
    /// Register one client: writes its token to `<creds>/clients/<ID>.token` and its hash to
    /// the registry; a running aggregator admits it from its next hello.
    AddClient {
        /// The new client's id.
        id: String,
        /// Credentials folder.
        #[arg(long, default_value = "creds")]
        creds: PathBuf,
    },
    /// Unregister one client and delete its token; a running aggregator refuses its next
    /// hello.
    RevokeClient {
        /// The client's id.
        id: String,
        /// Credentials folder.
        #[arg(long, default_value = "creds")]
        creds: PathBuf,
    },
    /// List the registered client ids.
    ListClients {
        /// Credentials folder.
        #[arg(long, default_value = "creds")]
        creds: PathBuf,
    },
    /// Issue a new server certificate with the CA key; clients keep their tokens and the CA
    /// they pin. Restart `serve` to use it.
    RenewServerCert {
        /// Credentials folder.
        #[arg(long, default_value = "creds")]
        creds: PathBuf,
        /// Folder with the CA key [default: the sibling `<creds>-ca`].
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Names (DNS or IP) the certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        server_names: Vec<String>,
        /// Days it is valid.
        #[arg(long, default_value_t = Lifetimes::default().server_days)]
        days: u32,
    },
    /// Run rounds until the configured number is done (Ctrl-C stops after a checkpoint).
    Serve(Box<ServeArgs>),
    /// Print the default run configuration as TOML.
    PrintConfig,
}

/// The shipped default: the MLP head on MobileNetV2 features, WSA (λ = 100, mean-of-σ rule)
/// with FedProx's term (μ = 0.1): the strategy that led every skew level of docs/results.md §7
/// (issue 17); the
/// coordinate-wise median (the one rule that held every lying-client attack of
/// docs/reliability.md within about 3 points, at a cost on strongly non-IID fleets), and a round
/// that counts only with four clients, so that no single client (one that reconnects first
/// after a restart, say) closes rounds alone.
fn default_config() -> EngineConfig {
    let mut config = EngineConfig::new(
        1,
        HeadSpec::mlp(1280, &[256], 10),
        "wsa:100:mean-std:mu=0.1"
            .parse::<Strategy>()
            .expect("the default strategy parses"),
    );
    config.classes = datasets::FASHION_MNIST_CLASSES.map(String::from).to_vec();
    config.backbone.sha256 = vec![
        MOBILENET_V2_ONNX_SHA256.to_owned(),
        MOBILENET_V2_NNEF_SHA256.to_owned(),
    ];
    config.aggregation = Aggregation::Median;
    config.eval_fraction = 0.1;
    config.quorum = 4;
    config.min_connected = 4;
    config
}

/// `models/mobilenet_v2_features.onnx`, as pinned in `models/SHA256SUMS`.
const MOBILENET_V2_ONNX_SHA256: &str =
    "aff2468fdaca127f2040af1b67548f4006ad7aee370a25d4f2e92ece97237924";
/// Its NNEF archive from `edge-client convert-model` (the conversion is deterministic), what
/// the ARM builds load.
const MOBILENET_V2_NNEF_SHA256: &str =
    "a7edd1ef6e0d5a3b2c5786cbe4baf27f3eeffacbf86e202fb853f8f6cc038123";

/// What `print-config` says above the TOML: the settings that decide how far one client can
/// sway a run.
const CONFIG_HEADER: &str = r#"# The aggregator's run configuration (aggregator serve --config FILE).
#
# Classes: `classes` names the head's outputs in order (Fashion-MNIST's here); clients map
# their data to them by name (an image folder's `cat/` is class "cat"), and a client holding a
# class not listed refuses to train. For your own data list your class names, one per output
# (head.classes), or name a file with one class per line: classes_file = "labels.txt"
# (relative to this file), in place of `classes`.
#
# Backbone: [backbone] names the feature extractor the clients run (the sha256 of each file
# that produces the same features, and the input side). It goes into the final model folder
# (run/model/model.json) so that the head is used only with the features it was trained on.
#
# Evaluation: eval_fraction = 0.1 has each client hold a tenth of its rows out of training
# and measure every round's global head on them before it trains (federated evaluation: the
# round log's federated_accuracy, rounds.jsonl's federated_eval with the weighted mean, spread,
# median, worst and best client). These are the clients' own figures: the server checks that
# each is possible and caps each client's weight as it caps training weights, but cannot
# measure them; `serve --eval-data DIR` measures the head itself on a labelled set you hold.
# 0 turns it off (every row trains); at most 0.5.
#
# Strategy: [strategy] kind = "wsa" with lambda = 100, rule = "mean-std" and mu = 0.1 (WSA's
# scope term and FedProx's proximal term together: docs/results.md section 7 found it ahead
# of FedProx alone at every skew). Other keys: warmup = R (no WSA term in the first R rounds),
# [strategy.tensors] kind = "only" with index = K (lambda on one scoped tensor) or "curvature"
# (lambda_l = lambda * n_l * target_sigma_l^2); kind = "fedprox" with mu; kind = "fedavg".
# [targets.fusion] kind = "global-head" (the new head's own scopes) or "fixed" (round 0's)
# are ablations, and [targets] align_head = true rescales each merged tensor to its target
# before broadcasting (the scale restoration that made FedAvg 14 points better at 0.1).
#
# Sampling: [sampling] population = "connected" (the default) samples each round from the
# clients connected when it opens; "registered" samples from every client in the registry and
# sends a sampled client its task when it checks in, until the round's deadline (devices woken
# only when asked, or a simulator's workers: wsa-fl --workers). Such a round waits for a
# sampled client that leaves to come back; secure aggregation needs "connected".
#
# Trust: the server weighs and bounds from what it measures, never from what a client claims.
# - quorum = 4, min_connected = 4: a round opens with at least 4 clients connected and moves
#   the head only with 4 accepted updates, so no one client closes rounds alone (after a
#   restart, whoever reconnects first would otherwise decide the next round).
# - max_claim_ratio = 2, max_share = 0.25: however many samples a client claims, it counts
#   for at most twice the median claim of the round's selection, and at most a quarter of a
#   round (at least 1/accepted), in the head, the targets and the reported metrics.
# - [targets]: the WSA targets are fused from the scopes the server measures, by default as
#   the per-tensor median of the clients' (fusion kind "median"; "trimmed-mean" with trim;
#   "follow-rule" for the weighted fusion, or the aggregation's rule under median/trimmed).
#   A round moves each target's sigma by at most max_std_ratio and its mean by at most
#   max_mean_shift sigmas, and sigma stays above std_floor times the initial std of its
#   layer's weights.
# - [bounds]: the largest sample count an update may claim, the largest step from the global
#   head (norm_ratio), how far reported scopes may stray from measured ones, and the factor
#   (max_scope_ratio = 4) within which each tensor's measured sigma must stay of the global
#   head's: a tensor collapsed to its mean or blown up is refused. Under strong label skew
#   (Dirichlet 0.1) an honest client's first round can take the logits layer past 4x; with
#   quorum below the round's selection that costs the round a few updates, not the round.
# - [aggregation] kind = "median" (the default): per coordinate, the median of the round's
#   updates, so attackers in the parameters themselves (a reversed or stretched step) move
#   the head only while they are half a round. Measured (docs/reliability.md, 20 clients,
#   10 a round): every attack by 1 or 4 of 20 liars within 3.3 points of the clean run, where
#   the mean lost 15-49 points to a stretched step. Its price: on strongly non-IID data
#   (Dirichlet 0.1) about 6.5 points below the mean on clean runs; with 0.5 or IID, none.
#   "mean" is the paper's weighted mean, for fleets whose every client you trust;
#   "trimmed-mean" (trim = 0.2) sits between; "norm-clipped" (max_norm) bounds each step's
#   length but not its direction.
#
# Downlink: downlink_encoding = "int8-row-scaled" (or "f16"; f32 when absent) sends the head in
# round tasks at a quarter (half) of the bytes. Each client's step is measured from exactly the
# head it decoded and applied to the aggregator's exact head, so rounding never accumulates in
# the model. A client that holds the head of its last lossy task gets the change from it
# instead (same bytes, a far smaller rounding); downlink_deltas = false sends every client the
# quantized head.
#
# Privacy (off here; docs/privacy.md): a [privacy] table turns on client-level differential
# privacy (DP-FedAvg). Each round clips every client's step to C and its scope offsets to
# scope_share * C, adds Gaussian noise of std noise_multiplier * C * sqrt(1 + scope_share^2)
# to the sums, divides by the round's target, and reports epsilon at delta after every round
# (rounds.jsonl's privacy); the run ends before a round that would pass epsilon_budget. It
# needs aggregation kind = "mean" and weighting = "uniform" (robust rules and claimed sample
# counts are not DP mechanisms), targets that are private: [targets.fusion] kind =
# "global-head" (the noised head's own scopes, no extra noise; the choice that held up in
# docs/privacy.md) or "follow-rule" (the noised mean of the clients' scope offsets, clipped to
# scope_share * C), and enough clients a round for the noise to average out:
#   [privacy]
#   noise_multiplier = 1.0
#   delta = 1e-5
#   epsilon_budget = 8.0
#   [privacy.clip]
#   kind = "fixed"      # or kind = "adaptive", initial = 1.0, quantile = 0.5, count_noise = 5
#   norm = 1.0
#
# Secure aggregation (off here; docs/privacy.md): a [secure] table runs every round as SecAgg+:
# clients mask their step and scope statistics in pairs over a sparse graph (X25519, Shamir
# shares of the mask secrets), and the aggregator learns only the round's sum, even with
# clients dropping (up to `dropout` of a round, which sets each client's neighbours). Values
# are clipped to +-clip in a 32-bit fixed-point ring. The aggregator then cannot check any one
# update, so it needs aggregation kind = "mean", weighting = "uniform", [targets.fusion] kind
# = "follow-rule", "global-head" or "fixed", and quorum >= 3. With [privacy] as well, each
# client clips its own step and adds its share of the noise (a fixed clip, and "global-head"
# or "fixed" targets: no client sends scopes then):
#   [secure]
#   dropout = 0.1
#   clip = 1.0
#   step_timeout_ms = 10000

"#;
fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init("info");
    match cli.command {
        Command::GenCerts {
            out,
            ca_dir,
            server_names,
            clients,
            client_ids,
            server_days,
            ca_days,
            force,
        } => {
            let ids = if client_ids.is_empty() {
                (0..clients).map(protocol::client_id).collect()
            } else {
                client_ids
            };
            let ca_dir = ca_dir.unwrap_or_else(|| tls::default_ca_dir(&out));
            let lifetimes = Lifetimes {
                ca_days,
                server_days,
            };
            tls::generate_credentials(&out, &ca_dir, &server_names, &ids, lifetimes, force)?;
            println!(
                "wrote a server certificate for {server_names:?} (valid {server_days} days) and \
                 {} client tokens to {}, the CA key to {} (keep it off the aggregator host)",
                ids.len(),
                out.display(),
                ca_dir.display()
            );
        }
        Command::AddClient { id, creds } => {
            let token = tls::add_client(&creds, &id)?;
            println!("registered {id}; its token is {}", token.display());
        }
        Command::RevokeClient { id, creds } => {
            tls::revoke_client(&creds, &id)?;
            println!("revoked {id}");
        }
        Command::ListClients { creds } => {
            for id in Registry::load(&creds.join(layout::REGISTRY))?.ids() {
                println!("{id}");
            }
        }
        Command::RenewServerCert {
            creds,
            ca_dir,
            server_names,
            days,
        } => {
            let ca_dir = ca_dir.unwrap_or_else(|| tls::default_ca_dir(&creds));
            tls::renew_server_certificate(&creds, &ca_dir, &server_names, days)?;
            println!(
                "renewed the server certificate in {} for {server_names:?}, valid {days} days; \
                 restart serve to use it",
                creds.display()
            );
        }
        Command::PrintConfig => print!("{CONFIG_HEADER}{}", toml::to_string(&default_config())?),
        Command::Serve(args) => serve(*args)?,
    }
    Ok(())
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Run configuration (TOML: the engine's settings; see `print-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    /// Credentials folder from `gen-certs`.
    #[arg(long, default_value = "creds")]
    creds: PathBuf,
    /// Checkpoint file, written after every round; resumed from when it exists.
    #[arg(long, default_value = "run/checkpoint.bin")]
    checkpoint: PathBuf,
    /// Per-round JSON lines.
    #[arg(long, default_value = "run/rounds.jsonl")]
    rounds_log: PathBuf,
    /// The final model's folder, written when the run finishes (docs/model-format.md).
    #[arg(long, default_value = "run/model")]
    model_dir: PathBuf,
    /// Once the run has finished, keep answering for this many seconds: clients that join
    /// then (offline at the end, say) get the final model. Also serves a finished run's model
    /// when restarted on its checkpoint.
    #[arg(long, default_value_t = 0)]
    linger: u64,
    /// A labelled set to evaluate every new global head on (accuracy, loss and per-class
    /// accuracy in rounds.jsonl and the round's log line, the confusion matrix in
    /// confusion.csv beside rounds.jsonl at the end). Its classes are matched to the
    /// run's by name.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// The evaluation set's format: image-folder, fashion-mnist (or idx), mnist, cifar10,
    /// cifar100, or features (a feature cache file, `*.feat`, from the run's backbone; it
    /// names no classes, so its label i must be the run's class i).
    #[arg(long, default_value = "image-folder")]
    eval_format: String,
    /// The evaluation set's split (IDX and CIFAR files, or an image folder holding
    /// train/ and test/).
    #[arg(long, default_value = "test")]
    eval_split: String,
    /// The backbone that turns evaluation images into features: one the run names in
    /// [backbone].
    #[arg(long, default_value = "models/mobilenet_v2_features.onnx")]
    backbone: PathBuf,
    /// Where the evaluation set's features are cached.
    #[arg(long, default_value = "cache")]
    cache_dir: PathBuf,
    /// Most simultaneous connections [default: 2048].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections not yet past their hello [default: 256].
    #[arg(long)]
    max_unauthenticated: Option<usize>,
    /// Most connections from one IP address [default: 64].
    #[arg(long)]
    max_per_address: Option<usize>,
    /// Stop after this many rounds of the run have closed (resume later).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Where updates are folded: auto (CUDA when this build has it and a GPU answers,
    /// else the CPU, with a log line saying why), cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9100: rounds, their durations, updates by outcome and reason, clients,
    /// bytes, engine time per update, accuracy, the last checkpoint's time.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

/// Runs rounds until the configured number is done.
fn serve(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        config,
        listen,
        creds,
        checkpoint,
        rounds_log,
        model_dir,
        linger,
        eval_data,
        eval_format,
        eval_split,
        backbone: backbone_path,
        cache_dir,
        max_connections,
        max_unauthenticated,
        max_per_address,
        stop_after,
        backend,
        metrics,
    } = args;
    let backend = open_backend(backend)?;
    let config = match &config {
        Some(path) => load_config(path)?,
        None => default_config(),
    };
    for path in [&checkpoint, &rounds_log] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
    }
    let eval_set = match &eval_data {
        Some(path) => Some(aggregator::eval::load_eval_set(
            &config,
            path,
            &eval_format,
            &eval_split,
            &backbone_path,
            &cache_dir,
        )?),
        None => None,
    };
    let mut engine = if checkpoint.exists() {
        let saved = Checkpoint::load(&checkpoint)
            .with_context(|| format!("loading {}", checkpoint.display()))?;
        tracing::info!(path = %checkpoint.display(), "resuming from checkpoint");
        Engine::resume_with_backend(config, saved, backend)?
    } else {
        Engine::with_backend(config, backend)?
    };
    if let Some(set) = eval_set {
        engine.set_test(set)?;
    }
    let defaults = ServerOptions::new(listen, &creds)?;
    let opts = ServerOptions {
        max_connections: max_connections.unwrap_or(defaults.max_connections),
        max_unauthenticated: max_unauthenticated.unwrap_or(defaults.max_unauthenticated),
        max_per_address: max_per_address.unwrap_or(defaults.max_per_address),
        checkpoint: Some(checkpoint),
        rounds_log: Some(rounds_log.clone()),
        model_dir: Some(model_dir),
        linger: std::time::Duration::from_secs(linger),
        confusion_csv: eval_data
            .is_some()
            .then(|| rounds_log.with_file_name("confusion.csv")),
        stop_after_rounds: stop_after,
        metrics: metrics.map(|_| aggregator::server::Metrics::new()),
        ..defaults
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(async move {
        if let (Some(addr), Some(registry)) = (metrics, opts.metrics.clone()) {
            let listener = aggregator::server::bind_metrics(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
            tokio::spawn(aggregator::server::serve_metrics(listener, registry));
        }
        let server = Server::bind(opts)?;
        tracing::info!(addr = %server.local_addr()?, "listening");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C: stopping");
                let _ = stop_tx.send(true);
            }
        });
        server.run(engine, stop_rx).await
    })?;
    println!(
        "{} rounds, finished: {}",
        summary.rounds.len(),
        summary.finished
    );

    Ok(())
}

/// Reads a run configuration; a `classes_file` key (one class name per line, relative to the
/// configuration's folder) stands for the `classes` list.
fn load_config(path: &Path) -> Result<EngineConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if let Some(file) = table.remove("classes_file") {
        anyhow::ensure!(
            !table.contains_key("classes"),
            "{}: give either classes or classes_file, not both",
            path.display()
        );
        let file = file
            .as_str()
            .with_context(|| format!("{}: classes_file must be a path", path.display()))?;
        let file = path.parent().unwrap_or(Path::new(".")).join(file);
        let names = read_class_names(&file)?;
        table.insert("classes".into(), names.into());
    }
    // The shipped configuration holds every section and key a run config may set, once its
    // optional sections are filled in.
    let mut every_key = default_config();
    every_key.privacy = Some(Privacy {
        noise_multiplier: 1.0,
        clip: Clip::Fixed { norm: 1.0 },
        delta: 1e-5,
        scope_share: 0.1,
        epsilon_budget: Some(8.0),
    });
    every_key.downlink_encoding = protocol::Encoding::Int8RowScaled;
    every_key.downlink_deltas = false;
    every_key.secure = Some(aggregator_core::engine::SecureAggregation::default());
    let known = toml::Table::try_from(every_key).context("listing the config keys")?;
    let config: EngineConfig = support::config::from_table_strict(table, &known)
        .with_context(|| format!("parsing {}", path.display()))?;
    config
        .validate()
        .with_context(|| format!("checking {}", path.display()))?;
    Ok(config)
}

/// One class name per line, surrounding spaces and blank lines ignored.
fn read_class_names(file: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the class list {}", file.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped defaults are the ones docs/reliability.md measured: no single client closes
    /// a round, and the rule that held every lying-client attack.
    #[test]
    fn the_shipped_config_needs_several_clients_and_a_robust_rule() {
        let config = default_config();
        config.validate().unwrap();
        assert!(config.quorum >= 4 && config.min_connected >= config.quorum);
        assert_eq!(config.aggregation, Aggregation::Median);
        assert!(config.max_share <= 0.25 && config.max_claim_ratio <= 2.0);
        let printed = format!("{CONFIG_HEADER}{}", toml::to_string(&config).unwrap());
        let read: EngineConfig = toml::from_str(&printed).unwrap();
        assert_eq!(read, config);
    }

    /// A misspelled key or section is an error naming it and the key meant, never a run on
    /// the default it would have replaced.
    #[test]
    fn unknown_keys_are_refused_with_the_nearest_valid_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        let printed = toml::to_string(&default_config()).unwrap();
        std::fs::write(&path, &printed).unwrap();
        assert_eq!(load_config(&path).unwrap(), default_config());
        for (typo, named, meant) in [
            ("[aggregation]", "agregation", "aggregation"),
            ("max_share", "max_shares", "max_share"),
            ("norm_ratio", "bounds.norm_raito", "bounds.norm_ratio"),
        ] {
            let text = printed.replacen(
                typo,
                &typo.replace(
                    meant.rsplit('.').next().unwrap(),
                    named.rsplit('.').next().unwrap(),
                ),
                1,
            );
            assert_ne!(text, printed, "{typo}");
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", load_config(&path).unwrap_err());
            assert!(
                err.contains(&format!("unknown key `{named}` (did you mean `{meant}`?)")),
                "{err}"
            );
        }
        // Inside a rule's own table (an internally tagged enum, which the key check does not
        // see into), serde refuses the key and lists the valid ones.
        let text = printed.replacen(
            "[aggregation]\nkind = \"median\"",
            "[aggregation]\nkind = \"trimmed-mean\"\ntrimm = 0.2",
            1,
        );
        assert_ne!(text, printed);
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", load_config(&path).unwrap_err());
        assert!(
            err.contains("unknown field `trimm`, expected `trim`"),
            "{err}"
        );
    }

    /// The variants of issue 17 are written in the run config as the printed header says.
    #[test]
    fn strategy_and_target_variants_read_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        let printed = toml::to_string(&default_config()).unwrap();
        let text = printed
            .replacen(
                "mu = 0.1\n",
                "mu = 0.1\nwarmup = 2\n\n[strategy.tensors]\nkind = \"only\"\nindex = 1\n",
                1,
            )
            .replacen("[targets]\n", "[targets]\nalign_head = true\n", 1)
            .replacen(
                "[targets.fusion]\nkind = \"median\"",
                "[targets.fusion]\nkind = \"fixed\"",
                1,
            );
        std::fs::write(&path, &text).unwrap();
        let config = load_config(&path).unwrap();
        assert_eq!(
            config.strategy.to_string(),
            "wsa:100:mean-std:mu=0.1:warmup=2:only=1"
        );
        assert!(config.targets.align_head);
        assert_eq!(config.targets.fusion.to_string(), "fixed");
        // λ on a tensor the head lacks stops the run before it starts.
        std::fs::write(&path, text.replace("index = 1", "index = 2")).unwrap();
        let err = format!("{:#}", load_config(&path).unwrap_err());
        assert!(err.contains("scoped tensors"), "{err}");
    }

    /// The printed header's commented example of the `[table]` table, uncommented.
    fn header_example(table: &str) -> String {
        let start = format!("#   [{table}]");
        CONFIG_HEADER
            .lines()
            .skip_while(|l| *l != start)
            .take_while(|l| l.starts_with("#   "))
            .map(|l| format!("{}\n", l.trim_start_matches("#   ")))
            .collect()
    }

    /// The printed header's `[privacy]` example, with the mean and uniform weights it needs,
    /// is a run config; a misspelled key in it is refused.
    #[test]
    fn the_privacy_example_reads_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        let example = header_example("privacy");
        assert!(example.contains("noise_multiplier"), "{example}");
        let printed = toml::to_string(&default_config())
            .unwrap()
            .replacen("weighting = \"sample-count\"", "weighting = \"uniform\"", 1)
            .replacen(
                "[aggregation]\nkind = \"median\"",
                "[aggregation]\nkind = \"mean\"",
                1,
            )
            .replacen(
                "[targets.fusion]\nkind = \"median\"",
                "[targets.fusion]\nkind = \"global-head\"",
                1,
            );
        std::fs::write(&path, format!("{printed}\n{example}")).unwrap();
        let config = load_config(&path).unwrap();
        let privacy = config.privacy.unwrap();
        assert_eq!(privacy.epsilon_budget, Some(8.0));
        assert_eq!(privacy.clip, Clip::Fixed { norm: 1.0 });
        let typo = format!("{printed}\n{}", example.replace("delta", "detla"));
        std::fs::write(&path, typo).unwrap();
        let err = format!("{:#}", load_config(&path).unwrap_err());
        assert!(err.contains("detla"), "{err}");
    }

    /// The printed header's `[secure]` example, with what secure aggregation needs, is a run
    /// config; a misspelled key in it is refused.
    #[test]
    fn the_secure_example_reads_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        let example = header_example("secure");
        assert!(example.contains("dropout"), "{example}");
        let mut config = default_config();
        config.quorum = config.quorum.max(3);
        let printed = toml::to_string(&config)
            .unwrap()
            .replacen("weighting = \"sample-count\"", "weighting = \"uniform\"", 1)
            .replacen(
                "[aggregation]\nkind = \"median\"",
                "[aggregation]\nkind = \"mean\"",
                1,
            )
            .replacen(
                "[targets.fusion]\nkind = \"median\"",
                "[targets.fusion]\nkind = \"follow-rule\"",
                1,
            );
        std::fs::write(&path, format!("{printed}\n{example}")).unwrap();
        let config = load_config(&path).unwrap();
        assert_eq!(config.secure.unwrap().clip, 1.0);
        let typo = format!("{printed}\n{}", example.replace("dropout", "drop_out"));
        std::fs::write(&path, typo).unwrap();
        let err = format!("{:#}", load_config(&path).unwrap_err());
        assert!(err.contains("drop_out"), "{err}");
    }

    /// A labels file names the classes; a list whose length differs from the head's outputs
    /// stops the run before it starts.
    #[test]
    fn a_classes_file_names_the_run_and_must_match_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = default_config();
        config.classes.clear();
        let mut table: toml::Table = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        table.remove("classes");
        table.insert("classes_file".into(), "labels.txt".into());
        let path = dir.path().join("run.toml");
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();

        let names: Vec<String> = (0..10).map(|i| format!("kind {i}")).collect();
        std::fs::write(dir.path().join("labels.txt"), names.join("\n") + "\n\n").unwrap();
        assert_eq!(load_config(&path).unwrap().classes, names);

        std::fs::write(dir.path().join("labels.txt"), "cat\ndog\n").unwrap();
        let err = format!("{:#}", load_config(&path).unwrap_err());
        assert!(
            err.contains("names 2 classes but the head has 10 outputs"),
            "{err}"
        );

        std::fs::write(
            dir.path().join("labels.txt"),
            names.join("\n").replace("kind 9", "kind 0"),
        )
        .unwrap();
        let err = format!("{:#}", load_config(&path).unwrap_err());
        assert!(err.contains("\"kind 0\" is listed twice"), "{err}");

        table.insert("classes".into(), toml::Value::Array(Vec::new()));
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
        let err = format!("{:#}", load_config(&path).unwrap_err());
        assert!(err.contains("not both"), "{err}");
    }
}
