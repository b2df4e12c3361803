//! The round engine: events in, actions out; no sockets, no clocks, no threads.
//!
//! The runtime (QUIC server, fleet simulator, tests) owns the I/O and the time. It feeds the
//! [`Engine`] [`Event`]s — a client connected or left, an update arrived, time passed — each
//! with the current monotonic time as [`Millis`], and carries out the [`Action`]s it gets
//! back in order: send a task or a verdict, record a round report, write a checkpoint (before
//! sending the next round's tasks, which follow it), say goodbye when the run is
//! [`Action::Finished`]. [`Engine::next_deadline`] says when to feed a [`Event::Tick`].
//!
//! A round opens as soon as enough clients are connected (or, sampling from the registry,
//! at once: a sampled client gets its task when it connects). The engine samples clients
//! deterministically ([`round_sample`]), sends each a [`RoundTask`], and checks every [`Update`] in a fixed
//! order ([`admission`]); accepted ones are folded at once through the round's
//! [`RoundFold`]. The round closes when its target of accepted updates is reached, when every
//! selected client has answered or left, or at its deadline. With a quorum of accepted
//! updates the fold becomes the next global head and the fused client scopes the next
//! targets; below quorum the round fails, the head stays, and the same round number is tried
//! again with a fresh sample.
//!
//! The pieces: [`config`] (what a run computes, and its checks), [`events`] (the clock, the
//! events, the actions and the reports), [`admission`] (the checks on an update).

pub mod admission;
mod config;
mod downlink;
mod events;
mod secure;

use std::collections::BTreeMap;
use std::sync::Arc;

use protocol::{
    Capabilities, Encoding, HeadRef, HeadShape, HeldOutEval, Outcome, RejectReason, RoundTask,
    RowLayout, Subject, TrainSpec, Verdict, WireScope,
};
use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};
use wsa::{DEFAULT_SCOPE_EPS, Head, LabelledFeatures, Scope};

pub use config::{
    BackboneRef, EngineConfig, EngineError, MAX_EVAL_FRACTION, MAX_ROUND_TIMEOUT_MS, Population,
    Sampling, UpdateBounds, round_sample, sample_sizes,
};
pub use events::{
    Action, ClosedBy, Event, FederatedEval, MAX_LISTED_REJECTIONS, Millis, PrivacyRound,
    ReceivedUpdate, Rejection, RoundReport, RoundStatus, SecureRoundReport,
};
pub use secure::SecureAggregation;

use crate::backend::{Backend, BackendError, CpuBackend, FoldShape};
use crate::checkpoint::{Checkpoint, History};
use crate::privacy::{Clip, PrivacyState};
use crate::strategy::{DpFolded, DpRound, FoldPolicy, Folded, RoundFold, layer_scales};
use downlink::{HeldHeads, KEYFRAME, RoundDownlink};

#[derive(Debug, Clone, Copy)]
struct ClientInfo {
    n_samples: u64,
    capabilities: Capabilities,
    /// The head it holds from an earlier lossy task: what its hello named, then what the
    /// engine last sent it.
    held: Option<HeadRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Pending,
    Accepted,
    Rejected,
    Disconnected,
}

#[derive(Debug)]
struct Selected {
    encoding: Encoding,
    answer: Answer,
    /// The sample count it claimed at its first hello of the round (the one its claim cap
    /// counts); `None` while a client sampled from the registry has not connected.
    claim: Option<u64>,
    /// The start its task gave it ([`RoundDownlink`]).
    start: usize,
}

/// What an accepted client reported of its training (telemetry, weighted at the close).
#[derive(Debug, Clone, Copy)]
struct Reported {
    loss: f64,
    accuracy: f64,
    kl: f64,
    held_out: Option<HeldOutEval>,
}

#[derive(Debug)]
struct OpenRound {
    round: u64,
    attempt: u32,
    connected: usize,
    /// What the round sampled from: the connected clients, or the registry.
    population: usize,
    opened_at: Millis,
    deadline: Millis,
    target: usize,
    order: Vec<String>,
    selected: BTreeMap<String, Selected>,
    /// The task as sent, per update encoding and start, for clients that reconnect mid-round.
    tasks: BTreeMap<(EncodingKey, usize), Arc<RoundTask>>,
    /// The task with the keyframe and f32 updates, which the others are made from.
    template: RoundTask,
    downlink: RoundDownlink,
    delta_tasks: u64,
    fold: RoundFold,
    accepted: Vec<String>,
    accepted_payload_bytes: u64,
    /// Accepted clients' reported metrics, averaged at the close with their capped weights
    /// in client order.
    metrics: BTreeMap<String, Reported>,
    step_norms: Vec<f64>,
    /// A secure round's protocol ([`secure`]).
    secure: Option<secure::SecureState>,
}

/// `Encoding` as a map key (it is not `Ord`).
type EncodingKey = u8;

/// Rejections and bytes since the last close.
#[derive(Debug, Default)]
struct Tally {
    rejected: Vec<Rejection>,
    by_reason: BTreeMap<String, u64>,
    payload_bytes: u64,
    wire_bytes: u64,
}

/// The round state machine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    config_hash: [u8; 32],
    backend: Arc<dyn Backend>,
    shape: HeadShape,
    layout: RowLayout,
    fold_shape: FoldShape,
    /// The σ̃ floor of each scoped tensor.
    floors: Vec<f64>,
    /// The initial std of each scoped tensor's layer's weights ([`layer_scales`]).
    scales: Vec<f64>,
    /// The scopes' ε: the WSA term's, which non-WSA clients also use (the core's default).
    eps: f64,
    global: Vec<f32>,
    global_norm: f64,
    /// The global head's scopes, which an update's may differ from by a bounded factor.
    global_scopes: Vec<Scope>,
    targets: Vec<Scope>,
    next_round: u64,
    attempt: u32,
    /// After a failed attempt, no new one opens before this: a round that fails every time
    /// (a quorum the fleet cannot meet, updates refused every time) is retried with
    /// exponential backoff instead of in a tight loop.
    retry_at: Option<Millis>,
    history: History,
    clients: BTreeMap<String, ClientInfo>,
    /// Under [`Population::Registered`]: every registered id, sorted.
    population: Option<Vec<String>>,
    open: Option<OpenRound>,
    tally: Tally,
    finished: bool,
    validation: Option<LabelledFeatures>,
    test: Option<LabelledFeatures>,
    /// Decoded parameters of the update being checked, reused across updates.
    scratch: Vec<f32>,
    /// Heads recent lossy tasks gave, for deltas from them.
    held_heads: HeldHeads,
    /// A failed attempt's starts, kept by the round's next attempt (the global head has not
    /// moved): a client keeps its start, so an update trained from it that arrives late is
    /// still measured from it.
    retried_downlink: Option<RoundDownlink>,
    /// Under client-level DP: the clip norm and the privacy spent.
    privacy: Option<PrivacyState>,
}

impl Engine {
    /// A fresh run on the CPU backend: the global head drawn from the seed, round 0's targets
    /// its scopes.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        Self::with_backend(config, Arc::new(CpuBackend::default()))
    }

    /// A fresh run folding on `backend`.
    pub fn with_backend(
        config: EngineConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let head = Head::<f32>::init(&config.head, config.init, config.seed)?;
        let mut targets = head.scopes(config.scope_selection, DEFAULT_SCOPE_EPS)?;
        let scales = layer_scales(&head, config.scope_selection, DEFAULT_SCOPE_EPS)?;
        let floors = config.targets.floors(&scales);
        config.targets.initial(&mut targets, &floors);
        let start = Checkpoint {
            config_hash: config.config_hash()?,
            run_id: config.run_id,
            seed: config.seed,
            next_round: 0,
            attempt: 0,
            global: head.to_flat(),
            targets,
            history: History::default(),
            privacy: config.privacy.as_ref().map(PrivacyState::new),
        };
        Self::build(config, backend, start)
    }

    /// Resumes a run from `checkpoint` on the CPU backend.
    pub fn resume(config: EngineConfig, checkpoint: Checkpoint) -> Result<Self, EngineError> {
        Self::resume_with_backend(config, checkpoint, Arc::new(CpuBackend::default()))
    }

    /// Resumes a run from `checkpoint`, folding on `backend`. The configuration must be the
    /// one the checkpoint was taken under.
    pub fn resume_with_backend(
        config: EngineConfig,
        checkpoint: Checkpoint,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let expected = config.config_hash()?;
        if checkpoint.config_hash != expected {
            return Err(EngineError::ConfigMismatch {
                expected: hex::encode(expected),
                found: hex::encode(checkpoint.config_hash),
            });
        }
        let bad = |msg: String| Err(EngineError::BadCheckpoint(msg));
        if checkpoint.run_id != config.run_id || checkpoint.seed != config.seed {
            return bad("run id or seed differ from the configuration".into());
        }
        if checkpoint.next_round > config.rounds {
            return bad(format!(
                "next round {} is past the run's {} rounds",
                checkpoint.next_round, config.rounds
            ));
        }
        // Checks length and finiteness of the parameters.
        Head::from_flat(&config.head, &checkpoint.global)
            .map_err(|e| EngineError::BadCheckpoint(format!("global head: {e}")))?;
        let scoped = config.head.scoped_tensor_count(config.scope_selection);
        if checkpoint.targets.len() != scoped {
            return bad(format!(
                "{} targets for {scoped} scoped tensors",
                checkpoint.targets.len()
            ));
        }
        for t in &checkpoint.targets {
            t.validate()
                .map_err(|e| EngineError::BadCheckpoint(format!("target: {e}")))?;
        }
        // The config hash covers `privacy`, so only a damaged file gets here with a mismatch.
        if config.privacy.is_some() != checkpoint.privacy.is_some() {
            return bad("the privacy state does not match the configuration's privacy".into());
        }
        if let Some(state) = &checkpoint.privacy
            && !(state.clip_norm.is_finite() && state.clip_norm > 0.0)
        {
            return bad(format!("privacy clip norm {}", state.clip_norm));
        }
        Self::build(config, backend, checkpoint)
    }

    /// The engine at `state`: a checked checkpoint, or a fresh run's first one.
    fn build(
        config: EngineConfig,
        backend: Arc<dyn Backend>,
        state: Checkpoint,
    ) -> Result<Self, EngineError> {
        let Checkpoint {
            global,
            targets,
            next_round,
            attempt,
            history,
            privacy,
            ..
        } = state;
        let config_hash = config.config_hash()?;
        if !backend.supports(&config.aggregation.plan()) {
            return Err(BackendError::Unsupported {
                op: "a run",
                rule: format!("{} (on the {} backend)", config.aggregation, backend.name()),
            }
            .into());
        }
        let shape = HeadShape::from(&config.head);
        let layout = RowLayout::of_head(&config.head);
        let eps = DEFAULT_SCOPE_EPS;
        let fold_shape = FoldShape::of_head(&config.head, config.scope_selection, eps);
        // The scales come from the initial head, which the seed redraws on a resume.
        let scales = layer_scales(
            &Head::init(&config.head, config.init, config.seed)?,
            config.scope_selection,
            eps,
        )?;
        let floors = config.targets.floors(&scales);
        let global_norm = l2_norm(&global);
        let global_scopes =
            Head::from_flat(&config.head, &global)?.scopes(config.scope_selection, eps)?;
        let scratch = vec![0.0; fold_shape.len];
        Ok(Self {
            config,
            config_hash,
            backend,
            shape,
            layout,
            fold_shape,
            floors,
            scales,
            eps,
            global,
            global_norm,
            global_scopes,
            targets,
            next_round,
            attempt,
            retry_at: None,
            history,
            clients: BTreeMap::new(),
            population: None,
            open: None,
            tally: Tally::default(),
            finished: false,
            validation: None,
            test: None,
            scratch,
            held_heads: HeldHeads::default(),
            retried_downlink: None,
            privacy,
        })
    }

    /// Evaluates every new global head on `data` (reported in [`RoundReport::eval`]): the
    /// split that choices such as λ are made on.
    pub fn set_validation(&mut self, data: LabelledFeatures) -> Result<(), EngineError> {
        self.check_eval_set(&data)?;
        self.validation = Some(data);
        Ok(())
    }

    /// Also evaluates every new global head on a held-out test set (reported in
    /// [`RoundReport::test_eval`]), kept apart from the validation set so nothing is tuned on it.
    pub fn set_test(&mut self, data: LabelledFeatures) -> Result<(), EngineError> {
        self.check_eval_set(&data)?;
        self.test = Some(data);
        Ok(())
    }

    fn check_eval_set(&self, data: &LabelledFeatures) -> Result<(), EngineError> {
        if data.dim() != self.config.head.input {
            return Err(EngineError::BadValidationSet(format!(
                "features are {}-wide, the head reads {}",
                data.dim(),
                self.config.head.input
            )));
        }
        if data.classes() > self.config.head.classes {
            return Err(EngineError::BadValidationSet(format!(
                "{} classes, the head has {}",
                data.classes(),
                self.config.head.classes
            )));
        }
        Ok(())
    }

    /// Whether the backend can hold the largest round `clients` connected clients give (the
    /// storing rules keep every selected update): checked when a run starts, since a round
    /// that does not fit would otherwise leave the run stuck at its opening.
    pub fn check_round_capacity(&self, clients: usize) -> Result<(), EngineError> {
        let needed = self.config.min_connected.max(self.config.quorum);
        let (_, select) = sample_sizes(
            &self.config.sampling,
            self.config.quorum,
            clients.max(needed),
        );
        // Sampled from the registry, a round holds its updates until the claim cap is known.
        let held = select.saturating_mul(self.fold_shape.len).saturating_mul(4);
        if self.config.sampling.population == Population::Registered && held > MAX_HELD_BYTES {
            return Err(EngineError::InvalidConfig(format!(
                "a round of {select} clients sampled from the registry holds {:.1} GiB of \
                 updates until its close (at most {} GiB): lower sampling.fraction",
                held as f64 / (1u64 << 30) as f64,
                MAX_HELD_BYTES >> 30
            )));
        }
        self.backend
            .accumulator(
                &self.fold_shape,
                &self.global,
                self.config.aggregation,
                select,
            )
            .map(drop)
            .map_err(EngineError::from)
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// sha256 of the configuration (as in checkpoints).
    pub fn config_hash(&self) -> [u8; 32] {
        self.config_hash
    }

    /// The name of the compute backend.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The round the run is in: the open one, or the one it opens next (`rounds` when done).
    /// This is what a `Welcome` announces.
    pub fn round(&self) -> u64 {
        self.next_round
    }

    /// Failed attempts at the current round so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The global head's flat parameters.
    pub fn global_params(&self) -> &[f32] {
        &self.global
    }

    /// The global head.
    pub fn global_head(&self) -> Head<f32> {
        // The engine only ever stores finite vectors of the configured length.
        Head::from_flat(&self.config.head, &self.global).expect("the global head is valid")
    }

    /// `counts[true][predicted]` of the global head on the test set, when one was given
    /// (quadratic in the classes: for the end of a run, not every round).
    pub fn test_confusion(&self) -> Option<Vec<Vec<u64>>> {
        let test = self.test.as_ref()?;
        self.global_head()
            .confusion(test.x(), test.labels())
            .inspect_err(|e| warn!(error = %e, "confusion matrix of the global head failed"))
            .ok()
    }

    /// The global head as a model for other runtimes: its classes, the backbone the run
    /// names, and the rounds closed so far.
    pub fn saved_model(&self) -> wsa::saved::SavedModel {
        use wsa::saved::{BackboneCard, Preprocessing, Provenance, SavedModel};
        SavedModel::new(
            self.global_head(),
            self.config.classes.clone(),
            BackboneCard {
                sha256: self
                    .config
                    .backbone
                    .sha256
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                side: self.config.backbone.side,
                preprocessing: Preprocessing::imagenet(),
            },
            Provenance {
                run_id: self.config.run_id,
                rounds: self.next_round,
                strategy: self.config.label(),
            },
        )
    }

    /// The current target scopes.
    pub fn targets(&self) -> &[Scope] {
        &self.targets
    }

    /// Run-wide counters.
    pub fn history(&self) -> History {
        self.history
    }

    /// Clients currently connected.
    pub fn connected(&self) -> usize {
        self.clients.len()
    }

    /// Whether all rounds are done.
    pub fn is_finished(&self) -> bool {
        self.next_round >= self.config.rounds
            || self.privacy.as_ref().is_some_and(|p| p.budget_spent)
    }

    /// Under client-level DP, ε spent so far at the run's δ.
    pub fn epsilon(&self) -> Option<f64> {
        let (privacy, state) = self.config.privacy.as_ref().zip(self.privacy.as_ref())?;
        Some(state.accountant.epsilon(privacy.delta))
    }

    /// The open round, if any.
    pub fn open_round(&self) -> Option<RoundStatus> {
        self.open.as_ref().map(|o| RoundStatus {
            round: o.round,
            attempt: o.attempt,
            selected: o.order.len(),
            accepted: o.accepted.len(),
            target: o.target,
            deadline: o.deadline,
        })
    }

    /// When the runtime must send the next [`Event::Tick`], if ever: the open round's
    /// deadline, or when a failed round may be tried again.
    pub fn next_deadline(&self) -> Option<Millis> {
        match &self.open {
            Some(o) => Some(o.secure.as_ref().map_or(o.deadline, |s| s.deadline())),
            None => self.retry_at,
        }
    }

    /// The state to resume from, as of now (between rounds it equals the last
    /// [`Action::Checkpoint`]).
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            config_hash: self.config_hash,
            run_id: self.config.run_id,
            seed: self.config.seed,
            next_round: self.next_round,
            attempt: self.attempt,
            global: self.global.clone(),
            targets: self.targets.clone(),
            history: self.history,
            privacy: self.privacy.clone(),
        }
    }

    /// Processes one event at time `now` and returns what to do, in order.
    ///
    /// A deadline that has passed is acted on first, whatever the event. An update gets a
    /// verdict on the stream of the task it answers; the checks and their order are in
    /// [`admission`]. A refused update leaves the fold untouched; a selected client may send
    /// again after a refusal while the round is open.
    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.poll_deadline(now, &mut out);
        match event {
            Event::Connected {
                client,
                n_samples,
                capabilities,
                held,
            } => self.on_connected(now, client, n_samples, capabilities, held, &mut out),
            Event::Disconnected { client } => self.on_disconnected(now, &client, &mut out),
            Event::Update {
                client,
                task_round,
                update,
                wire_bytes,
            } => self.on_update(now, &client, task_round, &update, wire_bytes, &mut out),
            Event::Unreadable {
                client,
                round,
                reason,
                wire_bytes,
            } => self.on_unreadable(now, &client, round, &reason, wire_bytes, &mut out),
            Event::SecAgg {
                client,
                round,
                step,
                wire_bytes,
            } => self.on_secagg(now, &client, round, step, wire_bytes, &mut out),
            Event::Tick => {}
        }
        if self.open.is_none() {
            self.try_open(now, &mut out);
        }
        if self.is_finished() && !self.finished {
            self.finished = true;
            out.push(Action::Finished);
        }
        out
    }

    fn poll_deadline(&mut self, now: Millis, out: &mut Vec<Action>) {
        // A secure round keeps its own deadlines, one per step.
        if self.open.as_ref().is_some_and(|o| o.secure.is_some()) {
            self.secure_deadline(now, out);
        } else if self.open.as_ref().is_some_and(|o| now >= o.deadline) {
            self.close(now, ClosedBy::Deadline, out);
        }
    }

    fn on_connected(
        &mut self,
        now: Millis,
        client: String,
        n_samples: u64,
        capabilities: Capabilities,
        held: Option<HeadRef>,
        out: &mut Vec<Action>,
    ) {
        self.clients.insert(
            client.clone(),
            ClientInfo {
                n_samples,
                capabilities,
                held,
            },
        );
        // A selected client that comes back mid-round (or, sampled from the registry, comes
        // for the first time) gets its task on the new session, with the time that is left;
        // not in a secure round, whose secrets it lost.
        let encoding = self.encoding_for(capabilities);
        if let Some(open) = &mut self.open
            && open.secure.is_none()
            && let Some(sel) = open.selected.get_mut(&client)
            && sel.answer != Answer::Accepted
        {
            sel.answer = Answer::Pending;
            if sel.claim.is_none() {
                // Its first hello of the round: the encoding it can take, its claim for the
                // round's cap, and where its task starts from.
                sel.encoding = encoding;
                sel.claim = Some(n_samples);
                sel.start =
                    open.downlink
                        .start_for(held, &self.global, &self.layout, &mut self.held_heads);
            } else {
                sel.start = open.downlink.start_on_return(sel.start, held);
            }
            let (encoding, start) = (sel.encoding, sel.start);
            let task = hand_out(
                &mut open.tasks,
                &open.template,
                &open.downlink,
                &mut open.delta_tasks,
                self.clients.get_mut(&client).map(|info| &mut info.held),
                encoding,
                start,
            );
            let mut task = RoundTask::clone(&task);
            task.deadline_ms = open.deadline.since(now);
            out.push(Action::SendTask {
                client,
                task: Arc::new(task),
            });
        }
    }

    /// The encoding a client with `capabilities` is asked to send updates in.
    fn encoding_for(&self, capabilities: Capabilities) -> Encoding {
        if can_encode(capabilities, self.config.update_encoding) {
            self.config.update_encoding
        } else {
            Encoding::F32
        }
    }

    /// Whether every client of `order` has said hello, so its claim is known.
    fn claims_known(&self, order: &[String]) -> bool {
        order.iter().all(|c| self.clients.contains_key(c))
    }

    /// The hello claims of the clients of `order` that are connected.
    fn selection_claims(&self, order: &[String]) -> Vec<u64> {
        order
            .iter()
            .filter_map(|c| self.clients.get(c).map(|i| i.n_samples))
            .collect()
    }

    /// Every registered client id, for a run that samples from the registry
    /// ([`Population::Registered`]); the server calls it before the first round. Ids are
    /// sorted and deduplicated here, so the sample is the same whatever order they come in.
    pub fn set_population(&mut self, ids: impl IntoIterator<Item = String>) {
        let mut ids: Vec<String> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        self.population = Some(ids);
    }

    /// The positions of round `self.next_round`'s sample in a sorted population of `n`.
    fn sample(&self, n: usize, select: usize) -> Vec<usize> {
        round_sample(self.config.seed, self.next_round, self.attempt, n, select)
    }

    fn on_disconnected(&mut self, now: Millis, client: &str, out: &mut Vec<Action>) {
        self.clients.remove(client);
        // Sampled from the registry, a client that leaves may check in again before the
        // deadline, as one that has not come yet may: it is still awaited.
        let awaited_after_leaving = self.config.sampling.population == Population::Registered;
        if let Some(open) = &mut self.open
            && let Some(sel) = open.selected.get_mut(client)
            && sel.answer == Answer::Pending
            && !awaited_after_leaving
        {
            sel.answer = Answer::Disconnected;
        }
        if self.open.as_ref().is_some_and(|o| o.secure.is_some()) {
            self.secure_client_left(now, client, out);
        } else {
            self.close_if_done(now, out);
        }
    }

    fn record_rejection(&mut self, client: &str, round: u64, reason: &RejectReason) {
        warn!(
            client,
            round,
            current = self.next_round,
            %reason,
            "update rejected"
        );
        self.history.updates_rejected += 1;
        let key = reason.key().to_owned();
        *self.tally.by_reason.entry(key).or_insert(0) += 1;
        if self.tally.rejected.len() < MAX_LISTED_REJECTIONS {
            self.tally.rejected.push(Rejection {
                client: client.to_owned(),
                round,
                reason: reason.to_string(),
            });
        }
    }

    /// A selected client answered its task with bytes that are no update: it has answered
    /// (the round need not wait for it), the refusal is counted, nothing is folded. It may
    /// still send a good update while the round is open.
    fn on_unreadable(
        &mut self,
        now: Millis,
        client: &str,
        round: u64,
        reason: &RejectReason,
        wire_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        self.refuse_answer(client, round, reason, wire_bytes);
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.secure.is_some() && o.round == round)
        {
            self.secure_client_left(now, client, out);
        } else {
            self.close_if_done(now, out);
        }
    }

    /// Counts a refused answer to the task of `round`; a selected client's pending answer to
    /// the open round is then given (the round need not wait for it).
    fn refuse_answer(&mut self, client: &str, round: u64, reason: &RejectReason, wire_bytes: u64) {
        self.tally.wire_bytes += wire_bytes;
        self.record_rejection(client, round, reason);
        if round == self.next_round
            && self.clients.contains_key(client)
            && let Some(open) = &mut self.open
            && let Some(sel) = open.selected.get_mut(client)
            && sel.answer == Answer::Pending
        {
            sel.answer = Answer::Rejected;
        }
    }

    fn on_update(
        &mut self,
        now: Millis,
        client: &str,
        task_round: u64,
        received: &ReceivedUpdate,
        wire_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        let update = received.update();
        // An update names its round, and its verdict goes back on the stream of the task it
        // answers: one naming another round than its task's is refused as that task's answer.
        // A secure round takes masked inputs only.
        let secure = self.open.as_ref().is_some_and(|o| o.secure.is_some());
        let checked = admission::check_task_round(update.round, task_round).and_then(|()| {
            if secure {
                Err(RejectReason::UnexpectedMessage(
                    "update in a secure round".into(),
                ))
            } else {
                Ok(())
            }
        });
        if let Err(reason) = checked {
            self.refuse_answer(client, task_round, &reason, wire_bytes);
            out.push(Action::SendVerdict {
                client: client.to_owned(),
                verdict: Verdict {
                    run_id: self.config.run_id,
                    subject: Subject::Update { round: task_round },
                    outcome: Outcome::Rejected(reason),
                },
            });
            self.close_if_done(now, out);
            return;
        }
        self.tally.payload_bytes += update.params.payload_bytes() as u64;
        self.tally.wire_bytes += wire_bytes;
        let outcome = match self.admit(client, received) {
            Ok(()) => {
                self.history.updates_accepted += 1;
                Outcome::Accepted
            }
            Err(reason) => {
                self.record_rejection(client, update.round, &reason);
                Outcome::Rejected(reason)
            }
        };
        out.push(Action::SendVerdict {
            client: client.to_owned(),
            verdict: Verdict {
                run_id: self.config.run_id,
                subject: Subject::Update {
                    round: update.round,
                },
                outcome,
            },
        });
        self.close_if_done(now, out);
    }

    fn close_if_done(&mut self, now: Millis, out: &mut Vec<Action>) {
        let Some(open) = &self.open else { return };
        if open.secure.is_some() {
            return;
        }
        if open.accepted.len() >= open.target {
            self.close(now, ClosedBy::Target, out);
        } else if open.selected.values().all(|s| s.answer != Answer::Pending) {
            self.close(now, ClosedBy::AllAnswered, out);
        }
    }

    fn close(&mut self, now: Millis, trigger: ClosedBy, out: &mut Vec<Action>) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        let quorum = self.config.quorum;
        let mut closed_by = trigger;
        let mut eval = None;
        let mut test_eval = None;
        let mut test_per_class = None;
        if open.fold.claim_cap_deferred() {
            // Before the weights are read, whether or not the round counts.
            let claims = open.selected.values().filter_map(|s| s.claim).collect();
            open.fold.cap_claims(self.max_weight(claims));
        }
        let fold = if open.secure.is_some() {
            self.finish_secure(&mut open, out)
        } else if open.accepted.len() >= quorum {
            open.fold
                .finish()
                .inspect_err(|e| {
                    error!(
                        round = open.round,
                        error = %e,
                        "the fold of a round at quorum did not finish; counting the round as failed"
                    );
                })
                .ok()
        } else {
            None
        };
        let weights = match &fold {
            Some(folded) => folded.weights.clone(),
            None => open.fold.weights(),
        };
        let mut drift = None;
        let mut privacy = None;
        if let Some(Folded {
            params,
            targets,
            drift: round_drift,
            dp,
            ..
        }) = fold
        {
            drift = Some(round_drift);
            privacy = dp.and_then(|dp| self.spend_privacy(&open, dp));
            self.global_norm = l2_norm(&params);
            self.global = params;
            match self
                .global_head()
                .scopes(self.config.scope_selection, self.eps)
            {
                Ok(scopes) => self.global_scopes = scopes,
                // Finite parameters always have scopes; keep the last ones if not.
                Err(e) => error!(error = %e, "cannot measure the new global head's scopes"),
            }
            self.targets = targets;
            self.next_round += 1;
            self.attempt = 0;
            self.history.rounds_closed += 1;
            let head = self.global_head();
            eval = self.validation.as_ref().and_then(|data| {
                head.evaluate(data.x(), data.labels())
                    .inspect_err(|e| warn!(error = %e, "evaluation of the new global head failed"))
                    .ok()
            });
            if let Some(test) = &self.test
                && let Ok((evaluation, per_class)) = head
                    .evaluate_by_class(test.x(), test.labels())
                    .inspect_err(|e| warn!(error = %e, "evaluation of the new global head failed"))
            {
                test_eval = Some(evaluation);
                test_per_class = Some(per_class);
            }
        } else {
            closed_by = ClosedBy::Failed;
            self.attempt = self.attempt.saturating_add(1);
            self.history.rounds_failed += 1;
            let delay = retry_delay_ms(self.attempt, self.config.round_timeout_ms);
            self.retry_at = (delay > 0).then(|| now.plus(delay));
            if self.attempt >= FAILURES_WORTH_AN_ERROR {
                error!(
                    round = open.round,
                    failed_attempts = self.attempt,
                    accepted = open.accepted.len(),
                    quorum,
                    rejections = ?self.tally.by_reason,
                    retry_in_ms = delay,
                    "round keeps failing its quorum: check the rejections, the connected \
                     clients against the quorum, and the bounds"
                );
            }
        }
        let tally = std::mem::take(&mut self.tally);
        // Weighted as in the fold, summed in client order.
        let total: f64 = weights.values().sum();
        let mean = |metric: fn(&Reported) -> f64| {
            let sum: f64 = open
                .metrics
                .iter()
                .map(|(client, r)| weights.get(client).copied().unwrap_or(0.0) * metric(r))
                .sum();
            (total > 0.0 && !open.metrics.is_empty()).then(|| sum / total)
        };
        let report = RoundReport {
            run_id: self.config.run_id,
            strategy: self.config.label(),
            round: open.round,
            attempt: open.attempt,
            closed_by,
            connected: open.connected,
            selected_count: open.order.len(),
            selected: open.order.clone(),
            target: open.target,
            quorum,
            accepted_count: open.accepted.len(),
            accepted: open.accepted.clone(),
            weights: weights.clone(),
            disconnected: open
                .order
                .iter()
                .filter(|c| {
                    open.selected
                        .get(*c)
                        .is_some_and(|s| s.answer == Answer::Disconnected)
                })
                .cloned()
                .collect(),
            rejected_count: tally.by_reason.values().sum(),
            rejected: tally.rejected,
            rejected_by_reason: tally.by_reason,
            train_loss: mean(|r| r.loss),
            train_accuracy: mean(|r| r.accuracy),
            mean_kl: mean(|r| r.kl),
            step_norms: {
                let mut norms = open.step_norms.clone();
                norms.sort_by(f64::total_cmp);
                norms.last().map(|&max| (norms[(norms.len() - 1) / 2], max))
            },
            eval,
            test_eval,
            test_per_class,
            targets: self.targets.clone(),
            drift,
            privacy,
            secure: open.secure.as_ref().map(|s| s.report()),
            federated_eval: FederatedEval::of(
                open.metrics.values().filter_map(|r| r.held_out),
                self.config.max_claim_ratio,
            ),
            payload_bytes_in: tally.payload_bytes,
            wire_bytes_in: tally.wire_bytes,
            accepted_payload_bytes: open.accepted_payload_bytes,
            delta_tasks: open.delta_tasks,
            opened_at: open.opened_at,
            closed_at: now,
            duration_ms: now.since(open.opened_at),
        };
        debug!(
            round = report.round,
            attempt = report.attempt,
            closed_by = ?report.closed_by,
            accepted = report.accepted.len(),
            selected = report.selected.len(),
            rejected = report.rejected_count,
            train_loss = report.train_loss.map(|l| format!("{l:.4}")),
            eval_accuracy = report.test_eval.map(|e| format!("{:.4}", e.accuracy)),
            federated_accuracy = report
                .federated_eval
                .map(|f| format!("{:.4}±{:.4}", f.accuracy, f.accuracy_std)),
            duration_ms = report.duration_ms,
            "round closed"
        );
        out.push(Action::RoundClosed(Box::new(report)));
        out.push(Action::Checkpoint(Box::new(self.checkpoint())));
        if closed_by == ClosedBy::Failed {
            self.retried_downlink = Some(open.downlink);
        }
    }

    /// Under DP, the clip and noise of a round that asks `select` of `connected` clients to
    /// close at `target`; `Err` when that round would take ε past the budget, which ends the
    /// run instead.
    fn dp_round(
        &mut self,
        target: usize,
        select: usize,
        connected: usize,
    ) -> Result<Option<DpRound>, ()> {
        let (Some(privacy), Some(state)) = (self.config.privacy, self.privacy.as_mut()) else {
            return Ok(None);
        };
        let q = select as f64 / connected as f64;
        if let Some(budget) = privacy.epsilon_budget {
            let next = state
                .accountant
                .epsilon_after(q, privacy.noise_multiplier, privacy.delta);
            if next > budget {
                info!(
                    round = self.next_round,
                    epsilon = state.accountant.epsilon(privacy.delta),
                    epsilon_after_next = next,
                    budget,
                    "privacy budget spent: the run ends before this round"
                );
                state.budget_spent = true;
                return Err(());
            }
        }
        let clip = state.clip_norm;
        let scopes = self.config.targets.fusion.uses_client_scopes();
        Ok(Some(DpRound {
            clip,
            scope_clip: if scopes {
                privacy.scope_share * clip
            } else {
                0.0
            },
            noise_std: privacy.update_noise_multiplier() * privacy.sensitivity(clip, scopes),
            count_noise: match privacy.clip {
                Clip::Adaptive { count_noise, .. } => count_noise,
                Clip::Fixed { .. } => 0.0,
            },
            denominator: target,
        }))
    }

    /// Charges a counted round to the accountant, moves an adaptive clip, and says what the
    /// round spent.
    fn spend_privacy(&mut self, open: &OpenRound, dp: DpFolded) -> Option<PrivacyRound> {
        let (privacy, state) = (self.config.privacy?, self.privacy.as_mut()?);
        let q = open.order.len() as f64 / open.population.max(1) as f64;
        state.accountant.compose(q, privacy.noise_multiplier, 1);
        state.adapt(&privacy, dp.unclipped_fraction);
        Some(PrivacyRound {
            epsilon: state.accountant.epsilon(privacy.delta),
            delta: privacy.delta,
            sampling_rate: q,
            clip: dp.round.clip,
            noise_std: dp.round.noise_std,
            unclipped_fraction: dp.unclipped_fraction,
            next_clip: state.clip_norm,
        })
    }

    /// The most one update of a round may weigh before the share cap: `max_claim_ratio`
    /// times the median of its selection's hello `claims`.
    fn max_weight(&self, mut claims: Vec<u64>) -> f64 {
        if claims.is_empty() {
            return f64::INFINITY;
        }
        claims.sort_unstable();
        let median = claims[(claims.len() - 1) / 2] as f64;
        let cap = (self.config.max_claim_ratio * median).min(u64::MAX as f64) as u64;
        self.config.weighting.weight(cap.max(1))
    }

    fn try_open(&mut self, now: Millis, out: &mut Vec<Action>) {
        if let Some(at) = self.retry_at {
            if now < at {
                return;
            }
            // Cleared whether or not a round opens now, so no past deadline is left to tick.
            self.retry_at = None;
        }
        if self.is_finished() {
            return;
        }
        let connected = self.clients.len();
        // Sorted ids (the registry's, or the connected map's order) sampled by
        // [`round_sample`], which depends on nothing but the seed and the round counters.
        let order: Vec<String>;
        let (target, population) = match (&self.config.sampling.population, &self.population) {
            (Population::Registered, Some(registered)) => {
                if registered.len() < self.config.quorum {
                    return;
                }
                let (target, select) =
                    sample_sizes(&self.config.sampling, self.config.quorum, registered.len());
                order = self
                    .sample(registered.len(), select)
                    .into_iter()
                    .map(|i| registered[i].clone())
                    .collect();
                (target, registered.len())
            }
            // Not handed the registry yet: nothing to sample from.
            (Population::Registered, None) => return,
            (Population::Connected, _) => {
                // Fewer clients than the quorum could only fail: wait for more.
                let needed = self.config.min_connected.max(self.config.quorum);
                if connected < needed {
                    return;
                }
                let (target, select) =
                    sample_sizes(&self.config.sampling, self.config.quorum, connected);
                let ids: Vec<&String> = self.clients.keys().collect();
                order = self
                    .sample(connected, select)
                    .into_iter()
                    .map(|i| ids[i].clone())
                    .collect();
                (target, connected)
            }
        };

        let deadline = now.plus(self.config.round_timeout_ms);
        let retried = self
            .retried_downlink
            .take()
            .filter(|d| d.round() == self.next_round);
        let opened = match retried {
            Some(downlink) => Ok(downlink),
            None => RoundDownlink::open(
                self.next_round,
                &self.global,
                &self.layout,
                self.config.downlink_encoding,
                // A secure round's masked steps are from the head as carried: no deltas.
                self.config.downlink_deltas && self.config.secure.is_none(),
                &mut self.held_heads,
            ),
        };
        let mut downlink = match opened {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, "cannot encode the global head; no round opens");
                return;
            }
        };
        let dp = match self.dp_round(target, order.len(), population) {
            Ok(dp) => dp,
            Err(()) => return,
        };
        let claims_known = self.claims_known(&order);
        let policy = FoldPolicy {
            weighting: self.config.weighting,
            max_share: self.config.max_share,
            // Known at the open only when every sampled client has said hello; else set at
            // the close from the claims of those that came (the fold holds every update).
            max_weight: if claims_known {
                self.max_weight(self.selection_claims(&order))
            } else {
                f64::INFINITY
            },
            targets: self.config.targets,
            floors: self.floors.clone(),
            dp,
        };
        let mut fold = match RoundFold::open(
            self.backend.as_ref(),
            &self.fold_shape,
            &self.global,
            &self.targets,
            self.config.strategy,
            self.config.aggregation,
            policy,
            order.len(),
        ) {
            Ok(fold) => fold,
            Err(e) => {
                error!(error = %e, backend = self.backend.name(), "no accumulator; no round opens");
                return;
            }
        };
        if !claims_known {
            fold.defer_claim_cap();
        }
        let train = self.config.strategy.client_config(
            &self.config.train,
            u64_seed(b"train", self.config.seed, self.next_round, self.attempt),
            self.next_round,
            &self.targets,
            self.config.scope_selection,
            &self.fold_shape,
        );
        let template = RoundTask {
            run_id: self.config.run_id,
            round: self.next_round,
            shape: self.shape.clone(),
            global: downlink.start(KEYFRAME).global.clone(),
            base: None,
            targets: self.targets.iter().copied().map(WireScope::from).collect(),
            train: TrainSpec::from(&train),
            encoding: Encoding::F32,
            deadline_ms: self.config.round_timeout_ms,
        };
        let mut tasks: BTreeMap<(EncodingKey, usize), Arc<RoundTask>> = BTreeMap::new();
        let mut delta_tasks = 0;
        let mut selected = BTreeMap::new();
        let secure = if self.config.secure.is_some() {
            // Masked inputs are f32 steps in the ring, whatever the update encoding.
            let task = Arc::new(template.clone());
            match self.open_secure(now, &order, &task, dp, out) {
                Ok(state) => {
                    for client in &order {
                        selected.insert(
                            client.clone(),
                            Selected {
                                encoding: Encoding::F32,
                                answer: Answer::Pending,
                                claim: self.clients.get(client).map(|c| c.n_samples),
                                start: KEYFRAME,
                            },
                        );
                    }
                    Some(state)
                }
                Err(e) => {
                    error!(error = %e, selected = order.len(), "cannot open a secure round");
                    // Tried again later, not on every event.
                    self.retry_at = Some(now.plus(RETRY_MAX_MS.min(self.config.round_timeout_ms)));
                    return;
                }
            }
        } else {
            None
        };
        for client in order.iter().filter(|_| secure.is_none()) {
            let info = self.clients.get(client);
            // A client that has not connected is asked in the run's encoding if it can take
            // it when it does ([`Engine::on_connected`]).
            let encoding = match info {
                Some(info) => self.encoding_for(info.capabilities),
                None => self.config.update_encoding,
            };
            let start = match info {
                Some(info) => {
                    downlink.start_for(info.held, &self.global, &self.layout, &mut self.held_heads)
                }
                None => KEYFRAME,
            };
            selected.insert(
                client.clone(),
                Selected {
                    encoding,
                    answer: Answer::Pending,
                    claim: info.map(|i| i.n_samples),
                    start,
                },
            );
            let Some(info) = self.clients.get_mut(client) else {
                continue;
            };
            let task = hand_out(
                &mut tasks,
                &template,
                &downlink,
                &mut delta_tasks,
                Some(&mut info.held),
                encoding,
                start,
            );
            out.push(Action::SendTask {
                client: client.clone(),
                task,
            });
        }
        info!(
            round = self.next_round,
            attempt = self.attempt,
            selected = order.len(),
            target,
            connected,
            "round opened"
        );
        self.open = Some(OpenRound {
            round: self.next_round,
            attempt: self.attempt,
            connected,
            population,
            opened_at: now,
            deadline,
            target,
            order,
            selected,
            tasks,
            template,
            downlink,
            delta_tasks,
            fold,
            accepted: Vec::new(),
            accepted_payload_bytes: 0,
            metrics: BTreeMap::new(),
            step_norms: Vec::new(),
            secure,
        });
    }
}

/// The task for updates in `encoding` from `start` (made from `template` the first time), as
/// it goes to a client: counted, and recorded as the head the client will hold for the next
/// round's delta (a client that loses it says so in its next hello).
fn hand_out(
    tasks: &mut BTreeMap<(EncodingKey, usize), Arc<RoundTask>>,
    template: &RoundTask,
    downlink: &RoundDownlink,
    delta_tasks: &mut u64,
    held: Option<&mut Option<HeadRef>>,
    encoding: Encoding,
    start: usize,
) -> Arc<RoundTask> {
    if let Some(held) = held {
        *held = downlink.given(start);
    }
    *delta_tasks += u64::from(start != KEYFRAME);
    let made = tasks.entry((encoding as u8, start)).or_insert_with(|| {
        let start = downlink.start(start);
        Arc::new(RoundTask {
            encoding,
            global: start.global.clone(),
            base: start.base,
            ..template.clone()
        })
    });
    Arc::clone(made)
}

/// The most update bytes a registry-sampled round may hold until its close.
const MAX_HELD_BYTES: usize = 8 << 30;

/// Consecutive failed attempts of one round from which each failure is logged as an error.
const FAILURES_WORTH_AN_ERROR: u32 = 3;
/// The wait after the second failure in a row; it doubles with each further one.
const RETRY_BASE_MS: u64 = 250;
/// The longest wait between attempts (or the round timeout, if shorter).
const RETRY_MAX_MS: u64 = 30_000;

/// How long to wait after `failed` consecutive failed attempts before the next: none after the
/// first (a round that missed its quorum by a straggler retries at once), then 250 ms doubling
/// up to 30 s or the round timeout, whichever is shorter.
fn retry_delay_ms(failed: u32, round_timeout_ms: u64) -> u64 {
    if failed <= 1 {
        return 0;
    }
    let doublings = (failed - 2).min(20);
    (RETRY_BASE_MS << doublings).min(RETRY_MAX_MS.min(round_timeout_ms))
}

fn can_encode(c: Capabilities, e: Encoding) -> bool {
    match e {
        Encoding::F32 => true,
        Encoding::F16 => c.f16,
        Encoding::Int8RowScaled => c.int8,
    }
}

/// A 32-byte RNG seed from the run seed and the round counters.
fn derive_seed(domain: &[u8], seed: u64, round: u64, attempt: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"wsa-fl engine\0");
    h.update(domain);
    h.update(seed.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update(attempt.to_le_bytes());
    h.finalize().into()
}

fn u64_seed(domain: &[u8], seed: u64, round: u64, attempt: u32) -> u64 {
    let d = derive_seed(domain, seed, round, attempt);
    let mut b = [0; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

fn l2_norm(w: &[f32]) -> f64 {
    w.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}
