//! The client's session state machine on a fake clock: joining, a round, the goodbyes,
//! refusals, the reconnect backoff and giving up, shutdowns, and a goodbye that arrives while
//! a round is in flight.

use std::time::Duration;

use edge_client::session::{
    Action, Backoff, ClientError, Event, Identity, RunEnd, Session, VERDICT_GRACE,
};
use edge_client::{ClientUpdate, TrainingTask};
use protocol::{
    EncodedParams, Encoding, Goodbye, GoodbyeReason, HeadShape, HeldOutEval, Message, Outcome,
    RejectReason, RoundTask, RowLayout, Subject, TrainSpec, Verdict, Welcome, WireScope,
};
use support::Millis;
use wsa::{DEFAULT_SCOPE_EPS, Head, HeadSpec, Init, ScopeSelection, TrainConfig, TrainMetrics};

const RUN: u64 = 3;

fn spec() -> HeadSpec {
    HeadSpec::mlp(4, &[3], 2)
}

fn backoff(max_attempts: Option<u32>) -> Backoff {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(1000),
        max_attempts,
    }
}

fn session(max_attempts: Option<u32>) -> Session {
    Session::new(
        Identity {
            client_id: "client-0007".into(),
            token: b"secret".to_vec(),
            n_samples: 40,
            classes: vec!["cat".into(), "dog".into()],
        },
        backoff(max_attempts),
    )
}

fn task(round: u64, encoding: Encoding) -> RoundTask {
    let head = Head::<f32>::init(&spec(), Init::Standard, 1).unwrap();
    let targets = head
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    RoundTask {
        run_id: RUN,
        round,
        shape: HeadShape::from(&spec()),
        global: EncodedParams::encode(&head.to_flat(), &RowLayout::of_head(&spec()), Encoding::F32)
            .unwrap(),
        targets: targets.into_iter().map(WireScope::from).collect(),
        train: TrainSpec::from(&TrainConfig::default()),
        encoding,
        deadline_ms: 60_000,
        base: None,
    }
}

/// What training would return: the task's head moved a little.
fn trained(task: &TrainingTask) -> ClientUpdate {
    let params: Vec<f32> = task.global.to_flat().iter().map(|w| w + 0.01).collect();
    let scopes = Head::from_flat(&spec(), &params)
        .unwrap()
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    ClientUpdate {
        round: task.round,
        params,
        scopes,
        metrics: TrainMetrics {
            loss: 0.5,
            n_samples: 40,
            ..TrainMetrics::default()
        },
        held_out: Some(HELD_OUT),
    }
}

/// What the held-out rows said of each task's head.
const HELD_OUT: HeldOutEval = HeldOutEval {
    samples: 10,
    loss: 0.75,
    accuracy: 0.625,
};

fn verdict(round: u64, outcome: Outcome) -> Message {
    Message::Verdict(Verdict {
        run_id: RUN,
        subject: Subject::Update { round },
        outcome,
    })
}

fn goodbye(reason: GoodbyeReason) -> Message {
    Message::Goodbye(Goodbye { reason })
}

/// The run's classes are the client's in the other order.
fn welcome() -> Message {
    welcome_to(&["dog", "cat"])
}

fn welcome_to(classes: &[&str]) -> Message {
    Message::Welcome(Welcome {
        run_id: RUN,
        round: 0,
        classes: classes.iter().map(|c| c.to_string()).collect(),
        eval_fraction: 0.25,
        attempt: 0,
    })
}

/// A session driven at `now`, remembering the last actions.
struct Driver {
    session: Session,
    now: u64,
}

impl Driver {
    fn new(max_attempts: Option<u32>) -> (Self, Vec<Action>) {
        let mut session = session(max_attempts);
        let first = session.start(Millis(0));
        (Self { session, now: 0 }, first)
    }

    fn at(&mut self, now: u64, event: Event) -> Vec<Action> {
        self.now = now;
        self.session.handle(Millis(now), event)
    }

    fn on(&mut self, event: Event) -> Vec<Action> {
        self.at(self.now, event)
    }

    /// Connected and welcomed: the machine asks for a task.
    fn join(&mut self) {
        assert_eq!(self.on(Event::Connected), vec![]);
        assert_eq!(
            self.on(Event::Control(welcome())),
            vec![
                Action::UseClasses {
                    map: vec![1, 0],
                    classes: 2,
                    eval_fraction: 0.25,
                },
                Action::AcceptTask
            ]
        );
    }

    /// A task of `round` arrives; returns what the machine asks to train.
    fn take_task(&mut self, round: u64) -> TrainingTask {
        self.take(task(round, Encoding::F32))
    }

    /// `task` arrives; returns what the machine asks to train.
    fn take(&mut self, task: RoundTask) -> TrainingTask {
        match self.on(Event::Task(Message::RoundTask(task)))[..] {
            [Action::Train(ref t)] => (**t).clone(),
            ref other => panic!("expected a training request, got {other:?}"),
        }
    }

    /// Training finishes `train_ms` later; returns the update the machine sends.
    fn finish_training(&mut self, task: &TrainingTask, train_ms: u64) -> protocol::Update {
        let at = self.now + train_ms;
        match &self.at(at, Event::Trained(Ok(trained(task))))[..] {
            [Action::SendUpdate(m)] => match m.as_ref() {
                Message::Update(u) => u.clone(),
                other => panic!("expected an update, got {other:?}"),
            },
            other => panic!("expected an update to send, got {other:?}"),
        }
    }
}

fn finish_of(actions: &[Action]) -> Option<&Result<RunEnd, ClientError>> {
    actions.iter().find_map(|a| match a {
        Action::Finish(r) => Some(r),
        _ => None,
    })
}

#[test]
fn a_round_from_hello_to_the_run_finished_goodbye() {
    let (mut d, first) = Driver::new(None);
    match &first[..] {
        [Action::Connect(hello)] => match hello.as_ref() {
            Message::Hello(h) => {
                assert_eq!(h.client_id, "client-0007");
                assert_eq!(h.n_samples, 40);
                assert_eq!(h.protocol_version, protocol::PROTOCOL_VERSION);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    d.join();
    let t = d.take_task(0);
    assert_eq!(t.round, 0);
    let update = d.finish_training(&t, 250);
    assert!(update.digest_ok(), "the update is sealed");
    assert_eq!(
        update.metrics.held_out,
        Some(HELD_OUT),
        "federated evaluation goes up"
    );
    assert_eq!((update.run_id, update.round), (RUN, 0));
    assert_eq!(update.client_id, "client-0007");
    assert_eq!(
        update.metrics.train_ms, 250,
        "training time on the caller's clock"
    );
    assert_eq!(d.on(Event::UpdateSent(1234)), vec![]);
    assert_eq!(
        d.on(Event::Verdict(verdict(0, Outcome::Accepted))),
        vec![Action::AcceptTask]
    );
    // The next round's update is refused; the machine records why and goes on.
    let t = d.take_task(1);
    d.finish_training(&t, 10);
    let refused = Outcome::Rejected(RejectReason::NormTooLarge {
        norm: 9.0,
        bound: 1.0,
    });
    assert_eq!(
        d.on(Event::Verdict(verdict(1, refused))),
        vec![Action::AcceptTask]
    );
    let end = d.on(Event::Control(goodbye(GoodbyeReason::RunFinished)));
    assert_eq!(
        end,
        vec![
            Action::Close {
                code: 0,
                reason: b"done"
            },
            Action::Finish(Ok(RunEnd::RunFinished))
        ]
    );
    assert!(d.session.is_done());
    let report = d.session.report();
    assert_eq!(report.end, RunEnd::RunFinished);
    assert_eq!(report.connections, 1);
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(report.rounds[0].outcome, "accepted");
    assert_eq!(report.rounds[0].update_bytes, 1234);
    assert_eq!(report.rounds[0].train_ms, 250);
    assert!(
        report.rounds[1]
            .outcome
            .starts_with("rejected: update norm")
    );
    // Nothing happens after the end.
    assert_eq!(d.on(Event::Tick), vec![]);
}

#[test]
fn failures_back_off_exponentially_below_the_cap_then_reconnect() {
    let (mut d, _) = Driver::new(None);
    let mut now = 0;
    for attempt in 1..=8u32 {
        let actions = d.at(now, Event::ConnectFailed("refused by the network".into()));
        assert!(
            finish_of(&actions).is_none(),
            "transient failures never end the run"
        );
        let deadline = d.session.next_deadline().expect("a backoff deadline").0;
        let bound = (100u64 << (attempt - 1)).min(1000);
        assert!(
            deadline - now <= bound,
            "attempt {attempt}: waits {} ms, bound {bound}",
            deadline - now
        );
        // Not before the deadline.
        if deadline > now {
            assert_eq!(d.at(deadline - 1, Event::Tick), vec![]);
        }
        match &d.at(deadline, Event::Tick)[..] {
            [Action::Connect(_)] => {}
            other => panic!("attempt {attempt}: expected a reconnect, got {other:?}"),
        }
        now = deadline;
    }
    assert_eq!(d.session.report().connections, 0);
}

#[test]
fn giving_up_counts_failures_in_a_row_only() {
    fn fail(d: &mut Driver) -> Option<Result<RunEnd, ClientError>> {
        let actions = d.on(Event::ConnectFailed("unreachable".into()));
        if let Some(end) = finish_of(&actions) {
            return Some(end.clone());
        }
        let deadline = d.session.next_deadline().unwrap().0;
        d.at(deadline, Event::Tick);
        None
    }
    let (mut d, _) = Driver::new(Some(3));
    assert_eq!(fail(&mut d), None);
    assert_eq!(fail(&mut d), None);
    // A session that was welcomed resets the count.
    d.join();
    let lost = d.on(Event::ControlFailed("connection lost".into()));
    assert!(finish_of(&lost).is_none());
    let deadline = d.session.next_deadline().unwrap().0;
    d.at(deadline, Event::Tick);
    assert_eq!(fail(&mut d), None);
    match fail(&mut d) {
        Some(Err(ClientError::GaveUp { attempts, last })) => {
            assert_eq!(attempts, 3);
            assert_eq!(last, "unreachable");
        }
        other => panic!("expected to give up, got {other:?}"),
    }
    assert_eq!(d.session.report().connections, 1);
}

#[test]
fn a_refused_hello_ends_the_run_without_retrying() {
    let (mut d, _) = Driver::new(None);
    d.on(Event::Connected);
    let refusal = Message::Verdict(Verdict {
        run_id: RUN,
        subject: Subject::Hello,
        outcome: Outcome::Rejected(RejectReason::BadCredentials),
    });
    let actions = d.on(Event::Control(refusal));
    assert_eq!(
        finish_of(&actions),
        Some(&Err(ClientError::Refused(RejectReason::BadCredentials)))
    );
    assert_eq!(d.session.next_deadline(), None);
    assert_eq!(d.session.report().connections, 0);
}

#[test]
fn a_goodbye_for_a_restart_reconnects_and_counts_the_connection() {
    let (mut d, _) = Driver::new(Some(2));
    d.on(Event::ConnectFailed("not up yet".into()));
    let deadline = d.session.next_deadline().unwrap().0;
    d.at(deadline, Event::Tick);
    d.join();
    let actions = d.on(Event::Control(goodbye(GoodbyeReason::ShuttingDown)));
    assert_eq!(
        actions,
        vec![Action::Close {
            code: 0,
            reason: b"bye"
        }]
    );
    // A second failure in a row would end the run with max_attempts 2; this one came after a
    // welcome, so it is the first of a new series, and the machine waits to reconnect.
    assert!(d.session.next_deadline().is_some());
    assert_eq!(d.session.report().connections, 1);
}

#[test]
fn a_goodbye_mid_round_waits_for_the_verdict() {
    let (mut d, _) = Driver::new(None);
    d.join();
    let t = d.take_task(4);
    assert_eq!(
        d.at(1000, Event::Control(goodbye(GoodbyeReason::RunFinished))),
        vec![]
    );
    assert_eq!(
        d.session.next_deadline(),
        Some(Millis(1000 + VERDICT_GRACE.as_millis() as u64))
    );
    // The server finishes its control stream after the goodbye: not a failure.
    assert_eq!(d.on(Event::ControlFailed("stream finished".into())), vec![]);
    d.finish_training(&t, 300);
    let end = d.at(1500, Event::Verdict(verdict(4, Outcome::Accepted)));
    assert_eq!(finish_of(&end), Some(&Ok(RunEnd::RunFinished)));
    let report = d.session.report();
    assert_eq!(report.rounds.len(), 1, "the round's verdict was kept");
    assert_eq!(report.rounds[0].round, 4);
}

#[test]
fn a_goodbye_mid_round_gives_up_on_the_verdict_at_the_grace_deadline() {
    let (mut d, _) = Driver::new(None);
    d.join();
    d.take_task(2);
    d.at(1000, Event::Control(goodbye(GoodbyeReason::RunFinished)));
    let grace = VERDICT_GRACE.as_millis() as u64;
    assert_eq!(d.at(1000 + grace - 1, Event::Tick), vec![]);
    let end = d.at(1000 + grace, Event::Tick);
    assert_eq!(finish_of(&end), Some(&Ok(RunEnd::RunFinished)));
    assert!(d.session.report().rounds.is_empty());
}

#[test]
fn a_shutdown_mid_round_says_goodbye_and_ends() {
    let (mut d, _) = Driver::new(None);
    d.join();
    d.take_task(0);
    let actions = d.on(Event::Shutdown);
    assert_eq!(
        actions,
        vec![
            Action::SendGoodbye(GoodbyeReason::ShuttingDown),
            Action::Close {
                code: 0,
                reason: b"shutdown"
            },
            Action::Finish(Ok(RunEnd::Shutdown)),
        ]
    );
    // A shutdown while waiting to reconnect ends at once, with no goodbye to send.
    let (mut d, _) = Driver::new(None);
    d.on(Event::ConnectFailed("down".into()));
    assert_eq!(
        d.on(Event::Shutdown),
        vec![Action::Finish(Ok(RunEnd::Shutdown))]
    );
}

#[test]
fn protocol_errors_end_the_session_not_the_run() {
    for bad in [
        // Something other than a task on a task's stream.
        Event::Task(welcome()),
        // A task whose parameters do not fit its shape.
        Event::Task(Message::RoundTask(RoundTask {
            shape: HeadShape {
                input: 5,
                hidden: vec![3],
                classes: 2,
            },
            ..task(0, Encoding::F32)
        })),
        // Something other than a goodbye on the control stream.
        Event::Control(welcome()),
    ] {
        let (mut d, _) = Driver::new(None);
        d.join();
        let actions = d.on(bad.clone());
        assert_eq!(
            actions,
            vec![Action::Close {
                code: 0,
                reason: b""
            }],
            "{bad:?}"
        );
        assert!(d.session.next_deadline().is_some(), "{bad:?}: reconnects");
    }
    // A verdict for another round.
    let (mut d, _) = Driver::new(None);
    d.join();
    let t = d.take_task(3);
    d.finish_training(&t, 1);
    d.on(Event::Verdict(verdict(2, Outcome::Accepted)));
    assert!(d.session.next_deadline().is_some());
    assert!(d.session.report().rounds.is_empty());
    // Training that failed.
    let (mut d, _) = Driver::new(None);
    d.join();
    d.take_task(0);
    let actions = d.on(Event::Trained(Err("diverged".into())));
    assert!(matches!(actions[..], [Action::Close { .. }]));
}

#[test]
fn an_update_follows_the_encoding_the_task_asks_for() {
    for encoding in [Encoding::F32, Encoding::F16, Encoding::Int8RowScaled] {
        let (mut d, _) = Driver::new(None);
        d.join();
        let wire = task(0, encoding);
        let Action::Train(t) = d.on(Event::Task(Message::RoundTask(wire))).remove(0) else {
            panic!("no training request")
        };
        let update = d.finish_training(&t, 1);
        assert_eq!(update.params.encoding, encoding);
        let decoded = update.params.decode(&RowLayout::of_head(&spec())).unwrap();
        let sent = trained(&t).params;
        // Within int8's bound, max|row| / 254, taking the whole vector's max as the row's.
        let bound = sent.iter().fold(0f32, |m, v| m.max(v.abs())) / 254.0 + 1e-6;
        for (a, b) in decoded.iter().zip(&sent) {
            assert!((a - b).abs() <= bound, "{encoding:?}: {a} vs {b}");
        }
    }
}

#[test]
fn events_out_of_turn_change_nothing() {
    let (mut d, _) = Driver::new(None);
    // Before the welcome: no task, no training result, no verdict is acted on.
    d.on(Event::Connected);
    let t = TrainingTask::from_wire(&task(0, Encoding::F32)).unwrap();
    assert_eq!(d.on(Event::Trained(Ok(trained(&t)))), vec![]);
    assert_eq!(d.on(Event::Verdict(verdict(0, Outcome::Accepted))), vec![]);
    d.on(Event::Control(welcome()));
    let t = d.take_task(0);
    // A verdict while training, a second task: ignored; the round goes on.
    assert_eq!(d.on(Event::Verdict(verdict(0, Outcome::Accepted))), vec![]);
    assert_eq!(
        d.on(Event::Task(Message::RoundTask(task(1, Encoding::F32)))),
        vec![]
    );
    let update = d.finish_training(&t, 5);
    assert_eq!(update.round, 0);
}

#[test]
fn a_class_the_run_does_not_know_ends_the_run_before_training() {
    let (mut d, _) = Driver::new(None);
    d.on(Event::Connected);
    let actions = d.on(Event::Control(welcome_to(&["cat", "bird"])));
    let [
        Action::Close { .. },
        Action::Finish(Err(ClientError::Classes(e))),
    ] = &actions[..]
    else {
        panic!("{actions:?}");
    };
    assert!(e.to_string().contains("\"dog\""), "{e}");
    assert!(d.session.is_done());
    // A subset of the run's classes is fine.
    let (mut d, _) = Driver::new(None);
    d.on(Event::Connected);
    let actions = d.on(Event::Control(welcome_to(&["bird", "dog", "cat", "fox"])));
    assert_eq!(
        actions[0],
        Action::UseClasses {
            map: vec![2, 1],
            classes: 4,
            eval_fraction: 0.25,
        }
    );
}

#[test]
fn a_task_whose_head_is_not_the_runs_width_is_a_protocol_error() {
    let (mut d, _) = Driver::new(None);
    d.on(Event::Connected);
    d.on(Event::Control(welcome_to(&["dog", "cat", "fox"])));
    let actions = d.on(Event::Task(Message::RoundTask(task(0, Encoding::F32))));
    assert_eq!(
        actions[0],
        Action::Close {
            code: 0,
            reason: b""
        }
    );
    assert!(!d.session.is_done(), "the session ends, not the run");
}

#[test]
fn the_final_model_is_kept_even_mid_round_and_the_goodbye_still_waits() {
    let (mut d, _) = Driver::new(None);
    d.join();
    let t = d.take_task(4);
    let model = protocol::FinalModel {
        run_id: RUN,
        rounds: 5,
        strategy: "fedavg".into(),
        shape: HeadShape::from(&spec()),
        params: task(4, Encoding::F32).global,
        classes: vec!["dog".into(), "cat".into()],
        backbone_sha256: Vec::new(),
        side: 96,
        preprocessing: "rgb-bilinear-imagenet-v1".into(),
    };
    assert_eq!(
        d.at(900, Event::Control(Message::FinalModel(model.clone()))),
        vec![Action::SaveModel(Box::new(model.clone()))]
    );
    assert!(model.to_saved().is_ok());
    // The goodbye behind it still waits for the round's verdict.
    assert_eq!(
        d.at(1000, Event::Control(goodbye(GoodbyeReason::RunFinished))),
        vec![]
    );
    d.finish_training(&t, 300);
    let end = d.at(1500, Event::Verdict(verdict(4, Outcome::Accepted)));
    assert_eq!(finish_of(&end), Some(&Ok(RunEnd::RunFinished)));
    assert_eq!(d.session.report().final_model_rounds, Some(5));
}

#[test]
fn a_welcome_asking_to_hold_out_all_the_data_is_a_protocol_error() {
    for fraction in [1.0, -0.1, f64::NAN] {
        let (mut d, _) = Driver::new(None);
        d.on(Event::Connected);
        let Message::Welcome(mut w) = welcome() else {
            unreachable!()
        };
        w.eval_fraction = fraction;
        let actions = d.on(Event::Control(Message::Welcome(w)));
        assert!(
            matches!(actions[..], [Action::Close { .. }]),
            "{fraction}: {actions:?}"
        );
        assert!(!d.session.is_done(), "the session ends, not the run");
    }
}

/// The hello a reconnecting session sends after losing its connection.
fn hello_after_loss(d: &mut Driver) -> protocol::Hello {
    d.on(Event::ControlFailed("connection lost".into()));
    hello_after_backoff(d)
}

/// The hello a session in backoff sends when its wait is over.
fn hello_after_backoff(d: &mut Driver) -> protocol::Hello {
    let deadline = d.session.next_deadline().unwrap().0;
    match &d.at(deadline, Event::Tick)[..] {
        [Action::Connect(hello)] => match hello.as_ref() {
            Message::Hello(h) => h.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("expected a connect, got {other:?}"),
    }
}

#[test]
fn a_lossy_task_is_held_and_the_next_is_a_change_from_it() {
    let layout = RowLayout::of_head(&spec());
    let (mut d, _) = Driver::new(None);
    d.join();
    // Round 0: the head in int8. The client trains from what it decodes.
    let first = task(0, Encoding::F32);
    let exact0 = first.global.decode(&layout).unwrap();
    let keyframe = RoundTask {
        global: EncodedParams::encode(&exact0, &layout, Encoding::Int8RowScaled).unwrap(),
        ..first.clone()
    };
    let start0 = keyframe.global.decode(&layout).unwrap();
    let t0 = d.take(keyframe);
    assert_eq!(t0.global.to_flat(), start0);
    d.finish_training(&t0, 10);
    d.on(Event::Verdict(verdict(0, Outcome::Accepted)));
    let held0 = protocol::HeadRef {
        round: 0,
        digest: protocol::head_digest(&start0),
    };
    // Round 1: the change from the head it holds, added as the aggregator adds it.
    let exact1: Vec<f32> = exact0.iter().map(|w| w * 0.9 + 0.003).collect();
    let change: Vec<f32> = exact1.iter().zip(&start0).map(|(g, s)| g - s).collect();
    let delta = EncodedParams::encode(&change, &layout, Encoding::Int8RowScaled).unwrap();
    let start1 = delta.add_to(&start0, &layout).unwrap();
    let t1 = d.take(RoundTask {
        round: 1,
        global: delta.clone(),
        base: Some(held0),
        ..first.clone()
    });
    assert_eq!(t1.global.to_flat(), start1);
    // Reconnecting, it names the head it now holds.
    let hello = hello_after_loss(&mut d);
    assert_eq!(
        hello.held,
        Some(protocol::HeadRef {
            round: 1,
            digest: protocol::head_digest(&start1),
        })
    );
    // The same task again (its base is still held) gives the same start.
    d.join();
    let again = d.take(RoundTask {
        round: 1,
        global: delta.clone(),
        base: Some(held0),
        ..first.clone()
    });
    assert_eq!(again.global.to_flat(), start1);
    // A change from a head it does not hold is a protocol error: it reconnects naming none.
    d.on(Event::Trained(Err("dropped".into())));
    let hello = {
        let deadline = d.session.next_deadline().unwrap().0;
        d.at(deadline, Event::Tick);
        d.join();
        let out = d.on(Event::Task(Message::RoundTask(RoundTask {
            round: 2,
            global: delta,
            base: Some(protocol::HeadRef {
                round: 1,
                digest: [5; 32],
            }),
            ..first
        })));
        assert!(
            !out.iter().any(|a| matches!(a, Action::Train(_))),
            "{out:?}"
        );
        hello_after_backoff(&mut d)
    };
    assert_eq!(hello.held, None);
}
