//! What a fleet run does: the data, the fleet, the strategies and rules compared, the
//! attackers; written to the run folder as `config.json`, read back by client processes.

use std::path::PathBuf;

use aggregator::backends::BackendChoice;
use aggregator_core::engine::SecureAggregation;
use aggregator_core::engine::{EngineConfig, Population, Sampling, UpdateBounds};
use aggregator_core::privacy::Privacy;
use aggregator_core::strategy::{Aggregation, Strategy, TargetPolicy};
use edge_client::Adversary;
use protocol::Encoding;
use serde::{Deserialize, Serialize};
use wsa::{HeadSpec, Sgd, Weighting};

use crate::partition::Scheme;

/// Where the features come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum DataSource {
    /// Labelled images through the MobileNetV2 backbone (features cached on disk), in any
    /// format `datasets::read_set` reads; classes named by the data.
    #[serde(alias = "fashion-mnist")]
    Images {
        /// `fashion-mnist`, `mnist`, `cifar10`, `cifar100` or `image-folder`.
        #[serde(default = "default_format")]
        format: String,
        /// The data's folder.
        data: PathBuf,
        /// The features ONNX.
        model: PathBuf,
        /// Backbone input side.
        side: usize,
        /// Feature caches.
        cache_dir: PathBuf,
        /// Use the first N training images (0: all).
        train_limit: usize,
        /// Use the first N test images (0: all).
        test_limit: usize,
        /// Threads for extraction.
        threads: usize,
        /// For an image folder without `train/` and `test/`: the share of each class's
        /// images (every k-th by file name) held out as the test set.
        #[serde(default = "default_test_fraction")]
        test_fraction: f64,
    },
    /// The built-in synthetic problem (no model needed): for tests and quick checks.
    Synthetic {
        /// Feature width.
        dim: usize,
        /// Classes.
        classes: usize,
        /// Training rows.
        train: usize,
        /// Test rows.
        test: usize,
    },
}

fn default_format() -> String {
    "fashion-mnist".into()
}

fn default_test_fraction() -> f64 {
    0.2
}

/// The attacking part of a fleet: the first `⌊fraction · clients⌋` clients (the partition is
/// random, so which ones does not matter) corrupt every update with `attack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Byzantine {
    /// The share of clients that attack, in [0, 1).
    pub fraction: f64,
    /// What they do.
    pub attack: Adversary,
}

impl Byzantine {
    /// How many of `clients` attack.
    pub fn count(&self, clients: usize) -> usize {
        (self.fraction * clients as f64).floor() as usize
    }
}

/// A fleet of virtual clients: registered (credentials derived from one key, data a recipe or
/// a partition), but alive only while a worker acts as one for the round that sampled it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    /// Worker processes (at most `per_round`); each acts as its share of every round's sample.
    pub workers: usize,
    /// How long a worker's client waits for its task after checking in before the worker
    /// asks again where the run stands (ms).
    #[serde(default = "default_patience_ms")]
    pub patience_ms: u64,
    /// Start the workers here (false: the user starts `wsa-fl worker` processes, on this
    /// machine or others, and the run waits for them).
    #[serde(default = "default_spawn_workers")]
    pub spawn: bool,
    /// Where the aggregator listens (default: a free loopback port); workers on other
    /// machines need an address they can reach.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// A name the aggregator's certificate also carries, for workers that reach it by that
    /// name (`localhost` and `127.0.0.1` are always there).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_patience_ms() -> u64 {
    10_000
}

fn default_spawn_workers() -> bool {
    true
}

fn default_downlink_deltas() -> bool {
    true
}

/// Everything a fleet run does; written to the run folder as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetConfig {
    /// The data.
    pub data: DataSource,
    /// Simulated clients.
    pub clients: usize,
    /// Clients asked per round.
    pub per_round: usize,
    /// How the training set is split.
    pub partition: Scheme,
    /// Rounds per strategy.
    pub rounds: u64,
    /// Strategies compared on the same partition and seed.
    pub strategies: Vec<Strategy>,
    /// Aggregation rules: every strategy runs with each (empty: the plain mean).
    #[serde(default)]
    pub aggregations: Vec<Aggregation>,
    /// How targets are formed and whether the merged head is aligned to them.
    #[serde(default)]
    pub targets: TargetPolicy,
    /// Where the aggregator folds updates.
    #[serde(default)]
    pub backend: BackendChoice,
    /// Accepted updates a round needs (default: `per_round`, every asked client).
    #[serde(default)]
    pub quorum: Option<usize>,
    /// The aggregator's bound on a tensor's σ change in one update (`bounds.max_scope_ratio`).
    #[serde(default = "default_max_scope_ratio")]
    pub max_scope_ratio: f64,
    /// Every endpoint's UDP socket buffers in bytes, 0 for the OS default; `None`: the
    /// shipped default ([`protocol::quic::QuicLimits::udp_buffer`]).
    #[serde(default)]
    pub udp_buffer: Option<usize>,
    /// Clients that attack (robustness experiments); none by default.
    #[serde(default)]
    pub byzantine: Option<Byzantine>,
    /// Client-level differential privacy for every federated run (the run config's
    /// `[privacy]`); none by default.
    #[serde(default)]
    pub privacy: Option<Privacy>,
    /// How clients are weighted in every federated run (default: by sample count; uniform
    /// under DP or secure aggregation, which cannot check a count).
    #[serde(default)]
    pub weighting: Option<Weighting>,
    /// Secure aggregation for every federated run (the run config's `[secure]`); none by
    /// default.
    #[serde(default)]
    pub secure: Option<SecureAggregation>,
    /// Also train centrally on the union of the client data.
    pub centralized: bool,
    /// One full comparison per seed (partition, initial head, sampling, shuffles).
    pub seeds: Vec<u64>,
    /// Hidden widths of the MLP head (empty: linear).
    pub hidden: Vec<usize>,
    /// Local training.
    pub train: Sgd,
    /// How clients encode updates.
    pub update_encoding: Encoding,
    /// How round tasks carry the global head (f32 by default).
    #[serde(default)]
    pub downlink_encoding: Encoding,
    /// With a lossy downlink, whether clients holding their last task's head get the change
    /// from it.
    #[serde(default = "default_downlink_deltas")]
    pub downlink_deltas: bool,
    /// For "rounds to reach": the test accuracy a strategy must reach.
    pub target_accuracy: f64,
    /// Fraction of the training set held out (per seed, before partitioning) as the
    /// validation split that choices like λ are made on; 0: none.
    #[serde(default)]
    pub validation_fraction: f64,
    /// The share of its rows each client holds out of training to measure every round's
    /// global head on (federated evaluation, `federated_accuracy` in `rounds.csv`); 0: none.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Run the clients in this many separate processes (0: in this process). The aggregator
    /// then has this process to itself, and its memory can be measured apart.
    #[serde(default)]
    pub client_processes: usize,
    /// Virtual clients: the aggregator samples from the registry of all `clients`, and a pool
    /// of worker processes acts as each round's sampled clients (none: every client stays
    /// connected for the run).
    #[serde(default)]
    pub pool: Option<Pool>,
    /// The run folder.
    pub out: PathBuf,
}

impl FleetConfig {
    /// `deployment` with this run's transport settings.
    pub fn transport(&self, deployment: crate::fleet::Deployment) -> crate::fleet::Deployment {
        match self.udp_buffer {
            Some(bytes) => deployment.with_udp_buffer(bytes),
            None => deployment,
        }
    }

    /// Reads a run's `config.json` (what `wsa-fl` writes into every run folder).
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The engine configuration of one run: `strategy` under `aggregation` on `seed`'s data.
fn default_max_scope_ratio() -> f64 {
    UpdateBounds::default().max_scope_ratio
}

pub(crate) fn engine_config(
    cfg: &FleetConfig,
    head: &HeadSpec,
    strategy: Strategy,
    aggregation: Aggregation,
    seed: u64,
) -> EngineConfig {
    let mut c = EngineConfig::new(seed.wrapping_add(1), head.clone(), strategy);
    c.aggregation = aggregation;
    c.targets = cfg.targets;
    c.bounds.max_scope_ratio = cfg.max_scope_ratio;
    if let Some(weighting) = cfg.weighting {
        c.weighting = weighting;
    }
    if cfg.privacy.is_some() {
        // DP clips and noises the mean, and a claimed sample count must not scale a client.
        c.privacy = cfg.privacy;
        c.weighting = Weighting::Uniform;
    }
    if cfg.secure.is_some() {
        // Every survivor of a secure round counts once: no claim is checked.
        c.secure = cfg.secure;
        c.weighting = Weighting::Uniform;
    }
    c.seed = seed;
    c.rounds = cfg.rounds;
    c.train = cfg.train.clone();
    c.eval_fraction = cfg.eval_fraction;
    c.update_encoding = cfg.update_encoding;
    c.downlink_encoding = cfg.downlink_encoding;
    c.downlink_deltas = cfg.downlink_deltas;
    c.sampling = Sampling {
        population: Default::default(),
        fraction: cfg.per_round as f64 / cfg.clients as f64,
        min_clients: cfg.per_round,
        over_selection: 1.0,
    };
    if cfg.pool.is_some() {
        // Virtual clients check in when sampled: the round samples the registry.
        c.sampling.population = Population::Registered;
    } else {
        // Every client is online in a simulation: wait for all.
        c.min_connected = cfg.clients;
    }
    // Count a round only when all asked clients answered, so strategies see the same number
    // of updates.
    c.quorum = cfg.quorum.unwrap_or(cfg.per_round).clamp(1, cfg.per_round);
    c.round_timeout_ms = 600_000;
    c
}
