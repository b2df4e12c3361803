//! The networked client: the QUIC glue around the [`Session`] state machine. It carries out the
//! session's actions — connect and say hello, accept a task's stream, train on a blocking
//! thread, send the update and read the verdict, say goodbye, close — and feeds back what
//! happened, with the time. Every decision (backoff, goodbyes, verdicts, the report) is the
//! session's.
//!
//! Each stream's I/O runs in a task of its own that reports through one channel, tagged with
//! the connection it belongs to, so the loop never holds a half-read frame when it turns to
//! another event, and what a closed connection's tasks still report is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::quic::{QuicLimits, read_message, write_message};
use protocol::{Goodbye, Limits, Message};
use support::Millis;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use wsa::LabelledFeatures;

use crate::labels::LocalData;

use crate::attack::Adversary;
use crate::round::{evaluate_held_out, local_round};
use crate::session::{Action, Event, Identity, Session};
pub use crate::session::{Backoff, ClientError, ClientReport, RoundRecord, RunEnd};

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
    /// Where the run's final model is kept when it arrives (`docs/model-format.md`); `None`:
    /// not kept.
    pub model_dir: Option<PathBuf>,
    /// Where the client's report (its rounds, verdicts, the final model's arrival) is kept,
    /// rewritten atomically after every round, so `edge-client status` can say where a
    /// running client stands.
    pub report_file: Option<PathBuf>,
    /// Check in for one task instead of staying for the run (`None`: stay).
    pub visit: Option<Visit>,
}

/// A visit: a client that checks in when it expects to be asked (a device woken for one
/// round, a simulator's worker acting as a sampled client), answers one task and leaves. It
/// also leaves, without a task, when the welcome shows the run elsewhere than it expected, or
/// when no task comes within its patience; [`ClientReport::last_welcome`] then says where the
/// run stood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visit {
    /// The (round, attempt) whose sample this client is in.
    pub expect: (u64, u32),
    /// Another (round, attempt) worth waiting through: the one the visitor saw last, still
    /// open when it checks in for the next.
    pub or_after: Option<(u64, u32)>,
    /// How long to wait for a task after the welcome (and, in the last round, for the end).
    pub patience: Duration,
    /// The run's last round: a rechecking visitor stays after its verdict for the final model
    /// and the goodbye, which tell it the run is over.
    pub last_round: bool,
    /// Leave after a second of waiting, so the visitor's owner can look again: a welcome is
    /// all a visitor learns of the run, and the run may fail a round and try it again, or open
    /// the next, while others wait. One visitor of a group doing so is enough.
    pub recheck: bool,
}

/// How long a rechecking visitor waits before it leaves to look again.
const RECHECK: Duration = Duration::from_secs(1);

impl Visit {
    /// Whether a welcome announcing `seen` is worth waiting on for a task.
    pub fn waits_at(&self, seen: (u64, u32)) -> bool {
        seen == self.expect || Some(seen) == self.or_after
    }
}

/// What the I/O tasks report: the session's events, and the QUIC handles the loop keeps.
enum Io {
    /// The connection is up, its control stream open and the hello sent.
    Connected(quinn::Connection, quinn::SendStream, quinn::RecvStream),
    /// A task's stream and its first message.
    TaskStream(quinn::SendStream, quinn::RecvStream, Message),
    /// The next message on secure round stream `n`, with the stream to read on.
    Step(u64, quinn::RecvStream, Message),
    /// Anything else.
    Event(Event),
}

/// One connection's handles and the tasks doing its I/O.
#[derive(Default)]
struct Link {
    conn: Option<quinn::Connection>,
    control: Option<quinn::SendStream>,
    task_stream: Option<(quinn::SendStream, quinn::RecvStream)>,
    /// A secure round's stream once it is read step by step: its halves, apart.
    step_send: Option<quinn::SendStream>,
    step_recv: Option<quinn::RecvStream>,
    /// Which task stream the step reads belong to: a read still pending on a stream the
    /// session has left must not land in the next round.
    step_stream: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Link {
    fn close(&mut self, code: u32, reason: &[u8]) {
        if let Some(conn) = self.conn.take() {
            conn.close(code.into(), reason);
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        *self = Link::default();
    }
}

/// Joins the aggregator and answers round tasks until the run finishes or `shutdown` turns
/// true (or its sender is dropped). Reconnects after transient failures with [`Backoff`].
/// `data` trains under the run's class numbering, matched by name at each welcome (plain
/// features count as classes named by index).
pub async fn run(
    opts: ConnectOptions,
    data: impl Into<LocalData>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<ClientReport, ClientError> {
    let local: LocalData = data.into();
    // The rows under the run's numbering, set at each welcome before any task is accepted:
    // those to train on, and those held out to evaluate each round's global head.
    let mut data: Arc<LabelledFeatures> = Arc::clone(local.features());
    let mut held_out: Option<Arc<LabelledFeatures>> = None;
    // What `data` is under: the local → run map, the class count and the held-out share.
    let mut numbering: Option<(Vec<u32>, usize, f64)> = None;
    let config = protocol::quic::client_config(&opts.ca_cert, &opts.quic)
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let bind: SocketAddr = if opts.server.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let setup = |e: std::io::Error| ClientError::Setup(e.to_string());
    let (socket, _) = protocol::quic::bind_udp(bind, opts.quic.udp_buffer).map_err(setup)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| ClientError::Setup("no async runtime for the endpoint".into()))?;
    let mut endpoint =
        quinn::Endpoint::new(Default::default(), None, socket, runtime).map_err(setup)?;
    endpoint.set_default_client_config(config);

    let clock = Instant::now();
    let now = || Millis(clock.elapsed().as_millis() as u64);
    let mut session = Session::new(
        Identity {
            client_id: opts.client_id.clone(),
            token: opts.token.clone(),
            n_samples: opts
                .adversary
                .as_ref()
                .and_then(Adversary::claim)
                .unwrap_or(local.len() as u64),
            classes: local.class_names().to_vec(),
        },
        opts.backoff,
    );
    let client_seed = session.client_seed();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Io)>();
    let mut link = Link::default();
    // Which connection the I/O tasks' reports must belong to.
    let mut epoch = 0u64;
    let mut watching = true;
    // A visit's wait for its task, from the welcome.
    let mut patience: Option<tokio::time::Instant> = None;
    let mut pending = if *shutdown.borrow() {
        watching = false;
        session.handle(now(), Event::Shutdown)
    } else {
        session.start(now())
    };
    let result = 'run: loop {
        for action in std::mem::take(&mut pending) {
            match action {
                Action::Connect(hello) => {
                    link.close(0, b"");
                    epoch += 1;
                    link.tasks
                        .push(spawn_connect(&endpoint, &opts, *hello, epoch, &tx));
                }
                // Every welcome of a run says the same: the rows are copied once, not at each
                // reconnect. The split is a function of the rows, the share and this client's
                // seed, so a reconnect never moves a held-out row into training.
                Action::UseClasses {
                    map,
                    classes,
                    eval_fraction,
                } if numbering.as_ref() != Some(&(map.clone(), classes, eval_fraction)) => {
                    let split = local.relabel(&map, classes).and_then(|relabelled| {
                        if eval_fraction == 0.0 {
                            return Ok((relabelled, None));
                        }
                        let (train, held) = relabelled.hold_out(eval_fraction, client_seed)?;
                        Ok((Arc::new(train), held.map(Arc::new)))
                    });
                    match split {
                        Ok((train, held)) => {
                            tracing::debug!(
                                client = %opts.client_id,
                                train = train.len(),
                                held_out = held.as_ref().map_or(0, |h| h.len()),
                                "data split for the run"
                            );
                            (data, held_out) = (train, held);
                            numbering = Some((map, classes, eval_fraction));
                        }
                        Err(e) => {
                            break 'run Err(ClientError::Setup(format!(
                                "preparing the data for the run: {e}"
                            )));
                        }
                    }
                }
                Action::UseClasses { .. } => {}
                Action::AcceptTask => {
                    // A secure round's stream is done with (or left): dropping it finishes this
                    // side, so the aggregator stops waiting for this client.
                    (link.step_send, link.step_recv) = (None, None);
                    if let Some(conn) = link.conn.clone() {
                        link.tasks.push(spawn_accept(conn, opts.limits, epoch, &tx));
                    }
                }
                Action::Train(task) => {
                    let (data, held_out, tx) = (Arc::clone(&data), held_out.clone(), tx.clone());
                    let adversary = opts.adversary.clone();
                    let training = tokio::task::spawn_blocking(move || {
                        let held_out = held_out
                            .map(|rows| evaluate_held_out(&task, &rows))
                            .transpose()?;
                        let mut update = local_round(&task, &data, client_seed)?;
                        update.held_out = held_out;
                        if let Some(a) = &adversary {
                            a.corrupt(&task, &mut update)?;
                        }
                        Ok::<_, wsa::Error>(update)
                    });
                    // The blocking thread cannot be stopped; its result is dropped if the
                    // connection has moved on.
                    tokio::spawn(async move {
                        let result = match training.await {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(e) => Err(format!("training thread: {e}")),
                        };
                        let _ = tx.send((epoch, Io::Event(Event::Trained(result))));
                    });
                }
                Action::SendUpdate(update) => {
                    if let Some((send, recv)) = link.task_stream.take() {
                        link.tasks
                            .push(spawn_answer(send, recv, *update, opts.limits, epoch, &tx));
                    }
                }
                Action::SendStep(message) => {
                    if let Some((send, recv)) = link.task_stream.take() {
                        (link.step_send, link.step_recv) = (Some(send), Some(recv));
                    }
                    if let Some(send) = link.step_send.as_mut()
                        && let Err(e) = write_message(send, &message).await
                    {
                        let failed = Event::TaskFailed(format!("sending a secure step: {e}"));
                        let _ = tx.send((epoch, Io::Event(failed)));
                    }
                }
                Action::ReadStep => {
                    if let Some((send, recv)) = link.task_stream.take() {
                        (link.step_send, link.step_recv) = (Some(send), Some(recv));
                    }
                    if let Some(recv) = link.step_recv.take() {
                        let stream = link.step_stream;
                        link.tasks
                            .push(spawn_read_step(recv, stream, opts.limits, epoch, &tx));
                    }
                }
                Action::SendGoodbye(reason) => {
                    if let Some(control) = link.control.as_mut() {
                        let _ = write_message(control, &Message::Goodbye(Goodbye { reason })).await;
                        let _ = control.finish();
                    }
                }
                Action::SaveModel(model) => save_final_model(&model, opts.model_dir.as_deref()),
                Action::Close { code, reason } => {
                    link.close(code, reason);
                    epoch += 1;
                }
                Action::Finish(result) => break 'run result,
            }
        }
        let deadline = session
            .next_deadline()
            .map(|Millis(ms)| tokio::time::Instant::from_std(clock + Duration::from_millis(ms)));
        tokio::select! {
            _ = shutdown.changed(), if watching => {
                // A dropped sender counts as a request too (and would wake this every time).
                watching = false;
                pending = session.handle(now(), Event::Shutdown);
            }
            _ = sleep_until(deadline) => {
                pending = session.handle(now(), Event::Tick);
            }
            Some((from, io)) = rx.recv() => {
                if from != epoch {
                    continue;
                }
                let event = match io {
                    Io::Connected(conn, send, recv) => {
                        link.tasks.push(spawn_control_reader(recv, opts.limits, epoch, &tx));
                        link.conn = Some(conn);
                        link.control = Some(send);
                        Event::Connected
                    }
                    Io::TaskStream(send, recv, message) => {
                        link.task_stream = Some((send, recv));
                        (link.step_send, link.step_recv) = (None, None);
                        link.step_stream += 1;
                        Event::Task(message)
                    }
                    Io::Step(stream, _, _) if stream != link.step_stream => continue,
                    Io::Step(_, recv, message) => {
                        link.step_recv = Some(recv);
                        Event::Step(message)
                    }
                    Io::Event(event) => event,
                };
                if let Event::Task(Message::RoundTask(task)) = &event
                    && let Some(visit) = &opts.visit
                {
                    // Training and the verdict fit in the round's own deadline; a visitor
                    // never waits longer than that and its patience.
                    let bound = Duration::from_millis(task.deadline_ms) + visit.patience;
                    patience = Some(tokio::time::Instant::now() + bound);
                }
                let verdict = matches!(event, Event::Verdict(_));
                let welcome = matches!(event, Event::Control(Message::Welcome(_)));
                pending = session.handle(now(), event);
                if verdict {
                    keep_report(&session.report(), opts.report_file.as_deref());
                }
                if let Some(visit) = &opts.visit {
                    let seen = session.last_welcome();
                    if (verdict && !(visit.last_round && visit.recheck))
                        || (welcome && !seen.is_some_and(|s| visit.waits_at(s)))
                    {
                        pending.extend(session.handle(now(), Event::Shutdown));
                    } else if welcome || verdict {
                        let wait = if visit.recheck {
                            visit.patience.min(RECHECK)
                        } else {
                            visit.patience
                        };
                        patience = Some(tokio::time::Instant::now() + wait);
                    }
                }
            }
            _ = sleep_until(patience), if patience.is_some() => {
                patience = None;
                pending = session.handle(now(), Event::Shutdown);
            }
        }
    };
    link.close(0, b"");
    endpoint.wait_idle().await;
    let report = session.report();
    match result {
        Ok(end) => {
            let report = ClientReport { end, ..report };
            keep_report(&report, opts.report_file.as_deref());
            Ok(report)
        }
        Err(e) => {
            // Kept too, so that `status` does not call a client that gave up running.
            let failed = ClientReport {
                end: RunEnd::Failed,
                error: Some(e.to_string()),
                ..report
            };
            keep_report(&failed, opts.report_file.as_deref());
            Err(e)
        }
    }
}

/// Writes `report` to `file`; a failure is logged: the run goes on without it.
pub fn keep_report(report: &ClientReport, file: Option<&std::path::Path>) {
    let Some(file) = file else { return };
    let written = serde_json::to_vec_pretty(report)
        .map_err(std::io::Error::other)
        .and_then(|json| support::fs::write_atomic(file, &json));
    if let Err(e) = written {
        tracing::warn!(file = %file.display(), error = %e, "cannot keep the client's report");
    }
}

/// Writes the final model to `dir`; a failure is logged, since the run itself is over and
/// done either way.
fn save_final_model(model: &protocol::FinalModel, dir: Option<&std::path::Path>) {
    let Some(dir) = dir else { return };
    match model.to_saved() {
        Ok(saved) => match saved.save(dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), rounds = model.rounds, "final model kept")
            }
            Err(e) => tracing::error!(error = %e, "cannot keep the final model"),
        },
        Err(e) => tracing::error!(error = %e, "the final model does not decode"),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Connects, opens the control stream and sends the hello.
fn spawn_connect(
    endpoint: &quinn::Endpoint,
    opts: &ConnectOptions,
    hello: Message,
    epoch: u64,
    tx: &mpsc::UnboundedSender<(u64, Io)>,
) -> JoinHandle<()> {
    let connecting = endpoint
        .connect(opts.server, &opts.server_name)
        .map_err(|e| format!("connect: {e}"));
    let tx = tx.clone();
    tokio::spawn(async move {
        let connected = async {
            let conn = connecting
                .map_err(Event::ConnectFailed)?
                .await
                .map_err(|e| {
                    if is_handshake_refusal(&e) {
                        Event::HandshakeRefused(e.to_string())
                    } else {
                        Event::ConnectFailed(format!("connection: {e}"))
                    }
                })?;
            let (mut send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| Event::ConnectFailed(format!("connection: {e}")))?;
            write_message(&mut send, &hello)
                .await
                .map_err(|e| Event::ConnectFailed(e.to_string()))?;
            Ok::<_, Event>(Io::Connected(conn, send, recv))
        };
        let io = connected.await.unwrap_or_else(Io::Event);
        let _ = tx.send((epoch, io));
    })
}

/// Whether `e` is this side's TLS refusing the aggregator's certificate (a name the
/// certificate does not hold, another CA): settings to fix, not a network to wait out. QUIC
/// carries TLS alerts as the crypto error codes 0x100..=0x1ff. An expired or not yet valid
/// certificate (alert 45) is retried: a board that boots before its clock is set sees every
/// certificate so, and a renewed server certificate ends it.
fn is_handshake_refusal(e: &quinn::ConnectionError) -> bool {
    const CERTIFICATE_EXPIRED: u64 = 0x100 + 45;
    matches!(e, quinn::ConnectionError::TransportError(t)
        if (0x100..=0x1ff).contains(&u64::from(t.code))
            && u64::from(t.code) != CERTIFICATE_EXPIRED)
}

/// Reads the control stream until it ends or says goodbye (nothing follows a goodbye).
fn spawn_control_reader(
    mut recv: quinn::RecvStream,
    limits: Limits,
    epoch: u64,
    tx: &mpsc::UnboundedSender<(u64, Io)>,
) -> JoinHandle<()> {
    let tx = tx.clone();
    tokio::spawn(async move {
        loop {
            let event = match read_message(&mut recv, &limits).await {
                Ok(r) => Event::Control(r.message),
                Err(e) => Event::ControlFailed(e.to_string()),
            };
            let last = !matches!(
                event,
                Event::Control(Message::Welcome(_) | Message::FinalModel(_))
            );
            let _ = tx.send((epoch, Io::Event(event)));
            if last {
                break;
            }
        }
    })
}

/// Accepts the next stream the server opens and reads its first message.
fn spawn_accept(
    conn: quinn::Connection,
    limits: Limits,
    epoch: u64,
    tx: &mpsc::UnboundedSender<(u64, Io)>,
) -> JoinHandle<()> {
    let tx = tx.clone();
    tokio::spawn(async move {
        let io = match conn.accept_bi().await {
            Ok((send, mut recv)) => match read_message(&mut recv, &limits).await {
                Ok(r) => Io::TaskStream(send, recv, r.message),
                Err(e) => Io::Event(Event::TaskFailed(e.to_string())),
            },
            Err(e) => Io::Event(Event::ControlFailed(format!("connection: {e}"))),
        };
        let _ = tx.send((epoch, io));
    })
}

/// Reads the next message on a secure round's stream.
fn spawn_read_step(
    mut recv: quinn::RecvStream,
    stream: u64,
    limits: Limits,
    epoch: u64,
    tx: &mpsc::UnboundedSender<(u64, Io)>,
) -> JoinHandle<()> {
    let tx = tx.clone();
    tokio::spawn(async move {
        let io = match read_message(&mut recv, &limits).await {
            Ok(r) => Io::Step(stream, recv, r.message),
            Err(e) => Io::Event(Event::TaskFailed(e.to_string())),
        };
        let _ = tx.send((epoch, io));
    })
}

/// Sends the update on the task's stream, finishes it and reads the verdict.
fn spawn_answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    update: Message,
    limits: Limits,
    epoch: u64,
    tx: &mpsc::UnboundedSender<(u64, Io)>,
) -> JoinHandle<()> {
    let tx = tx.clone();
    tokio::spawn(async move {
        let event = match write_message(&mut send, &update).await {
            Ok(bytes) => {
                let _ = send.finish();
                let _ = tx.send((epoch, Io::Event(Event::UpdateSent(bytes))));
                match read_message(&mut recv, &limits).await {
                    Ok(r) => Event::Verdict(r.message),
                    Err(e) => Event::TaskFailed(e.to_string()),
                }
            }
            Err(e) => Event::TaskFailed(e.to_string()),
        };
        let _ = tx.send((epoch, Io::Event(event)));
    })
}
