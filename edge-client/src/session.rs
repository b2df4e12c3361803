//! The client's session with the aggregator as a state machine: events in, actions out, the
//! caller's clock; no sockets, no threads. The QUIC glue ([`crate::net`]) connects, moves
//! frames and runs the training the machine asks for; every decision is here: when to
//! (re)connect and how long to back off, what a welcome, a refusal or a goodbye means, how a
//! task is checked and its update packaged, what a verdict says, and what the run's report
//! records. Tests drive it with a fake clock (`edge-client/tests/session.rs`).
//!
//! The sequence of one session: [`Action::Connect`] (the glue opens the connection and the
//! control stream and sends the hello) → the welcome on the control stream →
//! [`Action::AcceptTask`] → a [`protocol::RoundTask`] on a stream the server opened →
//! [`Action::Train`] → [`Event::Trained`] → [`Action::SendUpdate`] on the task's stream → its
//! verdict → the next [`Action::AcceptTask`], until a goodbye ends the run. A lost connection
//! or a protocol error ends the session, and the machine reconnects after an exponential
//! backoff with jitter; a refused hello ends the run.

use std::time::Duration;

use protocol::{
    Auth, Capabilities, EncodedParams, Encoding, Goodbye, GoodbyeReason, HeadRef, HeldOutEval,
    Hello, Message, Outcome, PROTOCOL_VERSION, RejectReason, RoundTask, RowLayout, SecAgg,
    SecAggInbox, SecAggSetup, Subject, Update, UpdateMetrics, WireScope,
};
use secagg::ClientRound;
use secagg::ring::FixedPoint;
use serde::Serialize;
use support::Millis;
use wsa::Head;

use crate::labels::{ClassError, class_map};
use crate::round::{ClientUpdate, TrainingTask};

/// How long a round in progress may still finish once the run's goodbye has arrived (its
/// verdict is usually already in flight); well under the server's wait for the close.
pub const VERDICT_GRACE: Duration = Duration::from_secs(2);

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
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
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
    /// The task's global head on the rows held out of training, when the run holds any out.
    #[serde(default)]
    pub held_out: Option<HeldOutEval>,
}

impl RoundRecord {
    /// The record of a round left before its training finished.
    fn untrained(round: u64) -> Self {
        Self {
            round,
            outcome: String::new(),
            train_ms: 0,
            loss: 0.0,
            update_bytes: 0,
            n_samples: 0,
            scopes: Vec::new(),
            held_out: None,
        }
    }
}

/// How a client's run ended (or that it goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum RunEnd {
    /// Still in the run: a report written as it goes.
    Running,
    /// Gave up with an error (the report's `error`).
    Failed,
    /// The aggregator finished the run.
    RunFinished,
    /// Shut down on request.
    Shutdown,
}

/// What a client did over its run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ClientReport {
    /// One record per task answered.
    pub rounds: Vec<RoundRecord>,
    /// Connections made (1 without reconnects).
    pub connections: u32,
    /// The rounds of the final model received, if one was.
    pub final_model_rounds: Option<u64>,
    /// Why it stopped, or [`RunEnd::Running`].
    pub end: RunEnd,
    /// What made it give up, when it did ([`RunEnd::Failed`]).
    #[serde(default)]
    pub error: Option<String>,
    /// The round and attempt the last welcome announced.
    #[serde(default)]
    pub last_welcome: Option<(u64, u32)>,
}

impl ClientReport {
    /// One line: how the run stands, the rounds answered and accepted, the connections.
    pub fn summary(&self) -> String {
        let accepted = self
            .rounds
            .iter()
            .filter(|r| r.outcome == "accepted")
            .count();
        format!(
            "{:?}, {} rounds answered ({accepted} accepted), {} connections",
            self.end,
            self.rounds.len(),
            self.connections
        )
    }
}

/// Why a client gave up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    /// The local data does not fit the run's classes; retrying would not help.
    #[error("{0}")]
    Classes(ClassError),
    /// The aggregator's certificate was refused; retrying would not help.
    #[error(
        "{0}; check --server-name against the names in the aggregator's certificate and \
         --ca-cert against the deployment's CA (creds/ca.pem)"
    )]
    Handshake(String),
}

/// Who the client is, and what its hello says.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its id, as in its credentials.
    pub client_id: String,
    /// Its secret token.
    pub token: Vec<u8>,
    /// Rows of local training data it holds.
    pub n_samples: u64,
    /// The names of its data's classes, by local label.
    pub classes: Vec<String>,
}

/// Something that happened, fed to [`Session::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The connection and its control stream are up and the hello was sent.
    Connected,
    /// Connecting, opening the control stream or sending the hello failed.
    ConnectFailed(String),
    /// The TLS handshake refused the aggregator's certificate: retrying would not help.
    HandshakeRefused(String),
    /// A message arrived on the control stream.
    Control(Message),
    /// The control stream or the connection failed.
    ControlFailed(String),
    /// The first message arrived on a stream the server opened (a round task, or a secure
    /// round's setup).
    Task(Message),
    /// The next message arrived on a secure round's stream ([`Action::ReadStep`]).
    Step(Message),
    /// The training asked for by [`Action::Train`] finished.
    Trained(Result<ClientUpdate, String>),
    /// The update went out: its frame's bytes.
    UpdateSent(u64),
    /// The answer arrived on the task's stream.
    Verdict(Message),
    /// The task's stream failed (reading the task, writing the update, reading the verdict).
    TaskFailed(String),
    /// Stop: say goodbye and end the run.
    Shutdown,
    /// Time passed; sent at [`Session::next_deadline`] (more often is harmless).
    Tick,
}

/// Something the runtime must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Connect, open the control stream and send this hello on it.
    Connect(Box<Message>),
    /// From now on train on the local rows relabelled by `map` (local label → the run's
    /// class index) into the run's `classes` classes, less `eval_fraction` of them held out
    /// to measure each task's global head on ([`crate::evaluate_held_out`]).
    UseClasses {
        /// The run's index of each local class.
        map: Vec<u32>,
        /// The run's class count.
        classes: usize,
        /// The share of the rows to hold out of training, in `[0, 1)`.
        eval_fraction: f64,
    },
    /// Accept the next stream the server opens and read its first message.
    AcceptTask,
    /// Train this task (off the I/O thread), then feed [`Event::Trained`].
    Train(Box<TrainingTask>),
    /// Send this update on the task's stream and finish the stream, then read the verdict.
    SendUpdate(Box<Message>),
    /// Send this secure-aggregation step on the task's stream (which stays open).
    SendStep(Box<Message>),
    /// Read the next message on the task's stream, then feed [`Event::Step`].
    ReadStep,
    /// Send this goodbye on the control stream and finish it.
    SendGoodbye(GoodbyeReason),
    /// Keep the run's final model (it arrives just before the goodbye of a finished run).
    SaveModel(Box<protocol::FinalModel>),
    /// Close the connection with this code and reason.
    Close {
        /// The application close code.
        code: u32,
        /// The reason, for the peer's logs.
        reason: &'static [u8],
    },
    /// The run is over: report and result.
    Finish(Result<RunEnd, ClientError>),
}

/// The task in progress.
#[derive(Debug)]
enum TaskState {
    /// Waiting for the server to open a task's stream.
    Waiting,
    /// Training on `task` since `started`.
    Training {
        task: Box<RoundTask>,
        started: Millis,
    },
    /// The update went out; its record waits for the verdict's outcome.
    AwaitingVerdict { record: RoundRecord },
    /// A secure round, from its setup to its verdict.
    Secure(Box<SecureTask>),
}

/// A secure round in progress: the protocol's state, the task once it arrives, and the
/// masked input's two halves (the inbox of shares, the trained input), which may come in
/// either order.
#[derive(Debug)]
struct SecureTask {
    protocol: ClientRound,
    setup: SecAggSetup,
    task: Option<Box<RoundTask>>,
    started: Millis,
    inbox: Option<SecAggInbox>,
    input: Option<Vec<u32>>,
    masked: bool,
    record: Option<RoundRecord>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting out a backoff delay before the next connection attempt.
    Backoff { until: Millis },
    /// A connection was asked for.
    Connecting,
    /// Connected, the hello sent, waiting for the welcome.
    Hello,
    /// In the run of `classes` classes; `goodbye` is a control message that arrived mid-task,
    /// acted on when the task's verdict arrives or at the deadline.
    Joined {
        classes: usize,
        task: TaskState,
        goodbye: Option<Box<(Message, Millis)>>,
    },
    /// The run is over.
    Done,
}

/// The client's session state machine. See the module docs.
#[derive(Debug)]
pub struct Session {
    identity: Identity,
    backoff: Backoff,
    jitter: u64,
    /// Failed attempts in a row.
    failures: u32,
    /// Whether the current connection got its welcome (it then counts, and resets the
    /// failures).
    welcomed: bool,
    /// Where the run stood at the last welcome: its round and the failed attempts at it.
    last_welcome: Option<(u64, u32)>,
    /// Heads lossy tasks gave it, which later tasks may be changes from.
    held: HeldHeads,
    phase: Phase,
    rounds: Vec<RoundRecord>,
    connections: u32,
    final_model_rounds: Option<u64>,
    end: Option<RunEnd>,
}

impl Session {
    /// A session for `identity` that reconnects by `backoff`; [`Session::start`] begins it.
    pub fn new(identity: Identity, backoff: Backoff) -> Self {
        let jitter = seed_of(&identity.client_id) | 1;
        Self {
            identity,
            backoff,
            jitter,
            failures: 0,
            welcomed: false,
            last_welcome: None,
            held: HeldHeads::default(),
            phase: Phase::Connecting,
            rounds: Vec::new(),
            connections: 0,
            final_model_rounds: None,
            end: None,
        }
    }

    /// The first actions: connect.
    pub fn start(&mut self, _now: Millis) -> Vec<Action> {
        self.connect()
    }

    /// A stable per-client seed (FNV-1a of the id): decorrelates client shuffles and jitter.
    pub fn client_seed(&self) -> u64 {
        seed_of(&self.identity.client_id)
    }

    /// When the runtime must send the next [`Event::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        match &self.phase {
            Phase::Backoff { until } => Some(*until),
            Phase::Joined {
                goodbye: Some(g), ..
            } => Some(g.1),
            _ => None,
        }
    }

    /// Whether the run is over.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// What the client did so far; `end` is set once the run is over.
    pub fn report(&self) -> ClientReport {
        ClientReport {
            rounds: self.rounds.clone(),
            // The connection in progress counts once it was welcomed.
            connections: self.connections + u32::from(self.welcomed),
            final_model_rounds: self.final_model_rounds,
            end: self.end.unwrap_or(RunEnd::Running),
            error: None,
            last_welcome: self.last_welcome,
        }
    }

    /// The round and attempt the last welcome announced.
    pub fn last_welcome(&self) -> Option<(u64, u32)> {
        self.last_welcome
    }

    /// Processes one event at time `now` and returns what to do, in order.
    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Action> {
        if self.is_done() {
            return Vec::new();
        }
        match event {
            Event::Connected => self.on_connected(),
            Event::HandshakeRefused(e) => self.finish(Vec::new(), Err(ClientError::Handshake(e))),
            Event::ConnectFailed(e) | Event::ControlFailed(e) | Event::TaskFailed(e)
                if !self.mid_task_goodbye() =>
            {
                self.fail(now, e)
            }
            // A goodbye waits for the task's verdict: the control stream has said its last
            // word (the server finishes it after the goodbye), and a task stream that fails
            // will bring no verdict, so the goodbye is due.
            Event::TaskFailed(_) => self.on_goodbye_due(now),
            Event::ConnectFailed(_) | Event::ControlFailed(_) => Vec::new(),
            Event::Control(message) => self.on_control(now, message),
            Event::Task(message) => self.on_task(now, message),
            Event::Step(message) => self.on_step(now, message),
            Event::Trained(result) => self.on_trained(now, result),
            Event::UpdateSent(bytes) => {
                if let Phase::Joined {
                    task: TaskState::AwaitingVerdict { record },
                    ..
                } = &mut self.phase
                {
                    record.update_bytes = bytes;
                }
                Vec::new()
            }
            Event::Verdict(message) => self.on_verdict(now, message),
            Event::Shutdown => self.on_shutdown(),
            Event::Tick => self.on_tick(now),
        }
    }

    fn mid_task_goodbye(&self) -> bool {
        matches!(
            self.phase,
            Phase::Joined {
                goodbye: Some(_),
                ..
            }
        )
    }

    fn connect(&mut self) -> Vec<Action> {
        self.phase = Phase::Connecting;
        self.welcomed = false;
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_id: self.identity.client_id.clone(),
            auth: Auth::Token(self.identity.token.clone()),
            capabilities: Capabilities {
                f16: true,
                int8: true,
            },
            n_samples: self.identity.n_samples,
            held: self.held.newest(),
        });
        vec![Action::Connect(Box::new(hello))]
    }

    fn on_connected(&mut self) -> Vec<Action> {
        if matches!(self.phase, Phase::Connecting) {
            self.phase = Phase::Hello;
        }
        Vec::new()
    }

    fn on_control(&mut self, now: Millis, message: Message) -> Vec<Action> {
        match &mut self.phase {
            Phase::Hello => match message {
                Message::Welcome(w) => {
                    self.welcomed = true;
                    self.last_welcome = Some((w.round, w.attempt));
                    if !(0.0..1.0).contains(&w.eval_fraction) {
                        let error = format!(
                            "protocol: the welcome asks to hold out {} of the data",
                            w.eval_fraction
                        );
                        return self.fail(now, error);
                    }
                    let map = match class_map(&self.identity.classes, &w.classes) {
                        Ok(map) => map,
                        Err(e) => {
                            return self.finish(
                                vec![Action::Close {
                                    code: 0,
                                    reason: b"unknown class",
                                }],
                                Err(ClientError::Classes(e)),
                            );
                        }
                    };
                    tracing::info!(client = %self.identity.client_id, run = w.run_id, round = w.round, classes = w.classes.len(), "joined");
                    self.phase = Phase::Joined {
                        classes: w.classes.len(),
                        task: TaskState::Waiting,
                        goodbye: None,
                    };
                    vec![
                        Action::UseClasses {
                            map,
                            classes: w.classes.len(),
                            eval_fraction: w.eval_fraction,
                        },
                        Action::AcceptTask,
                    ]
                }
                Message::Verdict(v) => match v.outcome {
                    Outcome::Rejected(reason) => self.finish(
                        vec![Action::Close {
                            code: 0,
                            reason: b"refused",
                        }],
                        Err(ClientError::Refused(reason)),
                    ),
                    Outcome::Accepted => self.fail(now, "protocol: verdict instead of welcome"),
                },
                other => self.fail(
                    now,
                    format!("protocol: expected welcome, got {}", other.kind()),
                ),
            },
            Phase::Joined { .. } if matches!(message, Message::FinalModel(_)) => {
                let Message::FinalModel(model) = message else {
                    return Vec::new();
                };
                // Kept whatever the task's state: the goodbye follows it on the same stream.
                tracing::info!(client = %self.identity.client_id, rounds = model.rounds, "final model received");
                self.final_model_rounds = Some(model.rounds);
                vec![Action::SaveModel(Box::new(model))]
            }
            Phase::Joined { task, goodbye, .. } => {
                if matches!(task, TaskState::Waiting) {
                    self.on_control_message(now, message)
                } else {
                    // Streams are not ordered among themselves: this round's verdict, sent
                    // before the goodbye, may still be on its way.
                    *goodbye = Some(Box::new((
                        message,
                        now.plus(VERDICT_GRACE.as_millis() as u64),
                    )));
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// What a message on the control stream, after the welcome, means for the run.
    fn on_control_message(&mut self, now: Millis, message: Message) -> Vec<Action> {
        match message {
            // Closing is this side's job: the server waits for it, so that its goodbye is
            // read before the connection goes.
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::RunFinished,
            }) => self.finish(
                vec![Action::Close {
                    code: 0,
                    reason: b"done",
                }],
                Ok(RunEnd::RunFinished),
            ),
            // The aggregator restarts or pauses: come back later.
            Message::Goodbye(Goodbye { reason }) => {
                let mut out = vec![Action::Close {
                    code: 0,
                    reason: b"bye",
                }];
                out.extend(self.fail_closed(now, format!("aggregator said goodbye: {reason:?}")));
                out
            }
            other => self.fail(
                now,
                format!(
                    "protocol: unexpected {} on the control stream",
                    other.kind()
                ),
            ),
        }
    }

    fn on_task(&mut self, now: Millis, message: Message) -> Vec<Action> {
        let Phase::Joined { task, classes, .. } = &mut self.phase else {
            return Vec::new();
        };
        if !matches!(task, TaskState::Waiting) {
            return Vec::new();
        }
        if let Message::SecAgg(SecAgg::Setup(setup)) = message {
            return match ClientRound::join(&setup) {
                Ok((protocol, advertise)) => {
                    *task = TaskState::Secure(Box::new(SecureTask {
                        protocol,
                        setup,
                        task: None,
                        started: now,
                        inbox: None,
                        input: None,
                        masked: false,
                        record: None,
                    }));
                    vec![
                        Action::SendStep(Box::new(Message::SecAgg(SecAgg::Advertise(advertise)))),
                        Action::ReadStep,
                    ]
                }
                Err(e) => self.fail(now, format!("protocol: secure round setup: {e}")),
            };
        }
        let Message::RoundTask(wire) = message else {
            return self.fail(now, "protocol: expected a round task");
        };
        let training = self
            .held
            .start_of(&wire)
            .and_then(|start| training_task(&wire, *classes, start));
        match training {
            Ok(training) => {
                *task = TaskState::Training {
                    task: Box::new(wire),
                    started: now,
                };
                vec![Action::Train(Box::new(training))]
            }
            Err(e) => self.fail(now, e),
        }
    }

    fn on_trained(&mut self, now: Millis, result: Result<ClientUpdate, String>) -> Vec<Action> {
        if let Phase::Joined {
            task: TaskState::Secure(_),
            ..
        } = &self.phase
        {
            return self.on_secure_trained(now, result);
        }
        let Phase::Joined {
            task: state @ TaskState::Training { .. },
            ..
        } = &mut self.phase
        else {
            return Vec::new();
        };
        let TaskState::Training { task, started } = std::mem::replace(state, TaskState::Waiting)
        else {
            return Vec::new();
        };
        let trained = match result {
            Ok(u) => u,
            Err(e) => return self.fail(now, format!("protocol: local training: {e}")),
        };
        let train_ms = now.since(started);
        match seal_update(&task, &self.identity.client_id, &trained, train_ms) {
            Ok(update) => {
                *state = TaskState::AwaitingVerdict {
                    record: RoundRecord {
                        round: task.round,
                        outcome: String::new(),
                        train_ms,
                        loss: trained.metrics.loss,
                        update_bytes: 0,
                        n_samples: trained.metrics.n_samples,
                        scopes: update.scopes.clone(),
                        held_out: trained.held_out,
                    },
                };
                vec![Action::SendUpdate(Box::new(Message::Update(update)))]
            }
            Err(e) => self.fail(now, format!("protocol: encoding the update: {e}")),
        }
    }

    /// The next message of a secure round: its task, a protocol step, or its verdict.
    fn on_step(&mut self, now: Millis, message: Message) -> Vec<Action> {
        let Phase::Joined {
            task: TaskState::Secure(secure),
            classes,
            ..
        } = &mut self.phase
        else {
            return Vec::new();
        };
        let step = |m: SecAgg| {
            vec![
                Action::SendStep(Box::new(Message::SecAgg(m))),
                Action::ReadStep,
            ]
        };
        match message {
            Message::RoundTask(wire) if secure.task.is_none() => {
                // Its masked input is a step from `global` as carried: no change from a head.
                let start = match wire.base {
                    None => decode_head(&wire),
                    Some(_) => Err("protocol: a secure round's task must carry the head".into()),
                };
                match start.and_then(|start| training_task(&wire, *classes, start)) {
                    Ok(training) => {
                        secure.task = Some(Box::new(wire));
                        secure.started = now;
                        vec![Action::Train(Box::new(training)), Action::ReadStep]
                    }
                    Err(e) => self.fail(now, e),
                }
            }
            Message::SecAgg(SecAgg::Roster(roster)) => match secure.protocol.share(&roster) {
                Ok(shares) => step(SecAgg::Shares(shares)),
                Err(e) => self.leave_secure_round(now, e.to_string()),
            },
            Message::SecAgg(SecAgg::Inbox(inbox)) if secure.inbox.is_none() => {
                secure.inbox = Some(inbox);
                let mut out = self.mask_if_ready(now);
                if matches!(
                    self.phase,
                    Phase::Joined {
                        task: TaskState::Secure(_),
                        ..
                    }
                ) {
                    out.push(Action::ReadStep);
                }
                out
            }
            Message::SecAgg(SecAgg::Unmask(request)) => match secure.protocol.reveal(&request) {
                Ok(reveal) => step(SecAgg::Reveal(reveal)),
                Err(e) => self.leave_secure_round(now, e.to_string()),
            },
            Message::Verdict(v) => {
                let round = secure.setup.round;
                let mut record = secure
                    .record
                    .take()
                    .unwrap_or_else(|| RoundRecord::untrained(round));
                if v.subject != (Subject::Update { round }) {
                    return self.fail(now, "protocol: a verdict for another round");
                }
                record.outcome = match v.outcome {
                    Outcome::Accepted => "accepted".to_owned(),
                    Outcome::Rejected(reason) => format!("rejected: {reason}"),
                };
                self.end_secure_round(now, record)
            }
            other => self.fail(
                now,
                format!("protocol: unexpected {} in a secure round", other.kind()),
            ),
        }
    }

    /// Training of a secure round finished: its input, coded for the ring, waits for the
    /// inbox (or goes out at once if the inbox is here).
    fn on_secure_trained(
        &mut self,
        now: Millis,
        result: Result<ClientUpdate, String>,
    ) -> Vec<Action> {
        let Phase::Joined {
            task: TaskState::Secure(secure),
            ..
        } = &mut self.phase
        else {
            return Vec::new();
        };
        let trained = match result {
            Ok(u) => u,
            Err(e) => return self.fail(now, format!("protocol: local training: {e}")),
        };
        // A result of an earlier round's training (one this client left while it ran) is not
        // this round's input.
        let Some(task) = secure.task.as_ref().filter(|t| t.round == trained.round) else {
            return Vec::new();
        };
        let input = decode_head(task).and_then(|global| {
            let code = FixedPoint::for_sum(secure.setup.clip, secure.setup.participants)
                .map_err(|e| e.to_string())?;
            let scopes: Vec<WireScope> = trained
                .scopes
                .iter()
                .copied()
                .map(WireScope::from)
                .collect();
            let mut input = protocol::secure::secure_input(&trained.params, &global, &scopes);
            // Under DP the step goes out clipped and noised, and no scope leaves the
            // client: the targets then come from the released head.
            if let Some(noise) = &secure.setup.local_noise {
                let (step, stats) = input.split_at_mut(trained.params.len());
                secagg::noise::privatize(step, noise).map_err(|e| e.to_string())?;
                stats.fill(0.0);
            }
            let mut coded = Vec::new();
            let clipped = code.encode(input, &mut coded);
            if clipped > 0 {
                tracing::debug!(clipped, clip = secure.setup.clip, "secure input clipped");
            }
            Ok((coded, scopes))
        });
        match input {
            Ok((coded, scopes)) => {
                secure.record = Some(RoundRecord {
                    round: secure.setup.round,
                    outcome: String::new(),
                    train_ms: now.since(secure.started),
                    loss: trained.metrics.loss,
                    update_bytes: 4 * coded.len() as u64,
                    n_samples: trained.metrics.n_samples,
                    scopes,
                    held_out: trained.held_out,
                });
                secure.input = Some(coded);
                self.mask_if_ready(now)
            }
            Err(e) => self.leave_secure_round(now, format!("coding the input: {e}")),
        }
    }

    /// Sends the masked input once both the inbox and the trained input are here.
    fn mask_if_ready(&mut self, now: Millis) -> Vec<Action> {
        let Phase::Joined {
            task: TaskState::Secure(secure),
            ..
        } = &mut self.phase
        else {
            return Vec::new();
        };
        let (Some(inbox), Some(input)) = (&secure.inbox, &secure.input) else {
            return Vec::new();
        };
        if secure.masked {
            return Vec::new();
        }
        match secure.protocol.mask(inbox, input) {
            Ok(masked) => {
                secure.masked = true;
                secure.input = None;
                vec![Action::SendStep(Box::new(Message::SecAgg(SecAgg::Masked(
                    masked,
                ))))]
            }
            Err(e) => self.leave_secure_round(now, e.to_string()),
        }
    }

    /// The client refuses to go on with a secure round (the protocol said it is unsafe or
    /// cannot work): the round is recorded as left, and the next task is awaited.
    fn leave_secure_round(&mut self, now: Millis, why: String) -> Vec<Action> {
        let Phase::Joined {
            task: TaskState::Secure(secure),
            ..
        } = &mut self.phase
        else {
            return Vec::new();
        };
        tracing::warn!(client = %self.identity.client_id, round = secure.setup.round, %why, "leaving a secure round");
        let mut record = secure
            .record
            .take()
            .unwrap_or_else(|| RoundRecord::untrained(secure.setup.round));
        record.outcome = format!("left the secure round: {why}");
        self.end_secure_round(now, record)
    }

    fn end_secure_round(&mut self, now: Millis, record: RoundRecord) -> Vec<Action> {
        let Phase::Joined { task, goodbye, .. } = &mut self.phase else {
            return Vec::new();
        };
        *task = TaskState::Waiting;
        log_round(&self.identity.client_id, &record);
        self.rounds.push(record);
        match goodbye.take() {
            Some(g) => self.on_control_message(now, g.0),
            None => vec![Action::AcceptTask],
        }
    }

    fn on_verdict(&mut self, now: Millis, message: Message) -> Vec<Action> {
        let Phase::Joined {
            task: state @ TaskState::AwaitingVerdict { .. },
            goodbye,
            ..
        } = &mut self.phase
        else {
            return Vec::new();
        };
        let TaskState::AwaitingVerdict { mut record } =
            std::mem::replace(state, TaskState::Waiting)
        else {
            return Vec::new();
        };
        match message {
            Message::Verdict(v)
                if v.subject
                    == (Subject::Update {
                        round: record.round,
                    }) =>
            {
                record.outcome = match v.outcome {
                    Outcome::Accepted => "accepted".to_owned(),
                    Outcome::Rejected(reason) => format!("rejected: {reason}"),
                };
                log_round(&self.identity.client_id, &record);
            }
            other => {
                return self.fail(
                    now,
                    format!("protocol: expected the verdict, got {}", other.kind()),
                );
            }
        }
        self.rounds.push(record);
        match goodbye.take() {
            Some(g) => self.on_control_message(now, g.0),
            None => vec![Action::AcceptTask],
        }
    }

    fn on_goodbye_due(&mut self, now: Millis) -> Vec<Action> {
        let Phase::Joined { task, goodbye, .. } = &mut self.phase else {
            return Vec::new();
        };
        let Some(g) = goodbye.take() else {
            return Vec::new();
        };
        // The task's record is dropped with its verdict.
        *task = TaskState::Waiting;
        self.on_control_message(now, g.0)
    }

    fn on_tick(&mut self, now: Millis) -> Vec<Action> {
        match &self.phase {
            Phase::Backoff { until } if now >= *until => self.connect(),
            Phase::Joined {
                goodbye: Some(g), ..
            } if now >= g.1 => self.on_goodbye_due(now),
            _ => Vec::new(),
        }
    }

    fn on_shutdown(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Joined { .. } => {
                out.push(Action::SendGoodbye(GoodbyeReason::ShuttingDown));
                out.push(Action::Close {
                    code: 0,
                    reason: b"shutdown",
                });
            }
            Phase::Connecting | Phase::Hello => out.push(Action::Close {
                code: 0,
                reason: b"shutdown",
            }),
            Phase::Backoff { .. } | Phase::Done => {}
        }
        self.finish(out, Ok(RunEnd::Shutdown))
    }

    /// The session failed with `error`: close the connection, then back off or give up.
    fn fail(&mut self, now: Millis, error: impl Into<String>) -> Vec<Action> {
        let mut out = Vec::new();
        if !matches!(self.phase, Phase::Backoff { .. }) {
            out.push(Action::Close {
                code: 0,
                reason: b"",
            });
        }
        out.extend(self.fail_closed(now, error.into()));
        out
    }

    /// The session is over with `error` and its connection closed: back off or give up.
    fn fail_closed(&mut self, now: Millis, error: String) -> Vec<Action> {
        self.count_connection();
        self.failures += 1;
        if self
            .backoff
            .max_attempts
            .is_some_and(|max| self.failures >= max)
        {
            return self.finish(
                Vec::new(),
                Err(ClientError::GaveUp {
                    attempts: self.failures,
                    last: error,
                }),
            );
        }
        self.jitter = xorshift(self.jitter);
        let delay = self.backoff.delay(
            self.failures,
            (self.jitter >> 11) as f64 / (1u64 << 53) as f64,
        );
        tracing::warn!(client = %self.identity.client_id, error = %error, ?delay, "session lost; reconnecting");
        self.phase = Phase::Backoff {
            until: now.plus(delay.as_millis() as u64),
        };
        Vec::new()
    }

    /// A connection that got its welcome counts, and ends a run of failures.
    fn count_connection(&mut self) {
        if std::mem::take(&mut self.welcomed) {
            self.connections += 1;
            self.failures = 0;
        }
    }

    fn finish(&mut self, mut out: Vec<Action>, result: Result<RunEnd, ClientError>) -> Vec<Action> {
        self.count_connection();
        if let Ok(end) = result {
            self.end = Some(end);
        }
        self.phase = Phase::Done;
        out.push(Action::Finish(result));
        out
    }
}

/// The one line a person reads per round on a device: the verdict, the training, what went
/// out, and how the round's starting head did on the held-out rows.
fn log_round(client: &str, r: &RoundRecord) {
    let held_out = r
        .held_out
        .map(|h| format!("{:.4} ({} rows)", h.accuracy, h.samples));
    if r.outcome == "accepted" {
        tracing::info!(
            client, round = r.round, outcome = %r.outcome, loss = format!("{:.4}", r.loss),
            samples = r.n_samples, bytes_sent = r.update_bytes, train_ms = r.train_ms,
            held_out_accuracy = held_out, "round done"
        );
    } else {
        tracing::warn!(
            client, round = r.round, outcome = %r.outcome, loss = format!("{:.4}", r.loss),
            samples = r.n_samples, bytes_sent = r.update_bytes, train_ms = r.train_ms,
            held_out_accuracy = held_out, "update rejected"
        );
    }
}

/// The update for `task` from what training produced, encoded as the task asks and sealed.
fn seal_update(
    task: &RoundTask,
    client_id: &str,
    trained: &ClientUpdate,
    train_ms: u64,
) -> Result<Update, String> {
    let spec = task.shape.to_spec().map_err(|e| e.to_string())?;
    let params = EncodedParams::encode(&trained.params, &RowLayout::of_head(&spec), task.encoding)
        .map_err(|e| e.to_string())?;
    Ok(Update {
        run_id: task.run_id,
        round: task.round,
        client_id: client_id.to_owned(),
        n_samples: trained.metrics.n_samples,
        params,
        scopes: trained
            .scopes
            .iter()
            .copied()
            .map(WireScope::from)
            .collect(),
        metrics: UpdateMetrics {
            loss: trained.metrics.loss,
            accuracy: trained.metrics.accuracy,
            kl: trained.metrics.regularizer.kl,
            steps: trained.metrics.steps,
            train_ms,
            held_out: trained.held_out,
        },
        digest: [0; 32],
    }
    .seal())
}

/// The heads the last lossy tasks gave a client, newest last: two, because a task resent
/// after a reconnect is still the change from the head before.
#[derive(Debug, Default)]
struct HeldHeads(Vec<(HeadRef, Vec<f32>)>);

impl HeldHeads {
    const KEPT: usize = 2;

    fn newest(&self) -> Option<HeadRef> {
        self.0.last().map(|(r, _)| *r)
    }

    /// The head `wire` starts training from: its head, or the change it carries added to the
    /// held head it names (the aggregator's rule, `EncodedParams::add_to`). Kept, named by
    /// its digest, when the task was lossy.
    fn start_of(&mut self, wire: &RoundTask) -> Result<Vec<f32>, String> {
        let layout = layout_of(wire)?;
        let head = match wire.base {
            None => decode_with(wire, &layout)?,
            Some(base) => {
                let Some((_, held)) = self.0.iter().find(|(r, _)| r.digest == base.digest) else {
                    // Asked again, the client reports what it holds and gets a keyframe.
                    self.0.clear();
                    return Err(format!(
                        "protocol: the task is a change from a head of round {} this client \
                         does not hold",
                        base.round
                    ));
                };
                wire.global
                    .add_to(held, &layout)
                    .map_err(|e| format!("protocol: task head change: {e}"))?
            }
        };
        if wire.global.encoding == Encoding::F32 {
            self.0.clear();
        } else {
            let digest = protocol::head_digest(&head);
            self.0.retain(|(r, _)| r.digest != digest);
            self.0.push((
                HeadRef {
                    round: wire.round,
                    digest,
                },
                head.clone(),
            ));
            if self.0.len() > Self::KEPT {
                self.0.remove(0);
            }
        }
        Ok(head)
    }
}

/// The head a task carries whole, decoded against its shape.
fn decode_head(wire: &RoundTask) -> Result<Vec<f32>, String> {
    decode_with(wire, &layout_of(wire)?)
}

fn layout_of(wire: &RoundTask) -> Result<RowLayout, String> {
    let spec = wire
        .shape
        .to_spec()
        .map_err(|e| format!("task head: {e}"))?;
    Ok(RowLayout::of_head(&spec))
}

fn decode_with(wire: &RoundTask, layout: &RowLayout) -> Result<Vec<f32>, String> {
    wire.global
        .decode(layout)
        .map_err(|_| "protocol: task head parameters do not decode".to_owned())
}

/// The task a wire task describes from `start`, checked against the run's class count: a
/// protocol error (the session fails on it) if it does not fit.
fn training_task(
    wire: &RoundTask,
    classes: usize,
    start: Vec<f32>,
) -> Result<TrainingTask, String> {
    if wire.shape.classes as usize != classes {
        return Err(format!(
            "protocol: the task's head has {} outputs, the run {} classes",
            wire.shape.classes, classes
        ));
    }
    TrainingTask::from_wire_start(wire, &start).map_err(|e| format!("protocol: {e}"))
}

impl TrainingTask {
    /// The task a wire [`RoundTask`] describes, checked: its head's shape, its parameters
    /// decoded against that shape, its training settings and targets.
    /// A task that is a change from a head ([`RoundTask::base`]) needs that head:
    /// [`TrainingTask::from_wire_start`].
    pub fn from_wire(task: &RoundTask) -> Result<Self, String> {
        if task.base.is_some() {
            return Err("the task is a change from a head it does not carry".into());
        }
        Self::from_wire_start(task, &decode_head(task)?)
    }

    /// The task a wire [`RoundTask`] describes, starting from `start` (its head decoded, or
    /// added to the head it is a change from).
    pub fn from_wire_start(task: &RoundTask, start: &[f32]) -> Result<Self, String> {
        let spec = task
            .shape
            .to_spec()
            .map_err(|e| format!("task head: {e}"))?;
        let global = Head::from_flat(&spec, start)
            .map_err(|_| "task head parameters do not fit its shape".to_owned())?;
        let train = task
            .train
            .to_config(&task.targets)
            .map_err(|e| format!("task training config: {e}"))?;
        Ok(Self {
            round: task.round,
            global,
            train,
        })
    }
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
