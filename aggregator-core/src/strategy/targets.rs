//! How a round's targets are formed from the clients' scopes, how far a round may move them,
//! and how low σ̃ may go.
//!
//! By default the targets are the per-tensor median of the clients' measured μ and σ: a few
//! clients sending collapsed or inflated tensors do not move the median, whereas any weighted
//! mean would drift under a persistent liar, and the drift compounds, since honest clients
//! align to the targets they are given and report the drifted scale back.
//!
//! The targets are what every client's local training is pulled toward, so a bad target hurts
//! every honest client of the next round: a σ̃ near zero makes the KL term's curvature
//! (`1/σ̃²`) explode and local training diverge. The fused targets are therefore kept within a
//! factor of the last round's σ̃, within a few σ̃ of its μ̃, and above a floor tied to each
//! tensor's initial scale — which also gives zero-initialised biases (σ = √ε ≈ 1e-4) a target
//! their training can follow.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use wsa::{Head, Scope, ScopeSelection, TensorKind};

/// How the clients' scopes become the next targets.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum TargetFusion {
    /// Per tensor, the median of the clients' μ and of their σ (weights ignored).
    #[default]
    Median,
    /// Per tensor, the trimmed mean of the clients' μ and of their σ (weights ignored).
    TrimmedMean {
        /// The fraction cut from each end, in `[0, 0.5)`.
        trim: f64,
    },
    /// The strategy's σ̃ rule over the clients' capped weights (the paper's fusion), or the
    /// aggregation's column rule when the parameters use one.
    FollowRule,
    /// The new global head's own scopes (the clients' scopes are not used): an ablation of
    /// fusion without DP, since averaging shrinks σ; under DP the recommended choice, as it
    /// releases nothing beyond the noised head and follows the σ the noise gives it.
    GlobalHead,
    /// The initial head's scopes, never moved: an ablation of target updates.
    Fixed,
}

impl TargetFusion {
    /// Whether the targets are formed from the clients' scopes (which under DP must then be
    /// released through the noised sums) rather than from the head or not at all.
    pub fn uses_client_scopes(&self) -> bool {
        !matches!(self, TargetFusion::GlobalHead | TargetFusion::Fixed)
    }
}

impl fmt::Display for TargetFusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetFusion::Median => f.write_str("median"),
            TargetFusion::TrimmedMean { trim } => write!(f, "trimmed:{trim}"),
            TargetFusion::FollowRule => f.write_str("follow-rule"),
            TargetFusion::GlobalHead => f.write_str("global-head"),
            TargetFusion::Fixed => f.write_str("fixed"),
        }
    }
}

impl FromStr for TargetFusion {
    type Err = String;

    /// `median`, `trimmed:TRIM`, `follow-rule`, `global-head` or `fixed`.
    fn from_str(text: &str) -> Result<Self, String> {
        let fusion = match text.trim().split(':').collect::<Vec<_>>().as_slice() {
            ["median"] => TargetFusion::Median,
            ["trimmed", trim] => TargetFusion::TrimmedMean {
                trim: trim
                    .parse()
                    .map_err(|e| format!("bad trim {trim:?} in {text:?}: {e}"))?,
            },
            ["follow-rule"] => TargetFusion::FollowRule,
            ["global-head"] => TargetFusion::GlobalHead,
            ["fixed"] => TargetFusion::Fixed,
            _ => {
                return Err(format!(
                    "unknown target fusion {text:?}: median, trimmed:TRIM, follow-rule, \
                     global-head or fixed"
                ));
            }
        };
        TargetPolicy {
            fusion,
            ..TargetPolicy::default()
        }
        .validate()?;
        Ok(fusion)
    }
}

/// How a round's targets are formed and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetPolicy {
    /// How the clients' scopes are fused.
    pub fusion: TargetFusion,
    /// σ̃ changes by at most this factor in a round (≥ 1).
    pub max_std_ratio: f64,
    /// μ̃ moves by at most this many of the last round's σ̃ in a round (≥ 0).
    pub max_mean_shift: f64,
    /// σ̃ never falls below this fraction of the initial std of its layer's weights (≥ 0).
    pub std_floor: f64,
    /// Rescale each scoped tensor of the merged head to its new target (μ̃, σ̃) before it is
    /// broadcast: restores the scale averaging shrinks (server-side scope alignment).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub align_head: bool,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        Self {
            fusion: TargetFusion::default(),
            max_std_ratio: 2.0,
            max_mean_shift: 1.0,
            std_floor: 0.1,
            align_head: false,
        }
    }
}

impl TargetPolicy {
    /// Checks each value against its domain.
    pub fn validate(&self) -> Result<(), String> {
        if let TargetFusion::TrimmedMean { trim } = self.fusion
            && !(0.0..0.5).contains(&trim)
        {
            return Err(format!(
                "targets.fusion: a trimmed mean needs trim in [0, 0.5), got {trim}"
            ));
        }
        if !(self.max_std_ratio.is_finite() && self.max_std_ratio >= 1.0) {
            return Err(format!(
                "targets.max_std_ratio must be finite and >= 1, got {}",
                self.max_std_ratio
            ));
        }
        if !(self.max_mean_shift.is_finite() && self.max_mean_shift >= 0.0) {
            return Err(format!(
                "targets.max_mean_shift must be finite and >= 0, got {}",
                self.max_mean_shift
            ));
        }
        if !(self.std_floor.is_finite() && self.std_floor >= 0.0) {
            return Err(format!(
                "targets.std_floor must be finite and >= 0, got {}",
                self.std_floor
            ));
        }
        Ok(())
    }

    /// The σ̃ floor of each scoped tensor: `std_floor` times its scale ([`layer_scales`]).
    pub fn floors(&self, scales: &[f64]) -> Vec<f64> {
        scales.iter().map(|s| self.std_floor * s).collect()
    }

    /// Keeps each of `fused` within the bounds around `previous` and above its floor.
    pub fn apply(&self, previous: &[Scope], fused: &mut [Scope], floors: &[f64]) {
        for ((f, p), &floor) in fused.iter_mut().zip(previous).zip(floors) {
            let shift = self.max_mean_shift * p.std;
            f.mean = f.mean.clamp(p.mean - shift, p.mean + shift);
            f.std = f
                .std
                .clamp(p.std / self.max_std_ratio, p.std * self.max_std_ratio)
                .max(floor);
        }
    }

    /// The first round's targets: the initial head's scopes, raised to their floors.
    pub fn initial(&self, scopes: &mut [Scope], floors: &[f64]) {
        for (s, &floor) in scopes.iter_mut().zip(floors) {
            s.std = s.std.max(floor);
        }
    }
}

/// The scale of each tensor `selection` scopes: the std of its layer's weights in the initial
/// head `initial` (ε as in the scopes), which a zero-initialised bias lacks of its own.
pub fn layer_scales(
    initial: &Head<f32>,
    selection: ScopeSelection,
    eps: f64,
) -> wsa::Result<Vec<f64>> {
    let weights = initial.scopes(ScopeSelection::default(), eps)?;
    Ok(initial
        .spec()
        .scoped_tensors(selection)
        .iter()
        .map(|t| {
            debug_assert!(t.kind == TensorKind::Weight || selection.include_biases);
            weights[t.layer].std
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsa::{DEFAULT_SCOPE_EPS, HeadSpec, Init};

    #[test]
    fn a_collapsed_or_inflated_fusion_moves_the_targets_by_the_bounds_only() {
        let b = TargetPolicy::default();
        let previous = [Scope::new(0.0, 0.04).unwrap()];
        let mut fused = [Scope::new(0.5, 1e-6).unwrap()];
        b.apply(&previous, &mut fused, &[0.004]);
        assert_eq!(fused[0].std, 0.02, "halved at most");
        assert_eq!(fused[0].mean, 0.04, "one σ̃ at most");
        let mut fused = [Scope::new(-0.01, 9.0).unwrap()];
        b.apply(&previous, &mut fused, &[0.004]);
        assert_eq!((fused[0].mean, fused[0].std), (-0.01, 0.08));
        // Repeated collapse stops at the floor.
        let mut prev = previous;
        for _ in 0..20 {
            let mut f = [Scope::new(0.0, 1e-9).unwrap()];
            b.apply(&prev, &mut f, &[0.004]);
            prev = f;
        }
        assert_eq!(prev[0].std, 0.004);
    }

    #[test]
    fn the_fusion_grammar_round_trips() {
        for text in [
            "median",
            "trimmed:0.2",
            "follow-rule",
            "global-head",
            "fixed",
        ] {
            assert_eq!(text.parse::<TargetFusion>().unwrap().to_string(), text);
        }
        for bad in ["mean", "trimmed:0.5", "trimmed", "fixed:1"] {
            assert!(bad.parse::<TargetFusion>().is_err(), "{bad}");
        }
    }

    #[test]
    fn biases_get_their_layers_weight_scale_as_floor() {
        let spec = HeadSpec::mlp(64, &[32], 10);
        let head = Head::<f32>::init(&spec, Init::Standard, 1).unwrap();
        let with_biases = ScopeSelection {
            include_biases: true,
        };
        let b = TargetPolicy::default();
        let floors = b.floors(&layer_scales(&head, with_biases, DEFAULT_SCOPE_EPS).unwrap());
        let weights = head
            .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
            .unwrap();
        assert_eq!(floors.len(), 4);
        assert_eq!(floors[0], 0.1 * weights[0].std);
        assert_eq!(floors[1], 0.1 * weights[0].std, "layer 0's bias");
        assert_eq!(floors[3], 0.1 * weights[1].std, "layer 1's bias");
        let mut initial = head.scopes(with_biases, DEFAULT_SCOPE_EPS).unwrap();
        assert!(initial[1].std < 1e-3, "a zero bias has σ = √ε");
        b.initial(&mut initial, &floors);
        assert_eq!(initial[1].std, floors[1]);
        assert_eq!(
            initial[0].std, weights[0].std,
            "weights are above their floor"
        );
    }
}
