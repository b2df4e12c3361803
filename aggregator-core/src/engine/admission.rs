//! Admission: the checks an update passes before it is folded, in their order. The first
//! that fails is the verdict's reason; a refused update leaves the fold untouched.
//!
//! 1. it answers the task of the stream it came on (`StaleRound`, `FutureRound`: the runtime
//!    says which task's stream carried it, and the verdict goes back there);
//! 2. run id (`WrongRun`); the session's client is connected (`UnknownClient`); the update's
//!    client id is the session's (`ClientMismatch`);
//! 3. its round is the current one and open (`StaleRound`, `FutureRound`, `RoundClosed`); the
//!    client was selected (`NotSelected`); not yet accepted this round (`Duplicate`) — from
//!    here on the client has answered, whatever the verdict;
//! 4. digest (`DigestMismatch`); the task's encoding (`WrongEncoding`); parameter and scope
//!    counts (`WrongShape`); decoding (`WrongShape`, `Malformed`), then the parameters moved
//!    from the client's start onto the global head ([`super::downlink`]); every parameter,
//!    scope and metric finite (`NonFinite`);
//! 5. sample count in `1..=min(hello's, max)` (`BadSampleCount`); every reported σ > 0 and
//!    the reported scopes within tolerance of the measured ones (`BadScope`); each measured
//!    σ within a factor of the global head's (`BadScope`); distance from the global head
//!    (`NormTooLarge`).

use protocol::{Encoding, RejectReason, RowLayout, Update};
use tracing::error;
use wsa::Scope;

use super::{Answer, Engine, ReceivedUpdate, Reported};
use crate::backend::{BackendError, Measurement};
use crate::strategy::RoundFold;

/// Step 1: an update answers the task of the stream it arrived on.
pub fn check_task_round(round: u64, task_round: u64) -> Result<(), RejectReason> {
    if round < task_round {
        Err(RejectReason::StaleRound {
            got: round,
            current: task_round,
        })
    } else if round > task_round {
        Err(RejectReason::FutureRound {
            got: round,
            current: task_round,
        })
    } else {
        Ok(())
    }
}

impl Engine {
    /// Checks `update` and folds it. On `Err` nothing was folded.
    pub(super) fn admit(
        &mut self,
        client: &str,
        received: &ReceivedUpdate,
    ) -> Result<(), RejectReason> {
        let update = received.update();
        if update.run_id != self.config.run_id {
            return Err(RejectReason::WrongRun);
        }
        let Some(info) = self.clients.get(client).copied() else {
            return Err(RejectReason::UnknownClient);
        };
        if update.client_id != client {
            return Err(RejectReason::ClientMismatch);
        }
        check_task_round(update.round, self.next_round)?;
        let Some(open) = self.open.as_mut() else {
            return Err(RejectReason::RoundClosed);
        };
        let Some(sel) = open.selected.get_mut(client) else {
            return Err(RejectReason::NotSelected);
        };
        if sel.answer == Answer::Accepted {
            return Err(RejectReason::Duplicate);
        }
        // From here on the client has answered, whatever the verdict.
        sel.answer = Answer::Rejected;
        let (encoding, start) = (sel.encoding, sel.start);
        if !received.digest_ok() {
            return Err(RejectReason::DigestMismatch);
        }
        let checked = check_contents(
            update,
            encoding,
            &self.layout,
            self.fold_shape.tensors.len(),
            &mut self.scratch,
            |params| open.downlink.rebase(start, &self.global, params),
            &mut open.fold,
        )?;
        let bounds = &self.config.bounds;
        let n = update.n_samples;
        if n == 0 || n > info.n_samples || n > bounds.max_n_samples {
            return Err(RejectReason::BadSampleCount(n));
        }
        // Held-out rows are rows the hello counted and the training did not use, about the
        // share the run asked for (a client holds out round(share · rows)), and only when it
        // asked.
        let most_held_out = (self.config.eval_fraction * info.n_samples as f64).ceil() as u64;
        if let Some(e) = &update.metrics.held_out
            && !(e.is_plausible()
                && e.samples <= most_held_out
                && e.samples.saturating_add(n) <= info.n_samples)
        {
            return Err(RejectReason::Malformed(format!(
                "implausible held-out evaluation: {} rows (training {n}, hello {}), loss {}, \
                 accuracy {}",
                e.samples, info.n_samples, e.loss, e.accuracy
            )));
        }
        check_scopes(
            &checked.reported,
            &checked.measurement.scopes,
            bounds.scope_tolerance,
        )?;
        check_scope_change(
            &checked.measurement.scopes,
            &self.global_scopes,
            &self.scales,
            bounds.max_scope_ratio,
        )?;
        let bound = bounds.norm_ratio * self.global_norm.max(1.0);
        if checked.measurement.distance > bound {
            return Err(RejectReason::NormTooLarge {
                norm: checked.measurement.distance,
                bound,
            });
        }
        // Folded with the scopes measured here: the reported ones were only checked against
        // them.
        open.fold
            .add(client, &self.scratch, &checked.measurement, n)
            .map_err(|e| {
                error!(client, error = %e, "fold refused a checked update");
                RejectReason::Malformed(format!("cannot fold: {e}"))
            })?;
        if let Some(sel) = open.selected.get_mut(client) {
            sel.answer = Answer::Accepted;
        }
        open.accepted.push(client.to_owned());
        open.step_norms.push(checked.measurement.distance);
        open.accepted_payload_bytes += update.params.payload_bytes() as u64;
        let m = &update.metrics;
        open.metrics.insert(
            client.to_owned(),
            Reported {
                loss: m.loss,
                accuracy: m.accuracy,
                kl: m.kl,
                held_out: m.held_out,
            },
        );
        Ok(())
    }
}

/// The update's contents, decoded and measured.
struct Checked {
    reported: Vec<Scope>,
    measurement: Measurement,
}

/// Encoding, counts, decoding into `scratch` and moving it onto the global head
/// (`rebase`, [`super::downlink`]), finiteness; then the measurement.
fn check_contents(
    update: &Update,
    encoding: Encoding,
    layout: &RowLayout,
    want_scopes: usize,
    scratch: &mut [f32],
    rebase: impl FnOnce(&mut [f32]),
    fold: &mut RoundFold,
) -> Result<Checked, RejectReason> {
    if update.params.encoding != encoding {
        return Err(RejectReason::WrongEncoding);
    }
    let want_params = layout.len();
    if update.params.count as usize != want_params || update.scopes.len() != want_scopes {
        return Err(RejectReason::WrongShape(format!(
            "{} parameters and {} scopes, the head has {} and {}",
            update.params.count,
            update.scopes.len(),
            want_params,
            want_scopes
        )));
    }
    update
        .params
        .decode_into(layout, scratch)
        .map_err(|e| match e {
            protocol::EncodingError::Length { .. }
            | protocol::EncodingError::DataBytes { .. }
            | protocol::EncodingError::Scales { .. } => RejectReason::WrongShape(e.to_string()),
            other => RejectReason::Malformed(other.to_string()),
        })?;
    rebase(scratch);
    let measurement = fold.measure(scratch).map_err(|e| match e {
        BackendError::Core(wsa::Error::NonFinite { .. }) => RejectReason::NonFinite,
        other => RejectReason::Malformed(other.to_string()),
    })?;
    let m = &update.metrics;
    let scopes_finite = update
        .scopes
        .iter()
        .all(|s| s.mean.is_finite() && s.std.is_finite());
    if !(scopes_finite && m.loss.is_finite() && m.accuracy.is_finite() && m.kl.is_finite()) {
        return Err(RejectReason::NonFinite);
    }
    Ok(Checked {
        reported: update
            .scopes
            .iter()
            .map(|s| Scope {
                mean: s.mean,
                std: s.std,
            })
            .collect(),
        measurement,
    })
}

/// Every σ > 0, and each reported scope within `tol · σ_measured` of the measured one.
fn check_scopes(reported: &[Scope], measured: &[Scope], tol: f64) -> Result<(), RejectReason> {
    for (i, (r, m)) in reported.iter().zip(measured).enumerate() {
        if r.std <= 0.0 {
            return Err(RejectReason::BadScope(format!(
                "tensor {i}: σ = {} is not positive",
                r.std
            )));
        }
        let slack = tol * m.std;
        if (r.mean - m.mean).abs() > slack || (r.std - m.std).abs() > slack {
            return Err(RejectReason::BadScope(format!(
                "tensor {i}: reported (μ {:.6e}, σ {:.6e}), parameters give (μ {:.6e}, σ {:.6e})",
                r.mean, r.std, m.mean, m.std
            )));
        }
    }
    Ok(())
}

/// Each measured σ within `ratio` of the global head's, around the tensor's scale `s` where the
/// global σ is far from it: `min(σ_g, s)/ratio ≤ σ ≤ ratio·max(σ_g, s)`.
fn check_scope_change(
    measured: &[Scope],
    global: &[Scope],
    scales: &[f64],
    ratio: f64,
) -> Result<(), RejectReason> {
    for (i, ((m, g), &s)) in measured.iter().zip(global).zip(scales).enumerate() {
        let (low, high) = (g.std.min(s) / ratio, g.std.max(s) * ratio);
        if !(low..=high).contains(&m.std) {
            return Err(RejectReason::BadScope(format!(
                "tensor {i}: σ {:.6e} is outside [{low:.6e}, {high:.6e}], a factor {ratio} \
                 around the global head's {:.6e}",
                m.std, g.std
            )));
        }
    }
    Ok(())
}
