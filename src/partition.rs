//! Splitting a labelled training set among N clients: IID, Dirichlet label skew, or class
//! shards. Pure and seeded: the same labels, scheme and seed always give the same
//! [`Partition`], and nothing here touches the file system except
//! [`Partition::write_json`].
//!
//! The schemes are the usual ones of the federated-learning literature:
//!
//! - [`Scheme::Iid`]: a shuffle cut into near-equal pieces.
//! - [`Scheme::Dirichlet`]: per class, the share of each client drawn from Dirichlet(α)
//!   (Hsu et al. 2019, Li et al. "NIID-Bench" 2021). Small α concentrates every class on a few
//!   clients; large α approaches IID.
//! - [`Scheme::Shards`]: each client holds shards of a few classes (McMahan et al. 2017).
//!
//! [`Partition::skew`] puts a number on how non-IID a split is.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use rand::distr::OpenClosed01;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// How many Dirichlet draws [`partition`] tries before giving up on `min_size`.
///
/// Each attempt only draws proportions and counts (no index shuffling), so even a thousand
/// attempts over 100 classes × 1000 clients take well under a second.
pub const DIRICHLET_ATTEMPTS: usize = 1000;

/// How a training set is split among clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Scheme {
    /// A uniform shuffle cut into pieces whose sizes differ by at most one.
    Iid,
    /// Per class, proportions over clients drawn from Dirichlet(α); resampled until every
    /// client has ≥ `min_size` samples (at most [`DIRICHLET_ATTEMPTS`] draws, then
    /// [`PartitionError::MinSizeNotMet`]).
    Dirichlet {
        /// Concentration: finite and > 0. 0.1 is strongly skewed, 100 nearly IID.
        alpha: f64,
        /// The fewest samples any client may end up with (0 allows empty clients).
        min_size: usize,
    },
    /// Each client gets `classes_per_client` classes (shards of sorted-by-label indices, the
    /// McMahan et al. scheme).
    ///
    /// Unlike the original, shards never straddle a class boundary and no client gets two
    /// shards of one class. Every client holds at most `classes_per_client` classes, and
    /// exactly that many when at least `classes_per_client` classes are present, each with at
    /// least as many samples as there are clients. Shards are sized in proportion to their
    /// class, so clients end up with about equally many samples. Clients ×
    /// `classes_per_client` must reach the number of classes present, or some class would go
    /// nowhere ([`PartitionError::TooFewShards`]).
    Shards {
        /// Classes per client: between 1 and the number of classes.
        classes_per_client: usize,
    },
    /// Each client's data is a seeded recipe, drawn only when asked for ([`Recipe`]): a class
    /// mix from Dirichlet(α) over the classes present and a size uniform in
    /// `[⌈rows/2⌉, ⌊3·rows/2⌋]`, its rows drawn from the pool with replacement. Clients share
    /// rows, so a fleet may have more clients than there are rows (a million phones over
    /// Fashion-MNIST), and a simulator materialises only the clients a round samples.
    Recipe {
        /// Concentration of each client's class mix: finite and ≥ 1e-6.
        alpha: f64,
        /// A client's typical row count (≥ 1).
        rows: usize,
    },
}

/// The largest typical row count of a recipe (a client holds up to 1.5× that).
pub const MAX_RECIPE_ROWS: usize = 1 << 24;

/// A [`Scheme::Recipe`] over one training set: a client's rows from its index alone.
#[derive(Debug, Clone)]
pub struct Recipe {
    by_class: Vec<Vec<usize>>,
    alpha: f64,
    rows: usize,
    seed: u64,
}

impl Recipe {
    /// The recipe of α and `rows` over samples with `labels` (each below `classes`), seeded.
    pub fn new(
        labels: &[u32],
        classes: usize,
        alpha: f64,
        rows: usize,
        seed: u64,
    ) -> Result<Self, PartitionError> {
        // Below 1e-6 a class's log-weight can underflow to −∞ for every class.
        if !(alpha.is_finite() && alpha >= 1e-6) {
            return Err(PartitionError::BadAlpha { alpha });
        }
        if rows == 0 || rows > MAX_RECIPE_ROWS || labels.is_empty() {
            return Err(PartitionError::EmptyRecipe {
                rows,
                samples: labels.len(),
            });
        }
        let mut by_class = group_by_class(labels, classes)?;
        by_class.retain(|members| !members.is_empty());
        Ok(Self {
            by_class,
            alpha,
            rows,
            seed,
        })
    }

    /// Client `client`'s rows, ascending (a row may repeat): a function of the recipe and the
    /// index alone, from the client's own ChaCha stream.
    pub fn rows_of(&self, client: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(client as u64);
        let boosted = Gamma::new(self.alpha + 1.0, 1.0).expect("α was checked");
        // As in the Dirichlet scheme: Gamma(α) = Gamma(α + 1) · U^(1/α), in log space.
        let log_weights: Vec<f64> = self
            .by_class
            .iter()
            .map(|_| {
                let u: f64 = rng.sample(OpenClosed01);
                boosted.sample(&mut rng).ln() + u.ln() / self.alpha
            })
            .collect();
        let max = log_weights
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let mut cumulative = Vec::with_capacity(log_weights.len());
        let mut total = 0.0;
        for w in &log_weights {
            total += (w - max).exp();
            cumulative.push(total);
        }
        let low = self.rows.div_ceil(2).max(1);
        let high = (3 * self.rows / 2).max(low);
        let size = rng.random_range(low..=high);
        let mut rows: Vec<usize> = (0..size)
            .map(|_| {
                let at = rng.random_range(0.0..total);
                let class = cumulative
                    .partition_point(|&c| c <= at)
                    .min(cumulative.len() - 1);
                let members = &self.by_class[class];
                members[rng.random_range(0..members.len())]
            })
            .collect();
        rows.sort_unstable();
        rows
    }
}

/// The name of a [`Scheme`], as the simulator's `--partition` takes it; the scheme's numbers
/// come with it ([`PartitionKind::scheme`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionKind {
    /// [`Scheme::Iid`].
    Iid,
    /// [`Scheme::Dirichlet`].
    Dirichlet,
    /// [`Scheme::Shards`].
    Shards,
    /// [`Scheme::Recipe`].
    Recipe,
}

impl PartitionKind {
    /// The scheme of this kind with its numbers (each kind reads the ones it needs).
    pub fn scheme(
        self,
        alpha: f64,
        min_size: usize,
        classes_per_client: usize,
        rows: usize,
    ) -> Scheme {
        match self {
            PartitionKind::Recipe => Scheme::Recipe { alpha, rows },
            PartitionKind::Iid => Scheme::Iid,
            PartitionKind::Dirichlet => Scheme::Dirichlet { alpha, min_size },
            PartitionKind::Shards => Scheme::Shards { classes_per_client },
        }
    }
}

impl fmt::Display for PartitionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PartitionKind::Iid => "iid",
            PartitionKind::Dirichlet => "dirichlet",
            PartitionKind::Shards => "shards",
            PartitionKind::Recipe => "recipe",
        })
    }
}

impl FromStr for PartitionKind {
    type Err = String;

    /// `iid`, `dirichlet` or `shards`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "iid" => Ok(PartitionKind::Iid),
            "dirichlet" => Ok(PartitionKind::Dirichlet),
            "shards" => Ok(PartitionKind::Shards),
            "recipe" => Ok(PartitionKind::Recipe),
            other => Err(format!(
                "unknown partition {other:?}: dirichlet, shards, iid or recipe"
            )),
        }
    }
}

/// A bad input to [`partition`], or a Dirichlet constraint that could not be met.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    /// A recipe of no rows or too many, or over no samples.
    #[error(
        "a recipe needs 1 ≤ rows ≤ 2^24 and samples to draw from, got {rows} rows over {samples}"
    )]
    EmptyRecipe {
        /// The typical row count asked for.
        rows: usize,
        /// Samples in the training set.
        samples: usize,
    },
    /// Asked to split among no clients.
    #[error("cannot partition among zero clients")]
    NoClients,
    /// Fewer samples than clients, so some client would be empty.
    #[error("{clients} clients but only {samples} samples: use at most {samples} clients")]
    TooManyClients {
        /// Clients asked for.
        clients: usize,
        /// Samples in the training set.
        samples: usize,
    },
    /// α of a Dirichlet scheme is not a finite positive number.
    #[error("Dirichlet concentration α must be finite and > 0, got {alpha}")]
    BadAlpha {
        /// The α given.
        alpha: f64,
    },
    /// `classes_per_client` of a shards scheme is 0 or more than the classes there are.
    #[error("classes per client must be between 1 and {classes}, got {classes_per_client}")]
    BadClassesPerClient {
        /// The value given.
        classes_per_client: usize,
        /// Classes in the training set.
        classes: usize,
    },
    /// Shards: clients × `classes_per_client` is below the number of classes present, so some
    /// class would go to no client.
    #[error(
        "{clients} clients × {classes_per_client} classes each cannot cover the {present} \
         classes present: raise classes per client or the number of clients"
    )]
    TooFewShards {
        /// Clients asked for.
        clients: usize,
        /// Classes per client asked for.
        classes_per_client: usize,
        /// Classes with at least one sample.
        present: usize,
    },
    /// A label is not below the number of classes.
    #[error("label {label} of sample {index} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// Index of the sample.
        index: usize,
        /// Its label.
        label: u32,
        /// Classes declared.
        classes: usize,
    },
    /// `min_size` × clients exceeds the samples there are: no draw could ever satisfy it.
    #[error(
        "min_size {min_size} for each of {clients} clients needs {} samples, only {samples} \
         exist: lower min_size or the number of clients",
        min_size.saturating_mul(*clients)
    )]
    MinSizeImpossible {
        /// The minimum asked for.
        min_size: usize,
        /// Clients asked for.
        clients: usize,
        /// Samples in the training set.
        samples: usize,
    },
    /// No Dirichlet draw gave every client `min_size` samples.
    #[error(
        "no Dirichlet(α = {alpha}) draw in {attempts} attempts gave each of the {clients} \
         clients at least {min_size} samples: raise α, lower min_size or use fewer clients"
    )]
    MinSizeNotMet {
        /// The α used.
        alpha: f64,
        /// The minimum asked for.
        min_size: usize,
        /// Clients asked for.
        clients: usize,
        /// Draws tried.
        attempts: usize,
    },
}

/// A split of a training set among clients: which sample indices each one holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    /// The scheme it was made with.
    pub scheme: Scheme,
    /// The seed it was made with.
    pub seed: u64,
    /// Per client, indices into the training set, ascending. Every index appears exactly once
    /// across all clients, except under [`Scheme::Recipe`], whose clients draw with
    /// replacement.
    pub clients: Vec<Vec<usize>>,
}

/// Splits the samples with `labels` (each below `classes`) among `clients` clients.
///
/// Deterministic in `seed` (a ChaCha8 stream). Every sample goes to exactly one client.
///
/// # Errors
///
/// [`PartitionError`] for zero clients, more clients than samples, a label ≥ `classes`, a bad
/// α or `classes_per_client`, or a Dirichlet `min_size` that cannot be (or was not) met.
pub fn partition(
    labels: &[u32],
    classes: usize,
    clients: usize,
    scheme: &Scheme,
    seed: u64,
) -> Result<Partition, PartitionError> {
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    // A recipe's clients share rows; every other scheme gives each row to one client.
    if clients > labels.len() && !matches!(scheme, Scheme::Recipe { .. }) {
        return Err(PartitionError::TooManyClients {
            clients,
            samples: labels.len(),
        });
    }
    let mut by_class = group_by_class(labels, classes)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut assigned = match *scheme {
        Scheme::Iid => iid(labels.len(), clients, &mut rng),
        Scheme::Dirichlet { alpha, min_size } => {
            dirichlet(&mut by_class, clients, alpha, min_size, &mut rng)?
        }
        Scheme::Recipe { alpha, rows } => {
            let recipe = Recipe::new(labels, classes, alpha, rows, seed)?;
            (0..clients).map(|c| recipe.rows_of(c)).collect()
        }
        Scheme::Shards { classes_per_client } => {
            if classes_per_client == 0 || classes_per_client > classes {
                return Err(PartitionError::BadClassesPerClient {
                    classes_per_client,
                    classes,
                });
            }
            let present = by_class.iter().filter(|m| !m.is_empty()).count();
            if clients.saturating_mul(classes_per_client) < present {
                return Err(PartitionError::TooFewShards {
                    clients,
                    classes_per_client,
                    present,
                });
            }
            shards(&mut by_class, clients, classes_per_client, &mut rng)
        }
    };
    for client in &mut assigned {
        client.sort_unstable();
    }
    Ok(Partition {
        scheme: scheme.clone(),
        seed,
        clients: assigned,
    })
}

/// The sample indices of each class, by class, up to the largest label present: grouping by
/// the classes actually present (not `classes`) keeps a huge declared class count from turning
/// into a huge allocation.
fn group_by_class(labels: &[u32], classes: usize) -> Result<Vec<Vec<usize>>, PartitionError> {
    let mut by_class: Vec<Vec<usize>> = Vec::new();
    for (index, &label) in labels.iter().enumerate() {
        let class = label as usize;
        if class >= classes {
            return Err(PartitionError::LabelOutOfRange {
                index,
                label,
                classes,
            });
        }
        if class >= by_class.len() {
            by_class.resize_with(class + 1, Vec::new);
        }
        by_class[class].push(index);
    }
    Ok(by_class)
}

fn iid(samples: usize, clients: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..samples).collect();
    order.shuffle(rng);
    let (base, extra) = (samples / clients, samples % clients);
    let mut rest = order.as_slice();
    (0..clients)
        .map(|c| {
            let (mine, tail) = rest.split_at(base + usize::from(c < extra));
            rest = tail;
            mine.to_vec()
        })
        .collect()
}

fn dirichlet(
    by_class: &mut [Vec<usize>],
    clients: usize,
    alpha: f64,
    min_size: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(PartitionError::BadAlpha { alpha });
    }
    // Gamma(α) = Gamma(α + 1) · U^(1/α) (Marsaglia–Tsang). Drawing the right side in log space
    // keeps tiny α exact: Gamma(0.01) itself underflows to 0.0 for about one draw in a
    // thousand, and a class whose draws all underflow would have no proportions at all.
    let boosted = Gamma::new(alpha + 1.0, 1.0).map_err(|_| PartitionError::BadAlpha { alpha })?;
    let samples: usize = by_class.iter().map(Vec::len).sum();
    if min_size.saturating_mul(clients) > samples {
        return Err(PartitionError::MinSizeImpossible {
            min_size,
            clients,
            samples,
        });
    }
    for members in by_class.iter_mut() {
        members.shuffle(rng);
    }
    // Only counts are drawn per attempt; indices are cut once a draw passes.
    let mut counts = vec![vec![0usize; clients]; by_class.len()];
    let mut log_weights = vec![0f64; clients];
    for _ in 0..DIRICHLET_ATTEMPTS {
        let mut totals = vec![0usize; clients];
        for (members, class_counts) in by_class.iter().zip(&mut counts) {
            if members.is_empty() {
                class_counts.fill(0);
                continue;
            }
            for w in &mut log_weights {
                let u: f64 = rng.sample(OpenClosed01);
                *w = boosted.sample(rng).ln() + u.ln() / alpha;
            }
            let max = log_weights
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            if max.is_finite() {
                // Subtracting the max makes the largest weight 1, so the sum is ≥ 1 and the
                // normalisation below cannot divide by zero.
                let weights: Vec<f64> = log_weights.iter().map(|w| (w - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                split_counts(members.len(), &weights, sum, class_counts);
            } else {
                // Unreachable in practice (a Gamma(α + 1) draw of exactly 0); the α → 0 limit
                // of a Dirichlet is one client chosen uniformly, so the class still lands.
                class_counts.fill(0);
                class_counts[rng.random_range(0..clients)] = members.len();
            }
            for (t, &n) in totals.iter_mut().zip(class_counts.iter()) {
                *t += n;
            }
        }
        if totals.iter().all(|&t| t >= min_size) {
            let mut assigned = vec![Vec::new(); clients];
            for (members, class_counts) in by_class.iter().zip(&counts) {
                let mut rest = members.as_slice();
                for (client, &n) in assigned.iter_mut().zip(class_counts) {
                    let (mine, tail) = rest.split_at(n);
                    client.extend_from_slice(mine);
                    rest = tail;
                }
            }
            return Ok(assigned);
        }
    }
    Err(PartitionError::MinSizeNotMet {
        alpha,
        min_size,
        clients,
        attempts: DIRICHLET_ATTEMPTS,
    })
}

/// Turns proportions `weights / sum` of `n` items into integer counts summing to exactly `n`.
fn split_counts(n: usize, weights: &[f64], sum: f64, out: &mut [usize]) {
    // Rounding the cumulative share (rather than each share) keeps the cuts monotone and the
    // total exact, whatever the floating-point error.
    let mut cumulative = 0.0;
    let mut previous = 0;
    let last = weights.len() - 1;
    for (i, (&w, slot)) in weights.iter().zip(out.iter_mut()).enumerate() {
        cumulative += w / sum;
        let cut = if i == last {
            n
        } else {
            ((cumulative * n as f64).round() as usize).clamp(previous, n)
        };
        *slot = cut - previous;
        previous = cut;
    }
}

fn shards(
    by_class: &mut [Vec<usize>],
    clients: usize,
    per_client: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    for members in by_class.iter_mut() {
        members.shuffle(rng);
    }
    let shard_counts = shards_per_class(by_class, clients.saturating_mul(per_client), clients);

    // Shards laid out in class order and dealt column-wise (client c gets positions c, c + N,
    // c + 2N, ...) never give one client a class twice, because no class has more than N
    // shards and so no class run spans two positions N apart.
    let mut shards: Vec<Vec<usize>> = Vec::new();
    for (members, &count) in by_class.iter().zip(&shard_counts) {
        let (base, extra) = (members.len() / count.max(1), members.len() % count.max(1));
        let mut rest = members.as_slice();
        for s in 0..count {
            let (mine, tail) = rest.split_at(base + usize::from(s < extra));
            shards.push(mine.to_vec());
            rest = tail;
        }
    }
    let class_of: Vec<usize> = shard_counts
        .iter()
        .enumerate()
        .flat_map(|(class, &count)| std::iter::repeat_n(class, count))
        .collect();
    let mut dealt: Vec<Vec<usize>> = vec![Vec::with_capacity(per_client); clients];
    for shard in 0..shards.len() {
        dealt[shard % clients].push(shard);
    }

    // That layout pairs classes rigidly (with 10 classes and 2 per client, always k with
    // k + 5); random swaps that keep every client's classes distinct (a degree-preserving
    // edge-swap chain) shuffle the pairings as McMahan's random shard assignment does.
    let held = |client: &[usize], class: usize| client.iter().any(|&s| class_of[s] == class);
    for _ in 0..shards.len().saturating_mul(20) {
        let (a, b) = (rng.random_range(0..clients), rng.random_range(0..clients));
        if a == b || dealt[a].is_empty() || dealt[b].is_empty() {
            continue;
        }
        let i = rng.random_range(0..dealt[a].len());
        let j = rng.random_range(0..dealt[b].len());
        let (x, y) = (class_of[dealt[a][i]], class_of[dealt[b][j]]);
        if x != y && !held(&dealt[a], y) && !held(&dealt[b], x) {
            let shard_a = dealt[a][i];
            dealt[a][i] = dealt[b][j];
            dealt[b][j] = shard_a;
        }
    }
    // Which column of the layout a client gets should not depend on its id.
    dealt.shuffle(rng);
    dealt
        .into_iter()
        .map(|mine| {
            mine.into_iter()
                .flat_map(|s| shards[s].iter().copied())
                .collect()
        })
        .collect()
}

/// How many shards each class is cut into: `wanted` in all, each class at most `clients`
/// (so the column-wise deal stays distinct) and at most its size (so no shard is empty).
/// Within those caps, shards go where they would be largest, which keeps shard sizes even.
fn shards_per_class(by_class: &[Vec<usize>], wanted: usize, clients: usize) -> Vec<usize> {
    /// A class bidding for its next shard: the size its shards would have with one more.
    #[derive(PartialEq, Eq)]
    struct Bid {
        size: usize,
        shards: usize,
        class: usize,
    }
    impl Ord for Bid {
        fn cmp(&self, other: &Self) -> Ordering {
            // size / (shards + 1) compared exactly, by cross-multiplying; ties go to the
            // lower class so the allocation does not depend on heap internals.
            let lhs = self.size as u128 * (other.shards as u128 + 1);
            let rhs = other.size as u128 * (self.shards as u128 + 1);
            lhs.cmp(&rhs).then_with(|| other.class.cmp(&self.class))
        }
    }
    impl PartialOrd for Bid {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }

    // Every present class gets one shard first (the caller checked `wanted` allows it), or a
    // small class could lose every bid to the big ones and its samples would go nowhere.
    let mut counts: Vec<usize> = by_class
        .iter()
        .map(|m| usize::from(!m.is_empty()))
        .collect();
    let mut given: usize = counts.iter().sum();
    let mut heap: BinaryHeap<Bid> = by_class
        .iter()
        .enumerate()
        .filter(|(_, members)| members.len() > 1 && clients > 1)
        .map(|(class, members)| Bid {
            size: members.len(),
            shards: 1,
            class,
        })
        .collect();
    while given < wanted {
        let Some(mut bid) = heap.pop() else { break };
        counts[bid.class] += 1;
        given += 1;
        bid.shards += 1;
        if bid.shards < clients.min(bid.size) {
            heap.push(bid);
        }
    }
    counts
}

impl Partition {
    /// Per client, how many of its samples carry each label (`classes` counts each).
    ///
    /// Indices beyond `labels` and labels ≥ `classes` are skipped; neither occurs when
    /// `labels` and `classes` are the ones the partition was made from.
    pub fn label_histograms(&self, labels: &[u32], classes: usize) -> Vec<Vec<usize>> {
        self.clients
            .iter()
            .map(|indices| {
                let mut histogram = vec![0; classes];
                for &i in indices {
                    if let Some(slot) = labels.get(i).and_then(|&l| histogram.get_mut(l as usize)) {
                        *slot += 1;
                    }
                }
                histogram
            })
            .collect()
    }

    /// Label skew: the sample-weighted mean total-variation distance between each client's
    /// label distribution and the global one,
    /// `Σ_c (n_c / n) · ½ Σ_k |n_ck / n_c − n_k / n|`.
    ///
    /// 0 for a perfect IID split; for one class per client it is `1 − Σ_k p_k²` under global
    /// class shares `p_k` (0.9 for 10 balanced classes), tending to 1 as classes grow. Empty
    /// clients weigh nothing; an empty partition has skew 0. Labels are read as in
    /// [`label_histograms`](Self::label_histograms).
    pub fn skew(&self, labels: &[u32], classes: usize) -> f64 {
        let histograms = self.label_histograms(labels, classes);
        let mut global = vec![0usize; classes];
        for histogram in &histograms {
            for (g, &n) in global.iter_mut().zip(histogram) {
                *g += n;
            }
        }
        let total: usize = global.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let total = total as f64;
        histograms
            .iter()
            .map(|histogram| {
                let size: usize = histogram.iter().sum();
                if size == 0 {
                    return 0.0;
                }
                let size = size as f64;
                let distance: f64 = histogram
                    .iter()
                    .zip(&global)
                    .map(|(&n, &g)| (n as f64 / size - g as f64 / total).abs())
                    .sum::<f64>()
                    / 2.0;
                size / total * distance
            })
            .sum()
    }

    /// How many samples each client holds.
    pub fn sizes(&self) -> Vec<usize> {
        self.clients.iter().map(Vec::len).collect()
    }

    /// Writes the partition as JSON: `scheme`, `seed`, `skew`, and per client its `indices`,
    /// `size` and label `histogram` (labels read as in
    /// [`label_histograms`](Self::label_histograms)).
    ///
    /// Atomic: the JSON goes to a temporary file beside `path` that is then renamed over it,
    /// so a reader never sees half a file.
    ///
    /// # Errors
    ///
    /// When the folder of `path` does not exist or cannot be written.
    pub fn write_json(&self, path: &Path, labels: &[u32], classes: usize) -> anyhow::Result<()> {
        #[derive(Serialize)]
        struct Client<'a> {
            size: usize,
            histogram: Vec<usize>,
            indices: &'a [usize],
        }
        #[derive(Serialize)]
        struct Document<'a> {
            scheme: &'a Scheme,
            seed: u64,
            skew: f64,
            clients: Vec<Client<'a>>,
        }
        let document = Document {
            scheme: &self.scheme,
            seed: self.seed,
            skew: self.skew(labels, classes),
            clients: self
                .clients
                .iter()
                .zip(self.label_histograms(labels, classes))
                .map(|(indices, histogram)| Client {
                    size: indices.len(),
                    histogram,
                    indices,
                })
                .collect(),
        };
        let mut json = serde_json::to_vec(&document)?;
        json.push(b'\n');
        support::fs::write_atomic(path, &json)
            .with_context(|| format!("writing partition {}", path.display()))
    }
}
