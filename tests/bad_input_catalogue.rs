//! The bad-input catalogue: a live aggregator over QUIC with TLS, three honest edge clients,
//! and one registered client ("mallory") that answers each round's task with one kind of bad
//! input. Every bad answer must come back as its typed reason while the honest clients'
//! updates of the same round are accepted; connection-level cases (credentials, versions, a
//! stream flood) are refused before anyone joins. The catalogue with each reason is printed
//! (`--nocapture`) and written up in docs/reliability.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aggregator::server::RunSummary;
use aggregator::tls::{layout, token_path};
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use protocol::client_id;
use protocol::quic::{QuicLimits, read_message, write_message};
use protocol::{
    Auth, Capabilities, EncodedParams, Encoding, Hello, Limits, MAGIC, Message, Outcome,
    PROTOCOL_VERSION, RejectReason, RoundTask, Update, UpdateMetrics, WireScope, encode_frame,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;
use wsa::{DEFAULT_SCOPE_EPS, Head, HeadSpec, LabelledFeatures, ScopeSelection, Sgd};
use wsa_fl::fleet::{Deployment, spawn_server};

mod common;

use common::{SYNTHETIC_CLASSES as CLASSES, SYNTHETIC_DIM as DIM};

const HONEST: usize = 3;
const MALLORY: &str = "mallory";

fn shard(client: usize) -> Arc<LabelledFeatures> {
    common::synthetic_shard(3, 60, 100 + client as u64)
}

/// What Mallory knows when it answers: the task, and its own update accepted in round 0.
struct Context<'a> {
    task: &'a RoundTask,
    accepted: Option<&'a Update>,
}

/// An update as an honest client would build it from `params`: its scopes, the task's
/// encoding, sealed.
fn update_with(task: &RoundTask, client: &str, params: &[f32]) -> Update {
    let spec = task.shape.to_spec().unwrap();
    let scopes = Head::from_flat(&spec, params)
        .unwrap()
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    let layout = protocol::RowLayout::of_head(&task.shape.to_spec().unwrap());
    Update {
        run_id: task.run_id,
        round: task.round,
        client_id: client.into(),
        n_samples: 60,
        params: EncodedParams::encode(params, &layout, task.encoding).unwrap(),
        scopes: scopes.into_iter().map(WireScope::from).collect(),
        metrics: UpdateMetrics {
            loss: 1.0,
            accuracy: 0.5,
            kl: 0.0,
            steps: 4,
            train_ms: 1,
            held_out: None,
        },
        digest: [0; 32],
    }
    .seal()
}

/// The global head plus small noise: a plausible update.
fn plausible(task: &RoundTask) -> Vec<f32> {
    let layout = protocol::RowLayout::of_head(&task.shape.to_spec().unwrap());
    let mut rng = ChaCha8Rng::seed_from_u64(task.round);
    task.global
        .decode(&layout)
        .unwrap()
        .iter()
        .map(|w| w + rng.random_range(-0.01f32..0.01))
        .collect()
}

fn good(cx: &Context) -> Update {
    update_with(cx.task, MALLORY, &plausible(cx.task))
}

fn frame(update: Update) -> Vec<u8> {
    encode_frame(&Message::Update(update)).unwrap()
}

/// A frame header announcing `len` body bytes, with `version`.
fn header(version: u16, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

/// One round-level case: the bytes Mallory writes on the round's stream, and the reason
/// expected back ("accepted" for the one good update).
struct Case {
    name: &'static str,
    expect: &'static str,
    answer: fn(&Context) -> Vec<u8>,
}

fn catalogue() -> Vec<Case> {
    vec![
        Case {
            name: "a valid update, written twice on its stream (counted once)",
            expect: "accepted",
            answer: |cx| [frame(good(cx)), frame(good(cx))].concat(),
        },
        Case {
            name: "truncated frame",
            expect: "malformed",
            answer: |cx| {
                let f = frame(good(cx));
                f[..f.len() / 2].to_vec()
            },
        },
        Case {
            name: "oversized length prefix",
            expect: "malformed",
            answer: |_| header(PROTOCOL_VERSION, u32::MAX),
        },
        Case {
            name: "a length prefix under the protocol's 64 MiB but over what the run's head needs",
            expect: "malformed",
            answer: |_| header(PROTOCOL_VERSION, 1 << 20),
        },
        Case {
            name: "unknown protocol version",
            expect: "unsupported-version",
            answer: |cx| {
                let mut f = frame(good(cx));
                f[4..6].copy_from_slice(&(PROTOCOL_VERSION + 7).to_le_bytes());
                f
            },
        },
        Case {
            name: "unknown message variant",
            expect: "malformed",
            answer: |_| [header(PROTOCOL_VERSION, 3), vec![0x7f, 1, 2]].concat(),
        },
        Case {
            name: "trailing bytes inside the frame",
            expect: "malformed",
            answer: |cx| {
                let mut f = frame(good(cx));
                f.extend_from_slice(&[0, 0, 0]);
                let len = u32::try_from(f.len() - protocol::HEADER_LEN).unwrap();
                f[6..10].copy_from_slice(&len.to_le_bytes());
                f
            },
        },
        Case {
            name: "another message kind in place of an update",
            expect: "unexpected-message",
            answer: |_| {
                encode_frame(&Message::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    client_id: MALLORY.into(),
                    auth: Auth::Token(vec![1]),
                    capabilities: Capabilities::default(),
                    n_samples: 1,
                    held: None,
                }))
                .unwrap()
            },
        },
        Case {
            name: "NaN and infinite parameters",
            expect: "non-finite",
            answer: |cx| {
                let mut w = plausible(cx.task);
                w[0] = f32::NAN;
                w[1] = f32::INFINITY;
                // The encoder refuses them, so the bytes are written by hand; the scopes are
                // those of a finite vector, so only the parameters are wrong.
                let mut u = update_with(cx.task, MALLORY, &plausible(cx.task));
                u.params.data = w.iter().flat_map(|x| x.to_le_bytes()).collect();
                frame(u.seal())
            },
        },
        Case {
            name: "wrong tensor shapes (a parameter short)",
            expect: "wrong-shape",
            answer: |cx| {
                let mut u = good(cx);
                u.params.count -= 1;
                u.params.data.truncate(u.params.data.len() - 4);
                frame(u.seal())
            },
        },
        Case {
            name: "n_samples of 0",
            expect: "bad-sample-count",
            answer: |cx| {
                let mut u = good(cx);
                u.n_samples = 0;
                frame(u.seal())
            },
        },
        Case {
            name: "n_samples absurdly large",
            expect: "bad-sample-count",
            answer: |cx| {
                let mut u = good(cx);
                u.n_samples = u64::MAX / 2;
                frame(u.seal())
            },
        },
        Case {
            name: "stale round",
            expect: "stale-round",
            answer: |cx| {
                let mut u = good(cx);
                u.round -= 1;
                frame(u.seal())
            },
        },
        Case {
            name: "future round",
            expect: "future-round",
            answer: |cx| {
                let mut u = good(cx);
                u.round += 1;
                frame(u.seal())
            },
        },
        Case {
            name: "its own accepted update of round 0, replayed",
            expect: "stale-round",
            answer: |cx| frame(cx.accepted.expect("round 0 was accepted").clone()),
        },
        Case {
            name: "an update in another client's name",
            expect: "client-mismatch",
            answer: |cx| frame(update_with(cx.task, &client_id(0), &plausible(cx.task))),
        },
        Case {
            name: "a scope with σ ≤ 0",
            expect: "bad-scope",
            answer: |cx| {
                let mut u = good(cx);
                u.scopes[0].std = -1.0;
                frame(u.seal())
            },
        },
        Case {
            name: "an update 10⁶× the global head",
            expect: "bad-scope",
            answer: |cx| {
                let w: Vec<f32> = plausible(cx.task).iter().map(|x| x * 1e6).collect();
                frame(update_with(cx.task, MALLORY, &w))
            },
        },
        Case {
            // The scope-collapse attack: a WSA target fused from it would pull honest
            // clients' σ toward zero.
            name: "an update with its last weight tensor set to its mean",
            expect: "bad-scope",
            answer: |cx| {
                let spec = cx.task.shape.to_spec().unwrap();
                let mut head = Head::from_flat(&spec, &plausible(cx.task)).unwrap();
                let mut tensors = head.tensors_mut(ScopeSelection::default());
                let last = tensors.last_mut().unwrap();
                let mean = last.iter().sum::<f32>() / last.len() as f32;
                last.fill(mean);
                frame(update_with(cx.task, MALLORY, &head.to_flat()))
            },
        },
        Case {
            // Every σ as the global head's, so only the distance can refuse it.
            name: "an update shifted 10³ from the global head",
            expect: "norm-too-large",
            answer: |cx| {
                let w: Vec<f32> = plausible(cx.task).iter().map(|x| x + 1e3).collect();
                frame(update_with(cx.task, MALLORY, &w))
            },
        },
        Case {
            name: "a digest that does not match the contents",
            expect: "digest-mismatch",
            answer: |cx| {
                let mut u = good(cx);
                u.digest[0] ^= 1;
                frame(u)
            },
        },
        Case {
            name: "an encoding the task did not ask for",
            expect: "wrong-encoding",
            answer: |cx| {
                let mut u = good(cx);
                let layout = protocol::RowLayout::of_head(&cx.task.shape.to_spec().unwrap());
                u.params =
                    EncodedParams::encode(&plausible(cx.task), &layout, Encoding::F16).unwrap();
                frame(u.seal())
            },
        },
        Case {
            name: "an update for another run",
            expect: "wrong-run",
            answer: |cx| {
                let mut u = good(cx);
                u.run_id += 1;
                frame(u.seal())
            },
        },
    ]
}

fn config(rounds: u64) -> EngineConfig {
    let mut c = EngineConfig::new(21, HeadSpec::mlp(DIM, &[8], CLASSES), Strategy::FedAvg);
    c.seed = 5;
    c.rounds = rounds;
    c.min_connected = HONEST + 1;
    c.quorum = HONEST;
    // Short: a bad answer that got no verdict would show as a round closed by its deadline
    // (and a failed assertion) rather than a long wait.
    c.round_timeout_ms = 8_000;
    c.train = Sgd {
        epochs: 1,
        batch_size: 16,
        ..Sgd::default()
    };
    c
}

async fn connect(
    deployment: &Deployment,
    addr: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    let config = protocol::quic::client_config(
        &deployment.creds().join(layout::CA_CERT),
        &QuicLimits::default(),
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    (endpoint, conn)
}

/// A hello from `id`; returns the aggregator's answer to it.
async fn hello(
    deployment: &Deployment,
    addr: SocketAddr,
    id: &str,
    token: Vec<u8>,
    version: u16,
) -> Message {
    let (endpoint, conn) = connect(deployment, addr).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        protocol_version: version,
        client_id: id.into(),
        auth: Auth::Token(token),
        capabilities: Capabilities::default(),
        n_samples: 60,
        held: None,
    });
    write_message(&mut send, &hello).await.unwrap();
    let answer = read_message(&mut recv, &Limits::default()).await.unwrap();
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    answer.message
}

fn refusal(answer: Message) -> RejectReason {
    match answer {
        Message::Verdict(v) => match v.outcome {
            Outcome::Rejected(reason) => reason,
            Outcome::Accepted => panic!("a bad hello was accepted"),
        },
        other => panic!("expected a verdict, got {}", other.kind()),
    }
}

/// Mallory: joins, answers round k's task with case k, returns the reason of each verdict
/// (`None` for an acceptance).
async fn mallory(
    deployment: &Deployment,
    addr: SocketAddr,
    cases: &[Case],
) -> Vec<Option<RejectReason>> {
    let (endpoint, conn) = connect(deployment, addr).await;
    let (mut control, mut control_recv) = conn.open_bi().await.unwrap();
    let token = std::fs::read(token_path(deployment.creds(), MALLORY)).unwrap();
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: MALLORY.into(),
        auth: Auth::Token(token),
        capabilities: Capabilities::default(),
        n_samples: 60,
        held: None,
    });
    write_message(&mut control, &hello).await.unwrap();
    let limits = Limits::default();
    assert!(matches!(
        read_message(&mut control_recv, &limits)
            .await
            .unwrap()
            .message,
        Message::Welcome(_)
    ));
    let mut verdicts = Vec::new();
    let mut accepted: Option<Update> = None;
    for case in cases {
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let Message::RoundTask(task) = read_message(&mut recv, &limits).await.unwrap().message
        else {
            panic!("expected a round task");
        };
        let bytes = (case.answer)(&Context {
            task: &task,
            accepted: accepted.as_ref(),
        });
        if case.expect == "accepted" {
            // The same bytes `good` gave (its noise is seeded by the round), kept for a replay.
            accepted = Some(good(&Context {
                task: &task,
                accepted: None,
            }));
        }
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let verdict = match read_message(&mut recv, &limits).await.unwrap().message {
            Message::Verdict(v) => match v.outcome {
                Outcome::Accepted => None,
                Outcome::Rejected(r) => Some(r),
            },
            other => panic!("{}: expected a verdict, got {}", case.name, other.kind()),
        };
        verdicts.push(verdict);
    }
    // The run ends: the final model, then the goodbye, come on the control stream.
    assert!(matches!(
        read_message(&mut control_recv, &limits)
            .await
            .unwrap()
            .message,
        Message::FinalModel(_)
    ));
    assert!(matches!(
        read_message(&mut control_recv, &limits)
            .await
            .unwrap()
            .message,
        Message::Goodbye(_)
    ));
    conn.close(0u32.into(), b"bye");
    endpoint.wait_idle().await;
    verdicts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_reason_while_honest_clients_are_accepted() {
    let cases = catalogue();
    let dir = tempfile::tempdir().unwrap();
    let mut ids: Vec<String> = (0..HONEST).map(client_id).collect();
    ids.push(MALLORY.into());
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let mut options = deployment
        .server_options("127.0.0.1:0".parse().unwrap(), None, None)
        .unwrap();
    options.hello_timeout = Duration::from_secs(2);
    let server = deployment.bind(options).unwrap();
    let addr = server.local_addr().unwrap();
    let engine = Engine::new(config(cases.len() as u64)).unwrap();
    let (run, _stop) = spawn_server(server, engine);

    // Connection-level cases, before anyone joins (the first round waits for all four).
    let token = std::fs::read(token_path(deployment.creds(), MALLORY)).unwrap();
    let mut table: Vec<(String, String)> = Vec::new();
    let unknown =
        refusal(hello(&deployment, addr, "nobody", token.clone(), PROTOCOL_VERSION).await);
    assert_eq!(unknown, RejectReason::UnknownClient);
    table.push(("hello from an unknown client".into(), unknown.to_string()));
    let bad = refusal(
        hello(
            &deployment,
            addr,
            MALLORY,
            b"guess".to_vec(),
            PROTOCOL_VERSION,
        )
        .await,
    );
    assert_eq!(bad, RejectReason::BadCredentials);
    table.push(("hello with bad credentials".into(), bad.to_string()));
    let old = refusal(hello(&deployment, addr, MALLORY, token, PROTOCOL_VERSION + 1).await);
    assert_eq!(old, RejectReason::UnsupportedVersion(PROTOCOL_VERSION + 1));
    table.push((
        "hello with an unknown protocol version".into(),
        old.to_string(),
    ));
    // A stranger's hello is read under a few KiB, whatever the limits of a session.
    let big = refusal(
        hello(
            &deployment,
            addr,
            &"x".repeat(5000),
            vec![1],
            PROTOCOL_VERSION,
        )
        .await,
    );
    assert!(
        matches!(&big, RejectReason::Malformed(m) if m.contains("exceeds the limit of 4096")),
        "{big}"
    );
    table.push(("a hello of 5 KB".into(), big.to_string()));
    // Credentials change under a running aggregator: a client added now is admitted, and
    // once revoked it is refused, without a restart.
    let late_token =
        std::fs::read(aggregator::tls::add_client(deployment.creds(), "late").unwrap()).unwrap();
    let welcome = hello(
        &deployment,
        addr,
        "late",
        late_token.clone(),
        PROTOCOL_VERSION,
    )
    .await;
    assert!(matches!(welcome, Message::Welcome(_)), "{}", welcome.kind());
    aggregator::tls::revoke_client(deployment.creds(), "late").unwrap();
    let revoked = refusal(hello(&deployment, addr, "late", late_token, PROTOCOL_VERSION).await);
    assert_eq!(revoked, RejectReason::UnknownClient);
    table.push((
        "hello from a client revoked while the aggregator runs".into(),
        revoked.to_string(),
    ));
    // A flood of streams: the server grants a client one stream (its control stream), so the
    // second open waits on QUIC stream credit; silent past the hello timeout, it is closed.
    let (endpoint, flood) = connect(&deployment, addr).await;
    let (mut first, _first_recv) = flood.open_bi().await.unwrap();
    first.write_all(&MAGIC).await.unwrap();
    let more = tokio::time::timeout(Duration::from_millis(500), flood.open_bi()).await;
    assert!(more.is_err(), "a second client stream was granted");
    let closed = tokio::time::timeout(Duration::from_secs(10), flood.closed()).await;
    assert!(closed.is_ok(), "a silent flooder was not closed");
    endpoint.wait_idle().await;
    table.push((
        "a client opening streams in a flood".into(),
        "no stream credit past the control stream; closed at the hello timeout".into(),
    ));

    let (keep, stop) = watch::channel(false);
    let honest = deployment
        .spawn_clients(
            addr,
            (0..HONEST).map(|i| (client_id(i), shard(i))).collect(),
            &stop,
        )
        .unwrap();
    let verdicts = mallory(&deployment, addr, &cases).await;
    let summary: RunSummary = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the run finished in time")
        .unwrap()
        .unwrap();
    drop(keep);
    for client in honest {
        let report = client.await.unwrap().unwrap();
        assert_eq!(report.rounds.len(), cases.len());
        assert!(report.rounds.iter().all(|r| r.outcome == "accepted"));
    }

    assert!(summary.finished);
    assert_eq!(
        summary.rounds.len(),
        cases.len(),
        "one round per case, none failed"
    );
    let honest_ids: Vec<String> = (0..HONEST).map(client_id).collect();
    for ((case, verdict), line) in cases.iter().zip(&verdicts).zip(&summary.rounds) {
        let report = &line.report;
        let key = verdict
            .as_ref()
            .map_or("accepted", protocol::RejectReason::key);
        assert_eq!(key, case.expect, "{}: {verdict:?}", case.name);
        for id in &honest_ids {
            let times = report.accepted.iter().filter(|a| *a == id).count();
            assert_eq!(
                times, 1,
                "round {}: {id} accepted {times} times",
                report.round
            );
        }
        let mallory_times = report.accepted.iter().filter(|a| *a == MALLORY).count();
        if case.expect == "accepted" {
            assert_eq!(mallory_times, 1, "{}", case.name);
        } else {
            assert_eq!(mallory_times, 0, "{}", case.name);
            assert_eq!(
                report.rejected_by_reason.get(case.expect),
                Some(&1),
                "{}",
                case.name
            );
        }
        table.push((
            case.name.into(),
            verdict
                .as_ref()
                .map_or("accepted".into(), ToString::to_string),
        ));
    }
    println!("| case | answer |\n|---|---|");
    for (case, answer) in &table {
        println!("| {case} | {} |", answer.replace('|', "\\|"));
    }
    // The issue asks for at least 15 refused cases besides the accepted one.
    assert!(table.len() > 15);
}
