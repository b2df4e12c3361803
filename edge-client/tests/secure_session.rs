//! A secure round through the client's session state machine on a fake clock, against the
//! real aggregator side of the protocol ([`secagg::ServerRound`]) and two more real clients:
//! the steps the session sends, in order, the input it masks (read back from the unmasked
//! sum), the verdict, and leaving a round whose unmask request asks for both kinds of share.

use edge_client::session::{Action, Backoff, Event, Identity, Session};
use edge_client::{ClientUpdate, TrainingTask};
use protocol::secure::{secure_input, secure_input_len, split_secure_sums};
use protocol::{
    EncodedParams, Encoding, HeadShape, Message, Outcome, RoundTask, RowLayout, SecAgg, Subject,
    TrainSpec, Verdict, Welcome, WireScope,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use secagg::{ClientRound, RoundParams, ServerRound};
use support::Millis;
use wsa::{DEFAULT_SCOPE_EPS, Head, HeadSpec, Init, ScopeSelection, TrainConfig, TrainMetrics};

const RUN: u64 = 3;

fn spec() -> HeadSpec {
    HeadSpec::mlp(4, &[3], 2)
}

fn task() -> RoundTask {
    let head = Head::<f32>::init(&spec(), Init::Standard, 1).unwrap();
    let targets = head
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    RoundTask {
        run_id: RUN,
        round: 0,
        shape: HeadShape::from(&spec()),
        global: EncodedParams::encode(&head.to_flat(), &RowLayout::of_head(&spec()), Encoding::F32)
            .unwrap(),
        targets: targets.into_iter().map(WireScope::from).collect(),
        train: TrainSpec::from(&TrainConfig::default()),
        encoding: Encoding::F32,
        deadline_ms: 60_000,
        base: None,
    }
}

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
        held_out: None,
    }
}

/// A joined session (client index 0), the aggregator's side, and two other clients.
struct Round {
    session: Session,
    server: ServerRound,
    others: Vec<ClientRound>,
    params: RoundParams,
}

fn joined() -> Round {
    let mut session = Session::new(
        Identity {
            client_id: "client-0000".into(),
            token: b"secret".to_vec(),
            n_samples: 40,
            classes: vec!["0".into(), "1".into()],
        },
        Backoff::default(),
    );
    session.start(Millis(0));
    session.handle(Millis(0), Event::Connected);
    session.handle(
        Millis(0),
        Event::Control(Message::Welcome(Welcome {
            run_id: RUN,
            round: 0,
            classes: vec!["0".into(), "1".into()],
            eval_fraction: 0.0,
            attempt: 0,
        })),
    );
    let head = Head::<f32>::zeros(&spec()).unwrap();
    let scoped = head
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap()
        .len();
    let params = RoundParams::for_round(
        RUN,
        0,
        3,
        [9; 32],
        secure_input_len(spec().param_count(), scoped) as u32,
        0.1,
        1.0,
    )
    .unwrap();
    let server = ServerRound::new(params.clone(), 3).unwrap();
    Round {
        session,
        server,
        others: Vec::new(),
        params,
    }
}

fn sent(actions: &[Action]) -> Vec<SecAgg> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendStep(m) => match m.as_ref() {
                Message::SecAgg(s) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn step(r: &mut Round, message: Message) -> Vec<Action> {
    r.session.handle(Millis(5), Event::Step(message))
}

/// Drives the round up to the unmask request, the session's input sent; returns the task
/// the session trained on.
fn to_unmask(r: &mut Round) -> TrainingTask {
    let first = r.session.handle(
        Millis(1),
        Event::Task(Message::SecAgg(SecAgg::Setup(r.params.setup_for(0)))),
    );
    assert!(matches!(first.last(), Some(Action::ReadStep)), "{first:?}");
    let Some(SecAgg::Advertise(advert)) = sent(&first).pop() else {
        panic!("{first:?}")
    };
    r.server.advertise(0, advert).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    for c in 1..3 {
        let (client, advert) = ClientRound::join_with(&r.params.setup_for(c), &mut rng).unwrap();
        r.server.advertise(c, advert).unwrap();
        r.others.push(client);
    }
    let train = match &step(r, Message::RoundTask(task()))[..] {
        [Action::Train(t), Action::ReadStep] => (**t).clone(),
        other => panic!("{other:?}"),
    };
    for (c, roster) in r.server.rosters().unwrap() {
        let shares = if c == 0 {
            let out = step(r, Message::SecAgg(SecAgg::Roster(roster)));
            match sent(&out).pop() {
                Some(SecAgg::Shares(s)) => s,
                other => panic!("{other:?}"),
            }
        } else {
            r.others[c as usize - 1].share(&roster).unwrap()
        };
        r.server.shares(c, shares).unwrap();
    }
    for (c, inbox) in r.server.inboxes().unwrap() {
        if c == 0 {
            // The inbox comes before training ends: nothing is sent until it does.
            let out = step(r, Message::SecAgg(SecAgg::Inbox(inbox)));
            assert_eq!(out, vec![Action::ReadStep]);
            let out = r
                .session
                .handle(Millis(9), Event::Trained(Ok(trained(&train))));
            let Some(SecAgg::Masked(m)) = sent(&out).pop() else {
                panic!("{out:?}")
            };
            r.server.masked(0, &m).unwrap();
        } else {
            let masked = r.others[c as usize - 1]
                .mask(&inbox, &vec![0; r.params.vector_len as usize])
                .unwrap();
            r.server.masked(c, &masked).unwrap();
        }
    }
    train
}

#[test]
fn a_secure_round_sends_each_step_and_its_input_is_what_the_aggregator_unmasks() {
    let mut r = joined();
    let train = to_unmask(&mut r);
    for (c, request) in r.server.unmask_requests().unwrap() {
        let reveal = if c == 0 {
            let out = step(&mut r, Message::SecAgg(SecAgg::Unmask(request)));
            assert!(matches!(out.last(), Some(Action::ReadStep)));
            match sent(&out).pop() {
                Some(SecAgg::Reveal(v)) => v,
                other => panic!("{other:?}"),
            }
        } else {
            r.others[c as usize - 1].reveal(&request).unwrap()
        };
        r.server.reveal(c, reveal).unwrap();
    }
    let code = r.params.code().unwrap();
    let aggregate = std::mem::replace(
        &mut r.server,
        ServerRound::new(r.params.clone(), 3).unwrap(),
    )
    .finish()
    .unwrap();
    // The other clients sent zeros: the sum is the session's input.
    let sums = code.decode_sum(&aggregate.sum);
    let update = trained(&train);
    let scopes: Vec<WireScope> = update.scopes.iter().copied().map(WireScope::from).collect();
    let expected = secure_input(&update.params, &train.global.to_flat(), &scopes);
    for (got, want) in sums.iter().zip(&expected) {
        assert!(
            (got - want).abs() <= code.max_rounding_error() + 1e-12,
            "{got} vs {want}"
        );
    }
    assert!(split_secure_sums(&sums, spec().param_count()).is_some());
    let verdict = Message::Verdict(Verdict {
        run_id: RUN,
        subject: Subject::Update { round: 0 },
        outcome: Outcome::Accepted,
    });
    assert_eq!(step(&mut r, verdict), vec![Action::AcceptTask]);
    let report = r.session.report();
    assert_eq!(report.rounds.len(), 1);
    assert_eq!(report.rounds[0].outcome, "accepted");
    assert_eq!(
        report.rounds[0].train_ms, 4,
        "from the task (5 ms) to the trained input (9 ms)"
    );
}

#[test]
fn an_unmask_request_for_both_shares_of_a_neighbour_makes_the_client_leave_the_round() {
    let mut r = joined();
    to_unmask(&mut r);
    let mut request = r.server.unmask_requests().unwrap().remove(0).1;
    let neighbour = request.survivors[0];
    request.dropped.push(neighbour);
    let out = step(&mut r, Message::SecAgg(SecAgg::Unmask(request)));
    assert_eq!(out, vec![Action::AcceptTask], "no share goes out");
    let report = r.session.report();
    assert!(
        report.rounds[0]
            .outcome
            .starts_with("left the secure round: refused: the aggregator asked for both"),
        "{}",
        report.rounds[0].outcome
    );
}
