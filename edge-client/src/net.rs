//! The networked client: connect over QUIC, authenticate, then for each round task train
//! locally, encode, send and await the verdict; reconnect with backoff when the link drops.
//!
//! The session logic is a loop over one connection ([`session`]); [`run`] wraps it in the
//! reconnect policy. Training runs on a blocking thread so the connection keeps answering
//! keep-alives and a shutdown request while a round trains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::quic::{QuicLimits, StreamError, read_message, write_message};
use protocol::{
    Auth, Capabilities, EncodedParams, Goodbye, GoodbyeReason, Hello, Limits, Message, Outcome,
    PROTOCOL_VERSION, RejectReason, RowLayout, Subject, Update, UpdateMetrics, WireScope,
};
use serde::Serialize;
use tokio::sync::watch;
use wsa::{Head, LabelledFeatures};

use crate::round::{Adversary, RoundTask, local_round};

/// How long a round in progress may still finish once the run's goodbye has arrived (its
/// verdict is usually already in flight); well under the server's wait for the close.
const VERDICT_GRACE: Duration = Duration::from_secs(2);

/// How to reach and authenticate with the aggregator.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The aggregator's address.
    pub server: SocketAddr,
    /// The name its certificate carries.
    pub server_name: String,
    /// The deployment's CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// This client's id.
    pub client_id: String,
    /// Its secret token.
    pub token: Vec<u8>,
    /// Message limits for what the aggregator sends.
    pub limits: Limits,
    /// QUIC timeouts.
    pub quic: QuicLimits,
    /// Reconnect policy.
    pub backoff: Backoff,
    /// Robustness experiments only: corrupt every update this way before sending it.
    pub adversary: Option<Adversary>,
}

/// Exponential backoff with full jitter between reconnect attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay's upper bound.
    pub initial: Duration,
    /// The cap on any delay.
    pub max: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (1-based), uniformly drawn from `[0, min(max,
    /// initial·2^(attempt−1))]` so that a fleet that lost its aggregator does not come back in
    /// lockstep. `unit` in `[0, 1)` is the random draw.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        exp.min(self.max).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// What happened to one round task.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// The round.
    pub round: u64,
    /// Accepted, or the reason it was rejected.
    pub outcome: String,
    /// Local training time.
    pub train_ms: u64,
    /// Mean local loss of the last epoch.
    pub loss: f64,
    /// Bytes of the update frame.
    pub update_bytes: u64,
    /// Rows trained on (the update's weight under sample-count weighting).
    pub n_samples: u64,
    /// The scopes sent with the update.
    pub scopes: Vec<WireScope>,
}

/// How a client's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RunEnd {
    /// The aggregator finished the run.
    RunFinished,
    /// Shut down on request.
    Shutdown,
}

/// What a client did over its run.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    /// One record per task answered.
    pub rounds: Vec<RoundRecord>,
    /// Connections made (1 without reconnects).
    pub connections: u32,
    /// Why it stopped.
    pub end: RunEnd,
}

/// Why a client gave up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The aggregator refused the hello; retrying would not help.
    #[error("aggregator refused the hello: {0}")]
    Refused(RejectReason),
    /// Too many failed connection attempts in a row.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// Local setup failed (TLS files, socket).
    #[error("setup: {0}")]
    Setup(String),
}

enum SessionEnd {
    Finished,
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("refused: {0}")]
    Refused(RejectReason),
    #[error("connect: {0}")]
    Connect(String),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("aggregator said goodbye: {0:?}")]
    ServerLeft(GoodbyeReason),
}

/// Joins the aggregator and answers round tasks until the run finishes or `shutdown` turns
/// true. Reconnects after transient failures with [`Backoff`].
pub async fn run(
    opts: ConnectOptions,
    data: Arc<LabelledFeatures>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<ClientReport, ClientError> {
    let config = protocol::quic::client_config(&opts.ca_cert, &opts.quic)
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let bind: SocketAddr = if opts.server.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Setup(e.to_string()))?;
    endpoint.set_default_client_config(config);
    let client_seed = seed_of(&opts.client_id);
    let mut jitter = client_seed | 1;
    let mut report = ClientReport {
        rounds: Vec::new(),
        connections: 0,
        end: RunEnd::Shutdown,
    };
    let mut failures = 0u32;
    let result = loop {
        if *shutdown.borrow() {
            break Ok(RunEnd::Shutdown);
        }
        let mut connected = false;
        let outcome = session(
            &endpoint,
            &opts,
            &data,
            client_seed,
            &mut shutdown,
            &mut report,
            &mut connected,
        )
        .await;
        if connected {
            report.connections += 1;
            failures = 0;
        }
        match outcome {
            Ok(SessionEnd::Finished) => break Ok(RunEnd::RunFinished),
            Ok(SessionEnd::Shutdown) => break Ok(RunEnd::Shutdown),
            Err(SessionError::Refused(reason)) => break Err(ClientError::Refused(reason)),
            Err(e) => {
                failures += 1;
                if opts.backoff.max_attempts.is_some_and(|max| failures >= max) {
                    break Err(ClientError::GaveUp {
                        attempts: failures,
                        last: e.to_string(),
                    });
                }
                jitter = xorshift(jitter);
                let delay = opts
                    .backoff
                    .delay(failures, (jitter >> 11) as f64 / (1u64 << 53) as f64);
                tracing::warn!(client = %opts.client_id, error = %e, ?delay, "session lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    };
    endpoint.wait_idle().await;
    result.map(|end| {
        report.end = end;
        report
    })
}

async fn session(
    endpoint: &quinn::Endpoint,
    opts: &ConnectOptions,
    data: &Arc<LabelledFeatures>,
    client_seed: u64,
    shutdown: &mut watch::Receiver<bool>,
    report: &mut ClientReport,
    connected: &mut bool,
) -> Result<SessionEnd, SessionError> {
    let conn = endpoint
        .connect(opts.server, &opts.server_name)
        .map_err(|e| SessionError::Connect(e.to_string()))?
        .await?;
    let (mut control_send, mut control_recv) = conn.open_bi().await?;
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: opts.client_id.clone(),
        auth: Auth::Token(opts.token.clone()),
        capabilities: Capabilities {
            f16: true,
            int8: true,
        },
        n_samples: data.len() as u64,
    });
    write_message(&mut control_send, &hello).await?;
    match read_message(&mut control_recv, &opts.limits).await?.message {
        Message::Welcome(w) => {
            *connected = true;
            tracing::info!(client = %opts.client_id, run = w.run_id, round = w.round, "joined");
        }
        Message::Verdict(v) => match v.outcome {
            Outcome::Rejected(reason) => return Err(SessionError::Refused(reason)),
            Outcome::Accepted => {
                return Err(SessionError::Protocol("verdict instead of welcome".into()));
            }
        },
        other => {
            return Err(SessionError::Protocol(format!(
                "expected welcome, got {}",
                other.kind()
            )));
        }
    }
    let control = read_message(&mut control_recv, &opts.limits);
    tokio::pin!(control);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(say_goodbye(&conn, &mut control_send).await),
            received = &mut control => return control_message(&conn, received?.message),
            stream = conn.accept_bi() => {
                let (send, recv) = stream?;
                // The control stream is watched while training too: a goodbye that arrives
                // mid-task (the run ended without this update) must be read before the server
                // gives up waiting and closes the connection, which would discard it.
                let task = answer_task(send, recv, opts, data, client_seed);
                tokio::pin!(task);
                let record = tokio::select! {
                    r = &mut task => r?,
                    received = &mut control => {
                        let message = received?.message;
                        // Streams are not ordered among themselves: this round's verdict,
                        // sent before the goodbye, may still be on its way.
                        if let Ok(Ok(record)) = tokio::time::timeout(VERDICT_GRACE, &mut task).await {
                            report.rounds.push(record);
                        }
                        return control_message(&conn, message);
                    }
                    _ = shutdown.changed() => return Ok(say_goodbye(&conn, &mut control_send).await),
                };
                report.rounds.push(record);
            }
        }
    }
}

/// What a message on the control stream, after the welcome, means for the session.
fn control_message(conn: &quinn::Connection, message: Message) -> Result<SessionEnd, SessionError> {
    match message {
        // Closing is this side's job: the server waits for it, so that its goodbye is read
        // before the connection goes.
        Message::Goodbye(Goodbye {
            reason: GoodbyeReason::RunFinished,
        }) => {
            conn.close(0u32.into(), b"done");
            Ok(SessionEnd::Finished)
        }
        // The aggregator restarts or pauses: come back later.
        Message::Goodbye(Goodbye { reason }) => {
            conn.close(0u32.into(), b"bye");
            Err(SessionError::ServerLeft(reason))
        }
        other => Err(SessionError::Protocol(format!(
            "unexpected {} on the control stream",
            other.kind()
        ))),
    }
}

async fn say_goodbye(conn: &quinn::Connection, control: &mut quinn::SendStream) -> SessionEnd {
    let bye = Message::Goodbye(Goodbye {
        reason: GoodbyeReason::ShuttingDown,
    });
    let _ = write_message(control, &bye).await;
    let _ = control.finish();
    conn.close(0u32.into(), b"shutdown");
    SessionEnd::Shutdown
}

/// Reads a round task from a server-opened stream, trains, sends the update, reads the verdict.
async fn answer_task(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    opts: &ConnectOptions,
    data: &Arc<LabelledFeatures>,
    client_seed: u64,
) -> Result<RoundRecord, SessionError> {
    let Message::RoundTask(task) = read_message(&mut recv, &opts.limits).await?.message else {
        return Err(SessionError::Protocol("expected a round task".into()));
    };
    let spec = task
        .shape
        .to_spec()
        .map_err(|e| SessionError::Protocol(format!("task head: {e}")))?;
    let layout = RowLayout::of_head(&task.shape);
    let global = task
        .global
        .decode(&layout)
        .ok()
        .and_then(|flat| Head::from_flat(&spec, &flat).ok())
        .ok_or_else(|| SessionError::Protocol("task head parameters do not decode".into()))?;
    let train = task
        .train
        .to_config(&task.targets)
        .map_err(|e| SessionError::Protocol(format!("task training config: {e}")))?;
    let local = RoundTask {
        round: task.round,
        global,
        train,
    };
    let data = Arc::clone(data);
    let started = Instant::now();
    let adversary = opts.adversary;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut update = local_round(&local, &data, client_seed)?;
        if let Some(a) = adversary {
            a.corrupt(&local, &mut update)?;
        }
        Ok::<_, wsa::Error>(update)
    })
    .await
    .map_err(|e| SessionError::Protocol(format!("training thread: {e}")))?
    .map_err(|e| SessionError::Protocol(format!("local training: {e}")))?;
    let train_ms = started.elapsed().as_millis() as u64;
    let params = EncodedParams::encode(&outcome.params, &layout, task.encoding)
        .map_err(|e| SessionError::Protocol(format!("encoding the update: {e}")))?;
    let scopes: Vec<WireScope> = outcome
        .scopes
        .iter()
        .copied()
        .map(WireScope::from)
        .collect();
    let update = Update {
        run_id: task.run_id,
        round: task.round,
        client_id: opts.client_id.clone(),
        n_samples: outcome.metrics.n_samples,
        params,
        scopes: scopes.clone(),
        metrics: UpdateMetrics {
            loss: outcome.metrics.loss,
            accuracy: outcome.metrics.accuracy,
            kl: outcome.metrics.regularizer.kl,
            steps: outcome.metrics.steps,
            train_ms,
        },
        digest: [0; 32],
    }
    .seal();
    let update_bytes = write_message(&mut send, &Message::Update(update)).await?;
    let _ = send.finish();
    let verdict = read_message(&mut recv, &opts.limits).await?.message;
    let outcome_text = match verdict {
        Message::Verdict(v) if v.subject == (Subject::Update { round: task.round }) => {
            match v.outcome {
                Outcome::Accepted => "accepted".to_owned(),
                Outcome::Rejected(reason) => {
                    tracing::warn!(client = %opts.client_id, round = task.round, %reason, "update rejected");
                    format!("rejected: {reason}")
                }
            }
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the verdict, got {}",
                other.kind()
            )));
        }
    };
    Ok(RoundRecord {
        round: task.round,
        outcome: outcome_text,
        train_ms,
        loss: outcome.metrics.loss,
        update_bytes,
        n_samples: outcome.metrics.n_samples,
        scopes,
    })
}

/// A stable per-client seed (FNV-1a of the id): decorrelates client shuffles.
fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_jitters_below_it() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: None,
        };
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(400));
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(100, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
    }
}
