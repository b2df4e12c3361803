//! The aggregator's Prometheus metrics: what an operator graphs and alerts on over weeks of
//! rounds. The run loop updates them; `serve --metrics ADDR` answers `GET /metrics` with their
//! OpenMetrics text (encoded by `prometheus-client`).
//!
//! The HTTP side is the least a scraper needs (one request per connection, the request head
//! read under a size and time bound, then the body and a close): an HTTP stack for one GET
//! would be most of the aggregator's dependency tree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aggregator_core::engine::{ClosedBy, RoundReport};
use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Labels = Vec<(&'static str, String)>;

/// The largest request head read before answering.
const MAX_REQUEST: usize = 8 * 1024;
/// How long one scrape may take, request and response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes answered at once; more connections are closed at once, so that a flood of idle
/// connections cannot use up the descriptors the run loop needs for its checkpoints.
const MAX_SCRAPES: usize = 16;

/// The metrics of one aggregator. Cheap to clone: every metric is shared.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    rounds_opened: Counter,
    rounds_closed: Family<Labels, Counter>,
    round_seconds: Histogram,
    updates: Family<Labels, Counter>,
    refused_hellos: Counter,
    refused_connections: Counter,
    clients_connected: Gauge,
    bytes_in: Counter,
    bytes_out: Counter,
    engine_update_seconds: Histogram,
    round: Gauge,
    test_accuracy: Gauge<f64, AtomicU64>,
    federated_accuracy: Gauge<f64, AtomicU64>,
    privacy_epsilon: Gauge<f64, AtomicU64>,
    checkpoint_time: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered under the `wsa_` prefix, at zero.
    pub fn new() -> Self {
        // The metrics first, then each registered by a handle (they share their values).
        let mut m = Self {
            registry: Arc::default(),
            rounds_opened: Counter::default(),
            rounds_closed: Family::default(),
            // 10 ms to ~3 h.
            round_seconds: Histogram::new(exponential_buckets(0.01, 4.0, 12)),
            updates: Family::default(),
            refused_hellos: Counter::default(),
            refused_connections: Counter::default(),
            clients_connected: Gauge::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            // 10 µs to ~2.6 s.
            engine_update_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 10)),
            round: Gauge::default(),
            test_accuracy: Gauge::default(),
            federated_accuracy: Gauge::default(),
            privacy_epsilon: Gauge::default(),
            checkpoint_time: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("wsa");
        let r = &mut registry;
        r.register(
            "rounds_opened",
            "Round attempts opened",
            m.rounds_opened.clone(),
        );
        r.register(
            "rounds_closed",
            "Round attempts closed, by outcome (counted: the head moved; failed: below quorum)",
            m.rounds_closed.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Wall time of each round attempt",
            m.round_seconds.clone(),
        );
        r.register(
            "updates",
            "Updates answered, by outcome and rejection reason",
            m.updates.clone(),
        );
        r.register(
            "refused_hellos",
            "Hellos refused (unknown client, bad credentials, wrong version)",
            m.refused_hellos.clone(),
        );
        r.register(
            "refused_connections",
            "Connections refused over the connection limits",
            m.refused_connections.clone(),
        );
        r.register(
            "clients_connected",
            "Authenticated client sessions",
            m.clients_connected.clone(),
        );
        r.register(
            "received_bytes",
            "Update frame bytes received",
            m.bytes_in.clone(),
        );
        r.register(
            "sent_bytes",
            "Frame bytes sent (tasks, verdicts)",
            m.bytes_out.clone(),
        );
        r.register(
            "engine_update_seconds",
            "Engine time spent checking and folding one update",
            m.engine_update_seconds.clone(),
        );
        r.register(
            "round",
            "The round the run is in (the next to open after a counted one)",
            m.round.clone(),
        );
        r.register(
            "test_accuracy",
            "The global head's accuracy on the server's evaluation set (NaN without one)",
            m.test_accuracy.clone(),
        );
        r.register(
            "federated_accuracy",
            "The global head's mean accuracy on the clients' held-out rows, as they report it \
             (NaN without eval_fraction)",
            m.federated_accuracy.clone(),
        );
        r.register(
            "privacy_epsilon",
            "The run's client-level DP epsilon so far, at the configured delta (NaN without \
             [privacy])",
            m.privacy_epsilon.clone(),
        );
        r.register(
            "checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint written (0: none yet); alert on its age",
            m.checkpoint_time.clone(),
        );
        m.test_accuracy.set(f64::NAN);
        m.federated_accuracy.set(f64::NAN);
        m.privacy_epsilon.set(f64::NAN);
        m.registry = Arc::new(registry);
        m
    }

    /// A round attempt opened.
    pub(super) fn round_opened(&self, round: u64) {
        self.rounds_opened.inc();
        self.round.set(round.min(i64::MAX as u64) as i64);
    }

    /// A round attempt closed with `report`.
    pub(super) fn round_closed(&self, report: &RoundReport) {
        let outcome = match report.closed_by {
            ClosedBy::Failed => "failed",
            _ => "counted",
        };
        self.rounds_closed
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
        if report.closed_by != ClosedBy::Failed {
            self.round
                .set((report.round + 1).min(i64::MAX as u64) as i64);
        }
        self.round_seconds.observe(report.duration_ms as f64 / 1e3);
        self.updates
            .get_or_create(&vec![
                ("outcome", "accepted".to_owned()),
                ("reason", String::new()),
            ])
            .inc_by(report.accepted_count as u64);
        for (reason, count) in &report.rejected_by_reason {
            self.updates
                .get_or_create(&vec![
                    ("outcome", "rejected".to_owned()),
                    ("reason", reason.clone()),
                ])
                .inc_by(*count);
        }
        if let Some(e) = report.test_eval {
            self.test_accuracy.set(e.accuracy);
        }
        if let Some(f) = report.federated_eval {
            self.federated_accuracy.set(f.accuracy);
        }
        if let Some(p) = report.privacy {
            self.privacy_epsilon.set(p.epsilon);
        }
    }

    /// An update took `seconds` of engine time.
    pub(super) fn update_handled(&self, seconds: f64, wire_bytes: u64) {
        self.engine_update_seconds.observe(seconds);
        self.bytes_in.inc_by(wire_bytes);
    }

    /// Frame bytes went out.
    pub(super) fn bytes_sent(&self, bytes: u64) {
        self.bytes_out.inc_by(bytes);
    }

    /// A hello was refused.
    pub(super) fn hello_refused(&self) {
        self.refused_hellos.inc();
    }

    /// A connection was refused over the limits.
    pub(super) fn connection_refused(&self) {
        self.refused_connections.inc();
    }

    /// `sessions` authenticated clients are connected.
    pub(super) fn connected(&self, sessions: usize) {
        self.clients_connected
            .set(sessions.min(i64::MAX as usize) as i64);
    }

    /// A checkpoint is on disk.
    pub(super) fn checkpointed(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.checkpoint_time.set(now);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, metrics: Metrics) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning on the error.
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                Err(_) => tracing::debug!("metrics request timed out"),
            }
            drop(slot);
        });
    }
}

/// Binds the metrics listener on `addr`.
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    };
    read.await?;
    let request_line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = request_line.split(|&b| b == b' ');
    let (method, path) = (words.next(), words.next());
    let (status, content_type, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
