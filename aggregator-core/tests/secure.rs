//! Secure rounds in the engine, driven by a fake clock and clients that run the real SecAgg+
//! client ([`secagg::ClientRound`]) on heads they perturb: the new global head and targets
//! against the plain mean and scope fusion of the same heads (within the ring code's bound),
//! dropouts, refusals, and the configurations a secure run cannot have.

use std::collections::BTreeMap;

use aggregator_core::engine::{
    Action, ClosedBy, Engine, EngineConfig, Event, Millis, RoundReport, SecureAggregation,
};
use aggregator_core::privacy::{Clip, Privacy, RdpAccountant};
use aggregator_core::strategy::{Aggregation, Strategy, TargetFusion};
use protocol::secure::secure_input;
use protocol::{
    EncodedParams, Outcome, RejectReason, RoundTask, RowLayout, SecAgg, SecAggSetup, WireScope,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use secagg::ClientRound;
use secagg::ring::FixedPoint;
use wsa::{
    DEFAULT_SCOPE_EPS, FusionRule, Head, HeadSpec, Scope, ScopeFusion, ScopeSelection, Weighting,
};

fn spec() -> HeadSpec {
    HeadSpec::mlp(8, &[6], 3)
}

fn config() -> EngineConfig {
    let mut c = EngineConfig::new(
        7,
        spec(),
        Strategy::Wsa {
            lambda: 1.0,
            rule: FusionRule::Mixture,
            mu: 0.0,
            warmup: 0,
            tensors: Default::default(),
        },
    );
    c.seed = 3;
    c.rounds = 2;
    c.quorum = 3;
    c.round_timeout_ms = 5_000;
    c.weighting = Weighting::Uniform;
    c.targets.fusion = TargetFusion::FollowRule;
    c.secure = Some(SecureAggregation::default());
    c
}

/// A client of the test: its secure round and the head it trained.
struct Client {
    round: Option<ClientRound>,
    setup: Option<SecAggSetup>,
    task: Option<RoundTask>,
    trained: Vec<f32>,
    scopes: Vec<Scope>,
}

struct Sim {
    engine: Engine,
    now: u64,
    clients: BTreeMap<String, Client>,
    log: Vec<Action>,
}

impl Sim {
    fn new(config: EngineConfig, n: usize) -> Self {
        let mut config = config;
        config.min_connected = n;
        let mut sim = Self {
            engine: Engine::new(config).unwrap(),
            now: 0,
            clients: BTreeMap::new(),
            log: Vec::new(),
        };
        for i in 0..n {
            let id = format!("c{i}");
            sim.clients.insert(
                id.clone(),
                Client {
                    round: None,
                    setup: None,
                    task: None,
                    trained: Vec::new(),
                    scopes: Vec::new(),
                },
            );
            let actions = sim.event(Event::Connected {
                client: id,
                n_samples: 100,
                capabilities: Default::default(),
                held: None,
            });
            sim.deliver(actions);
        }
        sim
    }

    fn event(&mut self, event: Event) -> Vec<Action> {
        let actions = self.engine.handle(Millis(self.now), event);
        self.log.extend(actions.iter().cloned());
        actions
    }

    /// Hands each secure action to its client and feeds back what the client answers, until
    /// nothing more is sent.
    fn deliver(&mut self, actions: Vec<Action>) {
        self.deliver_holding(actions, |_| false);
    }

    /// [`Sim::deliver`], but the actions `hold` picks are returned instead of delivered.
    fn deliver_holding(&mut self, actions: Vec<Action>, hold: fn(&Action) -> bool) -> Vec<Action> {
        let mut held = Vec::new();
        let mut queue = actions;
        while !queue.is_empty() {
            let mut next = Vec::new();
            for action in queue {
                if hold(&action) {
                    held.push(action);
                    continue;
                }
                let answer = match action {
                    Action::SendSecureTask {
                        client,
                        setup,
                        task,
                    } => self.on_task(&client, &setup, &task),
                    Action::SendSecAgg {
                        client,
                        round,
                        step,
                    } => self.on_step(&client, round, *step),
                    _ => None,
                };
                if let Some((client, round, step)) = answer {
                    next.extend(self.event(Event::SecAgg {
                        client,
                        round,
                        step,
                        wire_bytes: 100,
                    }));
                }
            }
            queue = next;
        }
        held
    }

    fn on_task(
        &mut self,
        client: &str,
        setup: &SecAggSetup,
        task: &RoundTask,
    ) -> Option<(String, u64, SecAgg)> {
        let c = self.clients.get_mut(client)?;
        let (round, advertise) = ClientRound::join(setup).unwrap();
        // "Training": the global head moved by a client-specific step.
        let global = task.global.decode(&RowLayout::of_head(&spec())).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(
            client.len() as u64 * 31 + task.round * 7 + { client[1..].parse::<u64>().unwrap() },
        );
        c.trained = global
            .iter()
            .map(|&g| g + rng.random_range(-0.1f32..0.1))
            .collect();
        c.scopes = Head::from_flat(&spec(), &c.trained)
            .unwrap()
            .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
            .unwrap();
        c.round = Some(round);
        c.setup = Some(setup.clone());
        c.task = Some(task.clone());
        Some((client.into(), task.round, SecAgg::Advertise(advertise)))
    }

    fn on_step(&mut self, client: &str, round: u64, step: SecAgg) -> Option<(String, u64, SecAgg)> {
        let c = self.clients.get_mut(client)?;
        let secure = c.round.as_mut()?;
        let answer = match step {
            SecAgg::Roster(r) => SecAgg::Shares(secure.share(&r).ok()?),
            SecAgg::Inbox(inbox) => {
                let setup = c.setup.as_ref()?;
                let task = c.task.as_ref()?;
                let global = task.global.decode(&RowLayout::of_head(&spec())).unwrap();
                let wire: Vec<WireScope> = c.scopes.iter().copied().map(WireScope::from).collect();
                let code = FixedPoint::for_sum(setup.clip, setup.participants).unwrap();
                let mut values = secure_input(&c.trained, &global, &wire);
                if let Some(noise) = &setup.local_noise {
                    let (step, stats) = values.split_at_mut(c.trained.len());
                    secagg::noise::privatize(step, noise).unwrap();
                    stats.fill(0.0);
                }
                let mut input = Vec::new();
                code.encode(values, &mut input);
                SecAgg::Masked(secure.mask(&inbox, &input).ok()?)
            }
            SecAgg::Unmask(u) => SecAgg::Reveal(secure.reveal(&u).ok()?),
            _ => return None,
        };
        Some((client.into(), round, answer))
    }

    fn reports(&self) -> Vec<RoundReport> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::RoundClosed(r) => Some((**r).clone()),
                _ => None,
            })
            .collect()
    }
}

/// The plain mean of the survivors' heads and the scope fusion of their scopes.
fn plain(sim: &Sim, survivors: &[String], rule: FusionRule) -> (Vec<f32>, Vec<Scope>) {
    let n = survivors.len() as f64;
    let len = sim.clients[&survivors[0]].trained.len();
    let mean: Vec<f32> = (0..len)
        .map(|j| {
            let s: f64 = survivors
                .iter()
                .map(|c| f64::from(sim.clients[c].trained[j]))
                .sum();
            (s / n) as f32
        })
        .collect();
    let mut fusion = ScopeFusion::new(sim.clients[&survivors[0]].scopes.len());
    for c in survivors {
        fusion.add(&sim.clients[c].scopes, 1.0).unwrap();
    }
    (mean, fusion.finish(rule).unwrap())
}

#[test]
fn a_secure_round_gives_the_plain_mean_and_fused_scopes_within_the_code_bound() {
    let sim = Sim::new(config(), 6);
    let reports = sim.reports();
    assert_eq!(reports.len(), 2, "both rounds: {reports:?}");
    assert!(sim.engine.is_finished());
    // The clients hold the heads of the last round.
    let report = &reports[1];
    assert_eq!(report.closed_by, ClosedBy::AllAnswered);
    assert_eq!(report.accepted_count, 6);
    let secure = report.secure.as_ref().unwrap();
    assert_eq!((secure.participants, secure.masked), (6, 6));
    assert_eq!(secure.failure, None);
    let survivors = report.accepted.clone();
    let (mean, fused) = plain(&sim, &survivors, FusionRule::Mixture);
    // The ring code moves each mean by at most clip / 2³¹ · participants / 2 (rounding), f32
    // rounding aside.
    let code = FixedPoint::for_sum(1.0, 6).unwrap();
    let bound = code.max_rounding_error() + 1e-6;
    let global = sim.engine.global_params();
    for (g, m) in global.iter().zip(&mean) {
        assert!((f64::from(*g) - f64::from(*m)).abs() <= bound, "{g} vs {m}");
    }
    for (t, f) in sim.engine.targets().iter().zip(&fused) {
        assert!(
            (t.mean - f.mean).abs() < 1e-5 && (t.std - f.std).abs() < 1e-5,
            "{t:?} vs {f:?}"
        );
    }
    // Every client heard that its input counted.
    let accepted = sim
        .log
        .iter()
        .filter(|a| matches!(a, Action::SendVerdict { verdict, .. } if verdict.outcome == Outcome::Accepted))
        .count();
    assert_eq!(accepted, 12);
    // Nothing a client reported is in a secure report.
    assert_eq!(report.train_loss, None);
}

#[test]
fn a_client_that_leaves_after_sharing_is_not_in_the_sum_and_the_round_still_counts() {
    let mut config = config();
    config.rounds = 1;
    let n = 6;
    let mut sim = Sim {
        engine: Engine::new(EngineConfig {
            min_connected: n,
            ..config
        })
        .unwrap(),
        now: 0,
        clients: BTreeMap::new(),
        log: Vec::new(),
    };
    // Connect everyone, but hold the actions to cut one client off mid-round.
    let mut held = Vec::new();
    for i in 0..n {
        let id = format!("c{i}");
        sim.clients.insert(
            id.clone(),
            Client {
                round: None,
                setup: None,
                task: None,
                trained: Vec::new(),
                scopes: Vec::new(),
            },
        );
        held.extend(sim.event(Event::Connected {
            client: id,
            n_samples: 100,
            capabilities: Default::default(),
            held: None,
        }));
    }
    // Keys and shares from everyone: deliver until the inboxes go out, then c2 leaves.
    let inboxes = sim.deliver_holding(
        held,
        |a| matches!(a, Action::SendSecAgg { step, .. } if matches!(**step, SecAgg::Inbox(_))),
    );
    assert_eq!(inboxes.len(), n);
    sim.event(Event::Disconnected {
        client: "c2".into(),
    });
    sim.deliver(inboxes);
    let reports = sim.reports();
    let report = reports.last().unwrap();
    assert_eq!(report.closed_by, ClosedBy::AllAnswered, "{report:?}");
    let survivors: Vec<String> = ["c0", "c1", "c3", "c4", "c5"].map(String::from).to_vec();
    let mut accepted = report.accepted.clone();
    accepted.sort();
    assert_eq!(accepted, survivors);
    let (mean, _) = plain(&sim, &survivors, FusionRule::Mixture);
    let bound = FixedPoint::for_sum(1.0, 6).unwrap().max_rounding_error() + 1e-6;
    for (g, m) in sim.engine.global_params().iter().zip(&mean) {
        assert!((f64::from(*g) - f64::from(*m)).abs() <= bound);
    }
}

#[test]
fn a_plain_update_in_a_secure_round_is_refused() {
    let mut config = config();
    config.min_connected = 3;
    let mut engine = Engine::new(config).unwrap();
    let mut task = None;
    for c in ["a", "b", "c"] {
        for a in engine.handle(
            Millis(0),
            Event::Connected {
                client: c.into(),
                n_samples: 10,
                capabilities: Default::default(),
                held: None,
            },
        ) {
            if let Action::SendSecureTask { task: t, .. } = a {
                task = Some(t);
            }
        }
    }
    let task = task.expect("a secure round opened");
    let global = task.global.decode(&RowLayout::of_head(&spec())).unwrap();
    let update = protocol::Update {
        run_id: 7,
        round: 0,
        client_id: "a".into(),
        n_samples: 10,
        params: EncodedParams::encode(
            &global,
            &RowLayout::of_head(&spec()),
            protocol::Encoding::F32,
        )
        .unwrap(),
        scopes: Vec::new(),
        metrics: Default::default(),
        digest: [0; 32],
    }
    .seal();
    let actions = engine.handle(
        Millis(1),
        Event::Update {
            client: "a".into(),
            task_round: 0,
            update: Box::new(update.into()),
            wire_bytes: 10,
        },
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::SendVerdict { verdict, .. }
            if matches!(verdict.outcome, Outcome::Rejected(RejectReason::UnexpectedMessage(_)))
    )));
}

#[test]
fn a_round_whose_clients_go_silent_fails_at_the_step_deadline() {
    let mut config = config();
    config.min_connected = 4;
    let mut engine = Engine::new(config).unwrap();
    for c in ["a", "b", "c", "d"] {
        engine.handle(
            Millis(0),
            Event::Connected {
                client: c.into(),
                n_samples: 10,
                capabilities: Default::default(),
                held: None,
            },
        );
    }
    let deadline = engine.next_deadline().unwrap();
    assert_eq!(deadline, Millis(10_000), "the key step's timeout");
    let actions = engine.handle(deadline, Event::Tick);
    let report = actions
        .iter()
        .find_map(|a| match a {
            Action::RoundClosed(r) => Some(r),
            _ => None,
        })
        .expect("the round closed");
    assert_eq!(report.closed_by, ClosedBy::Failed);
    assert!(
        report
            .secure
            .as_ref()
            .and_then(|s| s.failure.clone())
            .is_some_and(|f| f.contains("clients left")),
        "{:?}",
        report.secure
    );
}

/// A change to a configuration.
type Change = Box<dyn Fn(&mut EngineConfig)>;

#[test]
fn what_a_secure_run_cannot_have_is_refused_with_the_reason() {
    let cases: Vec<(&str, Change)> = vec![
        (
            "aggregation = mean",
            Box::new(|c| c.aggregation = Aggregation::Median),
        ),
        (
            "targets.fusion",
            Box::new(|c| c.targets.fusion = TargetFusion::Median),
        ),
        (
            "uniform",
            Box::new(|c| c.weighting = Weighting::SampleCount),
        ),
        ("quorum >= 3", Box::new(|c| c.quorum = 2)),
        (
            "secure.dropout",
            Box::new(|c| {
                c.secure = Some(SecureAggregation {
                    dropout: 0.5,
                    ..Default::default()
                })
            }),
        ),
    ];
    for (needle, change) in cases {
        let mut c = config();
        change(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(config().validate().is_ok());
}

/// Secure aggregation under DP, with the noise added by the clients in shares.
fn private(z: f64, clip: f64) -> EngineConfig {
    let mut c = config();
    c.rounds = 1;
    c.targets.fusion = TargetFusion::GlobalHead;
    c.privacy = Some(Privacy {
        noise_multiplier: z,
        clip: Clip::Fixed { norm: clip },
        delta: 1e-3,
        scope_share: 0.1,
        epsilon_budget: None,
    });
    c
}

/// The release a noiseless DP round gives: the global head plus the clipped steps' sum over
/// the round's fixed denominator (all six asked).
fn clipped_mean(sim: &Sim, global: &[f32], clip: f64) -> Vec<f64> {
    let mut sum = vec![0.0; global.len()];
    for c in sim.clients.values() {
        let step: Vec<f64> = c
            .trained
            .iter()
            .zip(global)
            .map(|(&w, &g)| f64::from(w) - f64::from(g))
            .collect();
        let norm = step.iter().map(|v| v * v).sum::<f64>().sqrt();
        let scale = (clip / norm).min(1.0);
        for (s, v) in sum.iter_mut().zip(&step) {
            *s += v * scale;
        }
    }
    global
        .iter()
        .zip(&sum)
        .map(|(&g, s)| f64::from(g) + s / 6.0)
        .collect()
}

#[test]
fn under_dp_the_clients_clip_and_noise_and_the_release_is_the_clipped_mean_plus_their_noise() {
    let clip = 0.2;
    let initial = Engine::new(private(1.0, clip))
        .unwrap()
        .global_params()
        .to_vec();
    // Noise far below the code's resolution: the release is the clipped sum over m = 6.
    let sim = Sim::new(private(1e-9, clip), 6);
    let expected = clipped_mean(&sim, &initial, clip);
    for (g, e) in sim.engine.global_params().iter().zip(&expected) {
        assert!((f64::from(*g) - e).abs() < 1e-6, "{g} vs {e}");
    }
    let report = &sim.reports()[0];
    let privacy = report.privacy.expect("a private round reports ε");
    let mut accountant = RdpAccountant::default();
    accountant.compose(1.0, 1e-9, 1);
    assert_eq!(privacy.epsilon, accountant.epsilon(1e-3));
    assert_eq!(privacy.clip, clip);
    // With z = 1: each of the six adds std z·C/√4 (4 = the least survivors a released sum
    // has: t + 1 with k = 5), so the release carries z·C·√6/2/6 per coordinate.
    let sim = Sim::new(private(1.0, clip), 6);
    let expected = clipped_mean(&sim, &initial, clip);
    let diffs: Vec<f64> = sim
        .engine
        .global_params()
        .iter()
        .zip(&expected)
        .map(|(g, e)| f64::from(*g) - e)
        .collect();
    let spread = (diffs.iter().map(|d| d * d).sum::<f64>() / diffs.len() as f64).sqrt();
    let stated = clip * 6f64.sqrt() / 2.0 / 6.0;
    assert!(
        (spread / stated - 1.0).abs() < 0.3,
        "noise spread {spread} vs {stated}"
    );
}

#[test]
fn dp_under_secure_aggregation_needs_a_fixed_clip_and_no_client_scopes() {
    let mut c = private(1.0, 0.2);
    assert!(c.validate().is_ok());
    c.targets.fusion = TargetFusion::FollowRule;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("global-head")
    );
    let mut c = private(1.0, 0.2);
    c.privacy.as_mut().unwrap().clip = Clip::Adaptive {
        initial: 1.0,
        quantile: 0.5,
        learning_rate: 0.2,
        count_noise: 1.0,
    };
    assert!(c.validate().unwrap_err().to_string().contains("fixed clip"));
}
