//! What goes in and out of the engine: the runtime's clock ([`Millis`]), the [`Event`]s it
//! feeds, the [`Action`]s it carries out, and the [`RoundReport`] of every round attempt.

use std::collections::BTreeMap;
use std::sync::Arc;

use protocol::{
    Capabilities, HeadRef, RejectReason, RoundTask, SecAgg, SecAggSetup, Update, Verdict,
};
use serde::{Deserialize, Serialize};
use wsa::{Evaluation, Scope};

use crate::checkpoint::Checkpoint;
use crate::strategy::Drift;
pub use support::Millis;

/// An update as it came off the wire, with its digest already checked.
///
/// sha256 over the parameters is the largest single cost of an update (~0.8 ms for the 1.3 MB
/// of a 330k-parameter head in f32) and needs no engine state, so the runtime builds this in
/// the connection's own task, in parallel with the other connections; the engine, one thread
/// for the whole round, only reads the result at its place in the check order. The flag is
/// private and set only by [`ReceivedUpdate::new`], so it cannot disagree with the contents.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedUpdate {
    update: Update,
    digest_ok: bool,
}

impl ReceivedUpdate {
    /// Checks the digest of `update` (O(payload); call it off the engine's thread).
    pub fn new(update: Update) -> Self {
        let digest_ok = update.digest_ok();
        Self { update, digest_ok }
    }

    /// The update.
    pub fn update(&self) -> &Update {
        &self.update
    }

    /// Whether its digest matched its contents.
    pub fn digest_ok(&self) -> bool {
        self.digest_ok
    }

    /// The update, for reuse of its buffers.
    pub fn into_update(self) -> Update {
        self.update
    }
}

impl From<Update> for ReceivedUpdate {
    fn from(update: Update) -> Self {
        Self::new(update)
    }
}

/// Something that happened, fed to [`Engine::handle`](super::Engine::handle).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client passed the transport's authentication.
    Connected {
        /// Its authenticated id.
        client: String,
        /// The training rows its hello claimed (an upper bound for its updates).
        n_samples: u64,
        /// Encodings it can produce.
        capabilities: Capabilities,
        /// The head its hello said it holds from an earlier lossy task.
        held: Option<HeadRef>,
    },
    /// A client's session ended.
    Disconnected {
        /// Its id.
        client: String,
    },
    /// An update arrived on a client's session.
    Update {
        /// The session's authenticated client id (not the id inside the update).
        client: String,
        /// The round of the task whose stream carried it: the verdict goes back there, and an
        /// update naming another round is refused.
        task_round: u64,
        /// The decoded message with its digest checked ([`ReceivedUpdate::new`]), otherwise
        /// not yet validated.
        update: Box<ReceivedUpdate>,
        /// Bytes it took on the wire (frame included), for the round report.
        wire_bytes: u64,
    },
    /// A client answered its round task with something that is not a decodable update
    /// (the transport already told it why). Counted as a rejection; the client has answered.
    Unreadable {
        /// The session's authenticated client id.
        client: String,
        /// The round of the task it answered.
        round: u64,
        /// Why the bytes were refused.
        reason: RejectReason,
        /// Bytes received for it.
        wire_bytes: u64,
    },
    /// A secure-aggregation step arrived on the stream of a client's secure round task.
    SecAgg {
        /// The session's authenticated client id.
        client: String,
        /// The round of the task whose stream carried it.
        round: u64,
        /// The step.
        step: SecAgg,
        /// Bytes it took on the wire.
        wire_bytes: u64,
    },
    /// Time passed; sent at [`Engine::next_deadline`](super::Engine::next_deadline) (sending more often is harmless).
    Tick,
}

impl Event {
    /// The client the event is about (none for a tick).
    pub fn client(&self) -> Option<&str> {
        match self {
            Event::Connected { client, .. }
            | Event::Disconnected { client }
            | Event::Update { client, .. }
            | Event::Unreadable { client, .. }
            | Event::SecAgg { client, .. } => Some(client),
            Event::Tick => None,
        }
    }
}

/// Something the runtime must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `task` to `client`. Clients with the same encoding share one task value.
    SendTask {
        /// Recipient.
        client: String,
        /// The task.
        task: Arc<RoundTask>,
    },
    /// Open a round stream to `client` and send `setup`, then `task`, on it: a secure round,
    /// whose further steps travel on the same stream.
    SendSecureTask {
        /// Recipient.
        client: String,
        /// Its place in the round's secure aggregation.
        setup: Box<SecAggSetup>,
        /// The task.
        task: Arc<RoundTask>,
    },
    /// Send a secure-aggregation step on the stream of `client`'s task of `round`.
    SendSecAgg {
        /// Recipient.
        client: String,
        /// The round whose stream carries it.
        round: u64,
        /// The step.
        step: Box<SecAgg>,
    },
    /// Send `verdict` to `client`.
    SendVerdict {
        /// Recipient.
        client: String,
        /// The answer to its update.
        verdict: Verdict,
    },
    /// A round attempt closed (successfully or below quorum): log the report.
    RoundClosed(Box<RoundReport>),
    /// Persist this checkpoint (e.g. [`Checkpoint::save_atomic`]) before carrying out the
    /// actions after it.
    Checkpoint(Box<Checkpoint>),
    /// All rounds are done: say goodbye to everyone.
    Finished,
}

/// Why a round attempt closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClosedBy {
    /// The target count of accepted updates was reached.
    Target,
    /// Every selected client answered or left.
    AllAnswered,
    /// The deadline passed with at least a quorum.
    Deadline,
    /// It closed (for any of the reasons above) below quorum: the head did not move.
    Failed,
}

/// One refused update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// The session's client id.
    pub client: String,
    /// The round the update claimed.
    pub round: u64,
    /// Why, as sent to the client.
    pub reason: String,
}

/// What a round under client-level DP released and what the run has spent
/// ([`crate::privacy`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRound {
    /// ε of the whole run so far at [`PrivacyRound::delta`], by the RDP accountant.
    pub epsilon: f64,
    /// The δ ε is stated at.
    pub delta: f64,
    /// The round's sampling rate: clients asked over clients connected.
    pub sampling_rate: f64,
    /// The clip norm `C` the round's steps were clipped to.
    pub clip: f64,
    /// The std of the noise on each summed coordinate (before the division by the
    /// round's target).
    pub noise_std: f64,
    /// The noised fraction of clients the clip left whole.
    pub unclipped_fraction: f64,
    /// The clip norm of the next round (moved by adaptive clipping).
    pub next_clip: f64,
}

/// What a secure round did ([`crate::engine::SecureAggregation`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureRoundReport {
    /// Clients asked to take part.
    pub participants: usize,
    /// Each client's neighbours in the masking graph.
    pub neighbours: u32,
    /// Shares that rebuild a secret.
    pub threshold: u32,
    /// Clients that sent keys, shares and masked inputs, step by step.
    pub advertised: usize,
    /// Clients that sent sealed shares.
    pub shared: usize,
    /// Clients whose masked input arrived: the sum holds exactly these.
    pub masked: usize,
    /// Clients that answered the unmask request.
    pub revealed: usize,
    /// Why the protocol could not finish, when it did not.
    pub failure: Option<String>,
}

/// What one round attempt did, one JSON line per attempt. Rejections and bytes are those that
/// arrived while this attempt was the current one (late updates for the previous round land
/// in the next report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// The run.
    pub run_id: u64,
    /// The strategy's label (e.g. `wsa(lambda=100,MeanStd)`), so a log of many runs can be
    /// grouped without knowing their order.
    #[serde(default)]
    pub strategy: String,
    /// The round number.
    pub round: u64,
    /// Attempt at this round number, from 0.
    pub attempt: u32,
    /// How the attempt ended.
    pub closed_by: ClosedBy,
    /// Connected clients when it opened.
    pub connected: usize,
    /// How many clients were asked.
    pub selected_count: usize,
    /// Clients asked, in the order they were sampled.
    pub selected: Vec<String>,
    /// Accepted updates at which it closes early.
    pub target: usize,
    /// Accepted updates it needed to count.
    pub quorum: usize,
    /// How many updates were folded.
    pub accepted_count: usize,
    /// Clients whose update was folded, in arrival order.
    pub accepted: Vec<String>,
    /// Each accepted client's weight in the fold, after the claim and share caps (what its
    /// claim bought it).
    pub weights: BTreeMap<String, f64>,
    /// Selected clients that left before answering.
    pub disconnected: Vec<String>,
    /// How many updates were refused.
    pub rejected_count: u64,
    /// Refused updates (the first [`MAX_LISTED_REJECTIONS`]; the counts are complete).
    pub rejected: Vec<Rejection>,
    /// Refused updates per reason (the kebab-case name of the reason).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Mean local training loss of the accepted updates, weighted as in the fold.
    pub train_loss: Option<f64>,
    /// Mean local training accuracy, weighted the same way.
    pub train_accuracy: Option<f64>,
    /// Mean Σ KL to the targets at the end of local training, weighted the same way.
    pub mean_kl: Option<f64>,
    /// The median and the largest `‖w − g‖` of the accepted updates (their steps from the
    /// round's global head): what a norm-clipping bound is chosen from.
    #[serde(default)]
    pub step_norms: Option<(f64, f64)>,
    /// The new global head on the validation set (when one was given and the round counted).
    pub eval: Option<Evaluation>,
    /// The new global head on the test set (when one was given and the round counted).
    pub test_eval: Option<Evaluation>,
    /// Its accuracy on each class of the test set, by class index (`None` for a class the
    /// set does not hold).
    #[serde(default)]
    pub test_per_class: Option<Vec<Option<f64>>>,
    /// The target scope (μ̃, σ̃) of each scoped tensor after the round: what the next round's
    /// tasks carry (unchanged by a failed attempt).
    #[serde(default)]
    pub targets: Vec<Scope>,
    /// How far apart the accepted clients pulled (when the round counted).
    #[serde(default)]
    pub drift: Option<Drift>,
    /// Under client-level DP (when the round counted): the privacy spent so far and the
    /// round's clip and noise.
    #[serde(default)]
    pub privacy: Option<PrivacyRound>,
    /// Under secure aggregation: the masking graph and who was lost at which step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<SecureRoundReport>,
    /// The head this round's tasks carried (the previous round's result), as the accepted
    /// clients measured it on their held-out rows before training.
    #[serde(default)]
    pub federated_eval: Option<FederatedEval>,
    /// Parameter payload bytes of all updates received (accepted or not).
    pub payload_bytes_in: u64,
    /// Wire bytes of all updates received, as the runtime reported them.
    pub wire_bytes_in: u64,
    /// Parameter payload bytes of the accepted updates.
    pub accepted_payload_bytes: u64,
    /// Tasks sent (resent ones after a reconnect included) that carried the change from a
    /// head the client held; the others carried the head.
    #[serde(default)]
    pub delta_tasks: u64,
    /// When it opened.
    pub opened_at: Millis,
    /// When it closed.
    pub closed_at: Millis,
    /// `closed_at − opened_at`.
    pub duration_ms: u64,
}

/// Federated evaluation of one global head: what the clients that hold rows out of training
/// ([`protocol::HeldOutEval`]) measured on them. Client-reported: the aggregator checks only
/// that each report is possible, so a lying client can move the mean by its capped weight;
/// the median is what one liar cannot drag.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FederatedEval {
    /// Clients that reported.
    pub clients: usize,
    /// Held-out rows they reported, in all.
    pub samples: u64,
    /// Mean accuracy, each client weighted by its rows (capped at `max_claim_ratio` times
    /// the median report's rows, as training weights are).
    pub accuracy: f64,
    /// The weighted standard deviation of the clients' accuracies: how unevenly the head
    /// serves them.
    pub accuracy_std: f64,
    /// The median client's accuracy.
    pub accuracy_median: f64,
    /// The worst client's accuracy.
    pub accuracy_min: f64,
    /// The best client's accuracy.
    pub accuracy_max: f64,
    /// Mean loss, weighted as the accuracy.
    pub loss: f64,
    /// Its weighted standard deviation.
    pub loss_std: f64,
}

impl FederatedEval {
    /// The summary of `reports` (plausible ones: the admission checked them), or `None`
    /// without any.
    pub fn of(
        reports: impl IntoIterator<Item = protocol::HeldOutEval>,
        max_claim_ratio: f64,
    ) -> Option<Self> {
        let reports: Vec<protocol::HeldOutEval> = reports.into_iter().collect();
        // The lower median for the cap, as for training weights: with two reports, one huge
        // claim cannot lift the cap it is measured against.
        let lower_median = |mut v: Vec<f64>| -> f64 {
            v.sort_by(f64::total_cmp);
            v[(v.len() - 1) / 2]
        };
        let median = |mut v: Vec<f64>| -> f64 {
            v.sort_by(f64::total_cmp);
            let mid = v.len() / 2;
            if v.len() % 2 == 1 {
                v[mid]
            } else {
                (v[mid - 1] + v[mid]) / 2.0
            }
        };
        if reports.is_empty() {
            return None;
        }
        let cap =
            max_claim_ratio * lower_median(reports.iter().map(|r| r.samples as f64).collect());
        let weights: Vec<f64> = reports
            .iter()
            .map(|r| (r.samples as f64).min(cap))
            .collect();
        let total: f64 = weights.iter().sum();
        let moments = |value: fn(&protocol::HeldOutEval) -> f64| {
            let mean = reports
                .iter()
                .zip(&weights)
                .map(|(r, w)| w * value(r))
                .sum::<f64>()
                / total;
            let var = reports
                .iter()
                .zip(&weights)
                .map(|(r, w)| w * (value(r) - mean).powi(2))
                .sum::<f64>()
                / total;
            (mean, var.sqrt())
        };
        let (accuracy, accuracy_std) = moments(|r| r.accuracy);
        let (loss, loss_std) = moments(|r| r.loss);
        let accuracies: Vec<f64> = reports.iter().map(|r| r.accuracy).collect();
        Some(Self {
            clients: reports.len(),
            samples: reports
                .iter()
                .fold(0u64, |sum, r| sum.saturating_add(r.samples)),
            accuracy,
            accuracy_std,
            accuracy_min: accuracies.iter().copied().fold(f64::INFINITY, f64::min),
            accuracy_max: accuracies.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            accuracy_median: median(accuracies),
            loss,
            loss_std,
        })
    }
}

/// Most rejections listed by name in one report.
pub const MAX_LISTED_REJECTIONS: usize = 256;

/// A snapshot of the open round, for status displays.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundStatus {
    /// The round number.
    pub round: u64,
    /// Attempt at it.
    pub attempt: u32,
    /// Clients asked.
    pub selected: usize,
    /// Accepted so far.
    pub accepted: usize,
    /// Early-close target.
    pub target: usize,
    /// When it closes at the latest.
    pub deadline: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::HeldOutEval;

    fn report(samples: u64, accuracy: f64, loss: f64) -> HeldOutEval {
        HeldOutEval {
            samples,
            loss,
            accuracy,
        }
    }

    #[test]
    fn federated_evaluation_is_the_row_weighted_mean_and_spread() {
        // Weights 10 and 30: mean 0.25·0.6 + 0.75·0.8 = 0.75, variance
        // 0.25·0.15² + 0.75·0.05² = 0.0075.
        let f = FederatedEval::of([report(10, 0.6, 1.0), report(30, 0.8, 0.6)], 10.0).unwrap();
        assert_eq!((f.clients, f.samples), (2, 40));
        assert!((f.accuracy - 0.75).abs() < 1e-12, "{f:?}");
        assert!((f.accuracy_std - 0.0075f64.sqrt()).abs() < 1e-12, "{f:?}");
        assert!((f.loss - 0.7).abs() < 1e-12, "{f:?}");
        assert!((f.accuracy_median - 0.7).abs() < 1e-12, "{f:?}");
        assert_eq!((f.accuracy_min, f.accuracy_max), (0.6, 0.8));
        assert_eq!(FederatedEval::of([], 10.0), None);
    }

    #[test]
    fn a_client_claiming_huge_held_out_counts_weighs_no_more_than_the_cap() {
        let honest = [
            report(100, 0.8, 0.5),
            report(100, 0.8, 0.5),
            report(100, 0.8, 0.5),
        ];
        let liar = report(u64::MAX / 2, 0.0, 10.0);
        let f = FederatedEval::of(honest.into_iter().chain([liar]), 2.0).unwrap();
        // The liar weighs 2 × the median (100): 200 of 500.
        assert!((f.accuracy - 0.8 * 300.0 / 500.0).abs() < 1e-12, "{f:?}");
        assert_eq!(f.accuracy_median, 0.8);
        // With two reports the cap comes from the lower one, not from the liar's own claim.
        let f = FederatedEval::of([honest[0], liar], 2.0).unwrap();
        assert!((f.accuracy - 0.8 * 100.0 / 300.0).abs() < 1e-12, "{f:?}");
    }
}
