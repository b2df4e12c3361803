//! Client-level differential privacy: DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018)
//! with fixed or adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021) and the
//! Rényi-DP accountant of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019).
//!
//! What one client can change in a round is bounded by clipping, on the server, the vector it
//! contributes: its step `w − g` to `C`, and its scopes' offsets from the round's targets
//! `(μ − μ̃, σ − σ̃)` to `s·C` (`s` is [`Privacy::scope_share`]), so the whole contribution has
//! L2 norm at most `C·√(1 + s²)`. The sums of both parts get Gaussian noise of std
//! `z·C·√(1 + s²)` and are divided by the round's target count, fixed before any update is
//! seen. The next global head *and* the next WSA targets are therefore the output of one
//! Gaussian mechanism per round, and the accountant composes rounds as sampled Gaussians with
//! the round's sampling rate (asked / connected clients). Adaptive clipping spends a little of
//! the noise on a noised count of unclipped clients and moves `C` toward a quantile of the
//! step norms; the accountant charges the configured `z` in both cases.
//!
//! The noise is drawn from the operating system's entropy through ChaCha20, never from the
//! run's seed: anyone who knows the seed could otherwise subtract it.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// The Rényi orders the accountant tracks: integers, where the sampled Gaussian's RDP has a
/// closed-form sum (the fractional orders of other accountants tighten ε by about 1% at most
/// on the published cases in this module's tests).
pub const ORDERS: [u32; 65] = {
    let mut orders = [0u32; 65];
    let mut i = 0;
    while i < 63 {
        orders[i] = i as u32 + 2;
        i += 1;
    }
    orders[63] = 128;
    orders[64] = 256;
    orders
};

/// A run's client-level DP settings (the run config's `[privacy]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// `z`: the noise's std over the contribution's L2 bound.
    pub noise_multiplier: f64,
    /// How the clip norm `C` of client steps is chosen.
    pub clip: Clip,
    /// The δ the run's ε is reported at (typically below 1/clients).
    pub delta: f64,
    /// The scopes' offsets are clipped to this fraction of `C`; 0 freezes the targets (no
    /// scope information is released).
    #[serde(default = "default_scope_share")]
    pub scope_share: f64,
    /// The run ends before a round that would take ε past this.
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
}

fn default_scope_share() -> f64 {
    0.1
}

/// How the clip norm is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Clip {
    /// One clip norm for the whole run.
    Fixed {
        /// `C`, in parameter units.
        norm: f64,
    },
    /// Geometric updates toward the `quantile` of the clients' step norms, from a noised count
    /// of the clients under the current norm: `C ← C·exp(−η(b̃ − γ))`.
    Adaptive {
        /// The first round's `C`.
        initial: f64,
        /// `γ`: the fraction of clients meant to stay unclipped.
        #[serde(default = "default_quantile")]
        quantile: f64,
        /// `η`.
        #[serde(default = "default_learning_rate")]
        learning_rate: f64,
        /// `σ_b`: the std of the noise on the unclipped count; must exceed `z/2` (the paper
        /// suggests a twentieth of the round's clients).
        count_noise: f64,
    },
}

fn default_quantile() -> f64 {
    0.5
}

fn default_learning_rate() -> f64 {
    0.2
}

impl Privacy {
    /// Why these settings cannot run, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.noise_multiplier) {
            return Err(format!(
                "privacy.noise_multiplier must be a positive number, not {}",
                self.noise_multiplier
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "privacy.delta must lie in (0, 1), not {}",
                self.delta
            ));
        }
        if !(self.scope_share.is_finite() && self.scope_share >= 0.0) {
            return Err(format!(
                "privacy.scope_share must be a non-negative number, not {}",
                self.scope_share
            ));
        }
        if let Some(budget) = self.epsilon_budget
            && !positive(budget)
        {
            return Err(format!(
                "privacy.epsilon_budget must be positive, not {budget}"
            ));
        }
        match self.clip {
            Clip::Fixed { norm } if !positive(norm) => {
                Err(format!("privacy.clip.norm must be positive, not {norm}"))
            }
            Clip::Fixed { .. } => Ok(()),
            Clip::Adaptive {
                initial,
                quantile,
                learning_rate,
                count_noise,
            } => {
                if !positive(initial) {
                    Err(format!(
                        "privacy.clip.initial must be positive, not {initial}"
                    ))
                } else if !(quantile > 0.0 && quantile < 1.0) {
                    Err(format!(
                        "privacy.clip.quantile must lie in (0, 1), not {quantile}"
                    ))
                } else if !(learning_rate.is_finite() && learning_rate >= 0.0) {
                    Err(format!(
                        "privacy.clip.learning_rate must be non-negative, not {learning_rate}"
                    ))
                } else if !(count_noise.is_finite() && 2.0 * count_noise > self.noise_multiplier) {
                    Err(format!(
                        "privacy.clip.count_noise must exceed noise_multiplier / 2 = {} (the \
                         count's noise is paid out of the update's), not {count_noise}",
                        self.noise_multiplier / 2.0
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The noise multiplier applied to the update sums: `z` with a fixed clip; with an
    /// adaptive one, `(z⁻² − (2σ_b)⁻²)^(−1/2)`, so that update and count together cost what
    /// one Gaussian of multiplier `z` costs (Andrew et al., Theorem 1).
    pub fn update_noise_multiplier(&self) -> f64 {
        match self.clip {
            Clip::Fixed { .. } => self.noise_multiplier,
            Clip::Adaptive { count_noise, .. } => {
                let z = self.noise_multiplier;
                (z.powi(-2) - (2.0 * count_noise).powi(-2)).powf(-0.5)
            }
        }
    }

    /// The bound on one client's contribution for clip norm `clip`: its step, and its scope
    /// offsets when the run's targets are fused from clients' scopes (`scopes`).
    pub fn sensitivity(&self, clip: f64, scopes: bool) -> f64 {
        let share = if scopes { self.scope_share } else { 0.0 };
        clip * (1.0 + share * share).sqrt()
    }
}

/// What DP carries from round to round (checkpointed): the clip norm and the privacy spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyState {
    /// The clip norm the next round uses.
    pub clip_norm: f64,
    /// The accountant.
    pub accountant: RdpAccountant,
    /// The next round would take ε past the budget: the run is over.
    pub budget_spent: bool,
}

impl PrivacyState {
    /// The state before the first round.
    pub fn new(privacy: &Privacy) -> Self {
        let clip_norm = match privacy.clip {
            Clip::Fixed { norm } => norm,
            Clip::Adaptive { initial, .. } => initial,
        };
        Self {
            clip_norm,
            accountant: RdpAccountant::default(),
            budget_spent: false,
        }
    }

    /// Moves an adaptive clip norm from the noised fraction of a round's clients that it did
    /// not clip; a fixed one stays.
    pub fn adapt(&mut self, privacy: &Privacy, noised_unclipped_fraction: f64) {
        if let Clip::Adaptive {
            quantile,
            learning_rate,
            ..
        } = privacy.clip
        {
            self.clip_norm *= (-learning_rate * (noised_unclipped_fraction - quantile)).exp();
        }
    }
}

/// A source of the Gaussian noise DP adds, seeded from the operating system.
pub struct Noise {
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for Noise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Noise")
    }
}

impl Noise {
    /// A generator seeded from the OS.
    pub fn from_os() -> Self {
        Self {
            rng: ChaCha20Rng::from_os_rng(),
        }
    }

    /// One draw of `N(0, std²)`; 0 for a zero std.
    pub fn sample(&mut self, std: f64) -> f64 {
        match Normal::new(0.0, std) {
            Ok(normal) if std > 0.0 => normal.sample(&mut self.rng),
            _ => 0.0,
        }
    }
}

/// Rényi DP of a composition of Poisson-sampled Gaussian mechanisms, one value per order in
/// [`ORDERS`]; composition adds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    rdp: Vec<f64>,
    steps: u64,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self {
            rdp: vec![0.0; ORDERS.len()],
            steps: 0,
        }
    }
}

impl RdpAccountant {
    /// Adds `steps` rounds that each sample clients with probability `q` and add Gaussian
    /// noise of multiplier `z`.
    pub fn compose(&mut self, q: f64, z: f64, steps: u64) {
        for (rdp, &order) in self.rdp.iter_mut().zip(&ORDERS) {
            *rdp += steps as f64 * sampled_gaussian_rdp(q, z, order);
        }
        self.steps += steps;
    }

    /// The rounds composed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The smallest ε over the tracked orders at which the composition is (ε, δ)-DP, by the
    /// conversion of Balle et al. 2020 (Proposition 12 of arXiv 2004.00010, as in Google's
    /// `dp-accounting`): `ε = r + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)`.
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.steps == 0 {
            return 0.0;
        }
        ORDERS
            .iter()
            .zip(&self.rdp)
            .map(|(&order, &r)| {
                let a = f64::from(order);
                if delta * delta + (-r).exp_m1() > 0.0 {
                    // δ ≥ √(1 − e^(−KL)): the KL bound already gives ε = 0.
                    0.0
                } else {
                    r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
                }
            })
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }

    /// ε after one more round at (`q`, `z`), leaving this accountant as it is.
    pub fn epsilon_after(&self, q: f64, z: f64, delta: f64) -> f64 {
        let mut next = self.clone();
        next.compose(q, z, 1);
        next.epsilon(delta)
    }
}

/// RDP at integer order `α ≥ 2` of the Gaussian mechanism of noise multiplier `z` applied to
/// a Poisson sample of rate `q`: `ln A_α / (α − 1)` with
/// `A_α = Σ_{i=0..α} C(α,i) qⁱ (1−q)^(α−i) exp((i² − i)/(2z²))` (Mironov et al. 2019, §3.3),
/// summed in log space.
pub fn sampled_gaussian_rdp(q: f64, z: f64, order: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if z <= 0.0 {
        return f64::INFINITY;
    }
    let alpha = f64::from(order);
    if q >= 1.0 {
        return alpha / (2.0 * z * z);
    }
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let mut ln_comb = 0.0; // ln C(α, 0)
    let mut ln_a = f64::NEG_INFINITY;
    for i in 0..=order {
        if i > 0 {
            ln_comb += f64::from(order - i + 1).ln() - f64::from(i).ln();
        }
        let fi = f64::from(i);
        let term = ln_comb + fi * ln_q + (alpha - fi) * ln_1mq + (fi * fi - fi) / (2.0 * z * z);
        ln_a = log_add(ln_a, term);
    }
    ln_a / (alpha - 1.0)
}

fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        (lo - hi).exp().ln_1p() + hi
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(q, z, rounds, δ, ε with these orders, ε with dp-accounting's default orders)` from
    /// Google's `dp-accounting` 0.6.0 (`scripts/dp-reference.py` prints them).
    const DP_ACCOUNTING: [(f64, f64, u64, f64, f64, f64); 7] = [
        (
            0.01,
            1.1,
            1000,
            1e-5,
            1.7252908180449444,
            1.7117701662429012,
        ),
        (0.1, 1.0, 100, 1e-5, 7.972921510380539, 7.903850223578231),
        (0.05, 0.8, 200, 1e-6, 9.905257248336735, 9.905257248336735),
        (1.0, 5.0, 50, 1e-5, 7.087861628831665, 7.077391578166641),
        (
            0.001,
            2.0,
            10000,
            1e-6,
            0.24471730638391861,
            0.24471730638391861,
        ),
        (0.2, 4.0, 40, 1e-3, 0.9694882250097946, 0.9683103116453232),
        (0.02, 0.5, 300, 1e-5, 16.49043268719913, 16.49043268719913),
    ];

    #[test]
    fn epsilon_matches_dp_accounting() {
        for (q, z, rounds, delta, same_orders, default_orders) in DP_ACCOUNTING {
            let mut acc = RdpAccountant::default();
            acc.compose(q, z, rounds);
            let eps = acc.epsilon(delta);
            assert!(
                (eps - same_orders).abs() <= 1e-9 * same_orders,
                "q {q} z {z} T {rounds}: {eps} vs dp-accounting {same_orders}"
            );
            // Integer orders only: never below the finer grid, and within 1% of it.
            assert!(eps >= default_orders - 1e-12 && eps <= default_orders * 1.01);
        }
    }

    #[test]
    fn rounds_compose_one_at_a_time_as_in_one_call() {
        let (mut one, mut many) = (RdpAccountant::default(), RdpAccountant::default());
        one.compose(0.05, 1.2, 30);
        for _ in 0..30 {
            many.compose(0.05, 1.2, 1);
        }
        assert!((one.epsilon(1e-5) - many.epsilon(1e-5)).abs() < 1e-9);
        assert_eq!(many.steps(), 30);
        assert!(
            (many.epsilon_after(0.05, 1.2, 1e-5) - {
                let mut m = many.clone();
                m.compose(0.05, 1.2, 1);
                m.epsilon(1e-5)
            })
            .abs()
                < 1e-12
        );
    }

    #[test]
    fn full_participation_is_the_plain_gaussian() {
        // q = 1: RDP α/(2z²) exactly, and the sum over i in the sampled formula tends to it.
        for order in [2, 7, 64] {
            let closed = f64::from(order) / (2.0 * 1.5 * 1.5);
            assert_eq!(sampled_gaussian_rdp(1.0, 1.5, order), closed);
            let near = sampled_gaussian_rdp(1.0 - 1e-12, 1.5, order);
            assert!(
                (near - closed).abs() < 1e-6,
                "order {order}: {near} vs {closed}"
            );
        }
    }

    #[test]
    fn less_noise_fewer_clients_and_more_rounds_all_cost_more() {
        let eps = |q: f64, z: f64, t: u64| {
            let mut a = RdpAccountant::default();
            a.compose(q, z, t);
            a.epsilon(1e-5)
        };
        assert!(eps(0.1, 0.8, 100) > eps(0.1, 1.0, 100));
        assert!(eps(0.2, 1.0, 100) > eps(0.1, 1.0, 100));
        assert!(eps(0.1, 1.0, 200) > eps(0.1, 1.0, 100));
        assert_eq!(RdpAccountant::default().epsilon(1e-5), 0.0);
    }

    #[test]
    fn adaptive_noise_split_costs_what_one_gaussian_costs() {
        let p = Privacy {
            noise_multiplier: 1.0,
            clip: Clip::Adaptive {
                initial: 1.0,
                quantile: 0.5,
                learning_rate: 0.2,
                count_noise: 5.0,
            },
            delta: 1e-5,
            scope_share: 0.1,
            epsilon_budget: None,
        };
        p.check().unwrap();
        let (z, zd, sb) = (1.0f64, p.update_noise_multiplier(), 5.0f64);
        // Two Gaussians compose to one of multiplier (z_Δ⁻² + (2σ_b)⁻²)^(−1/2).
        assert!(((zd.powi(-2) + (2.0 * sb).powi(-2)).powf(-0.5) - z).abs() < 1e-12);
        assert!(zd > z);
        let mut state = PrivacyState::new(&p);
        state.adapt(&p, 1.0); // everyone unclipped: the norm shrinks
        assert!(state.clip_norm < 1.0);
        state.adapt(&p, 0.0);
        state.adapt(&p, 0.0);
        assert!(state.clip_norm > 1.0);
        let bad = Privacy {
            clip: Clip::Adaptive {
                initial: 1.0,
                quantile: 0.5,
                learning_rate: 0.2,
                count_noise: 0.4,
            },
            ..p
        };
        assert!(bad.check().unwrap_err().contains("count_noise"));
    }

    #[test]
    fn noise_has_the_asked_spread() {
        let mut noise = Noise::from_os();
        let draws: Vec<f64> = (0..20_000).map(|_| noise.sample(2.0)).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        // 20,000 draws: the mean's std is 0.014, the variance's about 0.04.
        assert!(mean.abs() < 0.1, "{mean}");
        assert!((var - 4.0).abs() < 0.3, "{var}");
        assert_eq!(noise.sample(0.0), 0.0);
    }
}
