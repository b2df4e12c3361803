//! The client's side of one round, free of sockets.

use protocol::HeldOutEval;
use wsa::{Head, LabelledFeatures, Scope, TrainConfig, TrainMetrics};

/// What a client trains in one round: the aggregator's round task (the wire's
/// [`protocol::RoundTask`]) decoded and checked ([`TrainingTask::from_wire`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingTask {
    /// The round number.
    pub round: u64,
    /// The global head to start from (and the FedProx anchor).
    pub global: Head<f32>,
    /// Local training settings, with the strategy's FedProx or WSA term already set.
    pub train: TrainConfig,
}

/// What a client returns for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// The round the update answers.
    pub round: u64,
    /// The trained head's flat parameters.
    pub params: Vec<f32>,
    /// The trained head's scopes, one per scoped tensor.
    pub scopes: Vec<Scope>,
    /// Loss, accuracy, regularizer values and sample counts.
    pub metrics: TrainMetrics,
    /// The task's global head on the rows held out of training ([`evaluate_held_out`]).
    pub held_out: Option<HeldOutEval>,
}

/// Trains the task's head on `data` and packages the result. `client_seed` decorrelates the
/// shuffles of clients that share a round seed.
pub fn local_round(
    task: &TrainingTask,
    data: &LabelledFeatures,
    client_seed: u64,
) -> wsa::Result<ClientUpdate> {
    let mut cfg = task.train.clone();
    cfg.seed = cfg.seed ^ client_seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ task.round;
    let outcome = wsa::train(&task.global, data, &cfg)?;
    Ok(ClientUpdate {
        round: task.round,
        params: outcome.head.to_flat(),
        scopes: outcome.scopes,
        metrics: outcome.metrics,
        held_out: None,
    })
}

/// The task's global head on rows the client holds out of training: federated evaluation of
/// the head the last round produced.
pub fn evaluate_held_out(
    task: &TrainingTask,
    held_out: &LabelledFeatures,
) -> wsa::Result<HeldOutEval> {
    let e = task.global.evaluate(held_out.x(), held_out.labels())?;
    Ok(HeldOutEval {
        samples: held_out.len() as u64,
        loss: e.loss,
        accuracy: e.accuracy,
    })
}
