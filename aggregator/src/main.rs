//! `aggregator`: makes credentials (`gen-certs`) and runs federated rounds over QUIC (`serve`).

use std::net::SocketAddr;
use std::path::PathBuf;

use aggregator::backends::{BackendChoice, open_backend};
use aggregator::server::{Server, ServerOptions};
use aggregator::tls::generate_credentials;
use aggregator_core::checkpoint::Checkpoint;
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use wsa::{FusionRule, HeadSpec};

#[derive(Parser)]
#[command(name = "aggregator", about = "WSA federated aggregator over QUIC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a private CA, a server certificate and a token per client.
    GenCerts {
        /// Output folder.
        #[arg(long, default_value = "creds")]
        out: PathBuf,
        /// Names (DNS or IP) the server certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        server_names: Vec<String>,
        /// Make N clients named client-0000 … (ignored when --client-ids is given).
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Explicit client ids.
        #[arg(long, value_delimiter = ',')]
        client_ids: Vec<String>,
    },
    /// Run rounds until the configured number is done (Ctrl-C stops after a checkpoint).
    Serve {
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
        /// Most simultaneous connections [default: 2048].
        #[arg(long)]
        max_connections: Option<usize>,
        /// Stop after this many rounds of the run have closed (resume later).
        #[arg(long)]
        stop_after: Option<u64>,
        /// Where updates are folded: auto (CUDA when this build has it and a GPU answers,
        /// else the CPU, with a log line saying why), cpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: BackendChoice,
    },
    /// Print the default run configuration as TOML.
    PrintConfig,
}

/// The shipped default: the MLP head on MobileNetV2 features, WSA with the mean-of-σ rule.
fn default_config() -> EngineConfig {
    EngineConfig::new(
        1,
        HeadSpec::mlp(1280, &[256], 10),
        Strategy::Wsa {
            lambda: 10.0,
            rule: FusionRule::MeanStd,
        },
    )
}

fn main() -> Result<()> {
    support::logging::init("info");
    match Cli::parse().command {
        Command::GenCerts {
            out,
            server_names,
            clients,
            client_ids,
        } => {
            let ids = if client_ids.is_empty() {
                (0..clients).map(protocol::client_id).collect()
            } else {
                client_ids
            };
            generate_credentials(&out, &server_names, &ids)?;
            println!(
                "wrote a private CA, a server certificate for {server_names:?} and {} client tokens to {}",
                ids.len(),
                out.display()
            );
        }
        Command::PrintConfig => print!("{}", toml::to_string(&default_config())?),
        Command::Serve {
            config,
            listen,
            creds,
            checkpoint,
            rounds_log,
            max_connections,
            stop_after,
            backend,
        } => {
            let backend = open_backend(backend)?;
            let config: EngineConfig = match &config {
                Some(path) => toml::from_str(
                    &std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?,
                )
                .with_context(|| format!("parsing {}", path.display()))?,
                None => default_config(),
            };
            for path in [&checkpoint, &rounds_log] {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
            }
            let engine = if checkpoint.exists() {
                let saved = Checkpoint::load(&checkpoint)
                    .with_context(|| format!("loading {}", checkpoint.display()))?;
                tracing::info!(path = %checkpoint.display(), "resuming from checkpoint");
                Engine::resume_with_backend(config, saved, backend)?
            } else {
                Engine::with_backend(config, backend)?
            };
            let defaults = ServerOptions::new(listen, &creds)?;
            let opts = ServerOptions {
                max_connections: max_connections.unwrap_or(defaults.max_connections),
                checkpoint: Some(checkpoint),
                rounds_log: Some(rounds_log),
                stop_after_rounds: stop_after,
                ..defaults
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let summary = runtime.block_on(async move {
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
        }
    }
    Ok(())
}
