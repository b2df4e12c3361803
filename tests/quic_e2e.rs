//! A real aggregator and real edge clients over loopback QUIC with TLS, on small synthetic
//! features (no model needed): rounds close, every update is accepted exactly once, the global
//! head moves and the targets are the fused client scopes; intruders are refused while the run
//! carries on; a run stopped after round 2 and resumed from its checkpoint ends where an
//! uninterrupted run ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aggregator::server::{RunSummary, Server};
use aggregator::tls::{layout, token_path};
use aggregator_core::checkpoint::Checkpoint;
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use edge_client::net::{ClientError, ClientReport, ConnectOptions, RunEnd};
use protocol::client_id;
use protocol::quic::{QuicLimits, read_message, write_message};
use protocol::{
    Auth, Capabilities, Hello, Limits, Message, Outcome, PROTOCOL_VERSION, RejectReason,
};
use tokio::sync::watch;
use wsa::{FusionRule, HeadSpec, LabelledFeatures, Scope, Sgd};
use wsa_fl::fleet::{Deployment, spawn_server};

mod common;

use common::{SYNTHETIC_CLASSES as CLASSES, SYNTHETIC_DIM as DIM};

fn client_ids(n: usize) -> Vec<String> {
    (0..n).map(client_id).collect()
}

fn shard(client: usize) -> Arc<LabelledFeatures> {
    common::synthetic_shard(3, 40 + 10 * client, 100 + client as u64)
}

fn config(rounds: u64, min_connected: usize, quorum: usize) -> EngineConfig {
    let mut c = EngineConfig::new(
        7,
        HeadSpec::mlp(DIM, &[8], CLASSES),
        Strategy::wsa(5.0, FusionRule::MeanStd),
    );
    c.seed = 11;
    c.rounds = rounds;
    c.min_connected = min_connected;
    c.quorum = quorum;
    c.round_timeout_ms = 30_000;
    c.train = Sgd {
        epochs: 2,
        batch_size: 16,
        ..Sgd::default()
    };
    c
}

struct Run {
    dir: tempfile::TempDir,
    deployment: Deployment,
}

impl Run {
    fn new(clients: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let deployment = Deployment::generate(&dir.path().join("creds"), clients).unwrap();
        Self { dir, deployment }
    }

    fn creds(&self) -> PathBuf {
        self.deployment.creds().to_owned()
    }

    fn checkpoint(&self) -> PathBuf {
        self.dir.path().join("checkpoint.bin")
    }

    fn server(&self, listen: SocketAddr, stop_after_rounds: Option<u64>) -> Server {
        let mut options = self
            .deployment
            .server_options(
                listen,
                Some(self.checkpoint()),
                Some(self.dir.path().join("rounds.jsonl")),
            )
            .unwrap();
        options.stop_after_rounds = stop_after_rounds;
        self.deployment.bind(options).unwrap()
    }

    fn options(&self, server: SocketAddr, id: &str) -> ConnectOptions {
        self.deployment.client_options(server, id).unwrap()
    }
}

fn spawn_clients(
    run: &Run,
    addr: SocketAddr,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<ClientReport, ClientError>>> {
    let (keep, stop) = watch::channel(false);
    // Keep the sender alive so the clients never see a shutdown: they end with the run.
    std::mem::forget(keep);
    let shards = (0..n).map(|i| (client_id(i), shard(i))).collect();
    run.deployment.spawn_clients(addr, shards, &stop).unwrap()
}

async fn serve(server: Server, engine: Engine) -> tokio::task::JoinHandle<RunSummary> {
    let (handle, stop) = spawn_server(server, engine);
    tokio::spawn(async move {
        let summary = handle.await.unwrap().unwrap();
        drop(stop);
        summary
    })
}

/// A registered client that answers every round task with garbage until the run ends;
/// returns the reasons the aggregator gave.
async fn malformed_client(run: &Run, addr: SocketAddr, id: &str) -> Vec<RejectReason> {
    let config =
        protocol::quic::client_config(&run.creds().join(layout::CA_CERT), &QuicLimits::default())
            .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let token = std::fs::read(token_path(&run.creds(), id)).unwrap();
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: id.into(),
        auth: Auth::Token(token),
        capabilities: Capabilities::default(),
        n_samples: 50,
        held: None,
    });
    write_message(&mut send, &hello).await.unwrap();
    let limits = Limits::default();
    assert!(matches!(
        read_message(&mut recv, &limits).await.unwrap().message,
        Message::Welcome(_)
    ));
    let mut reasons = Vec::new();
    loop {
        tokio::select! {
            control = read_message(&mut recv, &limits) => {
                // The final model, then the goodbye, end a finished run.
                match control.unwrap().message {
                    Message::FinalModel(_) => continue,
                    other => assert!(matches!(other, Message::Goodbye(_)), "{}", other.kind()),
                }
                break;
            }
            stream = conn.accept_bi() => {
                let (mut task_send, mut task_recv) = stream.unwrap();
                assert!(matches!(
                    read_message(&mut task_recv, &limits).await.unwrap().message,
                    Message::RoundTask(_)
                ));
                // A valid header announcing 3 bytes that are no message.
                let mut frame = protocol::MAGIC.to_vec();
                frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                frame.extend_from_slice(&3u32.to_le_bytes());
                frame.extend_from_slice(&[9, 9, 9]);
                task_send.write_all(&frame).await.unwrap();
                match read_message(&mut task_recv, &limits).await.unwrap().message {
                    Message::Verdict(v) => match v.outcome {
                        Outcome::Rejected(reason) => reasons.push(reason),
                        Outcome::Accepted => panic!("garbage accepted"),
                    },
                    other => panic!("expected a verdict, got {}", other.kind()),
                }
            }
        }
    }
    conn.close(0u32.into(), b"bye");
    endpoint.wait_idle().await;
    reasons
}

/// The targets a round of `records` (sample count, scopes) should give under the default
/// fusion: per tensor, the median of the clients' μ and of their σ (an odd count here).
fn fused(records: &[(u64, Vec<Scope>)]) -> Vec<Scope> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (0..records[0].1.len())
        .map(|t| Scope {
            mean: median(records.iter().map(|(_, s)| s[t].mean).collect()),
            std: median(records.iter().map(|(_, s)| s[t].std).collect()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_three_rounds_over_quic_with_intruders_refused() {
    init_logs();
    let ids = client_ids(6);
    let run = Run::new(&ids);
    let cfg = config(3, 6, 5);
    let initial = Engine::new(cfg.clone()).unwrap().global_params().to_vec();
    let server = run.server("127.0.0.1:0".parse().unwrap(), None);
    let addr = server.local_addr().unwrap();
    let server = serve(server, Engine::new(cfg.clone()).unwrap()).await;

    // Wrong token for a registered id, and an id nobody registered: refused, no retry.
    let mut bad = run.options(addr, &client_id(0));
    bad.token = b"not-the-token".to_vec();
    let (_s, stop) = watch::channel(false);
    let refused = edge_client::net::run(bad, shard(0), stop.clone()).await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Refused(RejectReason::BadCredentials))
        ),
        "{refused:?}"
    );
    let mut stranger = run.options(addr, &client_id(0));
    stranger.client_id = "mallory".into();
    let refused = edge_client::net::run(stranger, shard(0), stop).await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Refused(RejectReason::UnknownClient))
        ),
        "{refused:?}"
    );

    // A registered client whose data holds a class the run does not name: it leaves after
    // the welcome, before any training, and does not retry.
    let foreign = edge_client::LocalData::new(
        shard(0),
        (0..CLASSES - 1)
            .map(|c| c.to_string())
            .chain(["zebra".to_owned()])
            .collect(),
    )
    .unwrap();
    let (_s, stop) = watch::channel(false);
    let refused = edge_client::net::run(run.options(addr, &client_id(0)), foreign, stop).await;
    assert!(
        matches!(&refused, Err(ClientError::Classes(e)) if e.to_string().contains("\"zebra\"")),
        "{refused:?}"
    );

    let clients = spawn_clients(&run, addr, 5);
    let malformed = malformed_client(&run, addr, &client_id(5)).await;
    assert_eq!(
        malformed.len(),
        3,
        "one garbage answer per round: {malformed:?}"
    );
    assert!(
        malformed
            .iter()
            .all(|r| matches!(r, RejectReason::Malformed(_)))
    );

    let summary = tokio::time::timeout(Duration::from_secs(120), server)
        .await
        .expect("run finished in time")
        .unwrap();
    assert!(summary.finished);
    assert_eq!(summary.rounds.len(), 3);
    for (r, line) in summary.rounds.iter().enumerate() {
        let mut accepted = line.report.accepted.clone();
        accepted.sort();
        assert_eq!(line.report.round, r as u64);
        assert_eq!(line.report.strategy, "wsa:5:mean-std");
        assert_eq!(
            accepted,
            client_ids(5),
            "round {r}: each honest update once"
        );
    }
    for line in &summary.rounds {
        assert_eq!(line.report.rejected_by_reason.get("malformed"), Some(&1));
    }
    assert_eq!(
        summary
            .rounds
            .iter()
            .map(|l| l.transport.refused_hellos.len())
            .sum::<usize>(),
        2
    );

    let mut last_round = Vec::new();
    for client in clients {
        let report = client.await.unwrap().unwrap();
        assert_eq!(report.end, RunEnd::RunFinished);
        assert_eq!(report.rounds.len(), 3);
        assert!(report.rounds.iter().all(|r| r.outcome == "accepted"));
        assert_eq!(
            report.final_model_rounds,
            Some(3),
            "the final model came with the goodbye"
        );
        let last = report.rounds.last().unwrap();
        let scopes = last.scopes.iter().map(|s| s.to_scope().unwrap()).collect();
        last_round.push((last.n_samples, scopes));
    }

    let checkpoint = Checkpoint::load(&run.checkpoint()).unwrap();
    assert_eq!(checkpoint.next_round, 3);
    assert_ne!(checkpoint.global, initial, "the global head moved");
    // The aggregator fuses the scopes it measured, which agree with the ones the clients
    // reported to the rounding of its f32 sums.
    let want = fused(&last_round);
    for (got, want) in checkpoint.targets.iter().zip(&want) {
        assert!(
            (got.mean - want.mean).abs() < 1e-6 * want.std
                && (got.std - want.std).abs() < 1e-6 * want.std,
            "{got:?} vs {want:?}"
        );
    }
}

async fn wait_for_exit(server: tokio::task::JoinHandle<RunSummary>) -> RunSummary {
    tokio::time::timeout(Duration::from_secs(120), server)
        .await
        .expect("server stopped in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumed_after_round_two_ends_like_an_uninterrupted_one() {
    init_logs();
    let ids = client_ids(4);
    let cfg = config(4, 4, 4);

    let straight = Run::new(&ids);
    let server = straight.server("127.0.0.1:0".parse().unwrap(), None);
    let addr = server.local_addr().unwrap();
    let handle = serve(server, Engine::new(cfg.clone()).unwrap()).await;
    let clients = spawn_clients(&straight, addr, 4);
    assert!(wait_for_exit(handle).await.finished);
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap().end, RunEnd::RunFinished);
    }
    let want = Checkpoint::load(&straight.checkpoint()).unwrap();

    let resumed = Run::new(&ids);
    let server = resumed.server("127.0.0.1:0".parse().unwrap(), Some(2));
    let addr = server.local_addr().unwrap();
    let handle = serve(server, Engine::new(cfg.clone()).unwrap()).await;
    let clients = spawn_clients(&resumed, addr, 4);
    let first = wait_for_exit(handle).await;
    assert!(!first.finished);
    assert_eq!(first.rounds.len(), 2);
    let saved = Checkpoint::load(&resumed.checkpoint()).unwrap();
    assert_eq!(saved.next_round, 2);

    // Same address: the clients reconnect on their own.
    let server = resumed.server(addr, None);
    let handle = serve(server, Engine::resume(cfg, saved).unwrap()).await;
    let second = wait_for_exit(handle).await;
    assert!(second.finished);
    assert_eq!(second.rounds.first().unwrap().report.round, 2);
    for c in clients {
        let report = c.await.unwrap().unwrap();
        assert_eq!(report.end, RunEnd::RunFinished);
        assert!(
            report.connections >= 2,
            "client reconnected after the restart"
        );
    }
    let got = Checkpoint::load(&resumed.checkpoint()).unwrap();
    assert_eq!(got.next_round, 4);
    assert_eq!(got.global, want.global, "same global head bits");
    assert_eq!(got.targets, want.targets);
}

/// A client keeps the run's final model, sent before the goodbye, as a model folder equal to
/// the aggregator's last head; a client that joins only after the run finished gets it while
/// the server lingers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_the_final_model_even_when_they_join_after_the_end() {
    init_logs();
    let ids = client_ids(2);
    let run = Run::new(&ids);
    let mut options = run
        .deployment
        .server_options("127.0.0.1:0".parse().unwrap(), Some(run.checkpoint()), None)
        .unwrap();
    options.linger = Duration::from_secs(60);
    let server = run.deployment.bind(options).unwrap();
    let addr = server.local_addr().unwrap();
    let cfg = config(2, 1, 1);
    let (handle, stop_server) = spawn_server(server, Engine::new(cfg.clone()).unwrap());
    let checkpoint_head = || Checkpoint::load(&run.checkpoint()).unwrap().global;

    for (i, id) in ids.iter().enumerate() {
        // The first trains through the run; the second joins once it is over.
        let mut options = run.options(addr, id);
        let kept = run.dir.path().join(format!("model-{i}"));
        options.model_dir = Some(kept.clone());
        let report_file = run.dir.path().join(format!("report-{i}.json"));
        options.report_file = Some(report_file.clone());
        let (_keep, stop) = watch::channel(false);
        let report = edge_client::net::run(options, shard(i), stop)
            .await
            .unwrap();
        assert_eq!(report.end, RunEnd::RunFinished);
        assert_eq!(report.final_model_rounds, Some(2), "client {i}");
        assert_eq!(report.rounds.len(), if i == 0 { 2 } else { 0 });
        // The report kept on disk (what `edge-client status` reads) is the run's.
        let kept_report: ClientReport =
            serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
        assert_eq!(kept_report.end, RunEnd::RunFinished);
        assert_eq!(kept_report.rounds, report.rounds);
        assert_eq!(kept_report.final_model_rounds, Some(2));
        let model = wsa::saved::SavedModel::load(&kept).unwrap();
        assert_eq!(model.head.to_flat(), checkpoint_head(), "client {i}");
        assert_eq!(model.card.classes, cfg.classes);
    }
    assert!(!handle.is_finished(), "the server lingers");
    stop_server.send(true).unwrap();
    let summary = wait_for_exit(tokio::spawn(async move { handle.await.unwrap().unwrap() })).await;
    assert!(summary.finished);
    assert_eq!(summary.rounds.len(), 2);
}

fn init_logs() {
    support::logging::init_for_tests("warn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asked_to_stop_says_goodbye_and_ends() {
    init_logs();
    let ids = client_ids(2);
    let run = Run::new(&ids);
    // Two clients needed before a round opens: the one that joins just waits.
    let server = run.server("127.0.0.1:0".parse().unwrap(), None);
    let addr = server.local_addr().unwrap();
    let (handle, stop_server) = spawn_server(server, Engine::new(config(1, 2, 2)).unwrap());
    let (stop_tx, stop) = watch::channel(false);
    let client = tokio::spawn(edge_client::net::run(
        run.options(addr, &client_id(0)),
        shard(0),
        stop,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("client stopped promptly")
        .unwrap()
        .unwrap();
    assert_eq!(report.end, RunEnd::Shutdown);
    assert_eq!(report.connections, 1);
    assert!(report.rounds.is_empty());
    stop_server.send(true).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("server stopped promptly")
        .unwrap()
        .unwrap();
    assert!(!summary.finished);
    assert!(summary.rounds.is_empty());
}

/// A certificate the client refuses (a name it does not hold, another deployment's CA) ends
/// the client at once with the reason, where a network error would be retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_server_certificate_ends_the_client_instead_of_retrying() {
    init_logs();
    let ids = client_ids(1);
    let run = Run::new(&ids);
    let other = Run::new(&ids);
    let server = run.server("127.0.0.1:0".parse().unwrap(), None);
    let addr = server.local_addr().unwrap();
    let (_handle, stop_server) = spawn_server(server, Engine::new(config(1, 2, 2)).unwrap());
    let (_keep, stop) = watch::channel(false);
    let mut wrong_name = run.options(addr, &client_id(0));
    wrong_name.server_name = "not-the-aggregator".into();
    let mut wrong_ca = run.options(addr, &client_id(0));
    wrong_ca.ca_cert = other.options(addr, &client_id(0)).ca_cert;
    for (mut options, says) in [
        (wrong_name, "not valid for name"),
        (wrong_ca, "invalid peer certificate"),
    ] {
        // Never giving up on errors worth retrying.
        options.backoff.max_attempts = None;
        let report_file = run.dir.path().join("report.json");
        options.report_file = Some(report_file.clone());
        let ended = tokio::time::timeout(
            Duration::from_secs(10),
            edge_client::net::run(options, shard(0), stop.clone()),
        )
        .await
        .expect("the client ends at the first refusal");
        match ended {
            Err(ClientError::Handshake(reason)) => assert!(reason.contains(says), "{reason}"),
            other => panic!("expected a handshake refusal, got {other:?}"),
        }
        // What `edge-client status` reads says so.
        let kept: ClientReport =
            serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
        assert_eq!(kept.end, RunEnd::Failed);
        assert!(kept.error.unwrap().contains(says));
    }
    stop_server.send(true).unwrap();
}
