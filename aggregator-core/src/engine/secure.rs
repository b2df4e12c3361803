//! Secure rounds (the run config's `[secure]`): a round's clients run SecAgg+ ([`secagg`]) on
//! the streams of their tasks, and the engine learns only the sum of the survivors' steps and
//! scope statistics ([`protocol::secure`]), never one client's.
//!
//! A secure round opens like any other (the sample, the task) and then walks four steps, each
//! closed when every client asked has answered or left, or at its deadline: keys and shares
//! (the step timeout each), masked inputs (the round's deadline: the clients train meanwhile)
//! and revealed shares (the step timeout). The unmasked sum, divided by the survivors, is
//! folded like a plain round's mean, and the round closes.
//!
//! What a secure run gives up, because no update is ever seen alone: the per-update checks
//! ([`super::admission`]: norms, scope bounds and consistency, sample counts), robust
//! aggregation rules and median or trimmed scope fusion, sample-count weights (every survivor
//! counts once), and per-client metrics and step directions in the report. What it keeps: the
//! ring code clips every value of an input to ±clip, so one client moves a coordinate of the
//! mean by at most clip / survivors, and a round needs its quorum of survivors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use protocol::secure::{secure_input_len, split_secure_sums};
use protocol::{LocalNoise, Outcome, RejectReason, RoundTask, SecAgg, Subject, Verdict};
use secagg::ring::FixedPoint;
use secagg::{Aggregate, Progress, RoundParams, SecAggError, ServerRound};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use wsa::ScopeSums;

use super::{Action, ClosedBy, Engine, Millis, OpenRound, SecureRoundReport, derive_seed};
use crate::strategy::{DpFolded, DpRound, Folded};

/// A run's secure-aggregation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregation {
    /// The fraction of a round's clients the masking must survive losing between sending
    /// their keys and revealing shares: sets each client's number of neighbours
    /// ([`secagg::RoundParams::for_round`]).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Every value of a client's input (step coordinates, scope statistics) is clipped to
    /// ±clip before the fixed-point code; the code's resolution is clip / 2³¹ per client of
    /// the round ([`secagg::ring`]).
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Milliseconds each of the key steps (keys, shares, reveal) may take.
    #[serde(default = "default_step_timeout_ms")]
    pub step_timeout_ms: u64,
}

fn default_dropout() -> f64 {
    0.1
}

fn default_clip() -> f64 {
    1.0
}

fn default_step_timeout_ms() -> u64 {
    10_000
}

impl Default for SecureAggregation {
    fn default() -> Self {
        Self {
            dropout: default_dropout(),
            clip: default_clip(),
            step_timeout_ms: default_step_timeout_ms(),
        }
    }
}

impl SecureAggregation {
    /// Checks each value against its domain.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..0.5).contains(&self.dropout) {
            return Err(format!(
                "secure.dropout must be in [0, 0.5), got {}",
                self.dropout
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(format!(
                "secure.clip must be finite and > 0, got {}",
                self.clip
            ));
        }
        if self.step_timeout_ms == 0 {
            return Err("secure.step_timeout_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// Where a secure round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Keys,
    Shares,
    Inputs,
    Reveal,
    Done,
}

/// A secure round's protocol state, inside its [`OpenRound`].
#[derive(Debug)]
pub(super) struct SecureState {
    server: Option<ServerRound>,
    code: FixedPoint,
    neighbours: u32,
    threshold: u32,
    /// Each client's index in the round.
    index: BTreeMap<String, u32>,
    step: Step,
    deadline: Millis,
    /// Clients asked at this step that have not answered and are connected.
    waiting: BTreeSet<u32>,
    /// Clients that left the round (disconnected, or sent a step that was refused): a client
    /// that reconnects has lost the round's stream and secrets, so it is never waited for.
    left: BTreeSet<u32>,
    progress: Progress,
    result: Option<Result<Aggregate, SecAggError>>,
    /// Under DP: the round's clip and total noise, which the clients add in shares.
    dp: Option<DpRound>,
}

impl SecureState {
    pub(super) fn deadline(&self) -> Millis {
        self.deadline
    }

    pub(super) fn report(&self) -> SecureRoundReport {
        SecureRoundReport {
            participants: self.index.len(),
            neighbours: self.neighbours,
            threshold: self.threshold,
            advertised: self.progress.advertised,
            shared: self.progress.shared,
            masked: self.progress.masked,
            revealed: self.progress.revealed,
            failure: match &self.result {
                Some(Err(e)) => Some(e.to_string()),
                None => Some("the round closed before the protocol finished".into()),
                Some(Ok(_)) => None,
            },
        }
    }
}

impl Engine {
    /// Opens the secure part of a round: the protocol's parameters, and each client's task
    /// behind its setup.
    pub(super) fn open_secure(
        &self,
        now: Millis,
        order: &[String],
        task: &Arc<RoundTask>,
        dp: Option<DpRound>,
        out: &mut Vec<Action>,
    ) -> Result<SecureState, SecAggError> {
        let settings = self.config.secure.unwrap_or_default();
        let mut params = RoundParams::for_round(
            self.config.run_id,
            self.next_round,
            order.len() as u32,
            derive_seed(
                b"secagg-graph",
                self.config.seed,
                self.next_round,
                self.attempt,
            ),
            secure_input_len(self.global.len(), self.targets.len()) as u32,
            settings.dropout,
            settings.clip,
        )?;
        let min_survivors = self.config.quorum.max(params.threshold as usize + 1);
        // Under DP each client adds noise of std σ/√m for the m survivors a released sum has
        // at least, so the sum carries at least the round's σ; the ring's range covers the
        // clipped step and eight of those stds.
        let local_noise = dp.map(|dp| LocalNoise {
            clip: dp.clip,
            std: dp.noise_std / (min_survivors as f64).sqrt(),
        });
        if let Some(noise) = &local_noise {
            params.clip = params.clip.max(noise.clip + 8.0 * noise.std);
            params.validate()?;
        }
        let server = ServerRound::new(params.clone(), min_survivors)?;
        for (i, client) in order.iter().enumerate() {
            let mut setup = params.setup_for(i as u32);
            setup.local_noise = local_noise;
            out.push(Action::SendSecureTask {
                client: client.clone(),
                setup: Box::new(setup),
                task: Arc::clone(task),
            });
        }
        Ok(SecureState {
            code: params.code()?,
            neighbours: params.neighbours,
            threshold: params.threshold,
            server: Some(server),
            index: order
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), i as u32))
                .collect(),
            step: Step::Keys,
            deadline: now.plus(settings.step_timeout_ms),
            waiting: (0..order.len() as u32).collect(),
            left: BTreeSet::new(),
            progress: Progress::default(),
            result: None,
            dp,
        })
    }

    /// A secure step from `client` on its stream of `round`. A step that is refused ends the
    /// client's part in the round (the verdict closes its stream); the round goes on without
    /// it as the protocol allows.
    pub(super) fn on_secagg(
        &mut self,
        now: Millis,
        client: &str,
        round: u64,
        step: SecAgg,
        wire_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        self.tally.wire_bytes += wire_bytes;
        let refusal = match self.open.as_mut() {
            None => Some(RejectReason::RoundClosed),
            Some(open) if open.round != round => Some(if round < open.round {
                RejectReason::StaleRound {
                    got: round,
                    current: open.round,
                }
            } else {
                RejectReason::FutureRound {
                    got: round,
                    current: open.round,
                }
            }),
            Some(open) => match open.secure.as_mut() {
                None => Some(RejectReason::UnexpectedMessage(step.kind().into())),
                Some(secure) => secure_step(secure, client, step),
            },
        };
        if let Some(reason) = refusal {
            // A refused step of the open round ends the client's part in it (a late step of
            // an earlier round does not).
            if let Some(open) = self.open.as_mut()
                && open.round == round
                && let Some(secure) = open.secure.as_mut()
                && let Some(&i) = secure.index.get(client)
            {
                secure.left.insert(i);
            }
            self.record_rejection(client, round, &reason);
            out.push(Action::SendVerdict {
                client: client.to_owned(),
                verdict: Verdict {
                    run_id: self.config.run_id,
                    subject: Subject::Update { round },
                    outcome: Outcome::Rejected(reason),
                },
            });
        }
        self.advance_secure_if_done(now, out);
    }

    /// A client of the open secure round left: the round waits no longer for it.
    pub(super) fn secure_client_left(&mut self, now: Millis, client: &str, out: &mut Vec<Action>) {
        if let Some(secure) = self.open.as_mut().and_then(|o| o.secure.as_mut())
            && let Some(&i) = secure.index.get(client)
        {
            secure.waiting.remove(&i);
            secure.left.insert(i);
        }
        self.advance_secure_if_done(now, out);
    }

    /// At the step's deadline: on without the clients that did not answer.
    pub(super) fn secure_deadline(&mut self, now: Millis, out: &mut Vec<Action>) {
        if let Some(secure) = self.open.as_mut().and_then(|o| o.secure.as_mut())
            && now >= secure.deadline
        {
            secure.waiting.clear();
        }
        self.advance_secure_if_done(now, out);
    }

    /// Moves the protocol on while no one is left to wait for at its step.
    fn advance_secure_if_done(&mut self, now: Millis, out: &mut Vec<Action>) {
        let timeout = self.config.secure.unwrap_or_default().step_timeout_ms;
        loop {
            let Some(open) = self.open.as_mut() else {
                return;
            };
            let round_deadline = open.deadline;
            let round = open.round;
            let Some(secure) = open.secure.as_mut() else {
                return;
            };
            if !secure.waiting.is_empty() || secure.step == Step::Done {
                return;
            }
            let Some(server) = secure.server.as_mut() else {
                return;
            };
            let sent = match secure.step {
                Step::Keys => server.rosters().map(|list| {
                    list.into_iter()
                        .map(|(i, m)| (i, SecAgg::Roster(m)))
                        .collect::<Vec<_>>()
                }),
                Step::Shares => server.inboxes().map(|list| {
                    list.into_iter()
                        .map(|(i, m)| (i, SecAgg::Inbox(m)))
                        .collect()
                }),
                Step::Inputs => server.unmask_requests().map(|list| {
                    list.into_iter()
                        .map(|(i, m)| (i, SecAgg::Unmask(m)))
                        .collect()
                }),
                Step::Reveal | Step::Done => Ok(Vec::new()),
            };
            secure.progress = server.progress();
            let next = match secure.step {
                Step::Keys => (Step::Shares, now.plus(timeout)),
                // The clients train meanwhile: their inputs are due by the round's deadline, and
                // get at least a step's time however long the keys took.
                Step::Shares => (Step::Inputs, round_deadline.max(now.plus(timeout))),
                Step::Inputs => (Step::Reveal, now.plus(timeout)),
                Step::Reveal | Step::Done => (Step::Done, now),
            };
            match sent {
                Ok(steps) if secure.step != Step::Reveal => {
                    secure.waiting.clear();
                    for (i, step) in steps {
                        // Index i is the i-th client of the round's sample.
                        let client = &open.order[i as usize];
                        if self.clients.contains_key(client) && !secure.left.contains(&i) {
                            secure.waiting.insert(i);
                        }
                        out.push(Action::SendSecAgg {
                            client: client.clone(),
                            round,
                            step: Box::new(step),
                        });
                    }
                    (secure.step, secure.deadline) = next;
                }
                Ok(_) => {
                    let result = secure.server.take().map(ServerRound::finish).unwrap_or(Err(
                        SecAggError::OutOfOrder {
                            got: "finish",
                            stage: "done",
                        },
                    ));
                    secure.step = Step::Done;
                    if let Ok(aggregate) = &result {
                        open.accepted = aggregate
                            .survivors
                            .iter()
                            .filter_map(|&i| open.order.get(i as usize).cloned())
                            .collect();
                    }
                    secure.result = Some(result);
                    self.close(now, ClosedBy::AllAnswered, out);
                    return;
                }
                Err(e) => {
                    warn!(round, error = %e, "secure aggregation cannot go on; the round fails");
                    secure.step = Step::Done;
                    secure.result = Some(Err(e));
                    self.close(now, ClosedBy::Failed, out);
                    return;
                }
            }
        }
    }

    /// The fold of a secure round that finished its protocol: the unmasked sum over the
    /// survivors, decoded, divided and folded; `None` for a round that failed or fell below
    /// quorum. Every selected client still connected is told whether its input counted.
    pub(super) fn finish_secure(
        &self,
        open: &mut OpenRound,
        out: &mut Vec<Action>,
    ) -> Option<Folded> {
        let secure = open.secure.as_mut()?;
        let folded = match &secure.result {
            Some(Ok(aggregate)) if aggregate.survivors.len() >= self.config.quorum => 'fold: {
                let sums = secure.code.decode_sum(&aggregate.sum);
                let Some(parts) = split_secure_sums(&sums, self.global.len()) else {
                    warn!(
                        round = open.round,
                        "the secure sum does not have the head's length"
                    );
                    break 'fold None;
                };
                let n = aggregate.survivors.len() as f64;
                // Under DP the denominator is fixed before the round (DP-FedAvg's `m`).
                let denominator = secure.dp.map_or(n, |dp| (dp.denominator as f64).max(n));
                let params: Vec<f32> = self
                    .global
                    .iter()
                    .zip(parts.steps)
                    .map(|(&g, &step)| (f64::from(g) + step / denominator) as f32)
                    .collect();
                let scope_sums = parts
                    .scopes
                    .iter()
                    .map(|&[mean, std, var, mean_sq]| ScopeSums {
                        p: n,
                        p_mean: mean,
                        p_std: std,
                        p_var: var,
                        p_mean_sq: mean_sq,
                    })
                    .collect();
                info!(
                    round = open.round,
                    survivors = aggregate.survivors.len(),
                    dropped = aggregate.dropped.len(),
                    "secure sum unmasked"
                );
                open.fold
                    .finish_secure(params, scope_sums, &open.accepted)
                    .inspect_err(
                        |e| warn!(round = open.round, error = %e, "the secure fold did not finish"),
                    )
                    .ok()
                    .map(|folded| Folded {
                        // What was clipped is the clients' business: the server cannot count it.
                        dp: secure.dp.map(|round| DpFolded {
                            round,
                            unclipped_fraction: f64::NAN,
                        }),
                        ..folded
                    })
            }
            _ => None,
        };
        for client in secure.index.keys() {
            if !self.clients.contains_key(client) {
                continue;
            }
            let counted = folded.is_some() && open.accepted.contains(client);
            out.push(Action::SendVerdict {
                client: client.clone(),
                verdict: Verdict {
                    run_id: self.config.run_id,
                    subject: Subject::Update { round: open.round },
                    outcome: if counted {
                        Outcome::Accepted
                    } else {
                        Outcome::Rejected(RejectReason::RoundClosed)
                    },
                },
            });
        }
        if folded.is_none() {
            open.accepted.clear();
        }
        folded
    }
}

/// Takes one client's step into the protocol; the reason it was refused, if it was.
fn secure_step(secure: &mut SecureState, client: &str, step: SecAgg) -> Option<RejectReason> {
    let Some(&i) = secure.index.get(client) else {
        return Some(RejectReason::NotSelected);
    };
    if !secure.waiting.remove(&i) {
        return Some(RejectReason::UnexpectedMessage(format!(
            "{} out of turn",
            step.kind()
        )));
    }
    let server = secure.server.as_mut()?;
    let taken = match (secure.step, step) {
        (Step::Keys, SecAgg::Advertise(m)) => server.advertise(i, m),
        (Step::Shares, SecAgg::Shares(m)) => server.shares(i, m),
        (Step::Inputs, SecAgg::Masked(m)) => server.masked(i, &m),
        (Step::Reveal, SecAgg::Reveal(m)) => server.reveal(i, m),
        (_, other) => Err(SecAggError::OutOfOrder {
            got: other.kind(),
            stage: "another step",
        }),
    };
    taken
        .err()
        .map(|e| RejectReason::Malformed(format!("secure aggregation: {e}")))
}
