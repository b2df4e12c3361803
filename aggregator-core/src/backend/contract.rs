//! What every backend checks, the same way and with the same errors, so that the CUDA backend
//! refuses exactly what the CPU backend refuses.

use super::{BackendError, FoldShape, Measurement};
use crate::strategy::Aggregation;

/// Before an accumulator is handed out: the shape against the reference, the rule's parameter.
pub fn check_request(
    shape: &FoldShape,
    reference: &[f32],
    aggregation: Aggregation,
) -> Result<(), BackendError> {
    shape.check(reference)?;
    aggregation.validate().map_err(wsa::Error::InvalidConfig)?;
    Ok(())
}

/// A fold weight: finite and ≥ 0 (the core's rule and error).
pub fn check_weight(p: f64) -> Result<(), BackendError> {
    if p.is_finite() && p >= 0.0 {
        Ok(())
    } else {
        Err(wsa::Error::ZeroTotalWeight { total: p }.into())
    }
}

/// A batch's weights (and measurements) are one per vector.
pub fn check_batch(
    ws: &[&[f32]],
    ps: &[f64],
    measured: Option<&[Measurement]>,
) -> Result<(), BackendError> {
    let found = match measured {
        _ if ps.len() != ws.len() => ps.len(),
        Some(m) => m.len(),
        None => ws.len(),
    };
    if found != ws.len() {
        return Err(wsa::Error::ShapeMismatch {
            what: "weights and measurements of a batch",
            expected: ws.len(),
            found,
        }
        .into());
    }
    Ok(())
}

/// A candidate's length against the shape's.
pub fn check_len(expected: usize, w: &[f32]) -> Result<(), BackendError> {
    if w.len() == expected {
        Ok(())
    } else {
        Err(wsa::Error::ShapeMismatch {
            what: "parameter vector",
            expected,
            found: w.len(),
        }
        .into())
    }
}

/// What `finish` says when a storing rule has nothing stored.
pub fn nothing_to_aggregate() -> BackendError {
    wsa::Error::Empty { what: "updates" }.into()
}

/// `1 / Σp` for a weighted sum's finish, refusing a total that is not > 0 as the core does.
pub fn inverse_total(total: f64) -> Result<f64, BackendError> {
    if total.is_finite() && total > 0.0 {
        Ok(1.0 / total)
    } else {
        Err(wsa::Error::ZeroTotalWeight { total }.into())
    }
}

/// The refusal of an operation a plan does not have (a median has no partial sum).
pub fn unsupported(op: &'static str, aggregation: Aggregation) -> BackendError {
    BackendError::Unsupported {
        op,
        rule: aggregation.label(),
    }
}

/// The refusal of an update beyond the room a storing rule was given.
pub fn full(aggregation: Aggregation, capacity: usize) -> BackendError {
    BackendError::Capacity(format!(
        "the {} rule was given room for {capacity} updates",
        aggregation.label()
    ))
}

/// The refusal of a batch that does not fit the room left.
pub fn batch_full(batch: usize, count: usize, capacity: usize) -> BackendError {
    BackendError::Capacity(format!(
        "a batch of {batch} with {count} of {capacity} places taken"
    ))
}
