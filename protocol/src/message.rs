//! The messages. Their postcard encoding is the wire format, pinned by golden-bytes tests:
//! variants and fields are only ever appended (a new field means a new protocol version, since
//! postcard is not self-describing), never reordered or removed.

use serde::{Deserialize, Serialize};

use crate::encoding::EncodedParams;

/// Every message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Client → aggregator, first message of a connection.
    Hello(Hello),
    /// Aggregator → client: the hello was accepted.
    Welcome(Welcome),
    /// Aggregator → client: train this round.
    RoundTask(RoundTask),
    /// Client → aggregator: the result of a round task.
    Update(Update),
    /// Aggregator → client: the answer to a hello or an update.
    Verdict(Verdict),
    /// Either side: the session ends.
    Goodbye(Goodbye),
    /// Aggregator → client, before the goodbye of a finished run: the final model.
    FinalModel(FinalModel),
    /// Either side, in a secure-aggregation round: one step of the masking protocol.
    SecAgg(SecAgg),
}

impl Message {
    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::RoundTask(_) => "round-task",
            Message::Update(_) => "update",
            Message::Verdict(_) => "verdict",
            Message::Goodbye(_) => "goodbye",
            Message::FinalModel(_) => "final-model",
            Message::SecAgg(m) => m.kind(),
        }
    }
}

/// How a client proves who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Auth {
    /// A per-client secret issued with the client's credentials.
    #[serde(with = "serde_bytes")]
    Token(Vec<u8>),
    /// The TLS client certificate already identifies the client.
    ClientCertificate,
}

/// The parameter encodings a client can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// Can send f16 parameters.
    pub f16: bool,
    /// Can send int8 parameters with per-row scales.
    pub int8: bool,
}

/// The conventional id of the `index`-th numbered client (`client-0000`, `client-0001`, …):
/// what `aggregator gen-certs --clients N` issues and the fleet simulator runs.
pub fn client_id(index: usize) -> String {
    format!("client-{index:04}")
}

/// The index of a conventional client id ([`client_id`]), if `id` is one.
pub fn client_index(id: &str) -> Option<usize> {
    let digits = id.strip_prefix("client-")?;
    let index: usize = digits.parse().ok()?;
    (client_id(index) == id).then_some(index)
}

/// The names `"0"`, `"1"`, … of `count` classes known only by index: what a run or a client
/// without class names uses, so both sides still match classes by name.
pub fn indexed_classes(count: usize) -> Vec<String> {
    (0..count).map(|i| i.to_string()).collect()
}

/// The first message of a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the client speaks (also in every frame header).
    pub protocol_version: u16,
    /// The client's name, as in its credentials.
    pub client_id: String,
    /// Its proof of identity.
    pub auth: Auth,
    /// What it can encode.
    pub capabilities: Capabilities,
    /// Rows of local training data it holds (the aggregator bounds what updates may claim).
    pub n_samples: u64,
    /// The head its last lossy-encoded task gave it, if it still holds it: the aggregator may
    /// send the next head as a change from it ([`RoundTask::base`]).
    pub held: Option<HeadRef>,
}

/// A head a client holds: the round of the task that gave it and its [`head_digest`]
/// (crate::head_digest), which is what names it (two attempts or two clients may hold
/// different heads for one round).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadRef {
    /// The round of the task that gave it.
    pub round: u64,
    /// sha256 of its values ([`crate::head_digest`]).
    pub digest: [u8; 32],
}

/// The aggregator's answer to an accepted hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The run the client joined.
    pub run_id: u64,
    /// The round the run is in (tasks may follow at any time).
    pub round: u64,
    /// The run's class names, by class index (the head's output width). A client maps its
    /// data to these indices by name and refuses to train if it holds a class not here.
    pub classes: Vec<String>,
    /// The fraction of its rows a client holds out of training, in `[0, 1)`, to report how
    /// each round's global head does on them ([`UpdateMetrics::held_out`]); 0: none.
    pub eval_fraction: f64,
    /// Failed attempts at `round` so far: with `round`, which sample the round asks
    /// ([`Welcome`] is all a client that checks in when asked, such as a simulator's worker,
    /// learns of where the run stands).
    pub attempt: u32,
}

/// The shape of the head being trained, as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadShape {
    /// Feature width.
    pub input: u32,
    /// Hidden widths, input side first; empty for a linear head.
    pub hidden: Vec<u32>,
    /// Classes.
    pub classes: u32,
}

/// A layer's weight scope, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WireScope {
    /// μ.
    pub mean: f64,
    /// σ.
    pub std: f64,
}

/// The WSA term a client adds to its loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WsaSpec {
    /// λ.
    pub lambda: f64,
    /// Whether biases carry scopes too.
    pub include_biases: bool,
    /// ε in `σ = sqrt(var + ε)`.
    pub eps: f64,
    /// A λ per scoped tensor in place of `lambda` (one per target); empty: `lambda` for all.
    pub tensor_lambdas: Vec<f64>,
}

/// Local training settings for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// Passes over the local data.
    pub epochs: u32,
    /// Rows per SGD step.
    pub batch_size: u32,
    /// Learning rate.
    pub lr: f64,
    /// Heavy-ball momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Seed of the shuffles (the client mixes in its own id).
    pub seed: u64,
    /// FedProx μ, if the strategy uses it.
    pub prox_mu: Option<f64>,
    /// The WSA term, if the strategy uses it (its targets are the task's `targets`).
    pub wsa: Option<WsaSpec>,
}

/// One round's work for one client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTask {
    /// The run.
    pub run_id: u64,
    /// The round this task belongs to.
    pub round: u64,
    /// The head's shape.
    pub shape: HeadShape,
    /// The global head's parameters (flat layout of `wsa::Head`), or with `base` their
    /// change from that head.
    pub global: EncodedParams,
    /// `Some`: `global` is a change from this head, which the client reported holding, and
    /// the task's head is the one [`EncodedParams::add_to`] makes of the two. `None`:
    /// `global` is the head.
    pub base: Option<HeadRef>,
    /// The target scope of each scoped tensor (the fused scopes of the last round).
    pub targets: Vec<WireScope>,
    /// How to train.
    pub train: TrainSpec,
    /// How to encode the update.
    pub encoding: crate::Encoding,
    /// Milliseconds the client has before the round closes without it.
    pub deadline_ms: u64,
}

/// What a client's local training measured.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct UpdateMetrics {
    /// Mean cross-entropy of the last local epoch.
    pub loss: f64,
    /// Training accuracy of the last local epoch.
    pub accuracy: f64,
    /// Σ KL to the targets at the final parameters (0 without WSA).
    pub kl: f64,
    /// SGD steps taken.
    pub steps: u64,
    /// Milliseconds spent training.
    pub train_ms: u64,
    /// The task's global head on the client's held-out rows, measured before training (when
    /// the run asks clients to hold rows out and this one has any).
    pub held_out: Option<HeldOutEval>,
}

/// How a round's global head did on one client's held-out rows: federated evaluation, which
/// the aggregator can only report, not check.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutEval {
    /// Rows evaluated.
    pub samples: u64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified right.
    pub accuracy: f64,
}

impl HeldOutEval {
    /// Whether the values are possible: at least one row, a non-negative loss up to
    /// [`HeldOutEval::MAX_LOSS`] and an accuracy in `[0, 1]`.
    pub fn is_plausible(&self) -> bool {
        self.samples > 0
            && (0.0..=Self::MAX_LOSS).contains(&self.loss)
            && (0.0..=1.0).contains(&self.accuracy)
    }

    /// The largest mean cross-entropy accepted: a head that puts e^-1000 on the right class
    /// is already as wrong as a head gets, and the bound keeps one report from swamping the
    /// round's mean.
    pub const MAX_LOSS: f64 = 1e3;
}

/// A client's trained head for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The run.
    pub run_id: u64,
    /// The round it answers.
    pub round: u64,
    /// The sender, as in its hello.
    pub client_id: String,
    /// Rows of local data it trained on (its weight under sample-count weighting).
    pub n_samples: u64,
    /// The trained parameters.
    pub params: EncodedParams,
    /// The trained head's scopes, one per scoped tensor.
    pub scopes: Vec<WireScope>,
    /// Loss, accuracy and the like.
    pub metrics: UpdateMetrics,
    /// sha256 over the fields above ([`Update::compute_digest`]): binds the parameters to
    /// this run, round and client, so a corrupted or re-addressed update is caught.
    pub digest: [u8; 32],
}

/// What a verdict answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject {
    /// The hello of this connection.
    Hello,
    /// The update for this round.
    Update {
        /// The round of the update.
        round: u64,
    },
}

/// Why the aggregator refused a hello or an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    /// The frame's protocol version is not one the aggregator speaks.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The bytes did not decode as a message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message was not the one expected at this point of the session.
    #[error("unexpected message {0}")]
    UnexpectedMessage(String),
    /// No such client is registered.
    #[error("unknown client")]
    UnknownClient,
    /// The client's credentials did not check out.
    #[error("bad credentials")]
    BadCredentials,
    /// The client id in the update is not the authenticated one.
    #[error("client id does not match the session")]
    ClientMismatch,
    /// The update is for another run.
    #[error("wrong run id")]
    WrongRun,
    /// The update answers a round that has closed.
    #[error("stale round {got} (current {current})")]
    StaleRound {
        /// Round in the update.
        got: u64,
        /// The aggregator's round.
        current: u64,
    },
    /// The update answers a round that has not started.
    #[error("future round {got} (current {current})")]
    FutureRound {
        /// Round in the update.
        got: u64,
        /// The aggregator's round.
        current: u64,
    },
    /// The client was not selected for this round.
    #[error("not selected for this round")]
    NotSelected,
    /// This client's update for this round was already accepted.
    #[error("duplicate update")]
    Duplicate,
    /// The parameters or scopes do not have the head's shape.
    #[error("wrong shape: {0}")]
    WrongShape(String),
    /// A parameter, scale, scope or metric is NaN or infinite.
    #[error("non-finite values")]
    NonFinite,
    /// The parameters' distance from the global head exceeds the bound.
    #[error("update norm {norm:.3e} exceeds the bound {bound:.3e}")]
    NormTooLarge {
        /// ‖w − w_global‖.
        norm: f64,
        /// The configured bound.
        bound: f64,
    },
    /// A scope with σ ≤ 0, or one that disagrees with the parameters.
    #[error("bad scope: {0}")]
    BadScope(String),
    /// n_samples is 0 or above the bound.
    #[error("bad sample count {0}")]
    BadSampleCount(u64),
    /// The digest does not match the contents.
    #[error("digest mismatch")]
    DigestMismatch,
    /// The encoding is not the one the task asked for.
    #[error("wrong encoding")]
    WrongEncoding,
    /// The round closed before the update arrived.
    #[error("round closed")]
    RoundClosed,
    /// The aggregator is at its connection limit.
    #[error("server busy")]
    Busy,
}

impl RejectReason {
    /// The reason's kebab-case name, for counting and logs (the variant without its data).
    pub fn key(&self) -> &'static str {
        match self {
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
}

/// Accepted or rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Taken (an update is then counted exactly once).
    Accepted,
    /// Refused, with why.
    Rejected(RejectReason),
}

/// The aggregator's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The run.
    pub run_id: u64,
    /// What it answers.
    pub subject: Subject,
    /// The answer.
    pub outcome: Outcome,
}

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GoodbyeReason {
    /// All rounds are done.
    RunFinished,
    /// The sender is shutting down.
    ShuttingDown,
    /// The hello was rejected.
    Rejected,
}

/// The last message of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why.
    pub reason: GoodbyeReason,
}

/// The run's final head with what using it needs: what `aggregator serve` writes to its model
/// folder (`wsa::saved`), sent to each client before the goodbye of a finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalModel {
    /// The run.
    pub run_id: u64,
    /// Rounds the head was trained for.
    pub rounds: u64,
    /// The strategy's label.
    pub strategy: String,
    /// The head's shape.
    pub shape: HeadShape,
    /// Its parameters (flat layout of `wsa::Head`, f32).
    pub params: EncodedParams,
    /// Class names, by output index.
    pub classes: Vec<String>,
    /// sha256 (hex) of each backbone file that produces the head's features.
    pub backbone_sha256: Vec<String>,
    /// The backbone's input side.
    pub side: u32,
    /// The preprocessing recipe's id (`wsa::saved::Preprocessing`).
    pub preprocessing: String,
}

/// The most neighbours a client has in a secure-aggregation round: the secret shares are taken
/// over GF(256), whose nonzero points number 255, and one is the dealer's own.
pub const MAX_SECAGG_NEIGHBOURS: u32 = 254;

/// One step of a secure-aggregation round (SecAgg+: Bonawitz et al. 2017, with the sparse
/// neighbour graph of Bell et al. 2020; the `secagg` crate runs both sides). Every step names
/// its run and round, so a message from another round is refused, not misapplied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecAgg {
    /// Aggregator → client: the round's parameters and the client's place in it.
    Setup(SecAggSetup),
    /// Client → aggregator: its two public keys and a commitment to its self-mask seed.
    Advertise(SecAggAdvertise),
    /// Aggregator → client: the public keys of its neighbours that advertised.
    Roster(SecAggRoster),
    /// Client → aggregator: its secret shares, sealed to each neighbour.
    Shares(SecAggShares),
    /// Aggregator → client: the sealed shares its neighbours addressed to it.
    Inbox(SecAggInbox),
    /// Client → aggregator: its masked input.
    Masked(SecAggMasked),
    /// Aggregator → client: which neighbours survived and which dropped.
    Unmask(SecAggUnmask),
    /// Client → aggregator: the shares that remove the survivors' and the dropped's masks.
    Reveal(SecAggReveal),
}

impl SecAgg {
    /// The step's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            SecAgg::Setup(_) => "secagg-setup",
            SecAgg::Advertise(_) => "secagg-advertise",
            SecAgg::Roster(_) => "secagg-roster",
            SecAgg::Shares(_) => "secagg-shares",
            SecAgg::Inbox(_) => "secagg-inbox",
            SecAgg::Masked(_) => "secagg-masked",
            SecAgg::Unmask(_) => "secagg-unmask",
            SecAgg::Reveal(_) => "secagg-reveal",
        }
    }

    /// The run and round the step belongs to.
    pub fn run_round(&self) -> (u64, u64) {
        match self {
            SecAgg::Setup(m) => (m.run_id, m.round),
            SecAgg::Advertise(m) => (m.run_id, m.round),
            SecAgg::Roster(m) => (m.run_id, m.round),
            SecAgg::Shares(m) => (m.run_id, m.round),
            SecAgg::Inbox(m) => (m.run_id, m.round),
            SecAgg::Masked(m) => (m.run_id, m.round),
            SecAgg::Unmask(m) => (m.run_id, m.round),
            SecAgg::Reveal(m) => (m.run_id, m.round),
        }
    }
}

/// A secure-aggregation round's public parameters, with the receiving client's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// The receiving client's index in the round, in `0..participants`.
    pub index: u32,
    /// Clients asked to take part.
    pub participants: u32,
    /// Neighbours of each client in the masking graph (k).
    pub neighbours: u32,
    /// Shares needed to rebuild a client's secret (t, a majority of k).
    pub threshold: u32,
    /// Seed of the masking graph's layout.
    pub graph_seed: [u8; 32],
    /// Ring elements in each masked input.
    pub vector_len: u32,
    /// Inputs are clipped to `[-clip, clip]` and coded in fixed point for a sum of
    /// `participants` of them (`secagg::ring`).
    pub clip: f64,
    /// Under client-level DP: the client clips its step and adds its share of the noise
    /// before masking, and sends no scope statistics.
    pub local_noise: Option<LocalNoise>,
}

/// A client's share of a round's DP noise under secure aggregation: the aggregator never sees
/// an un-noised sum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocalNoise {
    /// The step `θ − g` is scaled down to at most this L2 norm.
    pub clip: f64,
    /// The std of the Gaussian noise the client adds to each step coordinate.
    pub std: f64,
}

/// A client's public keys for one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggAdvertise {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// X25519 key that seals shares between neighbours.
    pub encryption_key: [u8; 32],
    /// X25519 key whose agreements seed the pairwise masks.
    pub masking_key: [u8; 32],
    /// sha256 commitment to the self-mask seed: lets the aggregator check a rebuilt seed.
    pub self_mask_commitment: [u8; 32],
}

/// A neighbour's public keys, as the roster forwards them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggPeer {
    /// The neighbour's index in the round.
    pub index: u32,
    /// Its key for sealing shares.
    pub encryption_key: [u8; 32],
    /// Its key for the pairwise masks.
    pub masking_key: [u8; 32],
}

/// The keys of a client's neighbours that advertised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggRoster {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// One entry per neighbour that advertised.
    pub peers: Vec<SecAggPeer>,
}

/// A share pair sealed between two neighbours; the aggregator forwards it unread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedShares {
    /// The other end: the recipient in [`SecAggShares`], the sender in [`SecAggInbox`].
    pub peer: u32,
    /// ChaCha20-Poly1305 over the two shares.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// A client's shares, one sealed pair per roster neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggShares {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// One per neighbour in the client's roster.
    pub sealed: Vec<SealedShares>,
}

/// The sealed shares a client's neighbours addressed to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggInbox {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// One per neighbour whose shares were accepted.
    pub sealed: Vec<SealedShares>,
}

/// A client's masked input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggMasked {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// The masked ring elements, u32 little-endian (random-looking words would cost five
    /// bytes each as varints).
    #[serde(with = "serde_bytes")]
    pub masked: Vec<u8>,
}

/// Which of a client's neighbours sent masked input and which dropped after sharing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggUnmask {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// Neighbours whose masked input arrived: reveal their self-mask shares.
    pub survivors: Vec<u32>,
    /// Neighbours that shared keys but sent no input: reveal their masking-key shares.
    pub dropped: Vec<u32>,
}

/// One revealed share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// The client whose secret this is a share of.
    pub owner: u32,
    /// The share: its x coordinate, then one byte per secret byte.
    #[serde(with = "serde_bytes")]
    pub share: Vec<u8>,
}

/// A client's answer to [`SecAggUnmask`]: never both kinds of share for one neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggReveal {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// Self-mask seed shares of surviving neighbours.
    pub self_mask_shares: Vec<RevealedShare>,
    /// Masking-key shares of dropped neighbours.
    pub key_shares: Vec<RevealedShare>,
}
