//! The round engine driven by a fake clock and synthetic clients: round lifecycle, every
//! rejection reason, determinism, resumption through a checkpoint file, sampling, and the fold
//! checked against a second implementation.

use std::collections::BTreeMap;
use std::sync::Arc;

use aggregator_core::checkpoint::Checkpoint;
use aggregator_core::engine::{
    Action, ClosedBy, Engine, EngineConfig, EngineError, Event, Millis, RoundReport, Sampling,
    sample_sizes,
};
use aggregator_core::privacy::{Clip, Privacy, RdpAccountant};
use aggregator_core::strategy::{Aggregation, Strategy, TargetFusion, capped_weights};
use protocol::{
    Capabilities, EncodedParams, Encoding, HeldOutEval, Outcome, RejectReason, RoundTask,
    RowLayout, Update, UpdateMetrics, WireScope,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
use wsa::{
    DEFAULT_SCOPE_EPS, FusionRule, Head, HeadSpec, Init, LabelledFeatures, Scope, ScopeFusion,
    ScopeSelection, Weighting,
};

const RUN: u64 = 7;

fn spec() -> HeadSpec {
    HeadSpec::mlp(8, &[6], 3)
}

fn config(strategy: Strategy) -> EngineConfig {
    let mut c = EngineConfig::new(RUN, spec(), strategy);
    c.seed = 11;
    c.rounds = 4;
    c.round_timeout_ms = 1_000;
    c
}

fn all_caps() -> Capabilities {
    Capabilities {
        f16: true,
        int8: true,
    }
}

/// An engine, a fake clock, and everything the engine asked for so far.
struct Sim {
    engine: Engine,
    now: u64,
    /// The last task each client got.
    tasks: BTreeMap<String, Arc<RoundTask>>,
    log: Vec<Action>,
}

impl Sim {
    fn new(config: EngineConfig) -> Self {
        Self::of(Engine::new(config).unwrap())
    }

    /// Connects `clients` to a fresh engine whose first round waits for all of them.
    fn start(mut config: EngineConfig, clients: &[(&str, u64)]) -> Self {
        config.min_connected = clients.len();
        let mut sim = Self::new(config);
        sim.connect_all(clients);
        sim
    }

    fn of(engine: Engine) -> Self {
        Self {
            engine,
            now: 0,
            tasks: BTreeMap::new(),
            log: Vec::new(),
        }
    }

    fn event(&mut self, event: Event) -> Vec<Action> {
        let actions = self.engine.handle(Millis(self.now), event);
        for a in &actions {
            if let Action::SendTask { client, task } = a {
                self.tasks.insert(client.clone(), task.clone());
            }
        }
        self.log.extend(actions.iter().cloned());
        actions
    }

    fn connect(&mut self, client: &str, n_samples: u64) -> Vec<Action> {
        self.event(Event::Connected {
            client: client.into(),
            n_samples,
            capabilities: all_caps(),
            held: None,
        })
    }

    fn connect_all(&mut self, clients: &[(&str, u64)]) -> Vec<Action> {
        clients
            .iter()
            .flat_map(|&(c, n)| self.connect(c, n))
            .collect()
    }

    fn send(&mut self, client: &str, update: Update) -> Vec<Action> {
        // Sent on the stream of the task of the round it names, as a client does.
        self.event(Event::Update {
            client: client.into(),
            task_round: update.round,
            update: Box::new(update.into()),
            wire_bytes: 1000,
        })
    }

    /// The outcome of `update` sent on `client`'s session.
    fn verdict(&mut self, client: &str, update: Update) -> Outcome {
        let actions = self.send(client, update);
        outcomes(&actions)
            .into_iter()
            .find(|(c, _)| c == client)
            .map(|(_, o)| o)
            .expect("every update gets a verdict")
    }

    fn rejection(&mut self, client: &str, update: Update) -> RejectReason {
        match self.verdict(client, update) {
            Outcome::Rejected(r) => r,
            Outcome::Accepted => panic!("expected a rejection"),
        }
    }

    fn tick_at(&mut self, now: u64) -> Vec<Action> {
        self.now = now;
        self.event(Event::Tick)
    }

    fn task(&self, client: &str) -> Arc<RoundTask> {
        self.tasks[client].clone()
    }
}

fn outcomes(actions: &[Action]) -> Vec<(String, Outcome)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendVerdict { client, verdict } => {
                Some((client.clone(), verdict.outcome.clone()))
            }
            _ => None,
        })
        .collect()
}

fn reports(actions: &[Action]) -> Vec<RoundReport> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RoundClosed(r) => Some((**r).clone()),
            _ => None,
        })
        .collect()
}

fn sent_to(actions: &[Action]) -> Vec<(String, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendTask { client, task } => Some((client.clone(), task.round)),
            _ => None,
        })
        .collect()
}

fn global_of(task: &RoundTask) -> Vec<f32> {
    task.global
        .decode(&RowLayout::of_head(&task.shape.to_spec().unwrap()))
        .unwrap()
}

fn selection_of(task: &RoundTask) -> ScopeSelection {
    ScopeSelection {
        include_biases: task.train.wsa.as_ref().is_some_and(|w| w.include_biases),
    }
}

/// An update carrying `params` as the client would build it: scopes of its own f32
/// parameters, the task's encoding, sealed.
fn update_with(task: &RoundTask, client: &str, n_samples: u64, params: &[f32]) -> Update {
    let spec = task.shape.to_spec().unwrap();
    let scopes = Head::from_flat(&spec, params)
        .unwrap()
        .scopes(selection_of(task), DEFAULT_SCOPE_EPS)
        .unwrap();
    Update {
        run_id: task.run_id,
        round: task.round,
        client_id: client.into(),
        n_samples,
        params: EncodedParams::encode(
            params,
            &RowLayout::of_head(&task.shape.to_spec().unwrap()),
            task.encoding,
        )
        .unwrap(),
        scopes: scopes.into_iter().map(WireScope::from).collect(),
        metrics: UpdateMetrics {
            loss: 1.0,
            accuracy: 0.5,
            kl: 0.1,
            steps: 3,
            train_ms: 5,
            held_out: None,
        },
        digest: [0; 32],
    }
    .seal()
}

/// The global head plus small noise drawn from `seed`.
fn perturbed(task: &RoundTask, client: &str, n_samples: u64, seed: u64) -> Update {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let params: Vec<f32> = global_of(task)
        .iter()
        .map(|&w| w + rng.random_range(-0.05f32..0.05))
        .collect();
    update_with(task, client, n_samples, &params)
}

/// The client's answer from real local training on its shard.
fn trained(task: &RoundTask, client: &str, data: &LabelledFeatures) -> Update {
    let spec = task.shape.to_spec().unwrap();
    let start = Head::from_flat(&spec, &global_of(task)).unwrap();
    let mut cfg = task.train.to_config(&task.targets).unwrap();
    cfg.seed ^= client.len() as u64;
    let out = wsa::train(&start, data, &cfg).unwrap();
    let mut u = update_with(task, client, data.len() as u64, &out.head.to_flat());
    u.metrics.loss = out.metrics.loss;
    u.metrics.accuracy = out.metrics.accuracy;
    u.metrics.kl = out.metrics.regularizer.kl;
    u.seal()
}

fn shards(clients: usize, n: usize) -> Vec<LabelledFeatures> {
    let problem = SyntheticProblem::new(
        SyntheticSpec {
            classes: 3,
            dim: 8,
            clusters_per_class: 2,
            noise: 1.0,
        },
        5,
    )
    .unwrap();
    (0..clients)
        .map(|k| problem.sample(n + 10 * k, 100 + k as u64).unwrap())
        .collect()
}

fn bits(w: &[f32]) -> Vec<u32> {
    w.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// Round lifecycle

#[test]
fn a_round_opens_once_enough_clients_are_connected() {
    let mut c = config(Strategy::FedAvg);
    c.min_connected = 3;
    let mut sim = Sim::new(c);
    assert!(sim.connect("a", 10).is_empty());
    assert!(sim.connect("b", 10).is_empty());
    assert_eq!(sim.engine.next_deadline(), None);
    let actions = sim.connect("c", 10);
    let mut sent: Vec<_> = sent_to(&actions).into_iter().map(|(c, _)| c).collect();
    sent.sort();
    assert_eq!(sent, ["a", "b", "c"]);
    assert_eq!(sim.engine.next_deadline(), Some(Millis(1_000)));
    let task = sim.task("a");
    assert_eq!((task.run_id, task.round, task.deadline_ms), (RUN, 0, 1_000));
    assert_eq!(task.global.encoding, Encoding::F32);
    assert_eq!(global_of(&task), sim.engine.global_params());
    // Round 0's targets are the initial head's scopes.
    let scopes = sim
        .engine
        .global_head()
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    let wire: Vec<WireScope> = scopes.into_iter().map(WireScope::from).collect();
    assert_eq!(task.targets, wire);
}

#[test]
fn reaching_the_target_closes_the_round_and_checkpoints_before_the_next_tasks() {
    let mut sim = Sim::start(config(Strategy::FedAvg), &[("a", 10), ("b", 20), ("c", 30)]);
    let before = sim.engine.global_params().to_vec();
    for (i, (c, n)) in [("a", 10), ("b", 20)].into_iter().enumerate() {
        let u = perturbed(&sim.task(c), c, n, i as u64);
        assert_eq!(sim.verdict(c, u), Outcome::Accepted);
    }
    let u = perturbed(&sim.task("c"), "c", 30, 9);
    let actions = sim.send("c", u);
    let kinds: Vec<&str> = actions
        .iter()
        .map(|a| match a {
            Action::SendVerdict { .. } => "verdict",
            Action::RoundClosed(_) => "closed",
            Action::Checkpoint(_) => "checkpoint",
            Action::SendTask { .. } => "task",
            Action::SendSecureTask { .. } => "secure task",
            Action::SendSecAgg { .. } => "secure step",
            Action::Finished => "finished",
        })
        .collect();
    assert_eq!(
        kinds,
        ["verdict", "closed", "checkpoint", "task", "task", "task"]
    );
    let report = &reports(&actions)[0];
    assert_eq!(report.closed_by, ClosedBy::Target);
    assert_eq!(report.accepted, ["a", "b", "c"]);
    assert_eq!((report.round, report.attempt, report.target), (0, 0, 3));
    assert_eq!(report.train_loss, Some(1.0));
    assert_eq!(report.payload_bytes_in, 3 * 4 * spec().param_count() as u64);
    assert_eq!(report.wire_bytes_in, 3000);
    assert_ne!(sim.engine.global_params(), &before[..]);
    assert_eq!(sim.engine.round(), 1);
    assert!(sent_to(&actions).iter().all(|(_, r)| *r == 1));
    let Some(Action::Checkpoint(cp)) = actions.iter().find(|a| matches!(a, Action::Checkpoint(_)))
    else {
        unreachable!()
    };
    assert_eq!(cp.next_round, 1);
    assert_eq!(cp.global, sim.engine.global_params());
    assert_eq!(cp.history.rounds_closed, 1);
    assert_eq!(cp.history.updates_accepted, 3);
    // The report is a JSON line.
    let line = serde_json::to_string(report).unwrap();
    assert!(line.contains("\"closed_by\":\"target\""), "{line}");
}

#[test]
fn the_deadline_closes_with_what_arrived_when_the_quorum_is_met() {
    let mut c = config(Strategy::FedAvg);
    c.quorum = 2;
    let mut sim = Sim::start(c, &[("a", 10), ("b", 10), ("c", 10)]);
    for (i, c) in ["a", "b"].into_iter().enumerate() {
        let u = perturbed(&sim.task(c), c, 10, i as u64);
        sim.send(c, u);
    }
    assert!(reports(&sim.tick_at(999)).is_empty());
    let actions = sim.tick_at(1_000);
    let report = &reports(&actions)[0];
    assert_eq!(report.closed_by, ClosedBy::Deadline);
    assert_eq!(report.accepted, ["a", "b"]);
    assert_eq!(report.duration_ms, 1_000);
    assert_eq!(sim.engine.round(), 1);
    // The straggler's late update is stale now.
    let late = perturbed(&sim.tasks["c"].clone(), "c", 10, 3);
    let late = Update { round: 0, ..late }.seal();
    assert_eq!(
        sim.rejection("c", late),
        RejectReason::StaleRound { got: 0, current: 1 }
    );
}

#[test]
fn below_quorum_the_round_fails_keeps_the_head_and_is_retried() {
    let mut c = config(Strategy::FedAvg);
    c.quorum = 2;
    c.sampling.fraction = 0.5;
    let mut sim = Sim::start(c, &[("a", 10), ("b", 10), ("c", 10), ("d", 10)]);
    let first: Vec<String> = sent_to(&sim.log).into_iter().map(|(c, _)| c).collect();
    assert_eq!(first.len(), 2);
    let before = sim.engine.global_params().to_vec();
    let u = perturbed(&sim.task(&first[0]), &first[0], 10, 1);
    assert_eq!(sim.verdict(&first[0], u), Outcome::Accepted);
    sim.log.clear();
    let actions = sim.tick_at(1_000);
    let report = &reports(&actions)[0];
    assert_eq!(report.closed_by, ClosedBy::Failed);
    assert_eq!((report.round, report.attempt), (0, 0));
    assert_eq!(report.accepted.len(), 1);
    assert_eq!(sim.engine.global_params(), &before[..]);
    assert_eq!((sim.engine.round(), sim.engine.attempt()), (0, 1));
    assert_eq!(sim.engine.history().rounds_failed, 1);
    // A checkpoint records the attempt, then the same round number is tried again.
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Checkpoint(cp) if cp.attempt == 1))
    );
    let retry = sent_to(&actions);
    assert_eq!(retry.len(), 2);
    assert!(retry.iter().all(|(_, r)| *r == 0));
    let task = sim.task(&retry[0].0);
    assert_eq!(global_of(&task), before);
    // Let the retry succeed.
    for (i, (c, _)) in retry.iter().enumerate() {
        let u = perturbed(&sim.task(c), c, 10, 10 + i as u64);
        sim.send(c, u);
    }
    let report = reports(&sim.log).pop().unwrap();
    assert_eq!((report.round, report.attempt), (0, 1));
    assert_eq!(report.closed_by, ClosedBy::Target);
    assert_eq!((sim.engine.round(), sim.engine.attempt()), (1, 0));
}

#[test]
fn the_sample_of_a_retry_comes_from_a_new_attempt_seed() {
    let mut c = config(Strategy::FedAvg);
    c.sampling.fraction = 0.2;
    c.quorum = 1;
    let ids: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    let clients: Vec<(&str, u64)> = ids.iter().map(|i| (i.as_str(), 10)).collect();
    let mut sim = Sim::start(c, &clients);
    let mut samples = vec![sent_to(&sim.log)];
    for _ in 1..6 {
        // The deadline fails the attempt; from the second failure on, the retry waits.
        sim.log.clear();
        while sent_to(&sim.log).is_empty() {
            let next = sim.engine.next_deadline().unwrap().0;
            sim.tick_at(next);
        }
        samples.push(sent_to(&sim.log));
    }
    assert_eq!(sim.engine.attempt(), 5);
    samples.sort();
    samples.dedup();
    assert!(samples.len() > 1, "every attempt drew the same sample");
}

#[test]
fn a_round_closes_when_every_selected_client_answered_or_left() {
    let mut c = config(Strategy::FedAvg);
    c.quorum = 1;
    let mut sim = Sim::start(c, &[("a", 10), ("b", 10), ("c", 10)]);
    let u = perturbed(&sim.task("a"), "a", 10, 1);
    sim.send("a", u);
    // b answers with garbage: it has answered, with a rejection.
    let mut bad = perturbed(&sim.task("b"), "b", 10, 2);
    bad.metrics.loss = 5.0;
    assert_eq!(sim.rejection("b", bad), RejectReason::DigestMismatch);
    let actions = sim.event(Event::Disconnected { client: "c".into() });
    let report = &reports(&actions)[0];
    assert_eq!(report.closed_by, ClosedBy::AllAnswered);
    assert_eq!(report.accepted, ["a"]);
    assert_eq!(report.disconnected, ["c"]);
    assert_eq!(report.rejected_by_reason["digest-mismatch"], 1);
    assert_eq!(sim.engine.round(), 1);
    // Round 1 waits for a third client.
    assert!(sent_to(&actions).is_empty());
    assert_eq!(sim.engine.next_deadline(), None);
    assert_eq!(sent_to(&sim.connect("d", 10)).len(), 3);
}

#[test]
fn an_unreadable_answer_counts_as_answered_and_rejected() {
    let mut c = config(Strategy::FedAvg);
    c.quorum = 1;
    let mut sim = Sim::start(c, &[("a", 10), ("b", 10)]);
    let before = bits(sim.engine.global_params());
    let actions = sim.event(Event::Unreadable {
        client: "b".into(),
        round: 0,
        reason: RejectReason::Malformed("garbage".into()),
        wire_bytes: 13,
    });
    // The transport already answered b; the engine only counts and stops waiting for it.
    assert!(outcomes(&actions).is_empty());
    assert!(reports(&actions).is_empty(), "a still has to answer");
    // A stale unreadable answer from a client that was not asked changes nothing either.
    sim.event(Event::Unreadable {
        client: "z".into(),
        round: 7,
        reason: RejectReason::Malformed("noise".into()),
        wire_bytes: 5,
    });
    let u = perturbed(&sim.task("a"), "a", 10, 1);
    let actions = sim.send("a", u);
    let report = &reports(&actions)[0];
    assert_eq!(report.closed_by, ClosedBy::AllAnswered);
    assert_eq!(report.accepted, ["a"]);
    assert_eq!(report.rejected_by_reason["malformed"], 2);
    assert_ne!(bits(sim.engine.global_params()), before);
}

#[test]
fn a_selected_client_that_reconnects_gets_its_task_again() {
    let mut sim = Sim::start(config(Strategy::FedAvg), &[("a", 10), ("b", 10)]);
    sim.now = 400;
    sim.event(Event::Disconnected { client: "b".into() });
    sim.now = 500;
    let actions = sim.connect("b", 10);
    let Some(Action::SendTask { task, .. }) = actions.first() else {
        panic!("no task on reconnect: {actions:?}")
    };
    assert_eq!((task.round, task.deadline_ms), (0, 500));
    let u = perturbed(task, "b", 10, 1);
    assert_eq!(sim.verdict("b", u), Outcome::Accepted);
}

#[test]
fn the_run_finishes_after_its_last_round() {
    let mut c = config(Strategy::FedAvg);
    c.rounds = 2;
    let mut sim = Sim::new(c);
    sim.connect("a", 10);
    for r in 0..2 {
        let u = perturbed(&sim.task("a"), "a", 10, r);
        sim.send("a", u);
    }
    assert!(matches!(sim.log.last(), Some(Action::Finished)));
    assert!(sim.engine.is_finished());
    assert_eq!(sim.engine.next_deadline(), None);
    assert_eq!(reports(&sim.log).len(), 2);
    // Nothing more opens, and Finished is said once.
    assert!(sim.connect("b", 10).is_empty());
    let u = perturbed(&sim.task("a"), "a", 10, 7);
    assert!(matches!(
        sim.rejection("a", u),
        RejectReason::StaleRound { got: 1, current: 2 }
    ));
}

#[test]
fn the_report_evaluates_the_new_head_on_the_validation_set() {
    let mut sim = Sim::new(config(Strategy::FedAvg));
    let data = shards(1, 50).pop().unwrap();
    sim.engine.set_validation(data.clone()).unwrap();
    sim.connect("a", 100);
    let u = trained(&sim.task("a"), "a", &data);
    let actions = sim.send("a", u);
    let eval = reports(&actions)[0].eval.unwrap();
    let direct = sim
        .engine
        .global_head()
        .evaluate(data.x(), data.labels())
        .unwrap();
    assert_eq!(eval, direct);
    let narrow = SyntheticProblem::new(
        SyntheticSpec {
            classes: 3,
            dim: 4,
            clusters_per_class: 1,
            noise: 1.0,
        },
        1,
    )
    .unwrap()
    .sample(5, 1)
    .unwrap();
    assert!(matches!(
        sim.engine.set_validation(narrow),
        Err(EngineError::BadValidationSet(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Rejections

/// Two connected clients a and b, both selected for round 0 with f32 tasks.
fn two_clients() -> Sim {
    Sim::start(config(Strategy::FedAvg), &[("a", 100), ("b", 100)])
}

#[test]
fn a_duplicate_update_is_refused_and_counted_once() {
    let mut sim = two_clients();
    let u = perturbed(&sim.task("a"), "a", 10, 1);
    assert_eq!(sim.verdict("a", u.clone()), Outcome::Accepted);
    assert_eq!(sim.rejection("a", u), RejectReason::Duplicate);
    let u = perturbed(&sim.task("b"), "b", 10, 2);
    let report = reports(&sim.send("b", u)).pop().unwrap();
    assert_eq!(report.accepted, ["a", "b"]);
    assert_eq!(report.rejected_by_reason["duplicate"], 1);
    assert_eq!(report.rejected[0].client, "a");
}

#[test]
fn stale_future_and_closed_rounds() {
    let mut sim = two_clients();
    let task = sim.task("a");
    let future = update_with(
        &RoundTask {
            round: 3,
            ..(*task).clone()
        },
        "a",
        10,
        &global_of(&task),
    );
    assert_eq!(
        sim.rejection("a", future),
        RejectReason::FutureRound { got: 3, current: 0 }
    );
    for (i, c) in ["a", "b"].into_iter().enumerate() {
        let u = perturbed(&sim.task(c), c, 10, i as u64);
        sim.send(c, u);
    }
    let stale = perturbed(&task, "a", 10, 5);
    assert_eq!(
        sim.rejection("a", stale),
        RejectReason::StaleRound { got: 0, current: 1 }
    );
    // Round 0 fails while only one client is left, and no retry opens: round 0 is closed.
    let mut sim = Sim::start(config(Strategy::FedAvg), &[("a", 100), ("b", 100)]);
    let task = sim.task("a");
    sim.event(Event::Disconnected { client: "b".into() });
    sim.tick_at(1_000);
    assert_eq!(sim.engine.next_deadline(), None);
    let u = perturbed(&task, "a", 10, 1);
    assert_eq!(sim.rejection("a", u), RejectReason::RoundClosed);
}

#[test]
fn unknown_client_and_client_id_mismatch() {
    let mut sim = two_clients();
    let u = perturbed(&sim.task("a"), "a", 10, 1);
    assert_eq!(
        sim.rejection("mallory", u.clone()),
        RejectReason::UnknownClient
    );
    assert_eq!(sim.rejection("b", u), RejectReason::ClientMismatch);
    sim.event(Event::Disconnected { client: "b".into() });
    let u = perturbed(&sim.task("b"), "b", 10, 1);
    assert_eq!(sim.rejection("b", u), RejectReason::UnknownClient);
}

#[test]
fn wrong_run_and_not_selected() {
    let mut c = config(Strategy::FedAvg);
    c.sampling.fraction = 0.5;
    c.min_connected = 4;
    let mut sim = Sim::new(c);
    sim.connect_all(&[("a", 100), ("b", 100), ("c", 100), ("d", 100)]);
    let chosen: Vec<String> = sent_to(&sim.log).into_iter().map(|(c, _)| c).collect();
    let left_out = ["a", "b", "c", "d"]
        .into_iter()
        .find(|c| !chosen.iter().any(|s| s == c))
        .unwrap();
    let task = sim.task(&chosen[0]);
    let u = perturbed(&task, left_out, 10, 1);
    assert_eq!(sim.rejection(left_out, u), RejectReason::NotSelected);
    let u = Update {
        run_id: RUN + 1,
        ..perturbed(&task, &chosen[0], 10, 1)
    }
    .seal();
    assert_eq!(sim.rejection(&chosen[0], u), RejectReason::WrongRun);
}

#[test]
fn digest_encoding_and_shape() {
    let mut sim = two_clients();
    let task = sim.task("a");
    let mut u = perturbed(&task, "a", 10, 1);
    u.n_samples = 11;
    assert_eq!(sim.rejection("a", u), RejectReason::DigestMismatch);

    let f16 = update_with(
        &RoundTask {
            encoding: Encoding::F16,
            ..(*task).clone()
        },
        "a",
        10,
        &global_of(&task),
    );
    assert_eq!(sim.rejection("a", f16), RejectReason::WrongEncoding);

    let mut u = perturbed(&task, "a", 10, 1);
    u.scopes.pop();
    assert!(matches!(
        sim.rejection("a", u.seal()),
        RejectReason::WrongShape(_)
    ));
    let mut u = perturbed(&task, "a", 10, 1);
    u.params.count += 1;
    u.params.data.extend_from_slice(&[0; 4]);
    assert!(matches!(
        sim.rejection("a", u.seal()),
        RejectReason::WrongShape(_)
    ));
    // The count matches but the bytes do not.
    let mut u = perturbed(&task, "a", 10, 1);
    u.params.data.truncate(8);
    assert!(matches!(
        sim.rejection("a", u.seal()),
        RejectReason::WrongShape(_)
    ));
    // None of it touched the fold: a good update still closes the round normally.
    let good = perturbed(&task, "a", 10, 1);
    assert_eq!(sim.verdict("a", good), Outcome::Accepted);
}

#[test]
fn a_negative_int8_scale_is_malformed() {
    let mut c = config(Strategy::FedAvg);
    c.update_encoding = Encoding::Int8RowScaled;
    let mut sim = Sim::new(c);
    sim.connect("a", 100);
    let task = sim.task("a");
    assert_eq!(task.encoding, Encoding::Int8RowScaled);
    let mut u = perturbed(&task, "a", 10, 1);
    u.params.scales[0] = -1.0;
    assert!(matches!(
        sim.rejection("a", u.seal()),
        RejectReason::Malformed(_)
    ));
}

#[test]
fn non_finite_parameters_scopes_and_metrics() {
    let mut sim = two_clients();
    let task = sim.task("a");
    for bad in [f32::NAN, f32::INFINITY] {
        let mut u = perturbed(&task, "a", 10, 1);
        u.params.data[4..8].copy_from_slice(&bad.to_le_bytes());
        assert_eq!(sim.rejection("a", u.seal()), RejectReason::NonFinite);
    }
    let mut u = perturbed(&task, "a", 10, 1);
    u.scopes[0].std = f64::NAN;
    assert_eq!(sim.rejection("a", u.seal()), RejectReason::NonFinite);
    let mut u = perturbed(&task, "a", 10, 1);
    u.metrics.kl = f64::INFINITY;
    assert_eq!(sim.rejection("a", u.seal()), RejectReason::NonFinite);
}

#[test]
fn held_out_reports_are_checked_and_summarized_in_the_round_report() {
    let mut c = config(Strategy::FedAvg);
    c.eval_fraction = 0.3;
    let mut sim = Sim::start(c, &[("a", 100), ("b", 100)]);
    let held = |samples, loss, accuracy| {
        Some(HeldOutEval {
            samples,
            loss,
            accuracy,
        })
    };
    let with = |mut u: Update, held_out| {
        u.metrics.held_out = held_out;
        u.seal()
    };
    let task = sim.task("a");
    // Impossible figures, and more rows than the hello counted beside the training rows.
    for bad in [
        held(10, 0.5, 1.5),
        held(10, -1.0, 0.5),
        held(10, f64::NAN, 0.5),
        held(0, 0.5, 0.5),
        held(11, 0.5, 0.5),
        held(10, 1e4, 0.5),
    ] {
        let u = with(perturbed(&task, "a", 90, 1), bad);
        assert!(
            matches!(sim.rejection("a", u), RejectReason::Malformed(_)),
            "{bad:?}"
        );
    }
    let u = with(perturbed(&task, "a", 90, 1), held(10, 0.5, 0.9));
    assert_eq!(sim.verdict("a", u), Outcome::Accepted);
    let u = with(perturbed(&sim.task("b"), "b", 70, 2), held(30, 1.0, 0.5));
    let report = reports(&sim.send("b", u)).pop().unwrap();
    let f = report.federated_eval.expect("both clients reported");
    assert_eq!((f.clients, f.samples), (2, 40));
    // Weighted by rows, each capped at max_claim_ratio (2) × the lower median (10): 10 and 20.
    assert!(
        (f.accuracy - (10.0 * 0.9 + 20.0 * 0.5) / 30.0).abs() < 1e-12,
        "{f:?}"
    );
    assert_eq!((f.accuracy_min, f.accuracy_max), (0.5, 0.9));
    // A round without reports has none.
    let task = sim.task("a");
    sim.verdict("a", perturbed(&task, "a", 90, 3));
    let report = reports(&sim.send("b", perturbed(&sim.task("b"), "b", 90, 4)))
        .pop()
        .unwrap();
    assert_eq!(report.federated_eval, None);

    // More rows than the run's share of the hello, or a report the run did not ask for.
    let mut c = config(Strategy::FedAvg);
    c.eval_fraction = 0.1;
    let mut sim = Sim::start(c, &[("a", 100), ("b", 100)]);
    let u = with(perturbed(&sim.task("a"), "a", 60, 1), held(40, 0.5, 0.5));
    assert!(matches!(sim.rejection("a", u), RejectReason::Malformed(_)));
    let mut sim = Sim::start(config(Strategy::FedAvg), &[("a", 100), ("b", 100)]);
    let u = with(perturbed(&sim.task("a"), "a", 90, 1), held(10, 0.5, 0.5));
    assert!(matches!(sim.rejection("a", u), RejectReason::Malformed(_)));
}

#[test]
fn bad_sample_counts() {
    let mut c = config(Strategy::FedAvg);
    c.bounds.max_n_samples = 50;
    let mut sim = Sim::start(c, &[("a", 40), ("b", 100)]);
    let task = sim.task("a");
    for n in [0, 41] {
        let u = perturbed(&task, "a", n, 1);
        assert_eq!(sim.rejection("a", u), RejectReason::BadSampleCount(n));
    }
    let u = perturbed(&sim.task("b"), "b", 60, 1);
    assert_eq!(sim.rejection("b", u), RejectReason::BadSampleCount(60));
    let u = perturbed(&task, "a", 40, 1);
    assert_eq!(sim.verdict("a", u), Outcome::Accepted);
}

#[test]
fn scopes_must_be_positive_and_match_the_parameters() {
    let mut sim = two_clients();
    let task = sim.task("a");
    for std in [0.0, -0.1] {
        let mut u = perturbed(&task, "a", 10, 1);
        u.scopes[1].std = std;
        assert!(matches!(
            sim.rejection("a", u.seal()),
            RejectReason::BadScope(_)
        ));
    }
    // A client that lies about its scope (to pull the fused target) is caught.
    let mut u = perturbed(&task, "a", 10, 1);
    u.scopes[0].std *= 1.5;
    assert!(matches!(
        sim.rejection("a", u.seal()),
        RejectReason::BadScope(_)
    ));
    let mut u = perturbed(&task, "a", 10, 1);
    u.scopes[0].mean += u.scopes[0].std;
    assert!(matches!(
        sim.rejection("a", u.seal()),
        RejectReason::BadScope(_)
    ));
}

#[test]
fn an_update_a_million_times_the_global_head_is_refused() {
    let mut sim = two_clients();
    let task = sim.task("a");
    // Shifted, not scaled: the scopes' σ stay as they were, only the distance is huge.
    let huge: Vec<f32> = global_of(&task).iter().map(|w| w + 1e4).collect();
    let u = update_with(&task, "a", 10, &huge);
    match sim.rejection("a", u) {
        RejectReason::NormTooLarge { norm, bound } => assert!(norm > 1e2 * bound),
        other => panic!("{other:?}"),
    }
}

/// A tensor collapsed to its mean or stretched tenfold is refused by its measured σ, whatever
/// it reports and however small its step; σ within the factor passes.
#[test]
fn a_collapsed_or_inflated_tensor_is_refused_by_its_measured_scope() {
    let mut sim = two_clients();
    let task = sim.task("a");
    let spec = task.shape.to_spec().unwrap();
    let last = spec.scoped_tensors(ScopeSelection::default())[1].range();
    let global = global_of(&task);
    let mean = global[last.clone()]
        .iter()
        .map(|&x| f64::from(x))
        .sum::<f64>()
        / last.len() as f64;
    let reshaped = |f: &dyn Fn(f32) -> f32| {
        let mut w = global.clone();
        for x in &mut w[last.clone()] {
            *x = f(*x);
        }
        w
    };
    let collapsed = reshaped(&|_| mean as f32);
    match sim.rejection("a", update_with(&task, "a", 10, &collapsed)) {
        RejectReason::BadScope(m) => assert!(m.contains("tensor 1"), "{m}"),
        other => panic!("{other:?}"),
    }
    let inflated = reshaped(&|x| mean as f32 + 10.0 * (x - mean as f32));
    assert!(matches!(
        sim.rejection("a", update_with(&task, "a", 10, &inflated)),
        RejectReason::BadScope(_)
    ));
    let stretched = reshaped(&|x| mean as f32 + 1.5 * (x - mean as f32));
    assert_eq!(
        sim.verdict("a", update_with(&task, "a", 10, &stretched)),
        Outcome::Accepted
    );
}

/// Four liars claiming ten million samples each, among six honest clients: the share cap alone
/// would give them the whole round; capped at twice the median claim of the selection, they
/// weigh what eight honest clients would.
#[test]
fn colluding_claims_weigh_at_most_twice_the_median_claim() {
    let mut clients: Vec<(String, u64)> = (0..6).map(|i| (format!("h{i}"), 100)).collect();
    clients.extend((0..4).map(|i| (format!("liar{i}"), 10_000_000)));
    let ids: Vec<(&str, u64)> = clients.iter().map(|(c, n)| (c.as_str(), *n)).collect();
    let mut c = config(Strategy::FedAvg);
    c.bounds.max_n_samples = 10_000_000;
    let mut sim = Sim::start(c, &ids);
    for (i, &(c, n)) in ids.iter().enumerate() {
        let task = sim.task(c);
        let u = perturbed(&task, c, n, 200 + i as u64);
        assert_eq!(sim.verdict(c, u), Outcome::Accepted);
    }
    let report = reports(&sim.log).remove(0);
    assert_eq!(report.accepted.len(), 10);
    for (client, w) in &report.weights {
        let want = if client.starts_with("liar") {
            200.0
        } else {
            100.0
        };
        assert_eq!(*w, want, "{client}");
    }
}

#[test]
fn rejected_updates_leave_the_fold_untouched() {
    let three = [("a", 100), ("b", 100), ("c", 100)];
    let honest = |sim: &mut Sim| {
        for (i, c) in ["a", "b"].into_iter().enumerate() {
            let u = perturbed(&sim.task(c), c, 10 + i as u64, i as u64);
            sim.send(c, u);
        }
    };
    let mut clean = Sim::start(config(Strategy::FedAvg), &three);
    honest(&mut clean);
    clean.event(Event::Disconnected { client: "c".into() });
    let mut noisy = Sim::start(config(Strategy::FedAvg), &three);
    // c's updates pass every check up to the contents, then fail one each.
    let task = noisy.task("c");
    let huge: Vec<f32> = global_of(&task).iter().map(|w| w * 1e6).collect();
    noisy.send("c", update_with(&task, "c", 10, &huge));
    let mut u = perturbed(&task, "c", 10, 1);
    u.scopes[0].std *= 2.0;
    noisy.send("c", u.seal());
    noisy.send("c", perturbed(&task, "c", 0, 3));
    honest(&mut noisy);
    let (rc, rn) = (
        reports(&clean.log).pop().unwrap(),
        reports(&noisy.log).pop().unwrap(),
    );
    assert_eq!(rc.accepted, rn.accepted);
    assert_eq!(
        bits(noisy.engine.global_params()),
        bits(clean.engine.global_params())
    );
    assert_eq!(noisy.engine.targets(), clean.engine.targets());
    // c was refused (it answered), a and b folded: every selected client answered.
    assert_eq!(rn.closed_by, ClosedBy::AllAnswered);
    assert_eq!(rn.rejected.len(), 3);
    assert_eq!(rn.rejected_count, 3);
    assert_eq!(rn.rejected_by_reason.values().sum::<u64>(), 3);
    assert_eq!(noisy.engine.history().updates_rejected, 3);
}

// ---------------------------------------------------------------------------------------------
// Encodings

#[test]
fn f16_and_int8_updates_of_trained_heads_pass_the_scope_check() {
    for encoding in [Encoding::F16, Encoding::Int8RowScaled] {
        let mut c = config(Strategy::wsa(1.0, FusionRule::MeanStd));
        c.update_encoding = encoding;
        c.bounds.scope_tolerance = 0.02;
        c.min_connected = 2;
        let mut sim = Sim::new(c);
        let data = shards(2, 80);
        sim.connect("a", 1000);
        sim.event(Event::Connected {
            client: "old".into(),
            n_samples: 1000,
            capabilities: Capabilities::default(),
            held: None,
        });
        let task = sim.task("a");
        assert_eq!(task.encoding, encoding);
        assert_eq!(sim.task("old").encoding, Encoding::F32);
        let u = trained(&task, "a", &data[0]);
        assert_eq!(sim.verdict("a", u), Outcome::Accepted, "{encoding:?}");
        let u = trained(&sim.task("old"), "old", &data[1]);
        assert_eq!(sim.verdict("old", u), Outcome::Accepted, "{encoding:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The fold against second implementations

#[test]
fn fedavg_equals_a_weighted_average_computed_by_hand() {
    let clients = [("a", 10u64), ("b", 25), ("c", 65)];
    let mut c = config(Strategy::FedAvg);
    // Uncapped here, and the paper's weighted fusion: the plain definition (the cap and the
    // default median fusion have their own tests).
    c.max_share = 1.0;
    c.max_claim_ratio = 1e9;
    c.targets.fusion = TargetFusion::FollowRule;
    let mut sim = Sim::start(c, &clients);
    let mut sent = Vec::new();
    for (i, &(c, n)) in clients.iter().enumerate() {
        let task = sim.task(c);
        let u = perturbed(&task, c, n, 40 + i as u64);
        let params = u
            .params
            .decode(&RowLayout::of_head(&task.shape.to_spec().unwrap()))
            .unwrap();
        sent.push((params, n, u.scopes.clone()));
        sim.send(c, u);
    }
    let total: f64 = sent.iter().map(|(_, n, _)| *n as f64).sum();
    let global = sim.engine.global_params();
    for (j, &g) in global.iter().enumerate() {
        let expected: f64 = sent
            .iter()
            .map(|(w, n, _)| f64::from(w[j]) * *n as f64)
            .sum::<f64>()
            / total;
        assert!(
            (f64::from(g) - expected).abs() <= 1e-6 * expected.abs().max(1e-3),
            "param {j}: {g} vs {expected}"
        );
    }
    // The scopes are fused too (mean-of-stds rule by default): the ones the engine measured,
    // which agree with the ones a client reports to the f32 sums' rounding.
    for (l, t) in sim.engine.targets().iter().enumerate() {
        let mean: f64 = sent
            .iter()
            .map(|(_, n, s)| s[l].mean * *n as f64)
            .sum::<f64>()
            / total;
        let std: f64 = sent
            .iter()
            .map(|(_, n, s)| s[l].std * *n as f64)
            .sum::<f64>()
            / total;
        assert!((t.mean - mean).abs() < 1e-6 * std && (t.std - std).abs() < 1e-6 * std);
    }
}

/// One client claiming a huge sample count counts for at most `max_share` of a round, in the
/// head and in the targets, under every rule that weighs clients; its step is still folded.
#[test]
fn a_client_claiming_millions_of_samples_weighs_at_most_its_share() {
    let clients = [
        ("a", 100u64),
        ("b", 100),
        ("c", 100),
        ("d", 100),
        ("e", 100),
        ("liar", 10_000_000),
    ];
    for rule in [
        Aggregation::Mean,
        Aggregation::NormClipped { max_norm: 10.0 },
    ] {
        let mut c = config(Strategy::FedAvg);
        c.aggregation = rule;
        c.bounds.max_n_samples = 10_000_000;
        let mut sim = Sim::start(c, &clients);
        let mut sent = Vec::new();
        for (i, &(c, n)) in clients.iter().enumerate() {
            let task = sim.task(c);
            let u = perturbed(&task, c, n, 90 + i as u64);
            let w = u
                .params
                .decode(&RowLayout::of_head(&task.shape.to_spec().unwrap()))
                .unwrap();
            sent.push(w);
            assert_eq!(sim.verdict(c, u), Outcome::Accepted, "{rule:?}");
        }
        // By hand: the liar's weight w solves w = 0.25·(500 + w), so w = 500/3 and its share
        // is exactly a quarter; the others keep 100 each.
        let weights = [100.0, 100.0, 100.0, 100.0, 100.0, 500.0 / 3.0];
        let total: f64 = weights.iter().sum();
        assert!((weights[5] / total - 0.25).abs() < 1e-12);
        let global = sim.engine.global_params();
        for j in 0..global.len() {
            let want: f64 = sent
                .iter()
                .zip(&weights)
                .map(|(w, p)| p * f64::from(w[j]))
                .sum::<f64>()
                / total;
            assert!(
                (f64::from(global[j]) - want).abs() <= 1e-5 * want.abs().max(1e-2),
                "{rule:?} param {j}: {} vs {want}",
                global[j]
            );
        }
        let report = reports(&sim.log).remove(0);
        assert_eq!(report.accepted.len(), 6);
    }
}

/// The engine folds with the configured rule: each robust rule's head is its definition
/// applied to the accepted updates (coordinate-wise, weights ignored), clipping scales each
/// step from the global head, and the label names the rule.
#[test]
fn robust_aggregation_rules_give_their_definition() {
    let clients = [("a", 10u64), ("b", 25), ("c", 65), ("d", 5), ("e", 40)];
    for rule in [
        Aggregation::Median,
        Aggregation::TrimmedMean { trim: 0.2 },
        Aggregation::NormClipped { max_norm: 0.05 },
    ] {
        let mut c = config(Strategy::FedAvg);
        c.aggregation = rule;
        c.max_share = 1.0;
        c.max_claim_ratio = 1e9;
        assert!(c.label().ends_with(&format!("+{}", rule.label())));
        let mut sim = Sim::start(c, &clients);
        let before = global_of(&sim.task("a"));
        let mut sent = Vec::new();
        for (i, &(c, n)) in clients.iter().enumerate() {
            let task = sim.task(c);
            let u = perturbed(&task, c, n, 70 + i as u64);
            sent.push((
                u.params
                    .decode(&RowLayout::of_head(&task.shape.to_spec().unwrap()))
                    .unwrap(),
                n,
            ));
            assert_eq!(sim.verdict(c, u), Outcome::Accepted);
        }
        let after = sim.engine.global_params().to_vec();
        assert_ne!(after, before, "{rule:?}: the round must move the head");
        let total: f64 = sent.iter().map(|(_, n)| *n as f64).sum();
        for j in 0..after.len() {
            let mut column: Vec<f64> = sent.iter().map(|(w, _)| f64::from(w[j])).collect();
            column.sort_by(f64::total_cmp);
            let want = match rule {
                Aggregation::Median => column[2],
                // ⌊0.2 · 5⌋ = 1 cut from each end.
                Aggregation::TrimmedMean { .. } => column[1..4].iter().sum::<f64>() / 3.0,
                _ => {
                    sent.iter()
                        .map(|(w, n)| {
                            let d = w
                                .iter()
                                .zip(&before)
                                .map(|(&x, &g)| (f64::from(x) - f64::from(g)).powi(2))
                                .sum::<f64>()
                                .sqrt();
                            let c = (0.05 / d).min(1.0);
                            *n as f64
                                * (f64::from(before[j])
                                    + c * (f64::from(w[j]) - f64::from(before[j])))
                        })
                        .sum::<f64>()
                        / total
                }
            };
            assert!(
                (f64::from(after[j]) - want).abs() <= 1e-5 * want.abs().max(1e-2),
                "{rule:?} param {j}: {} vs {want}",
                after[j]
            );
        }
    }
}

#[test]
fn wsa_targets_are_the_scope_fusion_of_the_client_scopes() {
    for rule in [
        FusionRule::MeanStd,
        FusionRule::RootMeanVar,
        FusionRule::Mixture,
    ] {
        for weighting in [Weighting::Uniform, Weighting::SampleCount] {
            let mut c = config(Strategy::wsa(0.5, rule));
            c.weighting = weighting;
            c.targets.fusion = TargetFusion::FollowRule;
            c.min_connected = 3;
            let mut sim = Sim::new(c);
            let data = shards(3, 40);
            let ids = ["a", "b", "c"];
            for (id, d) in ids.iter().zip(&data) {
                sim.connect(id, d.len() as u64);
            }
            let task = sim.task("a");
            let wsa = task.train.wsa.clone().unwrap();
            assert_eq!(wsa.lambda, 0.5);
            assert!(!wsa.include_biases);
            let mut sent = Vec::new();
            for (id, d) in ids.iter().zip(&data) {
                let u = trained(&sim.task(id), id, d);
                let scopes: Vec<Scope> = WireScope::to_scopes(&u.scopes).unwrap();
                sent.push((scopes, weighting.weight(u.n_samples)));
                sim.send(id, u);
            }
            // Weighted as the fold weighs: sample counts capped at the run's share (the
            // shards differ in size, so the largest is cut to a third).
            let raw: Vec<f64> = sent.iter().map(|(_, w)| *w).collect();
            let weights = capped_weights(&raw, sim.engine.config().max_share);
            let mut fusion = ScopeFusion::new(2);
            for ((scopes, _), w) in sent.iter().zip(weights) {
                fusion.add(scopes, w).unwrap();
            }
            let expected = fusion.finish(rule).unwrap();
            // The engine fuses the scopes it measured, which agree with the reported ones to
            // the rounding of its f32 sums.
            for (got, want) in sim.engine.targets().iter().zip(&expected) {
                assert!(
                    (got.mean - want.mean).abs() < 1e-6 * want.std
                        && (got.std - want.std).abs() < 1e-6 * want.std,
                    "{rule:?} {weighting:?}: {got:?} vs {want:?}"
                );
            }
            // And round 1's tasks carry them.
            let next = sim.task("a");
            assert_eq!(next.round, 1);
            let wire: Vec<WireScope> = sim
                .engine
                .targets()
                .iter()
                .copied()
                .map(WireScope::from)
                .collect();
            assert_eq!(next.targets, wire);
        }
    }
}

#[test]
fn wsa_with_bias_scopes_tells_clients_and_checks_four_scopes() {
    let mut c = config(Strategy::wsa(0.1, FusionRule::MeanStd));
    c.scope_selection.include_biases = true;
    let mut sim = Sim::start(c, &[("a", 10)]);
    let task = sim.task("a");
    assert!(task.train.wsa.as_ref().unwrap().include_biases);
    assert_eq!(task.targets.len(), 4);
    let u = perturbed(&task, "a", 10, 1);
    assert_eq!(u.scopes.len(), 4);
    assert_eq!(sim.verdict("a", u), Outcome::Accepted);
    assert_eq!(sim.engine.targets().len(), 4);
}

#[test]
fn fedprox_tasks_carry_mu_and_seeds_differ_per_round() {
    let mut sim = Sim::new(config(Strategy::FedProx { mu: 0.01 }));
    sim.connect("a", 10);
    let t0 = sim.task("a");
    assert_eq!(t0.train.prox_mu, Some(0.01));
    assert!(t0.train.wsa.is_none());
    let u = perturbed(&t0, "a", 10, 1);
    sim.send("a", u);
    let t1 = sim.task("a");
    assert_eq!(t1.round, 1);
    assert_ne!(t0.train.seed, t1.train.seed);
}

// ---------------------------------------------------------------------------------------------
// Sampling

#[test]
fn sample_sizes_follow_fraction_minimum_and_over_selection() {
    let s = |fraction, min_clients, over_selection| Sampling {
        population: Default::default(),
        fraction,
        min_clients,
        over_selection,
    };
    assert_eq!(sample_sizes(&s(1.0, 1, 1.0), 1, 10), (10, 10));
    assert_eq!(sample_sizes(&s(0.3, 1, 1.0), 1, 10), (3, 3));
    assert_eq!(sample_sizes(&s(0.25, 1, 1.0), 1, 10), (3, 3)); // ceil(2.5)
    assert_eq!(sample_sizes(&s(0.1, 4, 1.0), 1, 10), (4, 4));
    assert_eq!(sample_sizes(&s(0.1, 1, 1.0), 6, 10), (6, 6)); // never below the quorum
    assert_eq!(sample_sizes(&s(0.3, 1, 1.5), 1, 10), (3, 5)); // ceil(4.5)
    assert_eq!(sample_sizes(&s(0.5, 1, 3.0), 1, 10), (5, 10)); // capped
    assert_eq!(sample_sizes(&s(0.1, 20, 2.0), 1, 10), (10, 10)); // capped
    assert_eq!(sample_sizes(&s(1.0, 1, 1.0), 1, 0), (0, 0));
}

#[test]
fn no_round_opens_with_fewer_clients_than_the_quorum() {
    let mut c = config(Strategy::FedAvg);
    c.quorum = 3;
    c.sampling.fraction = 0.1;
    let mut sim = Sim::new(c);
    assert!(sim.connect("a", 10).is_empty());
    assert!(sim.connect("b", 10).is_empty());
    let actions = sim.connect("c", 10);
    assert_eq!(sent_to(&actions).len(), 3);
    assert_eq!(sim.engine.open_round().unwrap().target, 3);
}

#[test]
fn the_engine_can_move_to_another_thread() {
    fn send<T: Send>(_: &T) {}
    send(&Engine::new(config(Strategy::FedAvg)).unwrap());
}

#[test]
fn over_selection_closes_as_soon_as_the_target_is_met() {
    let mut c = config(Strategy::FedAvg);
    c.sampling = Sampling {
        population: Default::default(),
        fraction: 0.3,
        min_clients: 2,
        over_selection: 1.5,
    };
    c.min_connected = 10;
    let mut sim = Sim::new(c);
    for i in 0..10 {
        sim.connect(&format!("c{i}"), 10);
    }
    let selected: Vec<String> = sent_to(&sim.log).into_iter().map(|(c, _)| c).collect();
    assert_eq!(selected.len(), 5);
    let status = sim.engine.open_round().unwrap();
    assert_eq!((status.target, status.selected), (3, 5));
    for (i, c) in selected.iter().take(3).enumerate() {
        let u = perturbed(&sim.task(c), c, 10, i as u64);
        sim.send(c, u);
    }
    let report = reports(&sim.log).pop().unwrap();
    assert_eq!(report.closed_by, ClosedBy::Target);
    assert_eq!(report.accepted.len(), 3);
    assert_eq!(report.selected, selected);
    // A fourth selected client is now late.
    let late = perturbed(&sim.tasks[&selected[3]].clone(), &selected[3], 10, 9);
    let late = Update { round: 0, ..late }.seal();
    assert!(matches!(
        sim.rejection(&selected[3], late),
        RejectReason::StaleRound { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Determinism and resumption

/// Runs `rounds` rounds with trained updates from clients a..e, every client answering its
/// task; `sim` must have all of them connected.
fn run_rounds(sim: &mut Sim, data: &[LabelledFeatures], rounds: u64) {
    let ids = ["a", "b", "c", "d", "e"];
    for _ in 0..rounds {
        let round = sim.engine.round();
        let selected: Vec<String> = sim
            .tasks
            .iter()
            .filter(|(_, t)| t.round == round)
            .map(|(c, _)| c.clone())
            .collect();
        assert!(!selected.is_empty());
        for c in selected {
            let k = ids.iter().position(|i| *i == c).unwrap();
            let u = trained(&sim.task(&c), &c, &data[k]);
            sim.now += 10;
            sim.send(&c, u);
        }
        assert_eq!(sim.engine.round(), round + 1);
    }
}

fn resumable_config() -> EngineConfig {
    let mut c = config(Strategy::wsa(1.0, FusionRule::Mixture));
    c.sampling.fraction = 0.6;
    c.quorum = 2;
    c.min_connected = 5;
    c
}

fn connect_five(sim: &mut Sim, data: &[LabelledFeatures]) {
    for (id, d) in ["a", "b", "c", "d", "e"].iter().zip(data) {
        sim.connect(id, d.len() as u64);
    }
}

#[test]
fn the_same_seed_and_events_give_the_same_actions_and_heads() {
    let data = shards(5, 30);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut sim = Sim::new(resumable_config());
        connect_five(&mut sim, &data);
        run_rounds(&mut sim, &data, 3);
        runs.push(sim);
    }
    assert_eq!(runs[0].log, runs[1].log);
    assert_eq!(
        bits(runs[0].engine.global_params()),
        bits(runs[1].engine.global_params())
    );
    // A different seed samples and trains differently.
    let mut c = resumable_config();
    c.seed += 1;
    let mut other = Sim::new(c);
    connect_five(&mut other, &data);
    run_rounds(&mut other, &data, 3);
    assert_ne!(
        bits(other.engine.global_params()),
        bits(runs[0].engine.global_params())
    );
}

#[test]
fn resuming_from_a_checkpoint_file_gives_the_same_head_bits() {
    let data = shards(5, 30);
    let mut straight = Sim::new(resumable_config());
    connect_five(&mut straight, &data);
    run_rounds(&mut straight, &data, 4);
    assert!(straight.engine.is_finished());

    let mut first = Sim::new(resumable_config());
    connect_five(&mut first, &data);
    run_rounds(&mut first, &data, 2);
    let Some(Action::Checkpoint(cp)) = first
        .log
        .iter()
        .rev()
        .find(|a| matches!(a, Action::Checkpoint(_)))
    else {
        panic!("no checkpoint")
    };
    assert_eq!(cp.next_round, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    cp.save_atomic(&path).unwrap();
    drop(first);

    let loaded = Checkpoint::load(&path).unwrap();
    let mut resumed = Sim::of(Engine::resume(resumable_config(), loaded.clone()).unwrap());
    assert_eq!(resumed.engine.round(), 2);
    connect_five(&mut resumed, &data);
    run_rounds(&mut resumed, &data, 2);
    assert!(resumed.engine.is_finished());
    assert_eq!(
        bits(resumed.engine.global_params()),
        bits(straight.engine.global_params())
    );
    assert_eq!(resumed.engine.targets(), straight.engine.targets());
    assert_eq!(resumed.engine.history(), straight.engine.history());

    // Another configuration cannot resume this run.
    let mut other = resumable_config();
    other.quorum = 3;
    assert!(matches!(
        Engine::resume(other, loaded.clone()),
        Err(EngineError::ConfigMismatch { .. })
    ));
    let mut broken = loaded;
    broken.global.pop();
    assert!(matches!(
        Engine::resume(resumable_config(), broken),
        Err(EngineError::BadCheckpoint(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn configurations_out_of_domain_are_refused_with_the_field_named() {
    type Change = Box<dyn Fn(&mut EngineConfig)>;
    let cases: Vec<(&str, Change)> = vec![
        ("fraction", Box::new(|c| c.sampling.fraction = 0.0)),
        (
            "over_selection",
            Box::new(|c| c.sampling.over_selection = 0.5),
        ),
        ("quorum", Box::new(|c| c.quorum = 0)),
        ("norm_ratio", Box::new(|c| c.bounds.norm_ratio = f64::NAN)),
        ("momentum", Box::new(|c| c.train.momentum = 1.0)),
        (
            "include_biases",
            Box::new(|c| c.scope_selection.include_biases = true),
        ),
        ("round_timeout_ms", Box::new(|c| c.round_timeout_ms = 0)),
        ("rounds", Box::new(|c| c.rounds = 0)),
        (
            "aggregation",
            Box::new(|c| c.aggregation = Aggregation::TrimmedMean { trim: 0.5 }),
        ),
        (
            "aggregation",
            Box::new(|c| c.aggregation = Aggregation::NormClipped { max_norm: 0.0 }),
        ),
    ];
    for (field, change) in cases {
        let mut c = config(Strategy::FedAvg);
        change(&mut c);
        match Engine::new(c) {
            Err(EngineError::InvalidConfig(msg)) => assert!(msg.contains(field), "{msg}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    let mut c = config(Strategy::FedAvg);
    c.head.classes = 1;
    assert!(Engine::new(c).is_err());
    // λ on one scoped tensor: the head's two weight matrices are 0 and 1.
    for (text, ok) in [
        ("wsa:10:mean-std:only=1", true),
        ("wsa:10:mean-std:only=2", false),
    ] {
        let made = Engine::new(config(text.parse().unwrap()));
        assert_eq!(made.is_ok(), ok, "{text}");
    }
}

#[test]
fn the_config_hash_changes_with_any_field_and_round_trips_through_json() {
    let c = config(Strategy::FedAvg);
    let mut d = c.clone();
    d.bounds.scope_tolerance = 0.06;
    assert_ne!(c.config_hash().unwrap(), d.config_hash().unwrap());
    let json = serde_json::to_string(&c).unwrap();
    let back: EngineConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    assert_eq!(back.config_hash().unwrap(), c.config_hash().unwrap());
    // Sections with defaults may be left out of a config file.
    let minimal = r#"{"run_id":1,"rounds":3,"strategy":{"kind":"fed-avg"},
        "head":{"input":8,"hidden":[6],"classes":3},"quorum":1,"round_timeout_ms":500,
        "min_connected":1}"#;
    let parsed: EngineConfig = serde_json::from_str(minimal).unwrap();
    assert_eq!(parsed.sampling, Sampling::default());
}

// ---------------------------------------------------------------------------------------------
// Clients that lie about their weight and their scopes

/// A client claiming ten million samples and sending an honest step with its last weight
/// tensor collapsed to its mean (σ = √ε), with the measured-σ bound turned off so that it
/// passes every check: the second line of defence. Its scopes are the aggregator's to measure
/// and its weight is capped, and the targets move by at most the bounds: under WSA λ = 100 the
/// honest clients' training keeps working round after round, and σ̃ never drops below its
/// floor.
#[test]
fn a_scope_collapsing_liar_cannot_drive_the_targets_to_zero() {
    let data = shards(5, 60);
    let mut c = config(Strategy::wsa(100.0, FusionRule::MeanStd));
    c.rounds = 6;
    c.bounds.max_scope_ratio = 1e9;
    let mut ids: Vec<(String, u64)> = (0..4)
        .map(|i| (format!("honest-{i}"), data[i].len() as u64))
        .collect();
    ids.push(("liar".into(), 10_000_000));
    let clients: Vec<(&str, u64)> = ids.iter().map(|(c, n)| (c.as_str(), *n)).collect();
    let mut sim = Sim::start(c, &clients);
    let first = sim.engine.targets().to_vec();
    for round in 0..6u64 {
        let before = sim.engine.targets().to_vec();
        for (i, (id, _)) in ids.iter().enumerate() {
            let task = sim.task(id);
            assert_eq!(task.round, round);
            let u = if id == "liar" {
                let honest = trained(&task, id, &data[4]);
                let spec = task.shape.to_spec().unwrap();
                let mut w = honest.params.decode(&RowLayout::of_head(&spec)).unwrap();
                let last = spec.scoped_tensors(ScopeSelection::default())[1];
                let mean =
                    w[last.range()].iter().map(|&x| f64::from(x)).sum::<f64>() / last.len() as f64;
                w[last.range()].fill(mean as f32);
                // It reports the scopes of what it sends, so the consistency check passes.
                update_with(&task, id, 10_000_000, &w)
            } else {
                // Honest local training under the targets: it must not diverge.
                trained(&task, id, &data[i])
            };
            assert_eq!(sim.verdict(id, u), Outcome::Accepted, "round {round} {id}");
        }
        let after = sim.engine.targets();
        for (t, (a, b)) in after.iter().zip(&before).enumerate() {
            assert!(
                a.std >= b.std / 2.0 * (1.0 - 1e-12),
                "round {round} tensor {t}"
            );
            assert!(a.std >= 0.1 * first[t].std * (1.0 - 1e-12), "floor");
        }
    }
    assert!(sim.engine.is_finished());
    assert_eq!(sim.engine.history().rounds_failed, 0);
}

/// The targets are the median of the clients' measured scopes (by default, and under the
/// median rule when they follow the rule), so one inflated tensor (a stretched copy of an
/// honest step) moves them as little as it moves a median head.
#[test]
fn targets_are_the_median_of_the_measured_scopes() {
    for (aggregation, fusion) in [
        (Aggregation::Mean, TargetFusion::Median),
        (Aggregation::Median, TargetFusion::FollowRule),
    ] {
        targets_are_the_median_under(aggregation, fusion);
    }
}

fn targets_are_the_median_under(aggregation: Aggregation, fusion: TargetFusion) {
    let clients = [("a", 10u64), ("b", 10), ("c", 10), ("d", 10), ("e", 10)];
    let mut c = config(Strategy::wsa(1.0, FusionRule::MeanStd));
    c.aggregation = aggregation;
    c.targets.fusion = fusion;
    let mut sim = Sim::start(c, &clients);
    let previous = sim.engine.targets().to_vec();
    let mut scopes = Vec::new();
    for (i, &(id, n)) in clients.iter().enumerate() {
        let task = sim.task(id);
        let mut u = perturbed(&task, id, n, 200 + i as u64);
        if id == "e" {
            // Scope inflation: the step stretched 50×, scopes honestly reported.
            let spec = task.shape.to_spec().unwrap();
            let g = global_of(&task);
            let w: Vec<f32> = u
                .params
                .decode(&RowLayout::of_head(&spec))
                .unwrap()
                .iter()
                .zip(&g)
                .map(|(&w, &g)| g + 50.0 * (w - g))
                .collect();
            u = update_with(&task, id, n, &w);
        }
        scopes.push(WireScope::to_scopes(&u.scopes).unwrap());
        assert_eq!(sim.verdict(id, u), Outcome::Accepted);
    }
    for (t, got) in sim.engine.targets().iter().enumerate() {
        let mut stds: Vec<f64> = scopes.iter().map(|s| s[t].std).collect();
        stds.sort_by(f64::total_cmp);
        let want = stds[2].clamp(previous[t].std / 2.0, previous[t].std * 2.0);
        assert!(
            (got.std - want).abs() <= 1e-5 * want,
            "tensor {t}: {} vs {want}",
            got.std
        );
        assert!(
            got.std < stds[4] / 2.0,
            "the inflated scope is not the target"
        );
    }
}

/// Zero-initialised biases have σ = √ε; their targets start at (and never fall below) the floor
/// their layer's weights set, instead of √ε.
#[test]
fn bias_targets_start_at_their_layers_floor() {
    let mut c = config(Strategy::wsa(10.0, FusionRule::MeanStd));
    c.scope_selection = ScopeSelection {
        include_biases: true,
    };
    let sim = Sim::new(c);
    let targets = sim.engine.targets();
    assert_eq!(targets.len(), 4);
    let head = Head::<f32>::init(&spec(), Init::Standard, 11).unwrap();
    let weights = head
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    assert_eq!(targets[0], weights[0], "a weight tensor is above its floor");
    assert_eq!(targets[1].std, 0.1 * weights[0].std, "layer 0's bias");
    assert_eq!(targets[3].std, 0.1 * weights[1].std, "layer 1's bias");
}

/// A run whose rounds a backend cannot hold is refused when it starts, not stuck at its first
/// opening; and a round deadline beyond a week (which would overflow a runtime's clock) is a
/// configuration error.
#[test]
fn rounds_that_cannot_be_held_or_timed_are_refused_up_front() {
    let mut c = config(Strategy::FedAvg);
    c.aggregation = Aggregation::Median;
    let tiny = aggregator_core::backend::CpuBackend::new(1).with_max_stored_bytes(1000);
    let engine = Engine::with_backend(c.clone(), Arc::new(tiny)).unwrap();
    match engine.check_round_capacity(10) {
        Err(EngineError::Backend(aggregator_core::backend::BackendError::Capacity(m))) => {
            assert!(m.contains("10 updates"), "{m}")
        }
        other => panic!("expected a capacity error, got {other:?}"),
    }
    assert!(
        Engine::new(c.clone())
            .unwrap()
            .check_round_capacity(10)
            .is_ok()
    );
    c.round_timeout_ms = u64::MAX;
    assert!(matches!(
        Engine::new(c),
        Err(EngineError::InvalidConfig(m)) if m.contains("round_timeout_ms")
    ));
}

/// WSA λ = 100 with biases scoped: honest local training from zero biases does not diverge,
/// round after round, and every update is accepted.
#[test]
fn wsa_with_biases_trains_from_zero_biases() {
    let data = shards(4, 60);
    for lambda in [10.0, 100.0] {
        let mut c = config(Strategy::wsa(lambda, FusionRule::MeanStd));
        c.scope_selection = ScopeSelection {
            include_biases: true,
        };
        c.rounds = 5;
        let ids: Vec<(String, u64)> = (0..4)
            .map(|i| (format!("h{i}"), data[i].len() as u64))
            .collect();
        let clients: Vec<(&str, u64)> = ids.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        let mut sim = Sim::start(c, &clients);
        for round in 0..5u64 {
            for (i, (id, _)) in ids.iter().enumerate() {
                let task = sim.task(id);
                assert_eq!(task.round, round);
                let u = trained(&task, id, &data[i]);
                assert!(
                    u.metrics.loss.is_finite() && u.metrics.loss < 10.0,
                    "λ {lambda} round {round} {id}: loss {}",
                    u.metrics.loss
                );
                assert_eq!(
                    sim.verdict(id, u),
                    Outcome::Accepted,
                    "λ {lambda} round {round} {id}"
                );
            }
        }
        assert!(sim.engine.is_finished());
    }
}

#[test]
fn a_round_that_keeps_failing_is_retried_with_growing_waits() {
    let mut c = config(Strategy::FedAvg);
    c.quorum = 2;
    let mut sim = Sim::start(c, &[("a", 10), ("b", 10)]);
    // Nobody answers: every attempt fails at its deadline.
    let mut waits = Vec::new();
    for _ in 0..6 {
        let deadline = sim.engine.next_deadline().unwrap().0;
        sim.log.clear();
        sim.tick_at(deadline);
        assert_eq!(reports(&sim.log)[0].closed_by, ClosedBy::Failed);
        // Nothing is asked before the engine's next deadline, which is the retry.
        if sent_to(&sim.log).is_empty() {
            let retry = sim.engine.next_deadline().unwrap().0;
            sim.tick_at(retry - 1);
            assert!(sent_to(&sim.log).is_empty(), "a retry opened early");
            sim.tick_at(retry);
        }
        assert_eq!(sent_to(&sim.log).len(), 2, "the retry opened");
        waits.push(sim.now - deadline);
    }
    // Capped by the round timeout (1 s here), else by 30 s.
    assert_eq!(waits, [0, 250, 500, 1_000, 1_000, 1_000]);
    assert_eq!(sim.engine.attempt(), 6);
}

// ---------------------------------------------------------------------------------------------
// Client-level differential privacy

fn private_config(noise_multiplier: f64, clip: f64, budget: Option<f64>) -> EngineConfig {
    let mut c = config(Strategy::wsa(1.0, FusionRule::MeanStd));
    c.weighting = Weighting::Uniform;
    // Bounds wide enough not to bind, so the targets are the released sums themselves.
    c.targets.max_std_ratio = 1e6;
    c.targets.max_mean_shift = 1e6;
    c.targets.std_floor = 0.0;
    // The clients' scopes, released through the noised sums (the definition checked below).
    c.targets.fusion = TargetFusion::FollowRule;
    c.privacy = Some(Privacy {
        noise_multiplier,
        clip: Clip::Fixed { norm: clip },
        delta: 1e-5,
        scope_share: 0.5,
        epsilon_budget: budget,
    });
    c
}

/// `v` scaled down to L2 norm at most `bound`.
fn clipped(v: Vec<f64>, bound: f64) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let scale = if norm > bound { bound / norm } else { 1.0 };
    v.into_iter().map(|x| x * scale).collect()
}

/// One DP round of four clients, steps of different lengths: the released head and targets
/// against the definition computed here, `g + Σ clip(w − g)/m` and
/// `targets + Σ clip(scope offsets)/m`, plus the noise.
fn private_round(noise_multiplier: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let clients = [("a", 1u64), ("b", 2), ("c", 3), ("d", 4)];
    let clip = 0.2;
    let mut sim = Sim::start(private_config(noise_multiplier, clip, None), &clients);
    let task = sim.task("a");
    let global = global_of(&task);
    let previous = sim.engine.targets().to_vec();
    let spec = task.shape.to_spec().unwrap();
    let (mut step_sum, mut scope_sum) = (vec![0.0; global.len()], vec![0.0; 2 * previous.len()]);
    for (i, &(client, n)) in clients.iter().enumerate() {
        // Steps of about 0.05·√75 ≈ 0.43·(i + 1)/4 in norm: the first is inside the clip.
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        let scale = 0.25 * (i as f32 + 1.0);
        let params: Vec<f32> = global
            .iter()
            .map(|&w| w + scale * rng.random_range(-0.1f32..0.1))
            .collect();
        let step = params
            .iter()
            .zip(&global)
            .map(|(&w, &g)| f64::from(w) - f64::from(g));
        for (s, d) in step_sum.iter_mut().zip(clipped(step.collect(), clip)) {
            *s += d;
        }
        let scopes = Head::from_flat(&spec, &params)
            .unwrap()
            .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
            .unwrap();
        let offsets: Vec<f64> = scopes
            .iter()
            .zip(&previous)
            .flat_map(|(s, p)| [s.mean - p.mean, s.std - p.std])
            .collect();
        for (s, d) in scope_sum.iter_mut().zip(clipped(offsets, 0.5 * clip)) {
            *s += d;
        }
        let u = update_with(&task, client, n, &params);
        assert_eq!(sim.verdict(client, u), Outcome::Accepted);
    }
    let m = 4.0;
    let expected_head: Vec<f64> = global
        .iter()
        .zip(&step_sum)
        .map(|(&g, s)| f64::from(g) + s / m)
        .collect();
    let expected_targets: Vec<f64> = previous
        .iter()
        .flat_map(|p| [p.mean, p.std])
        .zip(&scope_sum)
        .map(|(p, s)| p + s / m)
        .collect();
    let head: Vec<f64> = sim
        .engine
        .global_params()
        .iter()
        .map(|&w| f64::from(w))
        .collect();
    let targets: Vec<f64> = sim
        .engine
        .targets()
        .iter()
        .flat_map(|t| [t.mean, t.std])
        .collect();
    let report = reports(&sim.log).pop().unwrap();
    let privacy = report.privacy.expect("a DP round reports its privacy");
    assert_eq!(privacy.clip, clip);
    assert_eq!(privacy.sampling_rate, 1.0);
    (head, expected_head, targets, expected_targets)
}

#[test]
fn a_private_round_releases_the_clipped_sum_over_the_target_count() {
    // Noise far below f32 resolution: the release is the definition.
    let (head, expected_head, targets, expected_targets) = private_round(1e-12);
    for (h, e) in head.iter().zip(&expected_head) {
        assert!((h - e).abs() < 1e-6, "{h} vs {e}");
    }
    // The backend measures scopes with its own summation order.
    for (t, e) in targets.iter().zip(&expected_targets) {
        assert!((t - e).abs() < 1e-7, "{t} vs {e}");
    }
}

#[test]
fn a_private_round_adds_noise_of_the_stated_spread() {
    // z = 1: each coordinate of the sums gets N(0, (C·√(1 + s²))²), then / m = 4.
    let (head, expected_head, targets, expected_targets) = private_round(1.0);
    let std = 0.2 * (1.0f64 + 0.25).sqrt() / 4.0;
    let z: Vec<f64> = head
        .iter()
        .zip(&expected_head)
        .chain(targets.iter().zip(&expected_targets))
        .map(|(h, e)| (h - e) / std)
        .collect();
    let n = z.len() as f64;
    let mean = z.iter().sum::<f64>() / n;
    let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    // 79 draws of N(0, 1): the sample variance lies in [0.55, 1.5] with overwhelming odds.
    assert!(mean.abs() < 0.5, "mean {mean}");
    assert!((0.55..1.5).contains(&var), "variance {var}");
}

#[test]
fn epsilon_is_accounted_per_round_and_the_budget_ends_the_run() {
    // Two of four clients a round: q = 0.5. With z = 2, find a budget that two rounds fit
    // and three do not.
    let mut accountant = RdpAccountant::default();
    accountant.compose(0.5, 2.0, 2);
    let two = accountant.epsilon(1e-5);
    let three = accountant.epsilon_after(0.5, 2.0, 1e-5);
    let budget = (two + three) / 2.0;
    let mut c = private_config(2.0, 1.0, Some(budget));
    c.rounds = 10;
    c.sampling = Sampling {
        population: Default::default(),
        fraction: 0.5,
        min_clients: 2,
        over_selection: 1.0,
    };
    c.quorum = 2;
    c.min_connected = 4;
    let clients = [("a", 1u64), ("b", 1), ("c", 1), ("d", 1)];
    let mut sim = Sim::start(c.clone(), &clients);
    for round in 0..2u64 {
        let asked: Vec<String> = sim
            .tasks
            .iter()
            .filter(|(_, t)| t.round == round)
            .map(|(c, _)| c.clone())
            .collect();
        assert_eq!(asked.len(), 2);
        for client in asked {
            let u = perturbed(&sim.task(&client), &client, 1, round);
            assert_eq!(sim.verdict(&client, u), Outcome::Accepted);
        }
    }
    let rounds = reports(&sim.log);
    assert_eq!(rounds.len(), 2);
    let mut expected = RdpAccountant::default();
    for r in &rounds {
        expected.compose(0.5, 2.0, 1);
        let p = r.privacy.unwrap();
        assert_eq!(p.sampling_rate, 0.5);
        assert!((p.epsilon - expected.epsilon(1e-5)).abs() < 1e-12);
    }
    assert!(
        sim.engine.is_finished(),
        "a third round would pass the budget"
    );
    assert!(matches!(sim.log.last(), Some(Action::Finished)));
    assert_eq!(sim.engine.epsilon(), Some(two));

    // The checkpoint carries what was spent: a resumed run is over too.
    let resumed = Engine::resume(c, sim.engine.checkpoint()).unwrap();
    assert!(resumed.is_finished());
    assert_eq!(resumed.epsilon(), Some(two));
}

/// With the head's own scopes as targets, no scope is released: the noise covers the step
/// alone, and the targets are the released head's scopes.
#[test]
fn global_head_targets_release_no_scopes_and_cost_no_scope_noise() {
    let mut c = private_config(1.0, 0.2, None);
    c.targets.fusion = TargetFusion::GlobalHead;
    let clients = [("a", 1u64), ("b", 1)];
    let mut sim = Sim::start(c, &clients);
    for (i, &(client, n)) in clients.iter().enumerate() {
        let u = perturbed(&sim.task(client), client, n, i as u64);
        assert_eq!(sim.verdict(client, u), Outcome::Accepted);
    }
    let p = reports(&sim.log).pop().unwrap().privacy.unwrap();
    assert_eq!(p.noise_std, 0.2, "z · C with no scope share");
    let head = Head::from_flat(&spec(), sim.engine.global_params()).unwrap();
    let scopes = head
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    for (t, s) in sim.engine.targets().iter().zip(&scopes) {
        assert!((t.mean - s.mean).abs() < 1e-12 && (t.std - s.std).abs() < 1e-12);
    }
}

#[test]
fn privacy_refuses_robust_rules_and_claimed_weights() {
    let mut c = private_config(1.0, 1.0, None);
    c.aggregation = Aggregation::Median;
    let e = Engine::new(c).unwrap_err().to_string();
    assert!(e.contains("aggregation = mean"), "{e}");
    let mut c = private_config(1.0, 1.0, None);
    c.weighting = Weighting::SampleCount;
    let e = Engine::new(c).unwrap_err().to_string();
    assert!(e.contains("uniform"), "{e}");
    let mut c = private_config(1.0, 1.0, None);
    c.targets.fusion = TargetFusion::Median;
    let e = Engine::new(c).unwrap_err().to_string();
    assert!(e.contains("global-head"), "{e}");
    let mut c = private_config(-1.0, 1.0, None);
    c.rounds = 1;
    let e = Engine::new(c).unwrap_err().to_string();
    assert!(e.contains("noise_multiplier"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Downlink encoding

/// An int8 downlink: the task carries a byte a value, the round's global head becomes
/// exactly what clients decode, and a client that sends its starting point back unchanged has
/// a zero step, so the next head is that point bit for bit.
#[test]
fn a_lossy_downlink_leaves_the_global_head_exact() {
    let mut c = config(Strategy::FedAvg);
    c.downlink_encoding = Encoding::Int8RowScaled;
    let clients = [("a", 10u64), ("b", 10)];
    let mut sim = Sim::start(c, &clients);
    let exact = sim.engine.global_params().to_vec();
    let task = sim.task("a");
    assert_eq!(task.global.encoding, Encoding::Int8RowScaled);
    assert_eq!(task.base, None);
    // One byte a value (plus a scale a row), where f32 takes four.
    assert_eq!(task.global.data.len(), task.global.count as usize);
    let start = global_of(&task);
    assert_ne!(bits(&start), bits(&exact), "int8 rounds the head");
    for (client, n) in clients {
        let u = update_with(&sim.task(client), client, n, &start);
        assert_eq!(sim.verdict(client, u), Outcome::Accepted);
    }
    // Each step is measured from the start the client decoded, and applied to the exact head:
    // clients that send their start back leave the head as it was, bit for bit.
    let report = reports(&sim.log).pop().unwrap();
    assert_eq!(report.step_norms, Some((0.0, 0.0)));
    assert_eq!(bits(sim.engine.global_params()), bits(&exact));
}

/// A client of a lossy downlink, as edge clients do it: the heads its last two tasks gave it,
/// and the start of the next task from one of them ([`EncodedParams::add_to`]).
#[derive(Default, Clone)]
struct LossyClient {
    held: Vec<(protocol::HeadRef, Vec<f32>)>,
}

impl LossyClient {
    fn newest(&self) -> Option<protocol::HeadRef> {
        self.held.last().map(|h| h.0)
    }

    fn start_of(&mut self, task: &RoundTask) -> Vec<f32> {
        let layout = RowLayout::of_head(&task.shape.to_spec().unwrap());
        let start = match task.base {
            None => task.global.decode(&layout).unwrap(),
            Some(base) => {
                let (_, head) = self
                    .held
                    .iter()
                    .find(|(r, _)| r.digest == base.digest)
                    .expect("the delta starts from a held head");
                task.global.add_to(head, &layout).unwrap()
            }
        };
        let digest = protocol::head_digest(&start);
        self.held.retain(|(r, _)| r.digest != digest);
        self.held.push((
            protocol::HeadRef {
                round: task.round,
                digest,
            },
            start.clone(),
        ));
        if self.held.len() > 2 {
            self.held.remove(0);
        }
        start
    }
}

/// `start` moved by noise from `seed`: a client's training.
fn moved(start: &[f32], seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    start
        .iter()
        .map(|&w| w + rng.random_range(-0.05f32..0.05))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_client_that_holds_its_last_start_gets_the_change_from_it() {
    let mut c = config(Strategy::FedAvg);
    c.downlink_encoding = Encoding::Int8RowScaled;
    let names = ["a", "b", "c"];
    let clients: Vec<(&str, u64)> = names.iter().map(|&n| (n, 10)).collect();
    let mut sim = Sim::start(c, &clients);
    let mut held: BTreeMap<&str, LossyClient> = BTreeMap::new();
    for round in 0..3u64 {
        let exact = sim.engine.global_params().to_vec();
        let layout = RowLayout::of_head(&spec());
        let keyframe = EncodedParams::encode(&exact, &layout, Encoding::Int8RowScaled)
            .unwrap()
            .decode(&layout)
            .unwrap();
        for (i, &name) in names.iter().enumerate() {
            let task = sim.task(name);
            assert_eq!(task.round, round);
            // Every client holds the start of its last task: from round 1 on, all get the
            // change from it, in the same int8 bytes as the head.
            assert_eq!(task.base.is_some(), round > 0);
            assert_eq!(task.global.data.len(), task.global.count as usize);
            let start = held.entry(name).or_default().start_of(&task);
            if round > 0 {
                // The change's rounding is far below the head's.
                assert!(
                    max_abs_diff(&start, &exact) < 0.2 * max_abs_diff(&keyframe, &exact),
                    "round {round}: delta start off by {}, keyframe by {}",
                    max_abs_diff(&start, &exact),
                    max_abs_diff(&keyframe, &exact)
                );
            }
            // Clients "a" and "b" send their start back; "c" moves.
            let params = if i < 2 {
                start.clone()
            } else {
                moved(&start, round * 10 + i as u64)
            };
            let u = update_with(&task, name, 10, &params);
            assert_eq!(sim.verdict(name, u), Outcome::Accepted);
        }
        // The engine measured the steps from exactly the starts the clients decoded: the
        // median step is 0.
        let report = reports(&sim.log).pop().unwrap();
        assert_eq!(report.round, round);
        assert_eq!(report.step_norms.unwrap().0, 0.0);
        assert_eq!(report.delta_tasks, if round > 0 { 3 } else { 0 });
    }
}

#[test]
fn a_client_whose_head_is_unknown_gets_the_keyframe() {
    let mut c = config(Strategy::FedAvg);
    c.downlink_encoding = Encoding::Int8RowScaled;
    c.min_connected = 2;
    let mut sim = Sim::new(c);
    sim.connect("a", 10);
    sim.event(Event::Connected {
        client: "b".into(),
        n_samples: 10,
        capabilities: all_caps(),
        held: Some(protocol::HeadRef {
            round: 0,
            digest: [7; 32],
        }),
    });
    assert_eq!(sim.task("b").base, None);
    assert_eq!(sim.task("b").global, sim.task("a").global);
}

#[test]
fn a_delta_task_is_resent_while_the_client_can_decode_it() {
    let mut c = config(Strategy::FedAvg);
    c.downlink_encoding = Encoding::Int8RowScaled;
    let clients = [("a", 10u64), ("b", 10)];
    let mut sim = Sim::start(c, &clients);
    let mut a = LossyClient::default();
    let mut b = LossyClient::default();
    for (name, client) in [("a", &mut a), ("b", &mut b)] {
        let task = sim.task(name);
        let start = client.start_of(&task);
        let u = update_with(&task, name, 10, &moved(&start, 1));
        assert_eq!(sim.verdict(name, u), Outcome::Accepted);
    }
    let first = sim.task("a");
    assert!(first.base.is_some());
    let base_held = a.clone();
    let start = a.start_of(&first);
    // Lost mid-round after decoding the task: it still holds the task's base, so the same
    // task comes back.
    sim.event(Event::Disconnected { client: "a".into() });
    sim.event(Event::Connected {
        client: "a".into(),
        n_samples: 10,
        capabilities: all_caps(),
        held: a.newest(),
    });
    let again = sim.task("a");
    assert_eq!(again.base, first.base);
    assert_eq!(again.global, first.global);
    let mut a = base_held;
    assert_eq!(bits(&a.start_of(&again)), bits(&start));
    // Restarted with nothing: the keyframe, and its step is measured from it.
    sim.event(Event::Disconnected { client: "a".into() });
    sim.connect("a", 10);
    let fresh = sim.task("a");
    assert_eq!(fresh.base, None);
    let start = LossyClient::default().start_of(&fresh);
    let u = update_with(&fresh, "a", 10, &start);
    assert_eq!(sim.verdict("a", u), Outcome::Accepted);
    let task = sim.task("b");
    let u = update_with(&task, "b", 10, &b.start_of(&task));
    assert_eq!(sim.verdict("b", u), Outcome::Accepted);
    assert_eq!(
        reports(&sim.log).pop().unwrap().step_norms,
        Some((0.0, 0.0))
    );
}

#[test]
fn a_retried_attempt_keeps_each_clients_start() {
    let mut c = config(Strategy::FedAvg);
    c.downlink_encoding = Encoding::Int8RowScaled;
    c.quorum = 2;
    let clients = [("a", 10u64), ("b", 10)];
    let mut sim = Sim::start(c, &clients);
    let mut held: BTreeMap<&str, LossyClient> = BTreeMap::new();
    for (name, n) in clients {
        let task = sim.task(name);
        let start = held.entry(name).or_default().start_of(&task);
        let u = update_with(&task, name, n, &moved(&start, n));
        assert_eq!(sim.verdict(name, u), Outcome::Accepted);
    }
    // Round 1, attempt 0: deltas. Only "b" trains; the attempt fails at its deadline.
    let first = sim.task("b");
    assert!(first.base.is_some());
    let start_b = held.get_mut("b").unwrap().start_of(&first);
    let _ = held.get_mut("a").unwrap().start_of(&sim.task("a"));
    let deadline = sim.engine.next_deadline().unwrap().0;
    sim.tick_at(deadline);
    assert_eq!(reports(&sim.log).pop().unwrap().closed_by, ClosedBy::Failed);
    // Attempt 1 gives every client the start it holds, so "b"'s update, trained from the
    // failed attempt's task and arriving now, is measured from where it started.
    let again = sim.task("b");
    assert_eq!(
        (again.global.clone(), again.base),
        (first.global.clone(), first.base)
    );
    let late = update_with(&first, "b", 10, &start_b);
    assert_eq!(sim.verdict("b", late), Outcome::Accepted);
    let task = sim.task("a");
    let start_a = held.get_mut("a").unwrap().start_of(&task);
    assert_eq!(
        sim.verdict("a", update_with(&task, "a", 10, &start_a)),
        Outcome::Accepted
    );
    let report = reports(&sim.log).pop().unwrap();
    assert_eq!((report.round, report.attempt), (1, 1));
    assert_eq!(report.step_norms, Some((0.0, 0.0)));
}

#[test]
fn a_client_reporting_another_head_on_return_gets_the_keyframe() {
    let mut c = config(Strategy::FedAvg);
    c.downlink_encoding = Encoding::Int8RowScaled;
    let clients = [("a", 10u64), ("b", 10)];
    let mut sim = Sim::start(c, &clients);
    let keyframe0 = LossyClient::default().start_of(&sim.task("a"));
    let mut held: BTreeMap<&str, LossyClient> = BTreeMap::new();
    for round in 0..2 {
        for (name, n) in clients {
            let task = sim.task(name);
            let start = held.entry(name).or_default().start_of(&task);
            let u = update_with(&task, name, n, &moved(&start, round * 10 + n));
            assert_eq!(sim.verdict(name, u), Outcome::Accepted);
        }
    }
    // Round 2 is a change from round 1's start. Back mid-round naming round 0's head, which
    // the aggregator still keeps but is neither the task's base nor its head: no new start is
    // built for it.
    assert!(sim.task("a").base.is_some_and(|b| b.round == 1));
    sim.event(Event::Disconnected { client: "a".into() });
    sim.event(Event::Connected {
        client: "a".into(),
        n_samples: 10,
        capabilities: all_caps(),
        held: Some(protocol::HeadRef {
            round: 0,
            digest: protocol::head_digest(&keyframe0),
        }),
    });
    assert_eq!(sim.task("a").base, None);
}

#[test]
fn without_deltas_every_task_carries_the_head() {
    let mut c = config(Strategy::FedAvg);
    c.downlink_encoding = Encoding::Int8RowScaled;
    c.downlink_deltas = false;
    let clients = [("a", 10u64), ("b", 10)];
    let mut sim = Sim::start(c, &clients);
    for round in 0..2 {
        for (name, n) in clients {
            let task = sim.task(name);
            assert_eq!((task.round, task.base), (round, None));
            let u = perturbed(&task, name, n, round);
            assert_eq!(sim.verdict(name, u), Outcome::Accepted);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling from the registry

/// Runs two rounds where the sampled clients answer with perturbed heads (client `i` of
/// `clients` claims `claims[i]`), once with every client connected and sampled from the
/// connected, once sampled from the registry with each sampled client connecting only for its
/// round and leaving after its verdict. Returns, per mode, each round's weights and the next
/// global head's bits.
#[test]
fn sampling_from_the_registry_gives_the_connected_run_round_for_round() {
    let ids: Vec<String> = (0..12).map(|i| format!("c{i:02}")).collect();
    // Two claims far above the median, so the claim cap binds and must be the same in both.
    let claim = |id: &str| {
        if id == "c03" || id == "c07" {
            5_000
        } else {
            100 + id.len() as u64
        }
    };
    let mut c = config(Strategy::FedAvg);
    c.rounds = 3;
    c.sampling.fraction = 0.5;
    c.quorum = 6;
    c.bounds.max_n_samples = 10_000;
    // No share cap: the claim cap alone bounds the heavy claims.
    c.max_share = 1.0;
    let answer = |sim: &mut Sim, client: &str, round: u64| {
        let task = sim.task(client);
        assert_eq!(task.round, round);
        let u = perturbed(
            &task,
            client,
            claim(client),
            1000 * round + client.len() as u64,
        );
        assert_eq!(sim.verdict(client, u), Outcome::Accepted);
    };

    let pairs: Vec<(&str, u64)> = ids.iter().map(|i| (i.as_str(), claim(i))).collect();
    let mut connected = Sim::start(c.clone(), &pairs);
    for round in 0..3 {
        let asked: Vec<String> = sent_to(&connected.log)
            .into_iter()
            .filter(|&(_, r)| r == round)
            .map(|(c, _)| c)
            .collect();
        assert_eq!(asked.len(), 6);
        for client in &asked {
            answer(&mut connected, client, round);
        }
    }

    c.sampling.population = aggregator_core::engine::Population::Registered;
    let mut registered = Sim::new(c.clone());
    // No registry yet: nothing opens, whoever connects.
    assert!(registered.event(Event::Tick).is_empty());
    // Handed in any order, sorted by the engine.
    registered.engine.set_population(ids.iter().rev().cloned());
    assert!(sent_to(&registered.event(Event::Tick)).is_empty());
    let mut sorted = ids.clone();
    sorted.sort();
    for round in 0..3 {
        let status = registered
            .engine
            .open_round()
            .expect("opens with no client connected");
        assert_eq!((status.round, status.attempt), (round, 0));
        let sample: Vec<String> = aggregator_core::engine::round_sample(c.seed, round, 0, 12, 6)
            .into_iter()
            .map(|i| sorted[i].clone())
            .collect();
        // A client outside the sample connects and is asked nothing.
        let outsider = ids.iter().find(|i| !sample.contains(i)).unwrap();
        assert!(sent_to(&registered.connect(outsider, 1)).is_empty());
        registered.event(Event::Disconnected {
            client: outsider.clone(),
        });
        for client in &sample {
            assert_eq!(
                sent_to(&registered.connect(client, claim(client))),
                [(client.clone(), round)]
            );
            answer(&mut registered, client, round);
            registered.event(Event::Disconnected {
                client: client.clone(),
            });
        }
    }

    let (a, b) = (reports(&connected.log), reports(&registered.log));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.accepted, y.accepted);
        assert_eq!(x.weights, y.weights, "round {}", x.round);
        assert_eq!(x.closed_by, y.closed_by);
    }
    // The cap bound: the heavy claims were cut to twice the median claim.
    let heavy: Vec<f64> = b
        .iter()
        .flat_map(|r| r.weights.iter())
        .filter(|(c, _)| claim(c) == 5_000)
        .map(|(_, &w)| w)
        .collect();
    assert!(
        !heavy.is_empty() && heavy.iter().all(|&w| w == 206.0),
        "{heavy:?}"
    );
    assert_eq!(
        bits(connected.engine.global_params()),
        bits(registered.engine.global_params())
    );
}

#[test]
fn a_client_sampled_from_the_registry_gets_the_encoding_it_can_take() {
    let mut c = config(Strategy::FedAvg);
    c.update_encoding = Encoding::Int8RowScaled;
    c.sampling.population = aggregator_core::engine::Population::Registered;
    let mut sim = Sim::new(c);
    sim.engine.set_population(["a".to_owned()]);
    sim.event(Event::Tick);
    let actions = sim.event(Event::Connected {
        client: "a".into(),
        n_samples: 10,
        capabilities: Capabilities {
            f16: false,
            int8: false,
        },
        held: None,
    });
    assert_eq!(sent_to(&actions), [("a".to_owned(), 0)]);
    assert_eq!(sim.task("a").encoding, Encoding::F32);
}

#[test]
fn a_client_sampled_from_the_registry_that_leaves_is_still_awaited() {
    let mut c = config(Strategy::FedAvg);
    c.sampling.population = aggregator_core::engine::Population::Registered;
    c.quorum = 2;
    let mut sim = Sim::new(c);
    sim.engine.set_population(["a".to_owned(), "b".to_owned()]);
    sim.event(Event::Tick);
    sim.connect("a", 10);
    let task = sim.task("a");
    assert_eq!(
        sim.verdict("a", perturbed(&task, "a", 10, 1)),
        Outcome::Accepted
    );
    // b checks in and leaves before answering: with a answered, a connected-population
    // round would close below quorum here; this one waits for b to come back.
    sim.connect("b", 10);
    sim.event(Event::Disconnected { client: "b".into() });
    assert!(reports(&sim.log).is_empty());
    assert_eq!(sent_to(&sim.connect("b", 10)), [("b".to_owned(), 0)]);
    let task = sim.task("b");
    assert_eq!(
        sim.verdict("b", perturbed(&task, "b", 10, 2)),
        Outcome::Accepted
    );
    let report = reports(&sim.log).remove(0);
    assert_eq!(report.accepted.len(), 2);
    assert_eq!(report.closed_by, ClosedBy::Target);
}

#[test]
fn a_private_round_sampled_from_the_registry_is_charged_at_the_registrys_rate() {
    // Two of eight registered clients a round, none connected when it opens: q = 1/4, not
    // the 2 sampled over the 0 connected.
    let mut c = private_config(1.0, 1.0, None);
    c.sampling.population = aggregator_core::engine::Population::Registered;
    c.sampling.fraction = 0.25;
    c.quorum = 2;
    let mut sim = Sim::new(c.clone());
    let ids: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    sim.engine.set_population(ids.clone());
    sim.event(Event::Tick);
    let sample: Vec<String> = aggregator_core::engine::round_sample(c.seed, 0, 0, 8, 2)
        .into_iter()
        .map(|i| ids[i].clone())
        .collect();
    for client in &sample {
        sim.connect(client, 1);
        let u = perturbed(&sim.task(client), client, 1, 3);
        assert_eq!(sim.verdict(client, u), Outcome::Accepted);
    }
    let report = reports(&sim.log).remove(0);
    let p = report.privacy.unwrap();
    assert_eq!(p.sampling_rate, 0.25);
    let mut expected = RdpAccountant::default();
    expected.compose(0.25, 1.0, 1);
    assert!((p.epsilon - expected.epsilon(1e-5)).abs() < 1e-12);
}

#[test]
fn a_registry_sample_too_large_to_hold_until_the_close_is_refused() {
    let mut c = config(Strategy::FedAvg);
    c.sampling.population = aggregator_core::engine::Population::Registered;
    let engine = Engine::new(c.clone()).unwrap();
    // Every one of 10⁸ registered clients a round, each update held till the close.
    assert!(matches!(
        engine.check_round_capacity(100_000_000),
        Err(EngineError::InvalidConfig(_))
    ));
    c.sampling.fraction = 1e-6;
    assert!(
        Engine::new(c)
            .unwrap()
            .check_round_capacity(100_000_000)
            .is_ok()
    );
}
