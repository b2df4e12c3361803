//! The round engine: events in, actions out; no sockets, no clocks, no threads.
//!
//! The runtime (QUIC server, fleet simulator, tests) owns the I/O and the time. It feeds the
//! [`Engine`] [`Event`]s — a client connected or left, an update arrived, time passed — each
//! with the current monotonic time as [`Millis`], and carries out the [`Action`]s it gets
//! back in order: send a task or a verdict, record a round report, write a checkpoint (before
//! sending the next round's tasks, which follow it), say goodbye when the run is
//! [`Action::Finished`]. [`Engine::next_deadline`] says when to feed a [`Event::Tick`].
//!
//! A round opens as soon as enough clients are connected. The engine samples clients
//! deterministically, sends each a [`RoundTask`], and validates every [`Update`] in a fixed
//! order (see [`Engine::handle`]); accepted ones are folded at once through the compute
//! [`Backend`]. The round closes when its target of accepted updates is reached, when every
//! selected client has answered or left, or at its deadline. With a quorum of accepted
//! updates the fold becomes the next global head and the fused client scopes the next
//! targets; below quorum the round fails, the head stays, and the same round number is tried
//! again with a fresh sample.

use std::collections::BTreeMap;
use std::sync::Arc;

use protocol::{
    Capabilities, EncodedParams, Encoding, HeadShape, Outcome, RejectReason, RoundTask, RowLayout,
    Subject, TrainSpec, Update, Verdict, WireScope,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};
use wsa::{
    DEFAULT_SCOPE_EPS, Evaluation, Head, HeadSpec, Init, LabelledFeatures, Scope, ScopeFusion,
    ScopeSelection, TrainConfig, Weighting,
};

use crate::Strategy;
use crate::backend::{
    Accumulator, Aggregation, Backend, BackendError, CpuBackend, FoldShape, Measurement,
};
use crate::checkpoint::{Checkpoint, History};

/// Milliseconds on the runtime's monotonic clock. The engine never reads a clock; tests pass
/// plain numbers.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + ms`, saturating.
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, 0 if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// The local-training settings every round starts from; the strategy adds its term
/// (FedProx μ or WSA λ and targets) and the engine a per-round seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalTraining {
    /// Passes over the local data.
    pub epochs: u32,
    /// Rows per SGD step.
    pub batch_size: u32,
    /// Learning rate.
    pub lr: f64,
    /// Heavy-ball momentum in `[0, 1)`.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
}

impl Default for LocalTraining {
    fn default() -> Self {
        let base = TrainConfig::default();
        Self {
            epochs: base.epochs,
            batch_size: base.batch_size as u32,
            lr: base.lr,
            momentum: base.momentum,
            weight_decay: base.weight_decay,
        }
    }
}

/// Which connected clients a round asks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// Fraction of the connected clients a round wants updates from, in `(0, 1]`.
    pub fraction: f64,
    /// At least this many (capped at the connected count).
    pub min_clients: usize,
    /// ≥ 1: ask `ceil(target · over_selection)` clients and close as soon as `target`
    /// updates are accepted, so a few stragglers do not hold the round up.
    pub over_selection: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            fraction: 1.0,
            min_clients: 1,
            over_selection: 1.0,
        }
    }
}

/// Bounds an update must stay within to be folded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateBounds {
    /// Most training samples an update may claim (also bounded by the client's hello).
    pub max_n_samples: u64,
    /// `‖w − w_global‖₂ ≤ norm_ratio · max(‖w_global‖₂, 1)`.
    pub norm_ratio: f64,
    /// Reported and recomputed scopes must agree within `tolerance · σ_recomputed` in both μ
    /// and σ (f16 and int8 make them differ slightly; f32 makes them equal).
    pub scope_tolerance: f64,
}

impl Default for UpdateBounds {
    fn default() -> Self {
        Self {
            max_n_samples: 10_000_000,
            norm_ratio: 10.0,
            scope_tolerance: 0.05,
        }
    }
}

/// Everything that decides what a run computes. Its [`EngineConfig::config_hash`] is stored
/// in every checkpoint, and a run resumes only under the same configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Names the run on the wire; updates for other runs are refused.
    pub run_id: u64,
    /// Seeds the initial head, the sampling and the clients' shuffles.
    #[serde(default)]
    pub seed: u64,
    /// Rounds in the run.
    pub rounds: u64,
    /// FedAvg, FedProx or WSA.
    pub strategy: Strategy,
    /// How accepted updates become the next global head: the weighted mean, or a robust rule.
    #[serde(default)]
    pub aggregation: Aggregation,
    /// The head's shape.
    pub head: HeadSpec,
    /// How the initial head is drawn.
    #[serde(default)]
    pub init: Init,
    /// Local training settings.
    #[serde(default)]
    pub train: LocalTraining,
    /// Which tensors carry scopes. Biases only with WSA: the wire carries the selection only
    /// inside the WSA term, so other strategies' clients scope the weights alone.
    #[serde(default)]
    pub scope_selection: ScopeSelection,
    /// How clients are weighted in the average and the fusion.
    #[serde(default)]
    pub weighting: Weighting,
    /// The encoding clients are asked to send updates in (f32 for a client that cannot).
    #[serde(default)]
    pub update_encoding: Encoding,
    /// Which clients a round asks.
    #[serde(default)]
    pub sampling: Sampling,
    /// Accepted updates a round needs to move the global head.
    pub quorum: usize,
    /// Milliseconds from a round's opening to its deadline.
    pub round_timeout_ms: u64,
    /// Connected clients needed before a round opens (at least `quorum` are always needed).
    pub min_connected: usize,
    /// Bounds on updates.
    #[serde(default)]
    pub bounds: UpdateBounds,
}

impl EngineConfig {
    /// A configuration that runs out of the box: 10 rounds, all connected clients every round,
    /// quorum 1, a minute per round, f32 updates.
    pub fn new(run_id: u64, head: HeadSpec, strategy: Strategy) -> Self {
        Self {
            run_id,
            seed: 0,
            rounds: 10,
            strategy,
            aggregation: Aggregation::Mean,
            head,
            init: Init::default(),
            train: LocalTraining::default(),
            scope_selection: ScopeSelection::default(),
            weighting: Weighting::default(),
            update_encoding: Encoding::F32,
            sampling: Sampling::default(),
            quorum: 1,
            round_timeout_ms: 60_000,
            min_connected: 1,
            bounds: UpdateBounds::default(),
        }
    }

    /// The strategy's label, with the aggregation rule's unless it is the plain mean.
    pub fn label(&self) -> String {
        match self.aggregation {
            Aggregation::Mean => self.strategy.label(),
            rule => format!("{}+{}", self.strategy.label(), rule.label()),
        }
    }

    /// sha256 of the configuration's postcard bytes.
    pub fn config_hash(&self) -> Result<[u8; 32], EngineError> {
        let bytes = postcard::to_stdvec(self)
            .map_err(|e| EngineError::InvalidConfig(format!("cannot encode: {e}")))?;
        Ok(Sha256::digest(&bytes).into())
    }

    /// Checks every value against its domain, with a message that names the field.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |msg: String| Err(EngineError::InvalidConfig(msg));
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        self.head.validate()?;
        if u32::try_from(self.head.param_count()).is_err() {
            return bad(format!(
                "head has {} parameters, more than the wire's u32 count",
                self.head.param_count()
            ));
        }
        let t = &self.train;
        if t.epochs == 0 || t.batch_size == 0 {
            return bad("train.epochs and train.batch_size must be at least 1".into());
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad(format!("train.lr must be finite and > 0, got {}", t.lr));
        }
        if !(0.0..1.0).contains(&t.momentum) {
            return bad(format!(
                "train.momentum must be in [0, 1), got {}",
                t.momentum
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(format!(
                "train.weight_decay must be finite and >= 0, got {}",
                t.weight_decay
            ));
        }
        match self.strategy {
            Strategy::FedAvg => {}
            Strategy::FedProx { mu } if !(mu.is_finite() && mu >= 0.0) => {
                return bad(format!("FedProx mu must be finite and >= 0, got {mu}"));
            }
            Strategy::Wsa { lambda, .. } if !(lambda.is_finite() && lambda >= 0.0) => {
                return bad(format!("WSA lambda must be finite and >= 0, got {lambda}"));
            }
            _ => {}
        }
        if let Err(e) = self.aggregation.validate() {
            return bad(format!("aggregation: {e}"));
        }
        if self.scope_selection.include_biases && !matches!(self.strategy, Strategy::Wsa { .. }) {
            return bad(
                "scope_selection.include_biases needs the WSA strategy (only its term tells \
                 clients to scope biases); turn it off for FedAvg and FedProx"
                    .into(),
            );
        }
        let s = &self.sampling;
        if !(s.fraction > 0.0 && s.fraction <= 1.0) {
            return bad(format!(
                "sampling.fraction must be in (0, 1], got {}",
                s.fraction
            ));
        }
        if s.min_clients == 0 {
            return bad("sampling.min_clients must be at least 1".into());
        }
        if !(s.over_selection.is_finite() && s.over_selection >= 1.0) {
            return bad(format!(
                "sampling.over_selection must be finite and >= 1, got {}",
                s.over_selection
            ));
        }
        if self.quorum == 0 || self.min_connected == 0 {
            return bad("quorum and min_connected must be at least 1".into());
        }
        if self.round_timeout_ms == 0 {
            return bad("round_timeout_ms must be at least 1".into());
        }
        let b = &self.bounds;
        if b.max_n_samples == 0 {
            return bad("bounds.max_n_samples must be at least 1".into());
        }
        if !(b.norm_ratio.is_finite() && b.norm_ratio > 0.0) {
            return bad(format!(
                "bounds.norm_ratio must be finite and > 0, got {}",
                b.norm_ratio
            ));
        }
        if !(b.scope_tolerance.is_finite() && b.scope_tolerance >= 0.0) {
            return bad(format!(
                "bounds.scope_tolerance must be finite and >= 0, got {}",
                b.scope_tolerance
            ));
        }
        Ok(())
    }
}

/// What the engine can refuse at construction or resumption; `handle` itself never fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A configuration value is out of its domain.
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// The checkpoint was taken under another configuration.
    #[error(
        "checkpoint was written under another configuration (hash {found}, this one {expected}); \
         resume with the configuration the run started with, or start a new run"
    )]
    ConfigMismatch {
        /// This configuration's hash, hex.
        expected: String,
        /// The checkpoint's, hex.
        found: String,
    },
    /// The checkpoint's contents do not fit the configuration.
    #[error("checkpoint does not fit the configuration: {0}")]
    BadCheckpoint(String),
    /// The validation set does not fit the head.
    #[error("validation set does not fit the head: {0}")]
    BadValidationSet(String),
    /// The core refused something.
    #[error(transparent)]
    Core(#[from] wsa::Error),
    /// The compute backend refused something.
    #[error("compute backend: {0}")]
    Backend(#[from] BackendError),
}

/// An update as it came off the wire, with its digest already checked.
///
/// sha256 over the parameters is the largest single cost of an update (~0.8 ms for the 1.3 MB
/// of a 330k-parameter head in f32) and needs no engine state, so the runtime builds this in
/// the connection's own task, in parallel with the other connections; the engine, one thread
/// for the whole round, only reads the result at its place in the check order. The flag is
/// private and set only by [`ReceivedUpdate::new`], so it cannot disagree with the contents.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedUpdate {
    update: Update,
    digest_ok: bool,
}

impl ReceivedUpdate {
    /// Checks the digest of `update` (O(payload); call it off the engine's thread).
    pub fn new(update: Update) -> Self {
        let digest_ok = update.digest_ok();
        Self { update, digest_ok }
    }

    /// The update.
    pub fn update(&self) -> &Update {
        &self.update
    }

    /// Whether its digest matched its contents.
    pub fn digest_ok(&self) -> bool {
        self.digest_ok
    }

    /// The update, for reuse of its buffers.
    pub fn into_update(self) -> Update {
        self.update
    }
}

impl From<Update> for ReceivedUpdate {
    fn from(update: Update) -> Self {
        Self::new(update)
    }
}

/// Something that happened, fed to [`Engine::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client passed the transport's authentication.
    Connected {
        /// Its authenticated id.
        client: String,
        /// The training rows its hello claimed (an upper bound for its updates).
        n_samples: u64,
        /// Encodings it can produce.
        capabilities: Capabilities,
    },
    /// A client's session ended.
    Disconnected {
        /// Its id.
        client: String,
    },
    /// An update arrived on a client's session.
    Update {
        /// The session's authenticated client id (not the id inside the update).
        client: String,
        /// The decoded message with its digest checked ([`ReceivedUpdate::new`]), otherwise
        /// not yet validated.
        update: Box<ReceivedUpdate>,
        /// Bytes it took on the wire (frame included), for the round report.
        wire_bytes: u64,
    },
    /// A client answered its round task with something that is not a decodable update
    /// (the transport already told it why). Counted as a rejection; the client has answered.
    Unreadable {
        /// The session's authenticated client id.
        client: String,
        /// The round of the task it answered.
        round: u64,
        /// Why the bytes were refused.
        reason: RejectReason,
        /// Bytes received for it.
        wire_bytes: u64,
    },
    /// Time passed; sent at [`Engine::next_deadline`] (sending more often is harmless).
    Tick,
}

/// Something the runtime must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `task` to `client`. Clients with the same encoding share one task value.
    SendTask {
        /// Recipient.
        client: String,
        /// The task.
        task: Arc<RoundTask>,
    },
    /// Send `verdict` to `client`.
    SendVerdict {
        /// Recipient.
        client: String,
        /// The answer to its update.
        verdict: Verdict,
    },
    /// A round attempt closed (successfully or below quorum): log the report.
    RoundClosed(Box<RoundReport>),
    /// Persist this checkpoint (e.g. [`Checkpoint::save_atomic`]) before carrying out the
    /// actions after it.
    Checkpoint(Box<Checkpoint>),
    /// All rounds are done: say goodbye to everyone.
    Finished,
}

/// Why a round attempt closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClosedBy {
    /// The target count of accepted updates was reached.
    Target,
    /// Every selected client answered or left.
    AllAnswered,
    /// The deadline passed with at least a quorum.
    Deadline,
    /// It closed (for any of the reasons above) below quorum: the head did not move.
    Failed,
}

/// One refused update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// The session's client id.
    pub client: String,
    /// The round the update claimed.
    pub round: u64,
    /// Why, as sent to the client.
    pub reason: String,
}

/// What one round attempt did, one JSON line per attempt. Rejections and bytes are those that
/// arrived while this attempt was the current one (late updates for the previous round land
/// in the next report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// The run.
    pub run_id: u64,
    /// The strategy's label (e.g. `wsa(lambda=100,MeanStd)`), so a log of many runs can be
    /// grouped without knowing their order.
    #[serde(default)]
    pub strategy: String,
    /// The round number.
    pub round: u64,
    /// Attempt at this round number, from 0.
    pub attempt: u32,
    /// How the attempt ended.
    pub closed_by: ClosedBy,
    /// Connected clients when it opened.
    pub connected: usize,
    /// How many clients were asked.
    pub selected_count: usize,
    /// Clients asked, in the order they were sampled.
    pub selected: Vec<String>,
    /// Accepted updates at which it closes early.
    pub target: usize,
    /// Accepted updates it needed to count.
    pub quorum: usize,
    /// How many updates were folded.
    pub accepted_count: usize,
    /// Clients whose update was folded, in arrival order.
    pub accepted: Vec<String>,
    /// Selected clients that left before answering.
    pub disconnected: Vec<String>,
    /// How many updates were refused.
    pub rejected_count: u64,
    /// Refused updates (the first [`MAX_LISTED_REJECTIONS`]; the counts are complete).
    pub rejected: Vec<Rejection>,
    /// Refused updates per reason (the kebab-case name of the reason).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Mean local training loss of the accepted updates, weighted as in the fold.
    pub train_loss: Option<f64>,
    /// Mean local training accuracy, weighted the same way.
    pub train_accuracy: Option<f64>,
    /// Mean Σ KL to the targets at the end of local training, weighted the same way.
    pub mean_kl: Option<f64>,
    /// The median and the largest `‖w − g‖` of the accepted updates (their steps from the
    /// round's global head): what a norm-clipping bound is chosen from.
    #[serde(default)]
    pub step_norms: Option<(f64, f64)>,
    /// The new global head on the validation set (when one was given and the round counted).
    pub eval: Option<Evaluation>,
    /// The new global head on the test set (when one was given and the round counted).
    pub test_eval: Option<Evaluation>,
    /// Parameter payload bytes of all updates received (accepted or not).
    pub payload_bytes_in: u64,
    /// Wire bytes of all updates received, as the runtime reported them.
    pub wire_bytes_in: u64,
    /// Parameter payload bytes of the accepted updates.
    pub accepted_payload_bytes: u64,
    /// When it opened.
    pub opened_at: Millis,
    /// When it closed.
    pub closed_at: Millis,
    /// `closed_at − opened_at`.
    pub duration_ms: u64,
}

/// Most rejections listed by name in one report.
pub const MAX_LISTED_REJECTIONS: usize = 256;

/// A snapshot of the open round, for status displays.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundStatus {
    /// The round number.
    pub round: u64,
    /// Attempt at it.
    pub attempt: u32,
    /// Clients asked.
    pub selected: usize,
    /// Accepted so far.
    pub accepted: usize,
    /// Early-close target.
    pub target: usize,
    /// When it closes at the latest.
    pub deadline: Millis,
}

#[derive(Debug, Clone, Copy)]
struct ClientInfo {
    n_samples: u64,
    capabilities: Capabilities,
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
}

/// Weighted sums of the accepted updates' metrics.
#[derive(Debug, Default)]
struct MetricSums {
    weight: f64,
    loss: f64,
    accuracy: f64,
    kl: f64,
}

#[derive(Debug)]
struct OpenRound {
    round: u64,
    attempt: u32,
    connected: usize,
    opened_at: Millis,
    deadline: Millis,
    target: usize,
    order: Vec<String>,
    selected: BTreeMap<String, Selected>,
    /// The task as sent, per encoding, for clients that reconnect mid-round.
    tasks: BTreeMap<EncodingKey, Arc<RoundTask>>,
    acc: Box<dyn Accumulator>,
    /// Accepted scopes with their weights, by client: fused at close in client order, so the
    /// targets do not depend on the order updates arrived in (f64 sums are not associative,
    /// and a resumed run must reproduce an uninterrupted one bit for bit).
    scopes: BTreeMap<String, (Vec<Scope>, f64)>,
    accepted: Vec<String>,
    accepted_payload_bytes: u64,
    metrics: MetricSums,
    step_norms: Vec<f64>,
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
    /// The scopes' ε: the WSA term's, which non-WSA clients also use (the core's default).
    eps: f64,
    global: Vec<f32>,
    global_norm: f64,
    targets: Vec<Scope>,
    next_round: u64,
    attempt: u32,
    history: History,
    clients: BTreeMap<String, ClientInfo>,
    open: Option<OpenRound>,
    tally: Tally,
    finished: bool,
    validation: Option<LabelledFeatures>,
    test: Option<LabelledFeatures>,
    /// Decoded parameters of the update being checked, reused across updates.
    scratch: Vec<f32>,
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
        let targets = head.scopes(config.scope_selection, DEFAULT_SCOPE_EPS)?;
        Self::build(
            config,
            backend,
            head.to_flat(),
            targets,
            0,
            0,
            History::default(),
        )
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
        Self::build(
            config,
            backend,
            checkpoint.global,
            checkpoint.targets,
            checkpoint.next_round,
            checkpoint.attempt,
            checkpoint.history,
        )
    }

    fn build(
        config: EngineConfig,
        backend: Arc<dyn Backend>,
        global: Vec<f32>,
        targets: Vec<Scope>,
        next_round: u64,
        attempt: u32,
        history: History,
    ) -> Result<Self, EngineError> {
        let config_hash = config.config_hash()?;
        let shape = HeadShape::from(&config.head);
        let layout = RowLayout::of_head(&shape);
        let eps = DEFAULT_SCOPE_EPS;
        let fold_shape = FoldShape::of_head(&config.head, config.scope_selection, eps);
        let global_norm = l2_norm(&global);
        let scratch = vec![0.0; fold_shape.len];
        Ok(Self {
            config,
            config_hash,
            backend,
            shape,
            layout,
            fold_shape,
            eps,
            global,
            global_norm,
            targets,
            next_round,
            attempt,
            history,
            clients: BTreeMap::new(),
            open: None,
            tally: Tally::default(),
            finished: false,
            validation: None,
            test: None,
            scratch,
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

    /// When the runtime must send the next [`Event::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.open.as_ref().map(|o| o.deadline)
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
        }
    }

    /// Processes one event at time `now` and returns what to do, in order.
    ///
    /// A deadline that has passed is acted on first, whatever the event. An update is checked
    /// in this order, and the first failure is sent back as the verdict's reason: run id
    /// (`WrongRun`); the session's client is connected (`UnknownClient`); the update's client
    /// id is the session's (`ClientMismatch`); its round is the current one and open
    /// (`StaleRound`, `FutureRound`, `RoundClosed`); the client was selected (`NotSelected`);
    /// not yet accepted this round (`Duplicate`); digest (`DigestMismatch`); the task's
    /// encoding (`WrongEncoding`); parameter and scope counts (`WrongShape`); decoding
    /// (`WrongShape`, `Malformed`); every parameter, scope and metric finite (`NonFinite`);
    /// sample count in `1..=min(hello's, max)` (`BadSampleCount`); every reported σ > 0 and
    /// the reported scopes within tolerance of the recomputed ones (`BadScope`); distance
    /// from the global head (`NormTooLarge`). A refused update leaves the fold untouched; a
    /// selected client may send again after a refusal while the round is open.
    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.poll_deadline(now, &mut out);
        match event {
            Event::Connected {
                client,
                n_samples,
                capabilities,
            } => self.on_connected(now, client, n_samples, capabilities, &mut out),
            Event::Disconnected { client } => self.on_disconnected(now, &client, &mut out),
            Event::Update {
                client,
                update,
                wire_bytes,
            } => self.on_update(now, &client, &update, wire_bytes, &mut out),
            Event::Unreadable {
                client,
                round,
                reason,
                wire_bytes,
            } => self.on_unreadable(now, &client, round, &reason, wire_bytes, &mut out),
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
        if self.open.as_ref().is_some_and(|o| now >= o.deadline) {
            self.close(now, ClosedBy::Deadline, out);
        }
    }

    fn on_connected(
        &mut self,
        now: Millis,
        client: String,
        n_samples: u64,
        capabilities: Capabilities,
        out: &mut Vec<Action>,
    ) {
        self.clients.insert(
            client.clone(),
            ClientInfo {
                n_samples,
                capabilities,
            },
        );
        // A selected client that comes back mid-round gets its task again on the new session,
        // with the time that is left.
        if let Some(open) = &mut self.open
            && let Some(sel) = open.selected.get_mut(&client)
            && sel.answer != Answer::Accepted
        {
            sel.answer = Answer::Pending;
            if let Some(task) = open.tasks.get(&(sel.encoding as u8)) {
                let mut task = RoundTask::clone(task);
                task.deadline_ms = open.deadline.since(now);
                out.push(Action::SendTask {
                    client,
                    task: Arc::new(task),
                });
            }
        }
    }

    fn on_disconnected(&mut self, now: Millis, client: &str, out: &mut Vec<Action>) {
        self.clients.remove(client);
        if let Some(open) = &mut self.open
            && let Some(sel) = open.selected.get_mut(client)
            && sel.answer == Answer::Pending
        {
            sel.answer = Answer::Disconnected;
        }
        self.close_if_done(now, out);
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
        let key = reason_key(reason).to_owned();
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
        self.close_if_done(now, out);
    }

    fn on_update(
        &mut self,
        now: Millis,
        client: &str,
        received: &ReceivedUpdate,
        wire_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        let update = received.update();
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

    /// Checks `update` and folds it. On `Err` nothing was folded.
    fn admit(&mut self, client: &str, received: &ReceivedUpdate) -> Result<(), RejectReason> {
        let update = received.update();
        if update.run_id != self.config.run_id {
            return Err(RejectReason::WrongRun);
        }
        let Some(info) = self.clients.get(client).copied() else {
            return Err(RejectReason::UnknownClient);
        };
        if update.client_id != client {
            return Err(RejectReason::ClientMismatch);
        }
        let current = self.next_round;
        if update.round < current {
            return Err(RejectReason::StaleRound {
                got: update.round,
                current,
            });
        }
        if update.round > current {
            return Err(RejectReason::FutureRound {
                got: update.round,
                current,
            });
        }
        let Some(open) = self.open.as_mut() else {
            return Err(RejectReason::RoundClosed);
        };
        let Some(sel) = open.selected.get_mut(client) else {
            return Err(RejectReason::NotSelected);
        };
        if sel.answer == Answer::Accepted {
            return Err(RejectReason::Duplicate);
        }
        // From here on the client has answered, whatever the verdict.
        sel.answer = Answer::Rejected;
        let encoding = sel.encoding;
        if !received.digest_ok() {
            return Err(RejectReason::DigestMismatch);
        }
        let checked = check_contents(
            update,
            encoding,
            &self.layout,
            self.fold_shape.tensors.len(),
            &mut self.scratch,
            open.acc.as_mut(),
        )?;
        let bounds = &self.config.bounds;
        let n = update.n_samples;
        if n == 0 || n > info.n_samples || n > bounds.max_n_samples {
            return Err(RejectReason::BadSampleCount(n));
        }
        check_scopes(
            &checked.reported,
            &checked.measurement.scopes,
            bounds.scope_tolerance,
        )?;
        let bound = bounds.norm_ratio * self.global_norm.max(1.0);
        if checked.measurement.distance > bound {
            return Err(RejectReason::NormTooLarge {
                norm: checked.measurement.distance,
                bound,
            });
        }
        // Fold: scopes into a copy first, so a failure of either part leaves both untouched.
        let p = self.config.weighting.weight(n);
        let folded = ScopeFusion::new(checked.reported.len())
            .add(&checked.reported, p)
            .map_err(BackendError::from)
            .and_then(|()| open.acc.add(&self.scratch, p, Some(&checked.measurement)));
        if let Err(e) = folded {
            error!(client, error = %e, "fold refused a checked update");
            return Err(RejectReason::Malformed(format!("cannot fold: {e}")));
        }
        open.scopes
            .insert(client.to_owned(), (checked.reported.clone(), p));
        if let Some(sel) = open.selected.get_mut(client) {
            sel.answer = Answer::Accepted;
        }
        open.accepted.push(client.to_owned());
        open.step_norms.push(checked.measurement.distance);
        open.accepted_payload_bytes += update.params.payload_bytes() as u64;
        let m = &update.metrics;
        open.metrics.weight += p;
        open.metrics.loss += p * m.loss;
        open.metrics.accuracy += p * m.accuracy;
        open.metrics.kl += p * m.kl;
        Ok(())
    }

    fn close_if_done(&mut self, now: Millis, out: &mut Vec<Action>) {
        let Some(open) = &self.open else { return };
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
        let fold = if open.accepted.len() >= quorum {
            let rule = self.config.strategy.fusion_rule();
            let mut fusion = ScopeFusion::new(self.fold_shape.tensors.len());
            let fused = open
                .scopes
                .values()
                .try_for_each(|(scopes, p)| fusion.add(scopes, *p))
                .and_then(|()| fusion.finish(rule));
            match (open.acc.finish(), fused) {
                (Ok(params), Ok(targets))
                    if params.len() == self.fold_shape.len
                        && params.iter().all(|v| v.is_finite()) =>
                {
                    Some((params, targets))
                }
                (params, targets) => {
                    error!(
                        round = open.round,
                        params_ok = params.is_ok(),
                        targets = ?targets.err(),
                        "the fold of a round at quorum did not finish; counting the round as failed"
                    );
                    None
                }
            }
        } else {
            None
        };
        if let Some((params, targets)) = fold {
            self.global_norm = l2_norm(&params);
            self.global = params;
            self.targets = targets;
            self.next_round += 1;
            self.attempt = 0;
            self.history.rounds_closed += 1;
            let head = self.global_head();
            let evaluate = |data: &Option<LabelledFeatures>| {
                let data = data.as_ref()?;
                head.evaluate(data.x(), data.labels())
                    .inspect_err(|e| warn!(error = %e, "evaluation of the new global head failed"))
                    .ok()
            };
            eval = evaluate(&self.validation);
            test_eval = evaluate(&self.test);
        } else {
            closed_by = ClosedBy::Failed;
            self.attempt = self.attempt.saturating_add(1);
            self.history.rounds_failed += 1;
        }
        let tally = std::mem::take(&mut self.tally);
        let m = &open.metrics;
        let mean = |sum: f64| (m.weight > 0.0).then(|| sum / m.weight);
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
            train_loss: mean(m.loss),
            train_accuracy: mean(m.accuracy),
            mean_kl: mean(m.kl),
            step_norms: {
                let mut norms = open.step_norms.clone();
                norms.sort_by(f64::total_cmp);
                norms.last().map(|&max| (norms[(norms.len() - 1) / 2], max))
            },
            eval,
            test_eval,
            payload_bytes_in: tally.payload_bytes,
            wire_bytes_in: tally.wire_bytes,
            accepted_payload_bytes: open.accepted_payload_bytes,
            opened_at: open.opened_at,
            closed_at: now,
            duration_ms: now.since(open.opened_at),
        };
        info!(
            round = report.round,
            attempt = report.attempt,
            closed_by = ?report.closed_by,
            accepted = report.accepted.len(),
            selected = report.selected.len(),
            rejected = report.rejected_count,
            "round closed"
        );
        out.push(Action::RoundClosed(Box::new(report)));
        out.push(Action::Checkpoint(Box::new(self.checkpoint())));
    }

    fn try_open(&mut self, now: Millis, out: &mut Vec<Action>) {
        // Fewer clients than the quorum could only fail: wait for more.
        let needed = self.config.min_connected.max(self.config.quorum);
        if self.is_finished() || self.clients.len() < needed {
            return;
        }
        let connected = self.clients.len();
        let (target, select) = sample_sizes(&self.config.sampling, self.config.quorum, connected);
        // Sorted ids (the map's order) shuffled by an RNG derived from (seed, round, attempt):
        // the sample depends on nothing else, so a checkpoint needs no RNG state.
        let mut ids: Vec<&String> = self.clients.keys().collect();
        let mut rng = ChaCha8Rng::from_seed(derive_seed(
            b"sample",
            self.config.seed,
            self.next_round,
            self.attempt,
        ));
        ids.shuffle(&mut rng);
        let order: Vec<String> = ids.into_iter().take(select).cloned().collect();

        let deadline = now.plus(self.config.round_timeout_ms);
        let global = match EncodedParams::encode(&self.global, &self.layout, Encoding::F32) {
            Ok(g) => g,
            Err(e) => {
                error!(error = %e, "cannot encode the global head; no round opens");
                return;
            }
        };
        let acc = match self.backend.accumulator(
            &self.fold_shape,
            &self.global,
            self.config.aggregation,
            order.len(),
        ) {
            Ok(acc) => acc,
            Err(e) => {
                error!(error = %e, backend = self.backend.name(), "no accumulator; no round opens");
                return;
            }
        };
        let mut train = self
            .config
            .strategy
            .client_config(&self.base_train_config(), &self.targets);
        if let Some(wsa) = &mut train.wsa {
            wsa.selection = self.config.scope_selection;
            wsa.eps = self.eps;
        }
        train.seed = u64_seed(b"train", self.config.seed, self.next_round, self.attempt);
        let template = RoundTask {
            run_id: self.config.run_id,
            round: self.next_round,
            shape: self.shape.clone(),
            global,
            targets: self.targets.iter().copied().map(WireScope::from).collect(),
            train: TrainSpec::from(&train),
            encoding: Encoding::F32,
            deadline_ms: self.config.round_timeout_ms,
        };
        let mut tasks: BTreeMap<EncodingKey, Arc<RoundTask>> = BTreeMap::new();
        let mut selected = BTreeMap::new();
        for client in &order {
            let encoding = match self.clients.get(client) {
                Some(info) if can_encode(info.capabilities, self.config.update_encoding) => {
                    self.config.update_encoding
                }
                _ => Encoding::F32,
            };
            let task = tasks
                .entry(encoding as u8)
                .or_insert_with(|| {
                    Arc::new(RoundTask {
                        encoding,
                        ..template.clone()
                    })
                })
                .clone();
            selected.insert(
                client.clone(),
                Selected {
                    encoding,
                    answer: Answer::Pending,
                },
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
            opened_at: now,
            deadline,
            target,
            order,
            selected,
            tasks,
            acc,
            scopes: BTreeMap::new(),
            accepted: Vec::new(),
            accepted_payload_bytes: 0,
            metrics: MetricSums::default(),
            step_norms: Vec::new(),
        });
    }

    fn base_train_config(&self) -> TrainConfig {
        let t = &self.config.train;
        TrainConfig {
            epochs: t.epochs,
            batch_size: t.batch_size as usize,
            lr: t.lr,
            momentum: t.momentum,
            weight_decay: t.weight_decay,
            ..TrainConfig::default()
        }
    }
}

/// `(target, selected)` for `connected` clients: target = max(ceil(fraction·connected),
/// min_clients, quorum) capped at connected; selected = ceil(target·over_selection) capped
/// likewise. The target is never below the quorum, or reaching it would close a round that
/// cannot count.
pub fn sample_sizes(sampling: &Sampling, quorum: usize, connected: usize) -> (usize, usize) {
    let target = ((sampling.fraction * connected as f64).ceil() as usize)
        .max(sampling.min_clients)
        .max(quorum)
        .min(connected);
    let select = ((target as f64 * sampling.over_selection).ceil() as usize).min(connected);
    (target, select.max(target))
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

/// The update's contents, decoded and measured.
struct Checked {
    reported: Vec<Scope>,
    measurement: Measurement,
}

/// Encoding, counts, decoding into `scratch`, finiteness; then the measurement.
fn check_contents(
    update: &Update,
    encoding: Encoding,
    layout: &RowLayout,
    want_scopes: usize,
    scratch: &mut [f32],
    acc: &mut dyn Accumulator,
) -> Result<Checked, RejectReason> {
    if update.params.encoding != encoding {
        return Err(RejectReason::WrongEncoding);
    }
    let want_params = layout.len();
    if update.params.count as usize != want_params || update.scopes.len() != want_scopes {
        return Err(RejectReason::WrongShape(format!(
            "{} parameters and {} scopes, the head has {} and {}",
            update.params.count,
            update.scopes.len(),
            want_params,
            want_scopes
        )));
    }
    update
        .params
        .decode_into(layout, scratch)
        .map_err(|e| match e {
            protocol::EncodingError::Length { .. }
            | protocol::EncodingError::DataBytes { .. }
            | protocol::EncodingError::Scales { .. } => RejectReason::WrongShape(e.to_string()),
            other => RejectReason::Malformed(other.to_string()),
        })?;
    let measurement = acc.measure(scratch).map_err(|e| match e {
        BackendError::Core(wsa::Error::NonFinite { .. }) => RejectReason::NonFinite,
        other => RejectReason::Malformed(other.to_string()),
    })?;
    let m = &update.metrics;
    let scopes_finite = update
        .scopes
        .iter()
        .all(|s| s.mean.is_finite() && s.std.is_finite());
    if !(scopes_finite && m.loss.is_finite() && m.accuracy.is_finite() && m.kl.is_finite()) {
        return Err(RejectReason::NonFinite);
    }
    Ok(Checked {
        reported: update
            .scopes
            .iter()
            .map(|s| Scope {
                mean: s.mean,
                std: s.std,
            })
            .collect(),
        measurement,
    })
}

/// Every σ > 0, and each reported scope within `tol · σ_measured` of the measured one.
fn check_scopes(reported: &[Scope], measured: &[Scope], tol: f64) -> Result<(), RejectReason> {
    for (i, (r, m)) in reported.iter().zip(measured).enumerate() {
        if r.std <= 0.0 {
            return Err(RejectReason::BadScope(format!(
                "tensor {i}: σ = {} is not positive",
                r.std
            )));
        }
        let slack = tol * m.std;
        if (r.mean - m.mean).abs() > slack || (r.std - m.std).abs() > slack {
            return Err(RejectReason::BadScope(format!(
                "tensor {i}: reported (μ {:.6e}, σ {:.6e}), parameters give (μ {:.6e}, σ {:.6e})",
                r.mean, r.std, m.mean, m.std
            )));
        }
    }
    Ok(())
}

/// The kebab-case name of a reason, for counting.
pub fn reason_key(reason: &RejectReason) -> &'static str {
    match reason {
        RejectReason::UnsupportedVersion(_) => "unsupported-version",
        RejectReason::Malformed(_) => "malformed",
        RejectReason::UnexpectedMessage(_) => "unexpected-message",
        RejectReason::UnknownClient => "unknown-client",
        RejectReason::BadCredentials => "bad-credentials",
        RejectReason::ClientMismatch => "client-mismatch",
        RejectReason::WrongRun => "wrong-run",
        RejectReason::StaleRound { .. } => "stale-round",
        RejectReason::FutureRound { .. } => "future-round",
        RejectReason::NotSelected => "not-selected",
        RejectReason::Duplicate => "duplicate",
        RejectReason::WrongShape(_) => "wrong-shape",
        RejectReason::NonFinite => "non-finite",
        RejectReason::NormTooLarge { .. } => "norm-too-large",
        RejectReason::BadScope(_) => "bad-scope",
        RejectReason::BadSampleCount(_) => "bad-sample-count",
        RejectReason::DigestMismatch => "digest-mismatch",
        RejectReason::WrongEncoding => "wrong-encoding",
        RejectReason::RoundClosed => "round-closed",
        RejectReason::Busy => "busy",
    }
}
