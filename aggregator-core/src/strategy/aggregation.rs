//! Aggregation rules: how a round's accepted parameter vectors become the next global head.
//!
//! A rule is defined here once — its config grammar, its label, its parameter's domain and
//! its arithmetic — and reaches a compute backend as a [`Plan`] made of two primitives every
//! backend provides: a streaming weighted sum of (possibly clipped) steps, or the stored
//! updates reduced column by column with a [`ColumnRule`]. The CPU backend runs any plan; the
//! CUDA backend says which column rules it has kernels for ([`crate::backend::Backend::supports`]).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use wsa::Real;

/// How the accepted updates of a round become the next global parameters.
///
/// `Mean` and `NormClipped` fold each update as it arrives into an f64 sum and weight clients
/// by the run's [`wsa::Weighting`]. `TrimmedMean` and `Median` are coordinate-wise and need
/// every update at once: the accumulator stores them (at most the round's selection, see
/// [`crate::backend::Backend::accumulator`]) and ignores the weights, so a client cannot buy
/// influence over a robust rule by claiming more samples.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum Aggregation {
    /// The weighted mean `Σ p·w / Σ p` (FedAvg's average).
    #[default]
    Mean,
    /// The weighted mean of the updates with each one's step `w − g` from the round's global
    /// head `g` scaled down to at most `max_norm` (L2) first.
    NormClipped {
        /// The largest step kept, in parameter units.
        max_norm: f64,
    },
    /// Per coordinate: drop the `⌊trim·n⌋` smallest and largest values, average the rest.
    TrimmedMean {
        /// The fraction cut from each end, in `[0, 0.5)`.
        trim: f64,
    },
    /// Per coordinate: the median (the mean of the two middle values for an even count).
    Median,
}

/// What a rule asks of a compute backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Plan {
    /// `Σ p·(c·w + (1 − c)·g) / Σ p`, folded as updates arrive, where `g` is the round's
    /// global head and `c` the update's [`Plan::step_scale`] (1 without a bound on steps).
    WeightedSum {
        /// The largest L2 step `‖w − g‖` kept whole, if steps are clipped.
        max_step: Option<f64>,
    },
    /// Every update stored, then each coordinate's values reduced by the rule (weights
    /// ignored).
    Columns(ColumnRule),
}

impl Plan {
    /// The factor `c` a weighted sum scales an update's step by: `min(1, max_step/distance)`.
    pub fn step_scale(&self, distance: f64) -> f64 {
        match *self {
            Plan::WeightedSum {
                max_step: Some(max),
            } if distance > max => max / distance,
            _ => 1.0,
        }
    }

    /// Whether the backend keeps every update (and so a bound on their count).
    pub fn stores_updates(&self) -> bool {
        matches!(self, Plan::Columns(_))
    }
}

/// A reduction of one coordinate's values across the round's updates. Non-exhaustive: a
/// backend other than the CPU's names the rules it has kernels for and refuses the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum ColumnRule {
    /// [`column_median`].
    Median,
    /// [`column_trimmed_mean`] with this trim.
    TrimmedMean {
        /// The fraction cut from each end.
        trim: f64,
    },
}

impl ColumnRule {
    /// The reduced value of one coordinate from its `values` in the round's updates (finite,
    /// at least one; reordered) and its value `global` in the round's global head. The same
    /// rule reduces parameters (f32) and, per tensor, the clients' scopes (f64) when a run
    /// fuses targets by its aggregation rule.
    pub fn reduce<T: Real>(&self, values: &mut [T], global: T) -> T {
        let _ = global;
        match *self {
            ColumnRule::Median => column_median(values),
            ColumnRule::TrimmedMean { trim } => column_trimmed_mean(values, trim),
        }
    }
}

impl Aggregation {
    /// What the rule asks of a backend.
    pub fn plan(&self) -> Plan {
        match *self {
            Aggregation::Mean => Plan::WeightedSum { max_step: None },
            Aggregation::NormClipped { max_norm } => Plan::WeightedSum {
                max_step: Some(max_norm),
            },
            Aggregation::TrimmedMean { trim } => Plan::Columns(ColumnRule::TrimmedMean { trim }),
            Aggregation::Median => Plan::Columns(ColumnRule::Median),
        }
    }

    /// A short name for tables and file names: the config grammar's spelling (see
    /// [`FromStr`]).
    pub fn label(&self) -> String {
        self.to_string()
    }

    /// Checks the rule's parameter against its domain.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Aggregation::NormClipped { max_norm } if !(max_norm.is_finite() && max_norm > 0.0) => {
                Err(format!(
                    "norm clipping needs a finite max_norm > 0, got {max_norm}"
                ))
            }
            Aggregation::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                Err(format!("trimmed mean needs trim in [0, 0.5), got {trim}"))
            }
            _ => Ok(()),
        }
    }

    /// Whether the rule needs every update at once (and stores them).
    pub fn stores_updates(&self) -> bool {
        self.plan().stores_updates()
    }

    /// Values cut from each end of a coordinate's `n` values: `⌊trim·n⌋`, at most `(n−1)/2`
    /// so at least one value is left.
    pub fn trimmed_per_end(trim: f64, n: usize) -> usize {
        ((trim * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregation::Mean => f.write_str("mean"),
            Aggregation::NormClipped { max_norm } => write!(f, "clip:{max_norm}"),
            Aggregation::TrimmedMean { trim } => write!(f, "trimmed:{trim}"),
            Aggregation::Median => f.write_str("median"),
        }
    }
}

impl FromStr for Aggregation {
    type Err = String;

    /// `mean`, `clip:MAX_NORM`, `trimmed:TRIM` or `median`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, arg) = match text.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (text, None),
        };
        let number = |what: &str| -> Result<f64, String> {
            arg.ok_or_else(|| format!("{name} needs {what}: {name}:{what}"))?
                .parse()
                .map_err(|e| format!("bad {what} in {text:?}: {e}"))
        };
        let rule = match (name, arg) {
            ("mean", None) => Aggregation::Mean,
            ("median", None) => Aggregation::Median,
            ("clip", _) => Aggregation::NormClipped {
                max_norm: number("MAX_NORM")?,
            },
            ("trimmed", _) => Aggregation::TrimmedMean {
                trim: number("TRIM")?,
            },
            _ => {
                return Err(format!(
                    "unknown aggregation {text:?}: mean, clip:MAX_NORM, trimmed:TRIM or median"
                ));
            }
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// IEEE total order, through f64 (widening keeps an f32's order).
fn by_value<T: Real>(a: &T, b: &T) -> Ordering {
    a.as_f64().total_cmp(&b.as_f64())
}

/// The median of `values` (finite, at least one), reordering them: the middle value, or the
/// mean of the two middle values (in f64, then rounded) for an even count.
pub fn column_median<T: Real>(values: &mut [T]) -> T {
    let n = values.len();
    let (below, &mut upper, _) = values.select_nth_unstable_by(n / 2, by_value);
    if n % 2 == 1 {
        return upper;
    }
    let lower = below
        .iter()
        .map(|x| x.as_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    T::of_f64((lower + upper.as_f64()) / 2.0)
}

/// The mean of `values` (finite, at least one) without the
/// [`Aggregation::trimmed_per_end`] smallest and largest, reordering them. The kept values
/// are summed in f64 in ascending order.
pub fn column_trimmed_mean<T: Real>(values: &mut [T], trim: f64) -> T {
    let n = values.len();
    let k = Aggregation::trimmed_per_end(trim, n);
    let kept = if k == 0 {
        values
    } else {
        // The k smallest go before index k, the k largest after index n − k − 1.
        values.select_nth_unstable_by(k, by_value);
        let rest = &mut values[k..];
        rest.select_nth_unstable_by(n - 2 * k - 1, by_value);
        &mut rest[..n - 2 * k]
    };
    kept.sort_unstable_by(by_value);
    let sum: f64 = kept.iter().map(|x| x.as_f64()).sum();
    T::of_f64(sum / kept.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(column_median(&mut [3.0]), 3.0);
        assert_eq!(column_median(&mut [5.0, -1.0, 2.0]), 2.0);
        assert_eq!(column_median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(column_median(&mut [1.0, 1.0, 9.0, 9.0]), 5.0);
    }

    #[test]
    fn trimmed_mean_cuts_each_end_and_keeps_one_value() {
        let mut v = [100.0, 1.0, 2.0, 3.0, -100.0];
        assert_eq!(column_trimmed_mean(&mut v, 0.2), 2.0);
        assert_eq!(column_trimmed_mean(&mut [1.0, 2.0, 6.0], 0.0), 3.0);
        // trim · n rounds down: 0.49 · 2 = 0 cut, both kept.
        assert_eq!(column_trimmed_mean(&mut [1.0, 2.0], 0.49), 1.5);
        // 0.45 · 10 = 4 cut from each end, 2 kept.
        let mut ten: Vec<f32> = (0..10).rev().map(|x| x as f32).collect();
        assert_eq!(column_trimmed_mean(&mut ten, 0.45), 4.5);
        assert_eq!(Aggregation::trimmed_per_end(0.49, 3), 1);
        assert_eq!(Aggregation::trimmed_per_end(0.49, 1), 0);
    }

    #[test]
    fn the_grammar_round_trips_through_the_label() {
        for text in ["mean", "median", "clip:3", "trimmed:0.2", "clip:0.5"] {
            let rule: Aggregation = text.parse().unwrap();
            assert_eq!(rule.to_string(), text);
        }
        for bad in [
            "clip",
            "trimmed:0.5",
            "clip:-1",
            "mean:1",
            "mode",
            "trimmed:x",
        ] {
            assert!(bad.parse::<Aggregation>().is_err(), "{bad}");
        }
    }

    #[test]
    fn clipping_scales_only_long_steps() {
        let plan = Aggregation::NormClipped { max_norm: 2.0 }.plan();
        assert_eq!(plan.step_scale(1.0), 1.0);
        assert_eq!(plan.step_scale(8.0), 0.25);
        assert_eq!(Aggregation::Mean.plan().step_scale(1e9), 1.0);
    }
}
