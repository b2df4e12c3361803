//! One task per connection: the handshake, the hello and its check against the registry, then
//! the session — round tasks out on streams the server opens, updates in on them, verdicts
//! back on the same streams, the goodbye on the control stream. Everything the engine must
//! hear goes to the run loop as a [`FromConnection`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aggregator_core::engine::{Event, ReceivedUpdate};
use anyhow::{Context, Result};
use protocol::quic::{StreamError, read_message, write_message};
use protocol::{
    Goodbye, GoodbyeReason, Limits, Message, Outcome, PROTOCOL_VERSION, RejectReason, Subject,
    Verdict, Welcome,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::auth::LiveRegistry;

/// How long a connection waits, after the goodbye, for its client to read it and close; a
/// client that does not is closed on.
pub(super) const GOODBYE_GRACE: Duration = Duration::from_secs(5);

/// Largest hello frame read from a peer not yet authenticated: a hello is a client id, a
/// token and a few numbers.
pub(super) const HELLO_MAX_BYTES: u32 = 4096;

/// What the run loop sends a session.
pub(super) enum Outbound {
    /// An encoded round task: encoded once, shared by every recipient; its answer is read for
    /// at most `answer_within`.
    Task {
        round: u64,
        frame: Arc<Vec<u8>>,
        answer_within: Duration,
    },
    /// A secure round's setup and task, on one new stream that carries the round's further
    /// steps both ways; each answer is read for at most `answer_within`.
    SecureTask {
        round: u64,
        setup: Vec<u8>,
        task: Arc<Vec<u8>>,
        answer_within: Duration,
    },
    /// A secure-aggregation step on the stream of `round`.
    Step {
        round: u64,
        frame: Vec<u8>,
    },
    Verdict(Verdict),
    /// The last message; a finished run's final model frame goes first.
    Goodbye {
        reason: GoodbyeReason,
        final_model: Option<Arc<Vec<u8>>>,
    },
}

/// What a connection tells the run loop.
pub(super) enum FromConnection {
    /// A client passed its hello as session `session`: where to send it things, and the
    /// engine's [`Event::Connected`].
    Joined {
        session: u64,
        out: mpsc::UnboundedSender<Outbound>,
        event: Event,
    },
    /// What the engine must hear from session `session` (the client left, sent an update, or
    /// answered with bytes that are no update); ignored once a newer session of the client
    /// replaced it.
    Session { session: u64, event: Event },
    /// A hello was refused, with why.
    Refused { reason: String },
    /// A connection was refused over the limit.
    OverLimit,
    /// Frame bytes sent.
    BytesOut(u64),
}

/// What every connection task reads.
pub(super) struct Shared {
    /// Limits on an authenticated session's frames (derived from the run's head).
    pub(super) limits: Limits,
    pub(super) registry: LiveRegistry,
    pub(super) hello_timeout: Duration,
    pub(super) run_id: u64,
    /// The run's class names, for every welcome.
    pub(super) classes: Vec<String>,
    /// The share of its rows each client holds out for federated evaluation, for every
    /// welcome.
    pub(super) eval_fraction: f64,
    /// The round the run is in and the failed attempts at it, as the welcome announces them
    /// (set together by the server loop, so no welcome pairs one round with another's attempt).
    pub(super) round: std::sync::Mutex<(u64, u32)>,
    pub(super) sessions: AtomicU64,
}

/// Who gets a connection, decided before the server keeps any state for it.
pub(super) struct Gate {
    pub(super) max_connections: usize,
    pub(super) max_unauthenticated: usize,
    pub(super) max_per_address: usize,
    pub(super) validate_addresses: bool,
    live: AtomicUsize,
    unauthenticated: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl Gate {
    pub(super) fn new(
        max_connections: usize,
        max_unauthenticated: usize,
        max_per_address: usize,
        validate_addresses: bool,
    ) -> Self {
        Self {
            max_connections,
            max_unauthenticated,
            max_per_address,
            validate_addresses,
            live: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a connection from `ip`, or `None` over any of the limits. The accept loop
    /// is the only caller, so the checks and the increments do not race.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut per_address = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = per_address.get(&ip).copied().unwrap_or(0);
        if self.live.load(Ordering::Relaxed) >= self.max_connections
            || self.unauthenticated.load(Ordering::Relaxed) >= self.max_unauthenticated
            || from_ip >= self.max_per_address
        {
            return None;
        }
        per_address.insert(ip, from_ip + 1);
        self.live.fetch_add(1, Ordering::Relaxed);
        self.unauthenticated.fetch_add(1, Ordering::Relaxed);
        Some(Admitted {
            gate: Arc::clone(self),
            ip,
            authenticated: false,
        })
    }
}

/// A connection's place at the gate, given back when it ends.
pub(super) struct Admitted {
    gate: Arc<Gate>,
    ip: IpAddr,
    authenticated: bool,
}

impl Admitted {
    /// The hello checked out: the connection leaves the unauthenticated budget.
    fn authenticate(&mut self) {
        if !std::mem::replace(&mut self.authenticated, true) {
            self.gate.unauthenticated.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.authenticated {
            self.gate.unauthenticated.fetch_sub(1, Ordering::Relaxed);
        }
        self.gate.live.fetch_sub(1, Ordering::Relaxed);
        let mut per_address = self
            .gate
            .per_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_address.remove(&self.ip);
            }
        }
    }
}

pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    events: mpsc::Sender<FromConnection>,
) {
    while let Some(incoming) = endpoint.accept().await {
        // A peer that has not shown it receives at its address gets a stateless retry: the
        // server keeps nothing for it, and a spoofed flood costs one packet each.
        if gate.validate_addresses && !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let Some(admitted) = gate.admit(incoming.remote_address().ip()) else {
            incoming.refuse();
            let _ = events.try_send(FromConnection::OverLimit);
            continue;
        };
        let shared = Arc::clone(&shared);
        let events = events.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = connection(incoming, admitted, &shared, &events).await {
                tracing::debug!(%remote, error = %e, "connection ended");
            }
        });
    }
}

/// One client's connection, from handshake to close.
async fn connection(
    incoming: quinn::Incoming,
    mut admitted: Admitted,
    shared: &Shared,
    events: &mpsc::Sender<FromConnection>,
) -> Result<()> {
    // One deadline for the handshake, the control stream and the hello together, and a
    // hello read under a few KiB: an unauthenticated peer holds little for little time.
    let hello_limits = Limits {
        max_message_bytes: HELLO_MAX_BYTES,
        ..shared.limits
    };
    let (conn, mut control_send, mut control_recv, hello) =
        tokio::time::timeout(shared.hello_timeout, async {
            let conn = incoming.await?;
            let (send, mut recv) = conn.accept_bi().await?;
            let hello = read_message(&mut recv, &hello_limits).await;
            Ok::<_, anyhow::Error>((conn, send, recv, hello))
        })
        .await
        .context("no hello in time")??;
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
            let _ = events
                .send(FromConnection::Refused {
                    reason: reason.to_string(),
                })
                .await;
            write_message(&mut control_send, &Message::Verdict(v)).await?;
            let _ = control_send.finish();
            // Give the verdict time to arrive before the close discards it.
            let _ = tokio::time::timeout(Duration::from_secs(1), control_send.stopped()).await;
            conn.close(1u32.into(), b"refused");
            return Ok(());
        }
    };
    admitted.authenticate();
    let client = hello.client_id;
    let session = shared.sessions.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out) = mpsc::unbounded_channel();
    let (round, attempt) = *shared.round.lock().unwrap_or_else(|e| e.into_inner());
    write_message(
        &mut control_send,
        &Message::Welcome(Welcome {
            run_id: shared.run_id,
            round,
            classes: shared.classes.clone(),
            eval_fraction: shared.eval_fraction,
            attempt,
        }),
    )
    .await?;
    let _ = events
        .send(FromConnection::Joined {
            session,
            out: out_tx,
            event: Event::Connected {
                client: client.clone(),
                n_samples: hello.n_samples,
                capabilities: hello.capabilities,
                held: hello.held,
            },
        })
        .await;
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
    let _ = events
        .send(FromConnection::Session {
            session,
            event: Event::Disconnected {
                client: client.clone(),
            },
        })
        .await;
    drop(admitted);
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve_session(
    conn: &quinn::Connection,
    shared: &Shared,
    events: &mpsc::Sender<FromConnection>,
    client: &str,
    session: u64,
    out: &mut mpsc::UnboundedReceiver<Outbound>,
    control_send: &mut quinn::SendStream,
    control_recv: &mut quinn::RecvStream,
) -> Result<()> {
    // Round streams waiting for their verdict, by round.
    let mut open: HashMap<u64, quinn::SendStream> = HashMap::new();
    let mut reads = JoinSet::new();
    // Secure rounds' streams, read one step after another: each read hands its stream back.
    let mut secure_reads = JoinSet::new();
    let control = read_message(control_recv, &shared.limits);
    tokio::pin!(control);
    loop {
        tokio::select! {
            outbound = out.recv() => match outbound {
                Some(Outbound::Task { round, frame, answer_within }) => {
                    // Revoked while connected: no more tasks, and no update it might send.
                    if !shared.registry.contains(client) {
                        tracing::warn!(client, "client revoked; closing its session");
                        conn.close(2u32.into(), b"revoked");
                        return Ok(());
                    }
                    let (mut send, mut recv) = conn.open_bi().await?;
                    send.write_all(&frame).await?;
                    let _ = events.send(FromConnection::BytesOut(frame.len() as u64)).await;
                    open.insert(round, send);
                    let limits = shared.limits;
                    // The answer is read until the round is over, not longer.
                    reads.spawn(async move {
                        let read = tokio::time::timeout(answer_within, read_message(&mut recv, &limits)).await;
                        (round, read)
                    });
                }
                Some(Outbound::SecureTask { round, setup, task, answer_within }) => {
                    if !shared.registry.contains(client) {
                        tracing::warn!(client, "client revoked; closing its session");
                        conn.close(2u32.into(), b"revoked");
                        return Ok(());
                    }
                    let (mut send, recv) = conn.open_bi().await?;
                    send.write_all(&setup).await?;
                    send.write_all(&task).await?;
                    let _ = events.send(FromConnection::BytesOut((setup.len() + task.len()) as u64)).await;
                    open.insert(round, send);
                    secure_reads.spawn(read_step(round, recv, shared.limits, answer_within));
                }
                Some(Outbound::Step { round, frame }) => {
                    if let Some(send) = open.get_mut(&round) {
                        send.write_all(&frame).await?;
                        let _ = events.send(FromConnection::BytesOut(frame.len() as u64)).await;
                    }
                }
                Some(Outbound::Verdict(verdict)) => {
                    if let Subject::Update { round } = verdict.subject
                        && let Some(mut send) = open.remove(&round)
                    {
                        let n = write_message(&mut send, &Message::Verdict(verdict)).await?;
                        let _ = events.send(FromConnection::BytesOut(n)).await;
                        let _ = send.finish();
                    }
                }
                Some(Outbound::Goodbye { reason, final_model }) => {
                    if let Some(frame) = final_model {
                        let _ = control_send.write_all(&frame).await;
                    }
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
                // The round is over without an answer: nothing to read or answer any more.
                let Ok(read) = read else {
                    open.remove(&round);
                    continue;
                };
                match read {
                    Ok(r) => match r.message {
                        Message::Update(_) if !shared.registry.contains(client) => {
                            tracing::warn!(client, "client revoked; dropping its update and session");
                            conn.close(2u32.into(), b"revoked");
                            return Ok(());
                        }
                        Message::Update(update) => {
                            // The digest is O(payload): checked here, in parallel across
                            // connections, not on the engine's thread. The engine judges the
                            // rest, the round included, and its verdict comes back for the
                            // stream of `round`.
                            let _ = events.send(FromConnection::Session {
                                session,
                                event: Event::Update {
                                    client: client.to_owned(),
                                    task_round: round,
                                    update: Box::new(ReceivedUpdate::new(update)),
                                    wire_bytes: r.wire_bytes,
                                },
                            }).await;
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
            Some(done) = secure_reads.join_next(), if !secure_reads.is_empty() => {
                let Ok((round, recv, answer_within, read)) = done else { continue };
                // A stream that ends or goes quiet before its verdict: the client left the
                // round, and the engine must not wait for it to the step's deadline.
                let left = |why: &str| Event::Unreadable {
                    client: client.to_owned(),
                    round,
                    reason: RejectReason::Malformed(format!("the secure round's stream {why}")),
                    wire_bytes: 0,
                };
                let Ok(read) = read else {
                    if open.remove(&round).is_some() {
                        let _ = events.send(FromConnection::Session { session, event: left("went quiet") }).await;
                    }
                    continue;
                };
                match read {
                    Ok(r) => match r.message {
                        Message::SecAgg(_) if !shared.registry.contains(client) => {
                            tracing::warn!(client, "client revoked; dropping its session");
                            conn.close(2u32.into(), b"revoked");
                            return Ok(());
                        }
                        Message::SecAgg(step) => {
                            let _ = events.send(FromConnection::Session {
                                session,
                                event: Event::SecAgg {
                                    client: client.to_owned(),
                                    round,
                                    step,
                                    wire_bytes: r.wire_bytes,
                                },
                            }).await;
                            secure_reads.spawn(read_step(round, recv, shared.limits, answer_within));
                        }
                        other => {
                            reject_on_stream(&mut open, round, shared, events, client, session, RejectReason::UnexpectedMessage(other.kind().into())).await;
                        }
                    },
                    Err(StreamError::Protocol(e)) => {
                        reject_on_stream(&mut open, round, shared, events, client, session, e.reject_reason()).await;
                    }
                    Err(_) => {
                        if open.remove(&round).is_some() {
                            let _ = events.send(FromConnection::Session { session, event: left("ended") }).await;
                        }
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

/// The next step a client sends on its secure round's stream, with the stream to read on.
async fn read_step(
    round: u64,
    mut recv: quinn::RecvStream,
    limits: Limits,
    answer_within: Duration,
) -> (
    u64,
    quinn::RecvStream,
    Duration,
    Result<Result<protocol::quic::Received, StreamError>, tokio::time::error::Elapsed>,
) {
    let read = tokio::time::timeout(answer_within, read_message(&mut recv, &limits)).await;
    (round, recv, answer_within, read)
}

async fn reject_on_stream(
    open: &mut HashMap<u64, quinn::SendStream>,
    round: u64,
    shared: &Shared,
    events: &mpsc::Sender<FromConnection>,
    client: &str,
    session: u64,
    reason: RejectReason,
) {
    let _ = events
        .send(FromConnection::Session {
            session,
            event: Event::Unreadable {
                client: client.to_owned(),
                round,
                reason: reason.clone(),
                wire_bytes: 0,
            },
        })
        .await;
    if let Some(mut send) = open.remove(&round) {
        let verdict = Message::Verdict(Verdict {
            run_id: shared.run_id,
            subject: Subject::Update { round },
            outcome: Outcome::Rejected(reason),
        });
        if let Ok(n) = write_message(&mut send, &verdict).await {
            let _ = events.send(FromConnection::BytesOut(n)).await;
        }
        let _ = send.finish();
    }
}
