//! One task per connection: the handshake, the hello and its check against the registry, then
//! the session — round tasks out on streams the server opens, updates in on them, verdicts
//! back on the same streams, the goodbye on the control stream. Everything the engine must
//! hear goes to the run loop as a [`FromConnection`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

use crate::auth::Registry;

/// How long a connection waits, after the goodbye, for its client to read it and close; a
/// client that does not is closed on.
pub(super) const GOODBYE_GRACE: Duration = Duration::from_secs(5);

/// What the run loop sends a session.
pub(super) enum Outbound {
    /// An encoded round task: encoded once, shared by every recipient.
    Task {
        round: u64,
        frame: Arc<Vec<u8>>,
    },
    Verdict(Verdict),
    Goodbye(GoodbyeReason),
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
    pub(super) limits: Limits,
    pub(super) registry: Registry,
    pub(super) hello_timeout: Duration,
    pub(super) run_id: u64,
    /// The round a `Welcome` announces.
    pub(super) round: AtomicU64,
    pub(super) sessions: AtomicU64,
    pub(super) live: AtomicUsize,
}

pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<FromConnection>,
    max_connections: usize,
) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.live.load(Ordering::Relaxed) >= max_connections {
            incoming.refuse();
            let _ = events.send(FromConnection::OverLimit);
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
    events: &mpsc::UnboundedSender<FromConnection>,
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
            let _ = events.send(FromConnection::Refused {
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
    let _ = events.send(FromConnection::Joined {
        session,
        out: out_tx,
        event: Event::Connected {
            client: client.clone(),
            n_samples: hello.n_samples,
            capabilities: hello.capabilities,
        },
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
    let _ = events.send(FromConnection::Session {
        session,
        event: Event::Disconnected {
            client: client.clone(),
        },
    });
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve_session(
    conn: &quinn::Connection,
    shared: &Shared,
    events: &mpsc::UnboundedSender<FromConnection>,
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
                    let _ = events.send(FromConnection::BytesOut(frame.len() as u64));
                    open.insert(round, send);
                    let limits = shared.limits;
                    reads.spawn(async move { (round, read_message(&mut recv, &limits).await) });
                }
                Some(Outbound::Verdict(verdict)) => {
                    if let Subject::Update { round } = verdict.subject
                        && let Some(mut send) = open.remove(&round)
                    {
                        let n = write_message(&mut send, &Message::Verdict(verdict)).await?;
                        let _ = events.send(FromConnection::BytesOut(n));
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
    events: &mpsc::UnboundedSender<FromConnection>,
    client: &str,
    session: u64,
    reason: RejectReason,
) {
    let _ = events.send(FromConnection::Session {
        session,
        event: Event::Unreadable {
            client: client.to_owned(),
            round,
            reason: reason.clone(),
            wire_bytes: 0,
        },
    });
    if let Some(mut send) = open.remove(&round) {
        let verdict = Message::Verdict(Verdict {
            run_id: shared.run_id,
            subject: Subject::Update { round },
            outcome: Outcome::Rejected(reason),
        });
        if let Ok(n) = write_message(&mut send, &verdict).await {
            let _ = events.send(FromConnection::BytesOut(n));
        }
        let _ = send.finish();
    }
}
