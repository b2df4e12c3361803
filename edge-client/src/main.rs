//! `edge-client`: the edge device's command line. Today it extracts and caches backbone
//! features for a data set and trains a head on them locally (`features`, `probe`); joining
//! an aggregator over QUIC comes with the transport.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use datasets::{FASHION_MNIST_CLASSES, ImageSet, Limits};
use edge_client::{Backbone, cached_features};
use wsa::{Head, HeadSpec, Init, LabelledFeatures, TrainConfig};

#[derive(Parser)]
#[command(
    name = "edge-client",
    about = "WSA edge client: frozen MobileNetV2 features and local head training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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

#[derive(Args)]
struct Source {
    /// The features ONNX (built by scripts/fetch-model.sh).
    #[arg(long, default_value = "models/mobilenet_v2_features.onnx")]
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

fn load_split(data: &Path, split: &str) -> Result<ImageSet> {
    let prefix = match split {
        "train" => "train",
        "test" => "t10k",
        other => anyhow::bail!("unknown split {other:?}: use train or test"),
    };
    let names = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    datasets::read_idx(
        &data.join(format!("{prefix}-images-idx3-ubyte.gz")),
        &data.join(format!("{prefix}-labels-idx1-ubyte.gz")),
        Some(names),
        &Limits::default(),
    )
    .with_context(|| {
        format!(
            "loading {split} from {} (run scripts/fetch-fashion-mnist.sh)",
            data.display()
        )
    })
}

fn features(source: &Source, backbone: &Backbone, split: &str) -> Result<LabelledFeatures> {
    let set = load_split(&source.data, split)?;
    let cache = source
        .cache_dir
        .join(format!("fashion-mnist-{split}-{}.feat", source.side));
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Features { source, split } => {
            let backbone = Backbone::load(&source.model, source.side)?;
            let f = features(&source, &backbone, &split)?;
            println!("{split}: {} rows × {} features", f.len(), f.dim());
        }
        Command::Probe {
            source,
            epochs,
            train_limit,
        } => {
            let backbone = Backbone::load(&source.model, source.side)?;
            let mut train = features(&source, &backbone, "train")?;
            if train_limit > 0 && train_limit < train.len() {
                train = train.select(&(0..train_limit).collect::<Vec<_>>())?;
            }
            let test = features(&source, &backbone, "test")?;
            let cfg = TrainConfig {
                epochs,
                batch_size: 64,
                ..TrainConfig::default()
            };
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
