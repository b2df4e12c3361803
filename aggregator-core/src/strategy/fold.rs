//! One round's fold: the accepted updates' parameters through a compute backend's accumulator
//! under the run's aggregation rule, and their scopes — as the aggregator measured them, never
//! as a client reported them — fused into the next targets, finished together.
//!
//! What a client claims only ever sets its weight, and the weight is capped twice: at a multiple
//! of the median claim of the round's selection (`max_weight`), and at a share — no accepted
//! client counts for more than `max(max_share, 1/accepted)` of a round, whatever it claims
//! ([`capped_weights`]). The cap applies to the parameters under the weighted-sum rules
//! (clipping included), to a weighted scope fusion and to the round's reported metrics; under
//! a column rule (median, trimmed mean) weights do not count at all. The targets are fused as
//! the run's [`TargetPolicy`] says (by default the median of the clients' scopes) and stay
//! within its bounds of the last round's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wsa::{FusionRule, Scope, ScopeFusion, Weighting};

use super::targets::{TargetFusion, TargetPolicy};
use super::{Aggregation, ColumnRule, Plan, Strategy};
use crate::backend::{Accumulator, Backend, BackendError, FoldShape, Measurement};
use crate::privacy::Noise;

/// How a round's fold weighs and bounds what it is given (from the run configuration).
#[derive(Debug, Clone)]
pub struct FoldPolicy {
    /// Clients' weights from their sample counts, or equal.
    pub weighting: Weighting,
    /// The largest share of a round one client may have (above `1/accepted`).
    pub max_share: f64,
    /// The largest weight one update may have before the share cap (from the claims of the
    /// round's selection; infinite for none).
    pub max_weight: f64,
    /// How the targets are fused, how far they may move in a round, and their floors.
    pub targets: TargetPolicy,
    /// The σ̃ floor of each scoped tensor ([`TargetPolicy::floors`]).
    pub floors: Vec<f64>,
    /// Client-level DP for this round: clip, sum, noise ([`crate::privacy`]).
    pub dp: Option<DpRound>,
}

/// One round's share of client-level DP: what a client's contribution is clipped to and how
/// much noise its sums get. The clipped step and scope offsets of one client together have L2
/// norm at most `√(clip² + scope_clip²)`, the bound `noise_std` is a multiple of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpRound {
    /// `C`: each step `w − g` is scaled down to at most this L2 norm.
    pub clip: f64,
    /// Each client's scope offsets `(μ − μ̃, σ − σ̃)` over all scoped tensors are scaled
    /// down to at most this L2 norm.
    pub scope_clip: f64,
    /// The std of the Gaussian noise on every coordinate of the summed steps and offsets.
    pub noise_std: f64,
    /// The std of the noise on the count of unclipped clients (adaptive clipping; else 0).
    pub count_noise: f64,
    /// The fixed denominator of the mean, set before any update is seen: the round's target
    /// of accepted updates (or the accepted count, if more).
    pub denominator: usize,
}

/// What DP measured of a round, after noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpFolded {
    /// The clip and noise the round ran with.
    pub round: DpRound,
    /// The noised fraction of the round's clients whose steps were not clipped: what an
    /// adaptive clip norm moves by.
    pub unclipped_fraction: f64,
}

/// An accepted client: its measured scopes and its weight before the cap.
#[derive(Debug, Clone)]
struct Accepted {
    scopes: Vec<Scope>,
    weight: f64,
}

/// An update held back from the sum because its weight may still be cut by the cap.
#[derive(Debug)]
struct Held {
    client: String,
    params: Vec<f32>,
    measured: Measurement,
    weight: f64,
}

/// The accepted updates of one round, folded as they arrive.
#[derive(Debug)]
pub struct RoundFold {
    acc: Box<dyn Accumulator>,
    plan: Plan,
    policy: FoldPolicy,
    fusion: FusionRule,
    previous: Vec<Scope>,
    len: usize,
    /// Where the scoped tensors lie, and the scopes' ε.
    tensors: Vec<std::ops::Range<usize>>,
    eps: f64,
    /// Accepted clients by id: fused at the finish in client order, so the targets do not
    /// depend on the order updates arrived in (f64 sums are not associative, and a resumed
    /// run must reproduce an uninterrupted one bit for bit).
    clients: BTreeMap<String, Accepted>,
    /// The updates with the largest weights, held out of the sum until the cap is known. Only
    /// they can be cut: more than `⌊1/max_share⌋` clients cannot all exceed the cap.
    held: Vec<Held>,
    hold: usize,
    /// The claim cap is set at the close ([`RoundFold::defer_claim_cap`]).
    claim_cap_deferred: bool,
    /// The round's global head, which every step is measured from.
    global: Vec<f32>,
    /// `Σ (w_i − g)/‖w_i − g‖` over the accepted updates with a non-zero step, and how many.
    unit_steps: Vec<f64>,
    moved: usize,
    /// `Σ ‖w_i − g‖` over the same updates.
    step_norm_sum: f64,
    /// Under DP: the sum of the accepted clients' clipped scope offsets (μ, σ per tensor) and
    /// how many steps were within the clip.
    dp_scope_sum: Vec<(f64, f64)>,
    dp_unclipped: usize,
}

/// How far apart a round's clients pulled: measured from their parameters, never reported.
/// What the write-up uses to say *why* a strategy wins (issue 17).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// The mean over clients of the cosine between a client's step `w_i − g` and the round's
    /// step `g' − g`: 1 when all clients move the same way, near 0 when their directions
    /// disagree so much that averaging cancels them. `None` when the head did not move.
    pub step_cosine: Option<f64>,
    /// `‖g' − g‖` over the clients' mean `‖w_i − g‖`: how much of the clients' movement
    /// survived the aggregation (1: none cancelled).
    pub step_agreement: Option<f64>,
    /// Per scoped tensor, the spread of the clients' means: their standard deviation in units
    /// of the clients' mean σ.
    pub mean_spread: Vec<f64>,
    /// Per scoped tensor, the spread of the clients' σ: their standard deviation over their
    /// mean (coefficient of variation).
    pub std_spread: Vec<f64>,
}

/// What a finished round gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    /// The next global parameters.
    pub params: Vec<f32>,
    /// The next target scopes.
    pub targets: Vec<Scope>,
    /// Each accepted client's weight after the cap.
    pub weights: BTreeMap<String, f64>,
    /// How far apart the accepted clients pulled.
    pub drift: Drift,
    /// Under DP, what the round measured after noise.
    pub dp: Option<DpFolded>,
}

impl RoundFold {
    /// An empty fold on `backend` for vectors of `shape`: parameters under `aggregation`,
    /// measured against (and clipped toward) `global`, scopes fused by `strategy`'s rule from
    /// the last round's `previous` targets, clients weighted by `policy`; room for `capacity`
    /// updates (the round's selection).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        backend: &dyn Backend,
        shape: &FoldShape,
        global: &[f32],
        previous: &[Scope],
        strategy: Strategy,
        aggregation: Aggregation,
        policy: FoldPolicy,
        capacity: usize,
    ) -> Result<Self, BackendError> {
        // DP clips every step to the round's C and sums them (uniform weights, checked by
        // the config); the noise and the fixed denominator come at the finish.
        let aggregation = match policy.dp {
            Some(dp) => Aggregation::NormClipped { max_norm: dp.clip },
            None => aggregation,
        };
        let plan = aggregation.plan();
        if previous.len() != shape.tensors.len() || policy.floors.len() != shape.tensors.len() {
            return Err(wsa::Error::ShapeMismatch {
                what: "previous targets and floors",
                expected: shape.tensors.len(),
                found: previous.len().min(policy.floors.len()),
            }
            .into());
        }
        let hold = match plan {
            Plan::WeightedSum { .. } if policy.max_share < 1.0 => {
                (1.0 / policy.max_share).floor() as usize
            }
            _ => 0,
        };
        Ok(Self {
            acc: backend.accumulator(shape, global, aggregation, capacity)?,
            plan,
            policy,
            fusion: strategy.fusion_rule(),
            previous: previous.to_vec(),
            len: shape.len,
            tensors: shape.tensors.clone(),
            eps: shape.eps,
            clients: BTreeMap::new(),
            held: Vec::new(),
            hold,
            claim_cap_deferred: false,
            global: global.to_vec(),
            unit_steps: vec![0.0; shape.len],
            moved: 0,
            step_norm_sum: 0.0,
            dp_scope_sum: vec![(0.0, 0.0); previous.len()],
            dp_unclipped: 0,
        })
    }

    /// Checks a candidate's parameters (length, finiteness) and measures them, folding
    /// nothing: its scopes and its distance from the round's global head.
    pub fn measure(&mut self, params: &[f32]) -> Result<Measurement, BackendError> {
        self.acc.measure(params)
    }

    /// Folds `client`'s update: `params` as `measured` (whose scopes are the ones fused), its
    /// weight from `n_samples` under the run's weighting, at most `max_weight`, before the
    /// share cap (returned). Checked
    /// in full before anything is added, so a refused update leaves the fold as it was. One
    /// update per client.
    pub fn add(
        &mut self,
        client: &str,
        params: &[f32],
        measured: &Measurement,
        n_samples: u64,
    ) -> Result<f64, BackendError> {
        if self.clients.contains_key(client) {
            return Err(wsa::Error::InvalidConfig(format!("{client} was folded already")).into());
        }
        let weight = self
            .policy
            .weighting
            .weight(n_samples)
            .min(self.policy.max_weight);
        // The scopes' checks (count, weight, values) on a scratch fusion first.
        ScopeFusion::new(self.previous.len()).add(&measured.scopes, weight)?;
        if self.held.len() < self.hold {
            crate::backend::contract::check_len(self.len, params)?;
            self.hold_back(client, params, measured, weight);
        } else if let Some(lightest) = self
            .lightest_held()
            .filter(|&i| self.held[i].weight < weight)
        {
            // The new update outweighs a held one, which can no longer be cut: it goes into
            // the sum with its weight, and the new one is held in its place.
            crate::backend::contract::check_len(self.len, params)?;
            let out = &self.held[lightest];
            self.acc.add(&out.params, out.weight, Some(&out.measured))?;
            self.held.swap_remove(lightest);
            self.hold_back(client, params, measured, weight);
        } else {
            self.acc.add(params, weight, Some(measured))?;
        }
        self.clients.insert(
            client.to_owned(),
            Accepted {
                scopes: measured.scopes.clone(),
                weight,
            },
        );
        self.add_step(params, measured.distance);
        if let Some(dp) = self.policy.dp {
            self.add_private_scopes(dp, measured);
        }
        Ok(weight)
    }

    /// Adds an accepted client's scope offsets from the round's targets, clipped to the
    /// round's bound, to the DP sums, and counts its step if the clip left it whole.
    fn add_private_scopes(&mut self, dp: DpRound, measured: &Measurement) {
        if measured.distance <= dp.clip {
            self.dp_unclipped += 1;
        }
        // A zero bound: the run releases no scopes (targets from the head, or fixed).
        if dp.scope_clip == 0.0 {
            return;
        }
        let offsets: Vec<(f64, f64)> = measured
            .scopes
            .iter()
            .zip(&self.previous)
            .map(|(s, p)| (s.mean - p.mean, s.std - p.std))
            .collect();
        let norm = offsets
            .iter()
            .map(|(m, s)| m * m + s * s)
            .sum::<f64>()
            .sqrt();
        let scale = if norm > dp.scope_clip {
            dp.scope_clip / norm
        } else {
            1.0
        };
        for (sum, (m, s)) in self.dp_scope_sum.iter_mut().zip(offsets) {
            sum.0 += scale * m;
            sum.1 += scale * s;
        }
    }

    /// Adds the unit direction of an accepted update's step (its length `distance`, as the
    /// backend measured it) to the drift sums.
    fn add_step(&mut self, params: &[f32], distance: f64) {
        if !(distance.is_finite() && distance > 0.0) || params.len() != self.global.len() {
            return;
        }
        let inv = 1.0 / distance;
        for ((u, &w), &g) in self.unit_steps.iter_mut().zip(params).zip(&self.global) {
            *u += (f64::from(w) - f64::from(g)) * inv;
        }
        self.moved += 1;
        self.step_norm_sum += distance;
    }

    /// The drift of the accepted updates around the round's step to `params`.
    fn drift(&self, params: &[f32]) -> Drift {
        let (mut dot, mut norm_sq) = (0.0, 0.0);
        for ((&u, &w), &g) in self.unit_steps.iter().zip(params).zip(&self.global) {
            let step = f64::from(w) - f64::from(g);
            dot += u * step;
            norm_sq += step * step;
        }
        let norm = norm_sq.sqrt();
        let moved = self.moved as f64;
        let step_cosine = (self.moved > 0 && norm > 0.0).then(|| dot / (moved * norm));
        let step_agreement =
            (self.moved > 0 && self.step_norm_sum > 0.0).then(|| norm * moved / self.step_norm_sum);
        let spread = |values: &[f64], unit: f64| -> f64 {
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            if unit > 0.0 { var.sqrt() / unit } else { 0.0 }
        };
        let (mut mean_spread, mut std_spread) = (Vec::new(), Vec::new());
        if !self.clients.is_empty() {
            for t in 0..self.previous.len() {
                let means: Vec<f64> = self.clients.values().map(|a| a.scopes[t].mean).collect();
                let stds: Vec<f64> = self.clients.values().map(|a| a.scopes[t].std).collect();
                let mean_std = stds.iter().sum::<f64>() / stds.len() as f64;
                mean_spread.push(spread(&means, mean_std));
                std_spread.push(spread(&stds, mean_std));
            }
        }
        Drift {
            step_cosine,
            step_agreement,
            mean_spread,
            std_spread,
        }
    }

    fn hold_back(&mut self, client: &str, params: &[f32], measured: &Measurement, weight: f64) {
        self.held.push(Held {
            client: client.to_owned(),
            params: params.to_vec(),
            measured: measured.clone(),
            weight,
        });
    }

    fn lightest_held(&self) -> Option<usize> {
        self.held
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.weight.total_cmp(&b.1.weight))
            .map(|(i, _)| i)
    }

    /// For a round whose selection's claims are not all known when it opens (clients sampled
    /// from the registry say hello later): every update is held out of the sum until
    /// [`RoundFold::cap_claims`] sets `max_weight`. Call before the first [`RoundFold::add`].
    pub fn defer_claim_cap(&mut self) {
        if matches!(self.plan, Plan::WeightedSum { .. }) {
            self.hold = usize::MAX;
        }
        self.policy.max_weight = f64::INFINITY;
        self.claim_cap_deferred = true;
    }

    /// Whether the claim cap waits for [`RoundFold::cap_claims`].
    pub fn claim_cap_deferred(&self) -> bool {
        self.claim_cap_deferred
    }

    /// Sets the deferred claim cap: every update so far (all held) weighs at most
    /// `max_weight`, as if the cap had been known when it came.
    pub fn cap_claims(&mut self, max_weight: f64) {
        self.policy.max_weight = max_weight;
        for accepted in self.clients.values_mut() {
            accepted.weight = accepted.weight.min(max_weight);
        }
        for held in &mut self.held {
            held.weight = held.weight.min(max_weight);
        }
        self.claim_cap_deferred = false;
    }

    /// Updates folded so far.
    pub fn accepted(&self) -> usize {
        self.clients.len()
    }

    /// Each accepted client's weight after the cap, as of now.
    pub fn weights(&self) -> BTreeMap<String, f64> {
        let raw: Vec<f64> = self.clients.values().map(|a| a.weight).collect();
        let capped = capped_weights(&raw, self.policy.max_share);
        self.clients.keys().cloned().zip(capped).collect()
    }

    /// The next global parameters, the fused target scopes within their bounds, and the
    /// weights they were formed with.
    pub fn finish(&mut self) -> Result<Folded, FoldError> {
        let weights = self.weights();
        // The held updates go in last, in client order, with their capped weights.
        let mut held = std::mem::take(&mut self.held);
        held.sort_by(|a, b| a.client.cmp(&b.client));
        for h in &held {
            self.acc
                .add(&h.params, weights[&h.client], Some(&h.measured))
                .map_err(FoldError::Params)?;
        }
        let params = self.acc.finish().map_err(FoldError::Params)?;
        if params.len() != self.len || !params.iter().all(|v| v.is_finite()) {
            return Err(FoldError::Params(
                wsa::Error::NonFinite {
                    what: "aggregated parameters",
                }
                .into(),
            ));
        }
        let (mut params, mut targets, dp) = match self.policy.dp {
            Some(dp) => {
                let (params, targets, folded) = self.finish_private(dp, &params);
                // Without released scopes the targets come from the head (post-processing of
                // the release) or, for a fusion of clients' scopes at scope share 0, stay.
                let targets = match targets {
                    Some(targets) => targets,
                    None if self.policy.targets.fusion.uses_client_scopes() => {
                        self.previous.clone()
                    }
                    None => self.fuse(&weights, &params).map_err(FoldError::Scopes)?,
                };
                (params, targets, Some(folded))
            }
            None => {
                let targets = self.fuse(&weights, &params).map_err(FoldError::Scopes)?;
                (params, targets, None)
            }
        };
        self.policy
            .targets
            .apply(&self.previous, &mut targets, &self.policy.floors);
        let drift = self.drift(&params);
        if self.policy.targets.align_head {
            self.align(&mut params, &targets);
        }
        Ok(Folded {
            params,
            targets,
            weights,
            drift,
            dp,
        })
    }

    /// A secure round's finish: the aggregator holds only the survivors' summed steps and
    /// scope statistics ([`protocol::secure`]), already divided into the mean head `params`
    /// and unit-weight `sums`. The targets are fused from the sums (the strategy's σ̃ rule), or
    /// taken from the head or kept, under the same policy as any round; the drift keeps what
    /// sums can tell (the spreads of μ and σ), not the per-client step directions.
    pub fn finish_secure(
        &mut self,
        mut params: Vec<f32>,
        sums: Vec<wsa::ScopeSums>,
        survivors: &[String],
    ) -> Result<Folded, FoldError> {
        if params.len() != self.len || !params.iter().all(|v| v.is_finite()) {
            return Err(FoldError::Params(
                wsa::Error::NonFinite {
                    what: "securely aggregated parameters",
                }
                .into(),
            ));
        }
        let mut targets = match self.policy.targets.fusion {
            TargetFusion::Fixed => self.previous.clone(),
            TargetFusion::GlobalHead => self
                .tensors
                .iter()
                .map(|range| Scope::of(&params[range.clone()], self.eps))
                .collect::<wsa::Result<_>>()
                .map_err(FoldError::Scopes)?,
            _ => ScopeFusion::from_sums(sums.clone())
                .finish(self.fusion)
                .map_err(FoldError::Scopes)?,
        };
        self.policy
            .targets
            .apply(&self.previous, &mut targets, &self.policy.floors);
        let spread = |sum: f64, sum_sq: f64, n: f64, unit: f64| {
            let var = (sum_sq / n - (sum / n) * (sum / n)).max(0.0);
            if unit > 0.0 { var.sqrt() / unit } else { 0.0 }
        };
        let (mut mean_spread, mut std_spread) = (Vec::new(), Vec::new());
        for s in &sums {
            let mean_std = s.p_std / s.p;
            mean_spread.push(spread(s.p_mean, s.p_mean_sq, s.p, mean_std));
            std_spread.push(spread(s.p_std, s.p_var, s.p, mean_std));
        }
        if self.policy.targets.align_head {
            self.align(&mut params, &targets);
        }
        Ok(Folded {
            params,
            targets,
            weights: survivors.iter().map(|c| (c.clone(), 1.0)).collect(),
            drift: Drift {
                step_cosine: None,
                step_agreement: None,
                mean_spread,
                std_spread,
            },
            dp: None,
        })
    }

    /// DP-FedAvg's release from the clipped sums: `g + (Σ clipped steps + N(0, σ²I))/m`
    /// and `targets + (Σ clipped offsets + N(0, σ²I))/m`, with `m` fixed before the round
    /// (`params` is the accumulator's clipped mean, `g + Σ clipped/k` for `k` accepted).
    /// The targets are released only when the round has a scope bound (the run fuses them
    /// from clients' scopes with a non-zero scope share).
    fn finish_private(
        &self,
        dp: DpRound,
        params: &[f32],
    ) -> (Vec<f32>, Option<Vec<Scope>>, DpFolded) {
        let mut noise = Noise::from_os();
        let k = self.clients.len() as f64;
        let m = dp.denominator.max(self.clients.len()) as f64;
        let params = params
            .iter()
            .zip(&self.global)
            .map(|(&p, &g)| {
                let g = f64::from(g);
                (g + ((f64::from(p) - g) * k + noise.sample(dp.noise_std)) / m) as f32
            })
            .collect();
        // Not a `Scope::new`: the noised σ̃ may dip below zero here, and the policy's bounds
        // and floors, applied next, bring it back into range.
        let targets = (dp.scope_clip > 0.0).then(|| {
            self.previous
                .iter()
                .zip(&self.dp_scope_sum)
                .map(|(p, &(sum_mean, sum_std))| Scope {
                    mean: p.mean + (sum_mean + noise.sample(dp.noise_std)) / m,
                    std: p.std + (sum_std + noise.sample(dp.noise_std)) / m,
                })
                .collect()
        });
        let unclipped_fraction = (self.dp_unclipped as f64 + noise.sample(dp.count_noise)) / m;
        let folded = DpFolded {
            round: dp,
            unclipped_fraction,
        };
        (params, targets, folded)
    }

    /// Moves each scoped tensor of `params` to its target: `w ← μ̃ + (w − μ)·d̃/d`, with `d`
    /// the tensor's std and `d̃ = √(σ̃² − ε)` (σ carries ε, the spread of the weights does
    /// not). A constant tensor has no spread to scale and only moves to μ̃.
    fn align(&self, params: &mut [f32], targets: &[Scope]) {
        for (range, target) in self.tensors.iter().zip(targets) {
            let w = &mut params[range.clone()];
            // The parameters are finite (checked): only a constant tensor at ε = 0 fails.
            let (mean, d) = match Scope::of(w, self.eps) {
                Ok(s) => (s.mean, (s.std * s.std - self.eps).max(0.0).sqrt()),
                Err(_) => (f64::from(w[0]), 0.0),
            };
            let d_target = (target.std * target.std - self.eps).max(0.0).sqrt();
            let scale = if d > 0.0 { d_target / d } else { 0.0 };
            for x in w.iter_mut() {
                *x = (target.mean + (f64::from(*x) - mean) * scale) as f32;
            }
        }
    }

    /// The clients' scopes fused as the policy says (or the new head's own, `params`, or the
    /// last round's, for the ablations that do not fuse).
    fn fuse(&self, weights: &BTreeMap<String, f64>, params: &[f32]) -> wsa::Result<Vec<Scope>> {
        let column = match (self.policy.targets.fusion, self.plan) {
            (TargetFusion::Fixed, _) => return Ok(self.previous.clone()),
            (TargetFusion::GlobalHead, _) => {
                return self
                    .tensors
                    .iter()
                    .map(|range| Scope::of(&params[range.clone()], self.eps))
                    .collect();
            }
            (TargetFusion::Median, _) => Some(ColumnRule::Median),
            (TargetFusion::TrimmedMean { trim }, _) => Some(ColumnRule::TrimmedMean { trim }),
            (TargetFusion::FollowRule, Plan::Columns(rule)) => Some(rule),
            (TargetFusion::FollowRule, Plan::WeightedSum { .. }) => None,
        };
        match column {
            None => {
                let mut fusion = ScopeFusion::new(self.previous.len());
                for (client, a) in &self.clients {
                    fusion.add(&a.scopes, weights[client])?;
                }
                fusion.finish(self.fusion)
            }
            Some(rule) => {
                if self.clients.is_empty() {
                    return Err(wsa::Error::Empty {
                        what: "scope fusion",
                    });
                }
                self.previous
                    .iter()
                    .enumerate()
                    .map(|(t, prev)| {
                        let mut means: Vec<f64> =
                            self.clients.values().map(|a| a.scopes[t].mean).collect();
                        let mut stds: Vec<f64> =
                            self.clients.values().map(|a| a.scopes[t].std).collect();
                        Scope::new(
                            rule.reduce(&mut means, prev.mean),
                            rule.reduce(&mut stds, prev.std),
                        )
                    })
                    .collect()
            }
        }
    }
}

/// The weights `raw` after the share cap: the largest are cut to a common `C` so that none
/// exceeds `max(max_share, 1/n)` of the new total (water-filling), the rest kept as they are.
/// With `max_share ≥ 1`, or when no weight exceeds the share, `raw` unchanged.
pub fn capped_weights(raw: &[f64], max_share: f64) -> Vec<f64> {
    let n = raw.len();
    if n == 0 {
        return Vec::new();
    }
    let share = max_share.max(1.0 / n as f64);
    if share >= 1.0 {
        return raw.to_vec();
    }
    let mut sorted = raw.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    // k: how many of the largest are cut; the rest sum to `rest`.
    let mut rest: f64 = sorted.iter().sum();
    for k in 0..n {
        if k > 0 {
            rest -= sorted[k - 1];
        }
        let room = 1.0 - k as f64 * share;
        if room <= 0.0 {
            break;
        }
        let cap = share * rest / room;
        let above_ok = k == 0 || sorted[k - 1] >= cap;
        if above_ok && sorted[k] <= cap {
            return raw.iter().map(|&w| w.min(cap)).collect();
        }
    }
    // Only rounding can get here (the share is at least 1/n, so all cut to the smallest
    // weight always qualifies): equal weights are within any share.
    let smallest = sorted[n - 1];
    vec![smallest; n]
}

/// Why a round's fold did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FoldError {
    /// The parameters did not aggregate (nothing folded, weight 0, a device failure, or a
    /// non-finite result).
    #[error("parameters: {0}")]
    Params(BackendError),
    /// The scopes did not fuse.
    #[error("scopes: {0}")]
    Scopes(wsa::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_of(w: &[f64], i: usize) -> f64 {
        w[i] / w.iter().sum::<f64>()
    }

    /// Two updates of a small MLP head folded under `targets`, with the round's global head,
    /// the previous targets and the result.
    fn fold_two(targets: TargetPolicy) -> (Vec<f32>, Vec<Scope>, Folded, FoldShape) {
        use wsa::{Head, HeadSpec, Init, ScopeSelection};
        let spec = HeadSpec::mlp(12, &[8], 5);
        let eps = wsa::DEFAULT_SCOPE_EPS;
        let shape = FoldShape::of_head(&spec, ScopeSelection::default(), eps);
        let global = Head::<f32>::init(&spec, Init::Standard, 1)
            .unwrap()
            .to_flat();
        let previous = Head::<f32>::from_flat(&spec, &global)
            .unwrap()
            .scopes(ScopeSelection::default(), eps)
            .unwrap();
        let policy = FoldPolicy {
            weighting: Weighting::Uniform,
            max_share: 1.0,
            max_weight: f64::INFINITY,
            targets,
            floors: vec![0.0; previous.len()],
            dp: None,
        };
        let backend = crate::backend::CpuBackend::default();
        let mut fold = RoundFold::open(
            &backend,
            &shape,
            &global,
            &previous,
            Strategy::wsa(1.0, FusionRule::MeanStd),
            Aggregation::Mean,
            policy,
            2,
        )
        .unwrap();
        for (c, seed) in [("a", 2), ("b", 3)] {
            let update = Head::<f32>::init(&spec, Init::Standard, seed)
                .unwrap()
                .to_flat();
            let measured = fold.measure(&update).unwrap();
            fold.add(c, &update, &measured, 10).unwrap();
        }
        let folded = fold.finish().unwrap();
        (global, previous, folded, shape)
    }

    fn scopes_of(params: &[f32], shape: &FoldShape) -> Vec<Scope> {
        shape
            .tensors
            .iter()
            .map(|r| Scope::of(&params[r.clone()], shape.eps).unwrap())
            .collect()
    }

    #[test]
    fn the_ablation_targets_are_the_heads_own_or_the_last_rounds() {
        let wide = |fusion| TargetPolicy {
            fusion,
            max_std_ratio: 1e6,
            max_mean_shift: 1e6,
            std_floor: 0.0,
            align_head: false,
        };
        let (_, previous, folded, _) = fold_two(wide(TargetFusion::Fixed));
        assert_eq!(folded.targets, previous);
        let (_, _, folded, shape) = fold_two(wide(TargetFusion::GlobalHead));
        assert_eq!(folded.targets, scopes_of(&folded.params, &shape));
        // Averaging two independent heads shrinks σ by about √2: the fused targets do not.
        let (_, _, fused, _) = fold_two(wide(TargetFusion::FollowRule));
        assert!(fused.targets[0].std > 1.3 * folded.targets[0].std);
    }

    #[test]
    fn an_aligned_head_has_the_targets_scopes_and_keeps_its_shape() {
        let policy = |align_head| TargetPolicy {
            fusion: TargetFusion::FollowRule,
            max_std_ratio: 1e6,
            max_mean_shift: 1e6,
            std_floor: 0.0,
            align_head,
        };
        let (_, _, plain, shape) = fold_two(policy(false));
        let (_, _, aligned, _) = fold_two(policy(true));
        assert_eq!(plain.targets, aligned.targets);
        assert_eq!(
            plain.drift, aligned.drift,
            "drift is the aggregation's, before alignment"
        );
        for (got, want) in scopes_of(&aligned.params, &shape)
            .iter()
            .zip(&aligned.targets)
        {
            assert!(
                (got.mean - want.mean).abs() < 1e-6 * want.std,
                "{got:?} {want:?}"
            );
            assert!((got.std / want.std - 1.0).abs() < 1e-5, "{got:?} {want:?}");
        }
        // An affine map per tensor: the standardized weights are unchanged.
        for range in &shape.tensors {
            let z = |p: &[f32]| -> Vec<f64> {
                let s = Scope::of(p, 0.0).unwrap();
                p.iter().map(|&x| (f64::from(x) - s.mean) / s.std).collect()
            };
            let (a, b) = (
                z(&plain.params[range.clone()]),
                z(&aligned.params[range.clone()]),
            );
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4));
        }
        // Parameters outside the scoped tensors (biases) are untouched.
        let outside: Vec<usize> = (0..shape.len)
            .filter(|i| !shape.tensors.iter().any(|r| r.contains(i)))
            .collect();
        assert!(!outside.is_empty());
        assert!(
            outside
                .iter()
                .all(|&i| plain.params[i] == aligned.params[i])
        );
    }

    #[test]
    fn one_claim_of_ten_million_is_cut_to_the_share() {
        let mut raw = vec![500.0; 9];
        raw.push(10_000_000.0);
        let w = capped_weights(&raw, 0.25);
        assert!((share_of(&w, 9) - 0.25).abs() < 1e-12, "{w:?}");
        assert_eq!(&w[..9], &raw[..9], "honest weights are kept");
        // Two liars: each at most a quarter.
        raw[0] = 1e7;
        let w = capped_weights(&raw, 0.25);
        assert!(share_of(&w, 0) <= 0.25 + 1e-12 && share_of(&w, 9) <= 0.25 + 1e-12);
    }

    #[test]
    fn weights_within_the_share_are_untouched_and_few_clients_get_equal_weights() {
        let raw = [5.0, 5.0, 6.0, 6.0, 7.0, 7.0];
        assert_eq!(capped_weights(&raw, 0.25), raw);
        assert_eq!(capped_weights(&raw, 1.0), raw);
        // Two clients cannot both stay under a quarter: the cap is then 1/2 each.
        let w = capped_weights(&[1.0, 1e9], 0.25);
        assert_eq!(w, vec![1.0, 1.0]);
        assert_eq!(capped_weights(&[], 0.25), Vec::<f64>::new());
    }

    #[test]
    fn capped_shares_never_exceed_the_bound_on_random_weights() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let n = rng.random_range(1..30);
            let raw: Vec<f64> = (0..n)
                .map(|_| 10f64.powf(rng.random_range(0.0..7.0)))
                .collect();
            let s = rng.random_range(0.05..0.6);
            let w = capped_weights(&raw, s);
            let bound = s.max(1.0 / n as f64);
            for i in 0..n {
                assert!(w[i] <= raw[i] * (1.0 + 1e-12));
                assert!(share_of(&w, i) <= bound * (1.0 + 1e-9), "{raw:?} {s} {w:?}");
            }
        }
    }
}
