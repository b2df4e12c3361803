//! What decides what a run computes: the [`EngineConfig`] (loaded from the run's TOML), its
//! checks, and what the engine refuses at construction or resumption ([`EngineError`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wsa::{HeadSpec, Init, ScopeSelection, Sgd, Weighting};

use crate::backend::BackendError;
use crate::privacy::Privacy;
use crate::strategy::{Aggregation, Strategy, TargetFusion, TargetPolicy, TensorLambdas};
use protocol::Encoding;

/// Which clients a round asks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// Whom a round samples from: the clients connected now, or every registered one.
    pub population: Population,
    /// Fraction of the population a round wants updates from, in `(0, 1]`.
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
            population: Population::Connected,
            fraction: 1.0,
            min_clients: 1,
            over_selection: 1.0,
        }
    }
}

/// Whom a round samples from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Population {
    /// The clients connected when the round opens: devices that hold a connection while they
    /// are available.
    #[default]
    Connected,
    /// Every client in the registry, connected or not: a sampled client gets its task when it
    /// connects, until the round's deadline. Devices check in only when asked (a push, a
    /// schedule, or a simulator's worker that acts as the sampled clients), so a fleet of
    /// millions needs no connection per device. The server hands the engine the registry
    /// when the run starts ([`crate::engine::Engine::set_population`]).
    Registered,
}

/// The positions, in the sorted population of `population` ids, of the clients round `round`
/// (attempt `attempt`) of a run seeded `seed` asks, `select` of them, in the order they are
/// asked. It depends on nothing else, so a checkpoint needs no RNG state, and a simulator's
/// workers compute the same sample as the engine.
pub fn round_sample(
    seed: u64,
    round: u64,
    attempt: u32,
    population: usize,
    select: usize,
) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut positions: Vec<usize> = (0..population).collect();
    let mut rng =
        rand_chacha::ChaCha8Rng::from_seed(super::derive_seed(b"sample", seed, round, attempt));
    // A full shuffle, not a partial one: its first `select` are the sample every earlier
    // build drew, so runs and checkpoints keep their meaning.
    positions.shuffle(&mut rng);
    positions.truncate(select);
    positions
}

/// `(target, selected)` for a population of `connected` clients (those connected, or the
/// registry's): target = max(ceil(fraction·connected), min_clients, quorum) capped at the
/// population; selected = ceil(target·over_selection) capped likewise. The target is never below the quorum, or reaching it would close a round that
/// cannot count.
pub fn sample_sizes(sampling: &Sampling, quorum: usize, connected: usize) -> (usize, usize) {
    let target = ((sampling.fraction * connected as f64).ceil() as usize)
        .max(sampling.min_clients)
        .max(quorum)
        .min(connected);
    let select = ((target as f64 * sampling.over_selection).ceil() as usize).min(connected);
    (target, select.max(target))
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
    /// Each scoped tensor's measured σ must lie within this factor of the global head's
    /// (≥ 1): `σ ≤ r · max(σ_global, s)` and `σ ≥ min(σ_global, s) / r`, with `s` the initial
    /// std of the tensor's layer's weights (zero-initialised biases start far below it). A
    /// round of honest training moves σ by a few percent; a tensor collapsed to its mean or
    /// blown up is refused however small its step.
    pub max_scope_ratio: f64,
}

impl Default for UpdateBounds {
    fn default() -> Self {
        Self {
            max_n_samples: 10_000_000,
            norm_ratio: 10.0,
            scope_tolerance: 0.05,
            max_scope_ratio: 4.0,
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
    /// The run's class names, by class index: as many as the head's outputs, unique. Sent
    /// to every client in its welcome; clients map their data to these indices by name.
    #[serde(default)]
    pub classes: Vec<String>,
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
    /// Local training settings; the strategy adds its term and the engine a per-round seed.
    #[serde(default)]
    pub train: Sgd,
    /// The fraction of its rows each client holds out of training to report how every
    /// round's global head does on its own data (federated evaluation); 0: none, at most 0.5.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Which tensors carry scopes. Biases only with WSA: the wire carries the selection only
    /// inside the WSA term, so other strategies' clients scope the weights alone.
    #[serde(default)]
    pub scope_selection: ScopeSelection,
    /// How clients are weighted in the average and the fusion: by the sample counts they
    /// claim, or equally. Either way capped by `max_share`.
    #[serde(default)]
    pub weighting: Weighting,
    /// The largest share of a round's weight one accepted client may have (it is at least
    /// `1/accepted`): a client claiming millions of samples counts for no more.
    #[serde(default = "default_max_share")]
    pub max_share: f64,
    /// A claim counts for at most this many times the median claim (in the clients' hellos)
    /// of the round's selection: a group of liars below half the round weighs no more than
    /// that many honest clients each, where the share cap alone would let four of them take
    /// the whole round.
    #[serde(default = "default_max_claim_ratio")]
    pub max_claim_ratio: f64,
    /// How far one round may move the WSA targets, and their floors.
    #[serde(default)]
    pub targets: TargetPolicy,
    /// The encoding clients are asked to send updates in (f32 for a client that cannot).
    #[serde(default)]
    pub update_encoding: Encoding,
    /// The encoding round tasks carry the global head in. Not f32, each client starts from
    /// what it decodes, its step is measured from that and applied to the exact global head
    /// (the rule is in the engine's `downlink` module). Left out of the config hash at its f32
    /// default.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub downlink_encoding: Encoding,
    /// With a lossy downlink, a client that reports a head an earlier task gave it gets the
    /// change from that head (in `downlink_encoding`) instead of the head: the same bytes,
    /// a smaller rounding. Left out of the config hash at its default (on).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub downlink_deltas: bool,
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
    /// The backbone the clients run, recorded in the final model so that it is used only
    /// with the features it was trained on.
    #[serde(default)]
    pub backbone: BackboneRef,
    /// Client-level differential privacy: clip and noise every round's updates and scopes
    /// and account for the privacy spent. Left out of the config hash when off, so runs
    /// without it resume from older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Privacy>,
    /// Secure aggregation: the aggregator sees only each round's sum of updates and scope
    /// statistics (docs/privacy.md), and gives up the per-update checks. Left out of the
    /// config hash when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<super::SecureAggregation>,
}

/// Which backbone produces a run's features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackboneRef {
    /// sha256 (hex) of each backbone file that produces them (an ONNX and its NNEF
    /// conversion); empty: not named, and the model's users cannot check theirs.
    pub sha256: Vec<String>,
    /// The input side the clients run it at.
    pub side: u32,
}

impl Default for BackboneRef {
    fn default() -> Self {
        Self {
            sha256: Vec::new(),
            side: 96,
        }
    }
}

impl EngineConfig {
    /// A configuration that runs out of the box: 10 rounds, all connected clients every round,
    /// quorum 1, a minute per round, f32 updates, classes named by index (`"0"`, `"1"`, …).
    pub fn new(run_id: u64, head: HeadSpec, strategy: Strategy) -> Self {
        Self {
            run_id,
            seed: 0,
            rounds: 10,
            classes: protocol::indexed_classes(head.classes),
            strategy,
            aggregation: Aggregation::Mean,
            head,
            init: Init::default(),
            train: Sgd::default(),
            eval_fraction: 0.0,
            scope_selection: ScopeSelection::default(),
            weighting: Weighting::default(),
            max_share: default_max_share(),
            max_claim_ratio: default_max_claim_ratio(),
            targets: TargetPolicy::default(),
            update_encoding: Encoding::F32,
            downlink_encoding: Encoding::F32,
            downlink_deltas: true,
            sampling: Sampling::default(),
            backbone: BackboneRef::default(),
            quorum: 1,
            round_timeout_ms: 60_000,
            min_connected: 1,
            bounds: UpdateBounds::default(),
            privacy: None,
            secure: None,
        }
    }

    /// The strategy's label, with the aggregation rule's unless it is the plain mean
    /// (`wsa:10:mean-std`, `fedavg+median`).
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
        if let Err(e) = validate_classes(&self.classes, self.head.classes) {
            return bad(format!("classes: {e}"));
        }
        if let Some(bad_hash) = self
            .backbone
            .sha256
            .iter()
            .find(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return bad(format!(
                "backbone.sha256: {bad_hash:?} is not 64 hex digits"
            ));
        }
        if self.backbone.side == 0 {
            return bad("backbone.side must be at least 1".into());
        }
        if u32::try_from(self.head.param_count()).is_err() {
            return bad(format!(
                "head has {} parameters, more than the wire's u32 count",
                self.head.param_count()
            ));
        }
        if let Err(wsa::Error::InvalidConfig(e)) = self.train.validate() {
            return bad(format!("train.{e}"));
        }
        if !(0.0..=MAX_EVAL_FRACTION).contains(&self.eval_fraction) {
            return bad(format!(
                "eval_fraction must be in [0, {MAX_EVAL_FRACTION}], got {}",
                self.eval_fraction
            ));
        }
        if let Err(e) = self.strategy.validate(self.scope_selection) {
            return bad(e);
        }
        if let Strategy::Wsa {
            tensors: TensorLambdas::Only { index },
            ..
        } = self.strategy
        {
            let scoped = self.head.scoped_tensor_count(self.scope_selection);
            if index as usize >= scoped {
                return bad(format!(
                    "strategy {}: the head has {scoped} scoped tensors, numbered from 0",
                    self.strategy
                ));
            }
        }
        if let Err(e) = self.aggregation.validate() {
            return bad(format!("aggregation: {e}"));
        }
        if !(self.max_share > 0.0 && self.max_share <= 1.0) {
            return bad(format!(
                "max_share must be in (0, 1], got {}",
                self.max_share
            ));
        }
        if !(self.max_claim_ratio.is_finite() && self.max_claim_ratio >= 1.0) {
            return bad(format!(
                "max_claim_ratio must be finite and >= 1, got {}",
                self.max_claim_ratio
            ));
        }
        if let Err(e) = self.targets.validate() {
            return bad(e);
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
        if self.round_timeout_ms == 0 || self.round_timeout_ms > MAX_ROUND_TIMEOUT_MS {
            return bad(format!(
                "round_timeout_ms must be between 1 and {MAX_ROUND_TIMEOUT_MS} (a week), got {}",
                self.round_timeout_ms
            ));
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
        if !(b.max_scope_ratio.is_finite() && b.max_scope_ratio >= 1.0) {
            return bad(format!(
                "bounds.max_scope_ratio must be finite and >= 1, got {}",
                b.max_scope_ratio
            ));
        }
        if let Some(privacy) = &self.privacy {
            if let Err(e) = privacy.check() {
                return bad(e);
            }
            // The Gaussian mechanism bounds what one client changes in a *mean*: a robust
            // rule's output is not a sum, and sample-count weights would let one client's
            // claim scale its contribution past the clip.
            if self.aggregation != Aggregation::Mean {
                return bad(format!(
                    "privacy needs aggregation = mean (it clips and noises the mean itself), \
                     not {}",
                    self.aggregation
                ));
            }
            // The clients' scopes can only be fused through the noised sums, which give their
            // mean: a median or trimmed mean of them has no bounded sensitivity.
            if matches!(
                self.targets.fusion,
                TargetFusion::Median | TargetFusion::TrimmedMean { .. }
            ) {
                return bad(format!(
                    "privacy: targets.fusion {} is not private; use \"global-head\" (the noised \
                     head's own scopes, no extra noise; docs/privacy.md) or \"follow-rule\" \
                     (the noised mean of the clients' scopes)",
                    self.targets.fusion
                ));
            }
            if self.weighting != Weighting::Uniform {
                return bad(
                    "privacy needs weighting = \"uniform\": a client's sample count \
                            must not scale its clipped contribution"
                        .into(),
                );
            }
        }
        if let Some(secure) = &self.secure {
            secure.check().map_err(EngineError::InvalidConfig)?;
            // What needs one update at a time cannot run on a sum.
            if self.aggregation != Aggregation::Mean {
                return bad(format!(
                    "secure aggregation sums the updates: aggregation = mean, not {}",
                    self.aggregation
                ));
            }
            if matches!(
                self.targets.fusion,
                TargetFusion::Median | TargetFusion::TrimmedMean { .. }
            ) {
                return bad(format!(
                    "secure aggregation fuses scopes from their sums: targets.fusion \
                     \"follow-rule\", \"global-head\" or \"fixed\", not {}",
                    self.targets.fusion
                ));
            }
            if self.weighting != Weighting::Uniform {
                return bad(
                    "secure aggregation needs weighting = \"uniform\": a sample count the \
                     aggregator cannot check would scale an input it cannot see"
                        .into(),
                );
            }
            // Under both, each client clips its own step and adds its share of the noise:
            // the aggregator can neither count clipped steps nor see scopes to clip.
            if let Some(privacy) = &self.privacy {
                if !matches!(privacy.clip, crate::privacy::Clip::Fixed { .. }) {
                    return bad(
                        "secure aggregation with [privacy] needs a fixed clip: adapting it \
                         needs a count of clipped steps the aggregator cannot see"
                            .into(),
                    );
                }
                if self.targets.fusion.uses_client_scopes() {
                    return bad(format!(
                        "secure aggregation with [privacy]: targets.fusion \"global-head\" or \
                         \"fixed\" (clients send no scopes under local noise), not {}",
                        self.targets.fusion
                    ));
                }
            }
            if self.quorum < 3 {
                return bad(format!(
                    "secure aggregation needs quorum >= 3 (with fewer, one input is the sum \
                     less the others), got {}",
                    self.quorum
                ));
            }
            if self.sampling.population == Population::Registered {
                return bad(
                    "secure aggregation keys a round's sample when it opens, so every \
                     sampled client must be connected then: sampling.population = \"connected\""
                        .into(),
                );
            }
        }
        Ok(())
    }
}

fn is_f32(e: &Encoding) -> bool {
    *e == Encoding::F32
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A run's class list: one unique, non-empty name per head output, within what the wire's
/// default limits let a welcome carry.
fn validate_classes(classes: &[String], head_outputs: usize) -> Result<(), String> {
    if classes.len() != head_outputs {
        return Err(format!(
            "the run names {} classes but the head has {head_outputs} outputs; list one name \
             per output (classes = [...] or classes_file)",
            classes.len()
        ));
    }
    let wire = protocol::Limits::default();
    if classes.len() > wire.max_classes as usize {
        return Err(format!(
            "{} classes, more than the {} a welcome may carry",
            classes.len(),
            wire.max_classes
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (index, name) in classes.iter().enumerate() {
        if name.trim().is_empty() || name.trim() != name {
            return Err(format!(
                "class {index} is {name:?}: names must be non-empty, without surrounding spaces"
            ));
        }
        if name.len() > wire.max_class_name_bytes as usize {
            return Err(format!(
                "class {index}'s name has {} bytes, more than {}",
                name.len(),
                wire.max_class_name_bytes
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(format!("class {name:?} is listed twice"));
        }
    }
    Ok(())
}

/// The most of its rows a client may be asked to hold out of training: beyond half, the
/// evaluation would cost the run more than it tells.
pub const MAX_EVAL_FRACTION: f64 = 0.5;

/// The longest a round may stay open: a week.
pub const MAX_ROUND_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// A quarter: with four or more clients accepted, no one of them decides a round.
fn default_max_share() -> f64 {
    0.25
}

/// Twice the median claim: honest clients with up to twice the typical data keep their
/// weight.
fn default_max_claim_ratio() -> f64 {
    2.0
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
