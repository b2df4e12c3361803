//! The server's settings, with their one set of defaults, and what a run reports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aggregator_core::engine::RoundReport;
use anyhow::Result;
use protocol::Limits;
use protocol::quic::QuicLimits;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::auth::Registry;
use crate::tls::layout;

/// Settings of the QUIC side.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server key (PEM).
    pub key: PathBuf,
    /// Who may join.
    pub registry: Registry,
    /// The file `registry` came from, reloaded when it changes (add-client, revoke-client).
    pub registry_file: Option<PathBuf>,
    /// Message size and count limits.
    pub limits: Limits,
    /// QUIC timeouts and stream limits.
    pub quic: QuicLimits,
    /// Connections beyond this are refused at the QUIC handshake.
    pub max_connections: usize,
    /// Connections that have not yet passed their hello, beyond which new ones are refused:
    /// a budget of its own, so a flood of strangers cannot take the authenticated clients'
    /// places.
    pub max_unauthenticated: usize,
    /// Connections from one IP address at once.
    pub max_per_address: usize,
    /// Answer a peer's first packet with a stateless QUIC retry, so no state is kept for an
    /// address that has not shown it receives there.
    pub validate_addresses: bool,
    /// The handshake, the control stream and the hello must all be done by then.
    pub hello_timeout: Duration,
    /// Checkpoint file written after every round (atomically).
    pub checkpoint: Option<PathBuf>,
    /// Per-round JSON lines.
    pub rounds_log: Option<PathBuf>,
    /// Where the final model goes when the run finishes (`docs/model-format.md`).
    pub model_dir: Option<PathBuf>,
    /// How long a finished run keeps answering: a client that joins then (one that was
    /// offline at the end, say) gets the final model and the run's goodbye. Zero: the server
    /// returns as soon as the run finishes.
    pub linger: Duration,
    /// Where the final head's confusion matrix on the evaluation set goes (CSV, rows the true
    /// classes, columns the predicted), when the engine has one.
    pub confusion_csv: Option<PathBuf>,
    /// Stop (with a checkpoint, telling clients the server is going down) once this many
    /// rounds of the run have closed; a later start resumes from the checkpoint.
    pub stop_after_rounds: Option<u64>,
    /// Receives each round's line as it closes (progress bars, live plots).
    pub round_observer: Option<mpsc::UnboundedSender<RoundLine>>,
    /// Kept up to date as the run goes, for a metrics endpoint ([`super::serve_metrics`]).
    pub metrics: Option<super::Metrics>,
}

impl ServerOptions {
    /// Options for a server on `listen` with the credentials `gen-certs` wrote to `creds`
    /// (certificate, key, client registry, watched for changes) and the defaults: the protocol's limits, 2,048
    /// connections, of them 256 not yet authenticated and 64 from one address, address
    /// validation, 5 s to handshake and say hello, no checkpoint, no round log, no stop.
    pub fn new(listen: SocketAddr, creds: &Path) -> Result<Self> {
        let registry_file = creds.join(layout::REGISTRY);
        Ok(Self {
            listen,
            cert: creds.join(layout::SERVER_CERT),
            key: creds.join(layout::SERVER_KEY),
            registry: Registry::load(&registry_file)?,
            registry_file: Some(registry_file),
            limits: Limits::default(),
            quic: QuicLimits::default(),
            max_connections: 2048,
            max_unauthenticated: 256,
            max_per_address: 64,
            validate_addresses: true,
            hello_timeout: Duration::from_secs(5),
            checkpoint: None,
            rounds_log: None,
            model_dir: None,
            linger: Duration::ZERO,
            confusion_csv: None,
            stop_after_rounds: None,
            round_observer: None,
            metrics: None,
        })
    }
}

/// What the transport saw in a round, beside the engine's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransportStats {
    /// Frame bytes sent (tasks, verdicts).
    pub bytes_out: u64,
    /// Frame bytes received (updates).
    pub bytes_in: u64,
    /// Hellos refused (bad credentials, unknown client, bad version).
    pub refused_hellos: Vec<String>,
    /// Hellos refused, all of them (the list above holds the first few).
    pub refused_hello_count: u64,
    /// Connections refused over the connection limits.
    pub refused_connections: u64,
    /// Engine CPU time spent handling updates, µs.
    pub engine_update_us: u64,
    /// Updates the engine handled.
    pub engine_updates: u64,
    /// Wall time of the round, ms.
    pub wall_ms: u64,
    /// Clients connected when the round closed.
    pub connected: usize,
}

/// One line of the per-round log.
#[derive(Debug, Clone, Serialize)]
pub struct RoundLine {
    /// The engine's account.
    #[serde(flatten)]
    pub report: RoundReport,
    /// The transport's.
    pub transport: TransportStats,
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Every round's line.
    pub rounds: Vec<RoundLine>,
    /// True when all rounds ran (false: stopped by shutdown).
    pub finished: bool,
}
