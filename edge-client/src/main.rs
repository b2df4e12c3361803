//! `edge-client`: the edge device's command line. `join` takes part in a federated run over
//! QUIC; `features` extracts and caches backbone features; `probe` trains heads centrally on
//! them to check what the frozen features are worth.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use datasets::{ImageSet, Limits};
use edge_client::{Backbone, cached_features};
use wsa::{Head, HeadSpec, Init, LabelledFeatures, Sgd, TrainConfig};

#[derive(Parser)]
#[command(
    name = "edge-client",
    version,
    about = "WSA edge client: frozen MobileNetV2 features and local head training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: support::logging::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Extract (or load from the cache) the features of an IDX data set split.
    Features {
        #[command(flatten)]
        source: Source,
        /// `train` or `test` (the IDX files `train-*` or `t10k-*`).
        #[arg(long, default_value = "train")]
        split: String,
        /// Use only the first N images (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Join an aggregator and train on local data until the run ends (Ctrl-C stops cleanly).
    Join(Box<JoinArgs>),
    /// Where this client stands: its last round (from the report `join --report` keeps up to
    /// date) and whether the run's final model is in its model folder. Takes join's settings
    /// (`--config client.toml`).
    Status(Box<JoinArgs>),
    /// Convert the features ONNX into an NNEF archive, the format NNEF-only builds (the ARM
    /// ones) load; one archive serves every input side.
    #[cfg(feature = "onnx")]
    ConvertModel {
        /// The features ONNX.
        #[arg(long, default_value = "models/mobilenet_v2_features.onnx")]
        onnx: PathBuf,
        /// The archive to write.
        #[arg(long, default_value = "models/mobilenet_v2_features.nnef.tgz")]
        out: PathBuf,
    },
    /// Classify images with a trained model folder (the aggregator's run/model): the top
    /// classes of each image with their probabilities.
    Predict(PredictArgs),
    /// Write one file holding the backbone, the model's head and a softmax: input the
    /// preprocessed image tensor, output the class probabilities. ONNX carries the classes,
    /// side and preprocessing in its metadata; the NNEF archive (what tract and the ARM builds
    /// load; input side symbolic, batch 1) carries labels.txt and model.json inside.
    #[cfg(feature = "onnx")]
    Export {
        /// The model folder.
        #[arg(long)]
        model: PathBuf,
        /// The backbone ONNX; it must be one the model names.
        #[arg(long, default_value = "models/mobilenet_v2_features.onnx")]
        backbone: PathBuf,
        /// The output format.
        #[arg(long, default_value = "onnx", value_parser = ["onnx", "nnef"])]
        format: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train linear and MLP heads centrally on cached features; report test accuracy.
    Probe {
        #[command(flatten)]
        source: Source,
        /// Epochs over the training features.
        #[arg(long, default_value_t = 10)]
        epochs: u32,
        /// Use only the first N training images (0: all).
        #[arg(long, default_value_t = 0)]
        train_limit: usize,
    },
}

/// Builds with the ONNX front end default to the ONNX; NNEF-only builds to its archive.
const DEFAULT_MODEL: &str = if cfg!(feature = "onnx") {
    "models/mobilenet_v2_features.onnx"
} else {
    "models/mobilenet_v2_features.nnef.tgz"
};

#[derive(Args)]
struct Source {
    /// The backbone: the features ONNX (scripts/fetch-model.sh) or its NNEF archive.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Input side in pixels (96 is fast on 2 cores; 224 is what ImageNet used).
    #[arg(long, default_value_t = 96)]
    side: usize,
    /// Folder with the IDX files (scripts/fetch-fashion-mnist.sh fills data/fashion-mnist).
    #[arg(long, default_value = "data/fashion-mnist")]
    data: PathBuf,
    /// Where feature caches live.
    #[arg(long, default_value = "cache")]
    cache_dir: PathBuf,
    /// Worker threads for feature extraction.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
}

#[derive(Args)]
struct PredictArgs {
    /// The model folder (head.safetensors, model.json, labels.txt).
    #[arg(long)]
    model: PathBuf,
    /// The backbone file; it must be one the model names.
    #[arg(long, default_value = DEFAULT_MODEL)]
    backbone: PathBuf,
    /// Image files (PNG or JPEG), or folders of them.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Classes shown per image.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// One JSON object per image instead of text.
    #[arg(long)]
    json: bool,
    /// Worker threads for the backbone.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
}

/// The image files named: files as given, folders as their image files sorted by name.
fn image_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for input in inputs {
        if !input.is_dir() {
            paths.push(input.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| format!("reading {}", input.display()))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("reading {}", input.display()))?
            .into_iter()
            .filter(|p| datasets::has_image_extension(p) && !p.is_dir())
            .collect();
        anyhow::ensure!(
            !found.is_empty(),
            "{} holds no .png, .jpg or .jpeg files",
            input.display()
        );
        found.sort();
        paths.extend(found);
    }
    Ok(paths)
}

fn predict(args: PredictArgs) -> Result<()> {
    /// Images decoded and run at a time, so a folder of thousands stays in bounded memory.
    const CHUNK: usize = 64;
    let predictor = edge_client::predict::Predictor::open(&args.model, &args.backbone)?;
    let paths = image_paths(&args.inputs)?;
    let mut seconds = 0.0;
    for chunk in paths.chunks(CHUNK) {
        let images = chunk
            .iter()
            .map(|p| datasets::read_image(p, &Limits::default()))
            .collect::<Result<Vec<_>, _>>()?;
        let started = Instant::now();
        let results = predictor.classify(&images, args.top, args.threads)?;
        seconds += started.elapsed().as_secs_f64();
        for (path, top) in chunk.iter().zip(results) {
            if args.json {
                let line = serde_json::json!({ "path": path, "top": top });
                println!("{line}");
            } else {
                let shown: Vec<String> = top
                    .iter()
                    .map(|s| format!("{} {:.3}", s.class, s.probability))
                    .collect();
                println!("{}: {}", path.display(), shown.join(", "));
            }
        }
    }
    tracing::info!(
        images = paths.len(),
        ms_per_image = format!("{:.1}", 1e3 * seconds / paths.len() as f64),
        "classified (backbone and head, after decoding)"
    );
    Ok(())
}

/// `join`'s settings: a TOML file (`--config`), overridden by flags.
#[derive(Args, Debug, Default, serde::Deserialize)]
struct JoinArgs {
    /// TOML file with any of the settings below (flags win).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Aggregator address, host:port.
    #[arg(long)]
    server: Option<String>,
    /// Name in the aggregator's certificate [default: the host part of --server].
    #[arg(long)]
    server_name: Option<String>,
    /// The deployment's CA certificate (PEM).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// This client's id.
    #[arg(long)]
    client_id: Option<String>,
    /// File holding this client's token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Local data: a `class/*.png|jpg` tree (or one with `train/` and `test/`), or a folder
    /// of IDX or CIFAR files (`--data-format`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// image-folder, fashion-mnist (or idx), mnist, cifar10 or cifar100 [default: image-folder].
    #[arg(long)]
    data_format: Option<String>,
    /// `train` or `test` [default: train].
    #[arg(long)]
    split: Option<String>,
    /// Use only the first N images (0: all) [default: 0].
    #[arg(long)]
    limit: Option<usize>,
    /// The backbone: the features ONNX or its NNEF archive [default:
    /// models/mobilenet_v2_features.onnx; .nnef.tgz on builds without ONNX].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Backbone input side [default: 96].
    #[arg(long)]
    side: Option<usize>,
    /// Where feature caches live [default: cache].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Threads for feature extraction [default: every core].
    #[arg(long)]
    threads: Option<usize>,
    /// Give up after this many failed connection attempts in a row [default: never].
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Keep the client's report (rounds, verdicts, how the run ended) as JSON here, rewritten
    /// after every round; `edge-client status` reads it.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where to keep the run's final model when the run finishes [default: model].
    #[arg(long)]
    model_dir: Option<PathBuf>,
}

impl JoinArgs {
    /// Flags over the config file's values.
    fn resolve(self) -> Result<Self> {
        let file: JoinArgs = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let table: toml::Table =
                    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                // The keys a file may set: the flags' names, as the fields spell them.
                let known: toml::Table = JoinArgs::augment_args(clap::Command::new("join"))
                    .get_arguments()
                    .map(|a| (a.get_id().as_str().replace('-', "_"), true.into()))
                    .filter(|(id, _)| id != "config")
                    .collect();
                support::config::from_table_strict(table, &known)
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None => JoinArgs::default(),
        };
        Ok(JoinArgs {
            config: self.config,
            server: self.server.or(file.server),
            server_name: self.server_name.or(file.server_name),
            ca_cert: self.ca_cert.or(file.ca_cert),
            client_id: self.client_id.or(file.client_id),
            token_file: self.token_file.or(file.token_file),
            data: self.data.or(file.data),
            data_format: self.data_format.or(file.data_format),
            split: self.split.or(file.split),
            limit: self.limit.or(file.limit),
            model: self.model.or(file.model),
            side: self.side.or(file.side),
            cache_dir: self.cache_dir.or(file.cache_dir),
            threads: self.threads.or(file.threads),
            max_attempts: self.max_attempts.or(file.max_attempts),
            report: self.report.or(file.report),
            model_dir: self.model_dir.or(file.model_dir),
        })
    }
}

fn need<T>(value: Option<T>, name: &str) -> Result<T> {
    value.with_context(|| {
        format!(
            "--{name} (or `{}` in the config) is required",
            name.replace('-', "_")
        )
    })
}

fn join(args: JoinArgs) -> Result<()> {
    let args = args.resolve()?;
    let server: String = need(args.server.clone(), "server")?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&server)
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to nothing"))?;
    let server_name = args.server_name.clone().unwrap_or_else(|| {
        server.rsplit_once(':').map_or(server.clone(), |(h, _)| {
            h.trim_matches(['[', ']']).to_owned()
        })
    });
    let client_id: String = need(args.client_id.clone(), "client-id")?;
    let token_file: PathBuf = need(args.token_file.clone(), "token-file")?;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading {}", token_file.display()))?
        .trim()
        .as_bytes()
        .to_vec();
    let data_path: PathBuf = need(args.data.clone(), "data")?;
    let side = args.side.unwrap_or(96);
    let model = args.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into());
    let cache_dir = args.cache_dir.clone().unwrap_or_else(|| "cache".into());
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let format: datasets::DataFormat = args
        .data_format
        .as_deref()
        .unwrap_or("image-folder")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let split: datasets::Split = args
        .split
        .as_deref()
        .unwrap_or("train")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let mut set = datasets::read_set(format, &data_path, split, &Limits::default())
        .with_context(|| format!("reading {}", data_path.display()))?;
    if let Some(n) = args.limit.filter(|&n| n > 0 && n < set.len()) {
        set.images.truncate(n);
        set.labels.truncate(n);
    }
    let backbone = Backbone::load(&model, side)?;
    let cache = cache_dir.join(format!("{client_id}-{side}.feat"));
    let (data, outcome) = cached_features(&backbone, &set, &cache, threads, true)?;
    tracing::info!(rows = data.len(), ?outcome, "local features ready");
    drop(backbone);
    let data = edge_client::LocalData::new(std::sync::Arc::new(data), set.class_names)?;

    let opts = edge_client::net::ConnectOptions {
        server: addr,
        server_name,
        ca_cert: need(args.ca_cert.clone(), "ca-cert")?,
        client_id,
        token,
        limits: protocol::Limits::default(),
        quic: protocol::quic::QuicLimits::default(),
        backoff: edge_client::net::Backoff {
            max_attempts: args.max_attempts,
            ..Default::default()
        },
        adversary: None,
        model_dir: Some(args.model_dir.clone().unwrap_or_else(|| "model".into())),
        visit: None,
        report_file: args.report.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C: leaving the run");
                let _ = stop_tx.send(true);
            }
        });
        edge_client::net::run(opts, data, stop_rx).await
    })?;
    println!("{}", report.summary());
    Ok(())
}

/// Prints where the client configured by `args` stands.
fn status(args: JoinArgs) -> Result<()> {
    let args = args.resolve()?;
    match &args.report {
        None => println!("report: none configured (join --report FILE keeps one)"),
        Some(path) if !path.exists() => {
            println!(
                "report {}: not written yet (no round answered)",
                path.display()
            )
        }
        Some(path) => {
            let report: edge_client::net::ClientReport = serde_json::from_slice(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("parsing {}", path.display()))?;
            println!("report {}: {}", path.display(), report.summary());
            if let Some(error) = &report.error {
                println!("gave up: {error}");
            }
            if let Some(r) = report.rounds.last() {
                let held_out = r.held_out.map_or(String::new(), |h| {
                    format!(
                        ", held-out accuracy {:.4} on {} rows",
                        h.accuracy, h.samples
                    )
                });
                println!(
                    "last round {}: {}, loss {:.4}, {} samples, {} bytes sent, {} ms training{held_out}",
                    r.round, r.outcome, r.loss, r.n_samples, r.update_bytes, r.train_ms
                );
            }
        }
    }
    let dir = args.model_dir.unwrap_or_else(|| "model".into());
    if !dir.exists() {
        println!("final model: none yet in {}", dir.display());
        return Ok(());
    }
    match wsa::saved::SavedModel::load(&dir) {
        Ok(model) => println!(
            "final model {}: {} rounds of {}, {} classes, backbone side {}",
            dir.display(),
            model.card.provenance.rounds,
            model.card.provenance.strategy,
            model.card.classes.len(),
            model.card.backbone.side
        ),
        Err(e) => println!("final model {}: unreadable: {e}", dir.display()),
    }
    Ok(())
}

fn load_split(data: &Path, split: &str) -> Result<ImageSet> {
    let split: datasets::Split = split.parse().map_err(anyhow::Error::msg)?;
    datasets::read_fashion_mnist(data, split, &Limits::default()).with_context(|| {
        format!(
            "loading {} from {} (run scripts/fetch-fashion-mnist.sh)",
            split.name(),
            data.display()
        )
    })
}

/// Features of the first `limit` images (0: all) of a split, through the cache.
fn features(
    source: &Source,
    backbone: &Backbone,
    split: &str,
    limit: usize,
) -> Result<LabelledFeatures> {
    let mut set = load_split(&source.data, split)?;
    if limit > 0 && limit < set.len() {
        set.images.truncate(limit);
        set.labels.truncate(limit);
    }
    let cache = edge_client::cache::cache_path(
        &source.cache_dir,
        "fashion-mnist",
        split,
        source.side,
        set.len(),
        &backbone.sha256(),
    );
    let started = Instant::now();
    let (features, outcome) = cached_features(backbone, &set, &cache, source.threads, true)?;
    tracing::info!(
        split,
        images = set.len(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        ?outcome,
        "features ready in {}",
        cache.display()
    );
    Ok(features)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init("info");
    match cli.command {
        Command::Join(args) => join(*args)?,
        Command::Status(args) => status(*args)?,
        Command::Predict(args) => predict(args)?,
        #[cfg(feature = "onnx")]
        Command::Export {
            model,
            backbone,
            format,
            out,
        } => {
            let saved = wsa::saved::SavedModel::load(&model)?;
            let bytes = std::fs::read(&backbone)
                .with_context(|| format!("reading {}", backbone.display()))?;
            let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
            edge_client::predict::check_backbone(&model, &saved, &backbone, &sha)?;
            let batch = if format == "nnef" {
                edge_client::export::export_nnef(&backbone, &bytes, &saved, &out)?;
                "1"
            } else {
                edge_client::export::export_onnx(&backbone, &bytes, &saved, &out)?;
                "N"
            };
            println!(
                "wrote {} ({} bytes): input \"input\" [{batch}, 3, {side}, {side}], output \"probabilities\" [{batch}, {}]",
                out.display(),
                std::fs::metadata(&out)?.len(),
                saved.card.classes.len(),
                side = saved.card.backbone.side,
            );
        }
        Command::Features {
            source,
            split,
            limit,
        } => {
            let backbone = Backbone::load(&source.model, source.side)?;
            let f = features(&source, &backbone, &split, limit)?;
            println!("{split}: {} rows × {} features", f.len(), f.dim());
        }
        #[cfg(feature = "onnx")]
        Command::ConvertModel { onnx, out } => {
            edge_client::convert_onnx_to_nnef(&onnx, &out)?;
            println!(
                "wrote {} ({} bytes)",
                out.display(),
                std::fs::metadata(&out)?.len()
            );
        }
        Command::Probe {
            source,
            epochs,
            train_limit,
        } => {
            let backbone = Backbone::load(&source.model, source.side)?;
            let mut train = features(&source, &backbone, "train", 0)?;
            if train_limit > 0 && train_limit < train.len() {
                train = train.select(&(0..train_limit).collect::<Vec<_>>())?;
            }
            let test = features(&source, &backbone, "test", 0)?;
            let cfg = TrainConfig::new(Sgd {
                epochs,
                batch_size: 64,
                ..Sgd::default()
            });
            println!("| head | train rows | epochs | test accuracy | train seconds |");
            println!("|---|---|---|---|---|");
            for spec in [
                HeadSpec::linear(train.dim(), 10),
                HeadSpec::mlp(train.dim(), &[256], 10),
            ] {
                let start = Head::init(&spec, Init::Standard, 0)?;
                let t = Instant::now();
                let out = wsa::train(&start, &train, &cfg)?;
                let secs = t.elapsed().as_secs_f64();
                let acc = out.head.evaluate(test.x(), test.labels())?.accuracy;
                println!(
                    "| {:?} | {} | {epochs} | {acc:.4} | {secs:.1} |",
                    spec.layer_dims(),
                    train.len()
                );
            }
        }
    }
    Ok(())
}
