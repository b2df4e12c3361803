//! The QUIC runtime around the round engine: it moves bytes and timers in and out of
//! [`Engine`], which holds every decision. One task per connection; one task owns the engine.
//!
//! A client opens one bidirectional *control* stream for its hello, the welcome and the final
//! goodbye. For each round the server opens a stream to each selected client and writes the
//! task; the client answers on it with its update and the server closes it with the verdict.
//! Clients may not open more streams than that (QUIC flow control refuses the rest).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use protocol::quic::{QuicLimits, StreamError, read_message, write_message};
use protocol::{
    Capabilities, Goodbye, GoodbyeReason, Limits, Message, Outcome, PROTOCOL_VERSION, RejectReason,
    Subject, Verdict, Welcome, encode_frame,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::auth::Registry;
use crate::engine::{Action, ClosedBy, Engine, Event, Millis, ReceivedUpdate, RoundReport};

/// How long a connection waits, after the goodbye, for its client to read it and close; a
/// client that does not is closed on.
const GOODBYE_GRACE: Duration = Duration::from_secs(5);

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
    /// Message size and count limits.
    pub limits: Limits,
    /// QUIC timeouts and stream limits.
    pub quic: QuicLimits,
    /// Connections beyond this are refused at the QUIC handshake.
    pub max_connections: usize,
    /// A connection that has not said hello by then is closed.
    pub hello_timeout: Duration,
    /// Checkpoint file written after every round (atomically).
    pub checkpoint: Option<PathBuf>,
    /// Per-round JSON lines.
    pub rounds_log: Option<PathBuf>,
    /// Stop (with a checkpoint, telling clients the server is going down) once this many
    /// rounds of the run have closed; a later start resumes from the checkpoint.
    pub stop_after_rounds: Option<u64>,
    /// Receives each round's line as it closes (progress bars, live plots).
    pub round_observer: Option<mpsc::UnboundedSender<RoundLine>>,
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
    /// Connections refused over the connection limit.
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

enum Outbound {
    /// An encoded round task: encoded once, shared by every recipient.
    Task {
        round: u64,
        frame: Arc<Vec<u8>>,
    },
    Verdict(Verdict),
    Goodbye(GoodbyeReason),
}

enum ConnEvent {
    Joined {
        client: String,
        session: u64,
        n_samples: u64,
        capabilities: Capabilities,
        out: mpsc::UnboundedSender<Outbound>,
    },
    Left {
        client: String,
        session: u64,
    },
    Update {
        client: String,
        session: u64,
        update: ReceivedUpdate,
        wire_bytes: u64,
    },
    Unreadable {
        client: String,
        session: u64,
        round: u64,
        reason: RejectReason,
    },
    Refused {
        reason: String,
    },
    OverLimit,
    BytesOut(u64),
}

struct Shared {
    limits: Limits,
    registry: Registry,
    hello_timeout: Duration,
    run_id: u64,
    round: AtomicU64,
    sessions: AtomicU64,
    live: AtomicUsize,
}

/// A bound, not yet running, aggregator.
pub struct Server {
    endpoint: quinn::Endpoint,
    opts: ServerOptions,
}

impl Server {
    /// Binds the endpoint (so the address is known before [`Server::run`]).
    pub fn bind(opts: ServerOptions) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = protocol::quic::server_config(&opts.cert, &opts.key, &opts.quic)?;
        // The stateless-reset key and the connection-id key come from the server's private
        // key, not from chance: an aggregator restarted after a crash (same key) then
        // recognizes the old process's connection ids and answers them with a valid reset, so
        // clients reconnect at their next packet instead of at their idle timeout.
        let key =
            std::fs::read(&opts.key).with_context(|| format!("reading {}", opts.key.display()))?;
        let secret = ring::digest::digest(
            &ring::digest::SHA256,
            &[&b"wsa-fl stateless reset\0"[..], &key].concat(),
        );
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&secret.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let socket = std::net::UdpSocket::bind(opts.listen)
            .with_context(|| format!("binding {}", opts.listen))?;
        let runtime = quinn::default_runtime().context("no async runtime for the endpoint")?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
            .with_context(|| format!("starting the endpoint on {}", opts.listen))?;
        Ok(Self { endpoint, opts })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Runs `engine` until all rounds are done or `shutdown` turns true.
    pub async fn run(
        self,
        mut engine: Engine,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<RunSummary> {
        let shared = Arc::new(Shared {
            limits: self.opts.limits,
            registry: self.opts.registry.clone(),
            hello_timeout: self.opts.hello_timeout,
            run_id: engine.config().run_id,
            round: AtomicU64::new(engine.round()),
            sessions: AtomicU64::new(0),
            live: AtomicUsize::new(0),
        });
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let acceptor = tokio::spawn(accept_loop(
            self.endpoint.clone(),
            Arc::clone(&shared),
            events_tx.clone(),
            self.opts.max_connections,
        ));

        let clock = Instant::now();
        let now = |clock: Instant| Millis(clock.elapsed().as_millis() as u64);
        let mut log = match &self.opts.rounds_log {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )),
            None => None,
        };
        let mut sessions: HashMap<String, (u64, mpsc::UnboundedSender<Outbound>)> = HashMap::new();
        let mut stats = TransportStats::default();
        let mut round_started = Instant::now();
        let mut summary = RunSummary {
            rounds: Vec::new(),
            finished: false,
        };
        let mut stop_now = false;
        let mut task_frame: Option<(Arc<protocol::RoundTask>, Arc<Vec<u8>>)> = None;
        let mut pending = engine.handle(now(clock), Event::Tick);
        'run: loop {
            // Apply the engine's actions in order: a checkpoint is on disk before the next
            // round's tasks leave.
            for action in pending.drain(..) {
                match action {
                    Action::SendTask { client, task } => {
                        let frame = match &task_frame {
                            Some((t, f)) if Arc::ptr_eq(t, &task) => Arc::clone(f),
                            _ => {
                                let f =
                                    Arc::new(encode_frame(&Message::RoundTask((*task).clone()))?);
                                task_frame = Some((Arc::clone(&task), Arc::clone(&f)));
                                f
                            }
                        };
                        if let Some((_, out)) = sessions.get(&client) {
                            let _ = out.send(Outbound::Task {
                                round: task.round,
                                frame,
                            });
                        }
                    }
                    Action::SendVerdict { client, verdict } => {
                        if let Some((_, out)) = sessions.get(&client) {
                            let _ = out.send(Outbound::Verdict(verdict));
                        }
                    }
                    Action::Checkpoint(checkpoint) => {
                        if let Some(path) = &self.opts.checkpoint {
                            // Blocking on purpose: nothing may leave before it is durable.
                            checkpoint.save_atomic(path).with_context(|| {
                                format!("writing checkpoint {}", path.display())
                            })?;
                        }
                        if stop_now {
                            tracing::info!(
                                next_round = checkpoint.next_round,
                                "stopping after the configured rounds"
                            );
                            break 'run;
                        }
                    }
                    Action::RoundClosed(report) => {
                        stats.wall_ms = round_started.elapsed().as_millis() as u64;
                        stats.connected = sessions.len();
                        let line = RoundLine {
                            report: *report,
                            transport: std::mem::take(&mut stats),
                        };
                        tracing::info!(
                            round = line.report.round,
                            accepted = line.report.accepted.len(),
                            selected = line.report.selected.len(),
                            wall_ms = line.transport.wall_ms,
                            "round closed"
                        );
                        if let Some(log) = log.as_mut() {
                            use std::io::Write;
                            serde_json::to_writer(&mut *log, &line)?;
                            log.write_all(b"\n")?;
                            log.flush()?;
                        }
                        stop_now = line.report.closed_by != ClosedBy::Failed
                            && self
                                .opts
                                .stop_after_rounds
                                .is_some_and(|n| line.report.round + 1 >= n);
                        if let Some(observer) = &self.opts.round_observer {
                            let _ = observer.send(line.clone());
                        }
                        summary.rounds.push(line);
                        round_started = Instant::now();
                        shared.round.store(engine.round(), Ordering::Relaxed);
                    }
                    Action::Finished => {
                        summary.finished = true;
                        break 'run;
                    }
                }
            }
            let deadline = engine.next_deadline().map(|Millis(ms)| {
                tokio::time::Instant::from_std(clock + Duration::from_millis(ms))
            });
            tokio::select! {
                _ = shutdown.changed() => break 'run,
                _ = sleep_until(deadline) => {
                    pending = engine.handle(now(clock), Event::Tick);
                }
                event = events.recv() => {
                    let Some(event) = event else { break 'run };
                    pending = match event {
                        ConnEvent::Joined { client, session, n_samples, capabilities, out } => {
                            if let Some((_, old)) = sessions.insert(client.clone(), (session, out)) {
                                // A reconnect replaces the old session; dropping its sender
                                // makes its connection task close it.
                                drop(old);
                                let mut a = engine.handle(now(clock), Event::Disconnected { client: client.clone() });
                                a.extend(engine.handle(now(clock), Event::Connected { client, n_samples, capabilities }));
                                a
                            } else {
                                engine.handle(now(clock), Event::Connected { client, n_samples, capabilities })
                            }
                        }
                        ConnEvent::Left { client, session } => {
                            if sessions.get(&client).is_some_and(|(s, _)| *s == session) {
                                sessions.remove(&client);
                                engine.handle(now(clock), Event::Disconnected { client })
                            } else {
                                Vec::new()
                            }
                        }
                        ConnEvent::Update { client, session, update, wire_bytes } => {
                            if sessions.get(&client).is_some_and(|(s, _)| *s == session) {
                                stats.bytes_in += wire_bytes;
                                let t = Instant::now();
                                let a = engine.handle(now(clock), Event::Update { client, update: Box::new(update), wire_bytes });
                                stats.engine_update_us += t.elapsed().as_micros() as u64;
                                stats.engine_updates += 1;
                                a
                            } else {
                                Vec::new()
                            }
                        }
                        ConnEvent::Unreadable { client, session, round, reason } => {
                            if sessions.get(&client).is_some_and(|(s, _)| *s == session) {
                                engine.handle(now(clock), Event::Unreadable { client, round, reason, wire_bytes: 0 })
                            } else {
                                Vec::new()
                            }
                        }
                        ConnEvent::OverLimit => {
                            stats.refused_connections += 1;
                            Vec::new()
                        }
                        ConnEvent::Refused { reason } => {
                            stats.refused_hellos.push(reason);
                            Vec::new()
                        }
                        ConnEvent::BytesOut(n) => {
                            stats.bytes_out += n;
                            Vec::new()
                        }
                    };
                }
            }
        }
        let reason = if summary.finished {
            GoodbyeReason::RunFinished
        } else {
            GoodbyeReason::ShuttingDown
        };
        acceptor.abort();
        let mut saying_goodbye = 0usize;
        for (_, (_, out)) in sessions.drain() {
            saying_goodbye += usize::from(out.send(Outbound::Goodbye(reason)).is_ok());
        }
        // Let connection tasks flush their goodbyes, then close what is left.
        let drain = async {
            while saying_goodbye > 0 {
                match events.recv().await {
                    Some(ConnEvent::Left { .. }) => saying_goodbye -= 1,
                    Some(_) => {}
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(GOODBYE_GRACE + Duration::from_millis(500), drain).await;
        self.endpoint.close(0u32.into(), b"run over");
        // Release the UDP port before returning, so a restart can bind it again.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        Ok(summary)
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<ConnEvent>,
    max_connections: usize,
) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.live.load(Ordering::Relaxed) >= max_connections {
            incoming.refuse();
            let _ = events.send(ConnEvent::OverLimit);
            continue;
        }
        shared.live.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let events = events.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = connection(incoming, &shared, &events).await {
                tracing::debug!(%remote, error = %e, "connection ended");
            }
            shared.live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One client's connection, from handshake to close.
async fn connection(
    incoming: quinn::Incoming,
    shared: &Shared,
    events: &mpsc::UnboundedSender<ConnEvent>,
) -> Result<()> {
    let conn = tokio::time::timeout(shared.hello_timeout, incoming)
        .await
        .context("handshake timed out")??;
    let (mut control_send, mut control_recv) =
        tokio::time::timeout(shared.hello_timeout, conn.accept_bi())
            .await
            .context("no control stream")??;
    let hello = tokio::time::timeout(
        shared.hello_timeout,
        read_message(&mut control_recv, &shared.limits),
    )
    .await
    .context("no hello")?;
    let refuse = |reason: RejectReason| Verdict {
        run_id: shared.run_id,
        subject: Subject::Hello,
        outcome: Outcome::Rejected(reason),
    };
    let verdict = match hello {
        Ok(r) => match r.message {
            Message::Hello(h) if h.protocol_version != PROTOCOL_VERSION => {
                Err(refuse(RejectReason::UnsupportedVersion(h.protocol_version)))
            }
            Message::Hello(h) => match shared.registry.verify(&h.client_id, &h.auth) {
                Ok(()) => Ok(h),
                Err(reason) => Err(refuse(reason)),
            },
            other => Err(refuse(RejectReason::UnexpectedMessage(other.kind().into()))),
        },
        Err(StreamError::Protocol(e)) => Err(refuse(e.reject_reason())),
        Err(e) => return Err(e.into()),
    };
    let hello = match verdict {
        Ok(h) => h,
        Err(v) => {
            let Outcome::Rejected(reason) = &v.outcome else {
                unreachable!()
            };
            tracing::warn!(remote = %conn.remote_address(), %reason, "hello refused");
            let _ = events.send(ConnEvent::Refused {
                reason: reason.to_string(),
            });
            write_message(&mut control_send, &Message::Verdict(v)).await?;
            let _ = control_send.finish();
            // Give the verdict time to arrive before the close discards it.
            let _ = tokio::time::timeout(Duration::from_secs(1), control_send.stopped()).await;
            conn.close(1u32.into(), b"refused");
            return Ok(());
        }
    };
    let client = hello.client_id;
    let session = shared.sessions.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out) = mpsc::unbounded_channel();
    write_message(
        &mut control_send,
        &Message::Welcome(Welcome {
            run_id: shared.run_id,
            round: shared.round.load(Ordering::Relaxed),
        }),
    )
    .await?;
    let _ = events.send(ConnEvent::Joined {
        client: client.clone(),
        session,
        n_samples: hello.n_samples,
        capabilities: hello.capabilities,
        out: out_tx,
    });
    let result = serve_session(
        &conn,
        shared,
        events,
        &client,
        session,
        &mut out,
        &mut control_send,
        &mut control_recv,
    )
    .await;
    let _ = events.send(ConnEvent::Left {
        client: client.clone(),
        session,
    });
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve_session(
    conn: &quinn::Connection,
    shared: &Shared,
    events: &mpsc::UnboundedSender<ConnEvent>,
    client: &str,
    session: u64,
    out: &mut mpsc::UnboundedReceiver<Outbound>,
    control_send: &mut quinn::SendStream,
    control_recv: &mut quinn::RecvStream,
) -> Result<()> {
    // Round streams waiting for their verdict, by round.
    let mut open: HashMap<u64, quinn::SendStream> = HashMap::new();
    let mut reads = JoinSet::new();
    let control = read_message(control_recv, &shared.limits);
    tokio::pin!(control);
    loop {
        tokio::select! {
            outbound = out.recv() => match outbound {
                Some(Outbound::Task { round, frame }) => {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    send.write_all(&frame).await?;
                    let _ = events.send(ConnEvent::BytesOut(frame.len() as u64));
                    open.insert(round, send);
                    let limits = shared.limits;
                    reads.spawn(async move { (round, read_message(&mut recv, &limits).await) });
                }
                Some(Outbound::Verdict(verdict)) => {
                    if let Subject::Update { round } = verdict.subject
                        && let Some(mut send) = open.remove(&round)
                    {
                        let n = write_message(&mut send, &Message::Verdict(verdict)).await?;
                        let _ = events.send(ConnEvent::BytesOut(n));
                        let _ = send.finish();
                    }
                }
                Some(Outbound::Goodbye(reason)) => {
                    let _ = write_message(control_send, &Message::Goodbye(Goodbye { reason })).await;
                    let _ = control_send.finish();
                    // The client closes once it has *read* the goodbye. Closing here as soon
                    // as the bytes are acknowledged would race it: a client still busy (in a
                    // round's training, or just slow) loses unread stream data with the
                    // connection and takes the close for a lost session.
                    let _ = tokio::time::timeout(GOODBYE_GRACE, conn.closed()).await;
                    conn.close(0u32.into(), b"goodbye");
                    return Ok(());
                }
                // Replaced by a newer session of the same client.
                None => {
                    conn.close(0u32.into(), b"replaced");
                    return Ok(());
                }
            },
            Some(done) = reads.join_next(), if !reads.is_empty() => {
                let Ok((round, read)) = done else { continue };
                match read {
                    Ok(r) => match r.message {
                        // An update names its round, and the verdict goes back on the stream of
                        // the round it names: one that names another round than its stream's is
                        // answered here, on its own stream, or its verdict would be lost.
                        Message::Update(update) if update.round != round => {
                            let reason = if update.round < round {
                                RejectReason::StaleRound { got: update.round, current: round }
                            } else {
                                RejectReason::FutureRound { got: update.round, current: round }
                            };
                            reject_on_stream(&mut open, round, shared, events, client, session, reason).await;
                        }
                        Message::Update(update) => {
                            // The digest is O(payload): checked here, in parallel across
                            // connections, not on the engine's thread.
                            let _ = events.send(ConnEvent::Update {
                                client: client.to_owned(),
                                session,
                                update: ReceivedUpdate::new(update),
                                wire_bytes: r.wire_bytes,
                            });
                        }
                        other => {
                            reject_on_stream(&mut open, round, shared, events, client, session, RejectReason::UnexpectedMessage(other.kind().into())).await;
                        }
                    },
                    Err(StreamError::Protocol(e)) => {
                        reject_on_stream(&mut open, round, shared, events, client, session, e.reject_reason()).await;
                    }
                    // The client finished its side mid-frame: it is still there to hear why.
                    Err(StreamError::Read(quinn::ReadExactError::FinishedEarly(got))) => {
                        let reason = RejectReason::Malformed(format!(
                            "truncated frame: the stream ended {got} bytes into a read"
                        ));
                        reject_on_stream(&mut open, round, shared, events, client, session, reason).await;
                    }
                    // The stream was reset or the connection dropped: nothing to answer.
                    Err(_) => {
                        open.remove(&round);
                    }
                }
            }
            received = &mut control => {
                return match received {
                    Ok(r) if matches!(r.message, Message::Goodbye(_)) => Ok(()),
                    Ok(r) => anyhow::bail!("unexpected {} on the control stream", r.message.kind()),
                    Err(e) => Err(e.into()),
                };
            }
        }
    }
}

async fn reject_on_stream(
    open: &mut HashMap<u64, quinn::SendStream>,
    round: u64,
    shared: &Shared,
    events: &mpsc::UnboundedSender<ConnEvent>,
    client: &str,
    session: u64,
    reason: RejectReason,
) {
    let _ = events.send(ConnEvent::Unreadable {
        client: client.to_owned(),
        session,
        round,
        reason: reason.clone(),
    });
    if let Some(mut send) = open.remove(&round) {
        let verdict = Message::Verdict(Verdict {
            run_id: shared.run_id,
            subject: Subject::Update { round },
            outcome: Outcome::Rejected(reason),
        });
        if let Ok(n) = write_message(&mut send, &verdict).await {
            let _ = events.send(ConnEvent::BytesOut(n));
        }
        let _ = send.finish();
    }
}
