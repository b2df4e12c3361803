//! What a client masks in a secure-aggregation round, as real numbers before the ring code:
//! its step `θ − g` (the trained head less the task's global head, in the head's flat layout),
//! then for each scoped tensor its `μ, σ, σ², μ²`. Summed over a round's survivors, that is
//! the summed step and every sum WSA's scope fusion needs (`wsa::ScopeSums` with unit weights),
//! and no client's scope on its own.

use crate::message::WireScope;

/// Values per scoped tensor: μ, σ, σ², μ².
pub const SCOPE_STATS: usize = 4;

/// The length of a secure input for a head of `params` values and `scoped` scoped tensors.
pub fn secure_input_len(params: usize, scoped: usize) -> usize {
    params + SCOPE_STATS * scoped
}

/// A client's secure input from its trained parameters, the task's global head and its
/// trained head's scopes.
pub fn secure_input(trained: &[f32], global: &[f32], scopes: &[WireScope]) -> Vec<f64> {
    let mut out = Vec::with_capacity(secure_input_len(trained.len(), scopes.len()));
    out.extend(
        trained
            .iter()
            .zip(global)
            .map(|(&w, &g)| f64::from(w) - f64::from(g)),
    );
    for s in scopes {
        out.extend([s.mean, s.std, s.std * s.std, s.mean * s.mean]);
    }
    out
}

/// A round's summed secure inputs, split back into their parts.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSums<'a> {
    /// Σ steps.
    pub steps: &'a [f64],
    /// Per scoped tensor: Σμ, Σσ, Σσ², Σμ².
    pub scopes: Vec<[f64; SCOPE_STATS]>,
}

/// Splits summed secure inputs of a head of `params` values; `None` if the length does not
/// fit.
pub fn split_secure_sums(sum: &[f64], params: usize) -> Option<SecureSums<'_>> {
    if sum.len() < params || !(sum.len() - params).is_multiple_of(SCOPE_STATS) {
        return None;
    }
    let (steps, rest) = sum.split_at(params);
    Some(SecureSums {
        steps,
        scopes: rest
            .chunks_exact(SCOPE_STATS)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_come_back_where_they_went() {
        let scopes = [
            WireScope {
                mean: 0.5,
                std: 2.0,
            },
            WireScope {
                mean: -1.0,
                std: 0.25,
            },
        ];
        let input = secure_input(&[1.0, 2.0, 3.0], &[0.5, 0.5, 0.5], &scopes);
        assert_eq!(input.len(), secure_input_len(3, 2));
        let sums = split_secure_sums(&input, 3).unwrap();
        assert_eq!(sums.steps, &[0.5, 1.5, 2.5]);
        assert_eq!(
            sums.scopes,
            vec![[0.5, 2.0, 4.0, 0.25], [-1.0, 0.25, 0.0625, 1.0]]
        );
        assert!(split_secure_sums(&input[..10], 3).is_none());
        assert!(split_secure_sums(&input[..2], 3).is_none());
    }
}
