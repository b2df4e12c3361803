//! Faults against a real aggregator over QUIC.
//!
//! `kill -9` mid-round: the aggregator runs in a child process (this test binary, re-run in
//! server mode), real edge clients in this one. The child is killed with SIGKILL while a round
//! is open and some of its updates are already accepted, then started again on the same
//! address and checkpoint. The semantics this pins down: an update is durable once its round
//! closes (the checkpoint is written atomically before the next round's tasks go out); a kill
//! before that restarts the round, and every selected client is asked again. So the rounds log
//! shows every round closed exactly once, each with every client folded exactly once, and the
//! run ends where it should.
//!
//! 30% of the clients vanish mid-round: three of ten clients run in a child process that is
//! killed with SIGKILL (no goodbye, no QUIC close: they fall silent). The open round closes at
//! its deadline with the seven that answered, above the quorum, and the run goes on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator_core::checkpoint::Checkpoint;
use aggregator_core::engine::{Engine, EngineConfig, RoundReport};
use aggregator_core::strategy::Strategy;
use edge_client::net::RunEnd;
use protocol::client_id;
use tokio::sync::watch;
use wsa::{HeadSpec, LabelledFeatures, Sgd};
use wsa_fl::fleet::{Deployment, spawn_server};

mod common;

use common::{SYNTHETIC_CLASSES as CLASSES, SYNTHETIC_DIM as DIM};

const CLIENTS: usize = 4;
const ROUNDS: u64 = 6;
/// Set in the child: the folder of the run it serves.
const SERVE_ENV: &str = "WSA_FAULT_SERVE";
/// Set in the child: `folder,address` of the run whose vanishing clients it runs.
const CLIENTS_ENV: &str = "WSA_FAULT_CLIENTS";
/// The vanishing test's fleet: 10 clients, of which the last 3 run in the child.
const FLEET: usize = 10;
const VANISHING: usize = 3;

fn config() -> EngineConfig {
    let mut c = EngineConfig::new(31, HeadSpec::mlp(DIM, &[32], CLASSES), Strategy::FedAvg);
    c.seed = 3;
    c.rounds = ROUNDS;
    c.min_connected = CLIENTS;
    c.quorum = CLIENTS;
    c.round_timeout_ms = 60_000;
    c.train = Sgd {
        epochs: 3,
        batch_size: 32,
        ..Sgd::default()
    };
    c
}

/// Client 0 holds far more data than the others, so its training takes a while and every
/// round has a stretch where the other updates are accepted and the round is still open.
fn shard(client: usize) -> Arc<LabelledFeatures> {
    let n = if client == 0 { 120_000 } else { 100 };
    common::synthetic_shard(5, n, 200 + client as u64)
}

/// Server mode: in the child process, serve the run in `$WSA_FAULT_SERVE` until it finishes.
/// In the parent (no variable) this test does nothing.
#[test]
fn child_server() {
    let Ok(dir) = std::env::var(SERVE_ENV) else {
        return;
    };
    support::logging::init("warn");
    let dir = PathBuf::from(dir);
    let addr: SocketAddr = std::fs::read_to_string(dir.join("addr"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deployment = Deployment::open(&dir.join("creds"));
    let checkpoint = dir.join("checkpoint.bin");
    let engine = if checkpoint.exists() {
        Engine::resume(config(), Checkpoint::load(&checkpoint).unwrap()).unwrap()
    } else {
        Engine::new(config()).unwrap()
    };
    let options = deployment
        .server_options(addr, Some(checkpoint), Some(dir.join("rounds.jsonl")))
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = deployment.bind(options).unwrap();
        let (run, _stop) = spawn_server(server, engine);
        let summary = run.await.unwrap().unwrap();
        assert!(summary.finished);
    });
}

fn start_child(dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_server", "--nocapture", "--test-threads=1"])
        .env_remove(CLIENTS_ENV)
        .env(SERVE_ENV, dir)
        .env(
            "RUST_LOG",
            std::env::var("CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .unwrap()
}

fn reports(dir: &Path) -> Vec<RoundReport> {
    std::fs::read_to_string(dir.join("rounds.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(v.get("report").cloned().unwrap_or(v)).unwrap()
        })
        .collect()
}

/// A free UDP port on loopback (bound and released; the server binds it next).
fn free_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn a_killed_aggregator_restarts_the_open_round_and_loses_or_doubles_nothing() {
    if std::env::var(SERVE_ENV).is_ok() || std::env::var(CLIENTS_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..CLIENTS).map(client_id).collect();
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let addr = free_addr();
    std::fs::write(dir.path().join("addr"), addr.to_string()).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut child = start_child(dir.path());
    let (keep, stop) = watch::channel(false);
    let clients = runtime.block_on(async {
        deployment
            .spawn_clients(
                addr,
                (0..CLIENTS).map(|i| (client_id(i), shard(i))).collect(),
                &stop,
            )
            .unwrap()
    });

    // Wait until round 1 has closed, then for the fast clients' updates of round 2 to be
    // accepted while the slow one still trains: half a round in, by round 1's duration.
    let started = Instant::now();
    let closed_before = loop {
        let r = reports(dir.path());
        if r.len() >= 2 {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no round closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let round_ms = closed_before[1].duration_ms.max(20);
    println!("round 1 took {round_ms} ms");
    std::thread::sleep(Duration::from_millis(round_ms / 2));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = reports(dir.path());
    let killed_round = at_kill.len() as u64;
    assert!(killed_round < ROUNDS, "the run ended before the kill");

    let restarted = Instant::now();
    let mut child = start_child(dir.path());
    let status = child.wait().unwrap();
    println!("the restarted aggregator ran {:?}", restarted.elapsed());
    assert!(
        status.success(),
        "the restarted aggregator failed: {status}"
    );
    drop(keep);
    let mut killed_round_records = Vec::new();
    runtime.block_on(async {
        for (i, c) in clients.into_iter().enumerate() {
            let report = c.await.unwrap().unwrap();
            assert_eq!(report.end, RunEnd::RunFinished, "client {i}");
            assert!(
                report.connections >= 2,
                "client {i} reconnected after the kill"
            );
            killed_round_records.push(
                report
                    .rounds
                    .iter()
                    .filter(|r| r.round == killed_round)
                    .map(|r| r.outcome.clone())
                    .collect::<Vec<_>>(),
            );
        }
    });

    let log = reports(dir.path());
    for r in &log {
        println!(
            "round {} attempt {}: {:?}, accepted {:?}, {} ms",
            r.round, r.attempt, r.closed_by, r.accepted, r.duration_ms
        );
    }
    let closed: Vec<&RoundReport> = log
        .iter()
        .filter(|r| r.accepted_count >= r.quorum)
        .collect();
    let rounds: Vec<u64> = closed.iter().map(|r| r.round).collect();
    assert_eq!(
        rounds,
        (0..ROUNDS).collect::<Vec<_>>(),
        "each round closed once"
    );
    for r in &closed {
        let mut accepted = r.accepted.clone();
        accepted.sort();
        assert_eq!(accepted, ids, "round {}: every client folded once", r.round);
    }
    let checkpoint = Checkpoint::load(&dir.path().join("checkpoint.bin")).unwrap();
    assert_eq!(checkpoint.next_round, ROUNDS);
    // What the clients saw of the killed round: updates accepted before the kill and then,
    // asked again, once more; only the second counted.
    println!(
        "killed in round {killed_round}; the clients' verdicts for it: {killed_round_records:?}"
    );
    let answered_twice = killed_round_records.iter().filter(|v| v.len() >= 2).count();
    assert!(
        answered_twice >= 1,
        "the kill should land after some updates of round {killed_round} were accepted: \
         {killed_round_records:?}"
    );
}

/// Clients mode: in the child process, run the fleet's last `VANISHING` clients until killed.
#[test]
fn child_clients() {
    let Ok(spec) = std::env::var(CLIENTS_ENV) else {
        return;
    };
    let (dir, addr) = spec.split_once(',').unwrap();
    let deployment = Deployment::open(Path::new(dir));
    let addr: SocketAddr = addr.parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (_keep, stop) = watch::channel(false);
        let clients = deployment
            .spawn_clients(
                addr,
                (FLEET - VANISHING..FLEET)
                    .map(|i| (client_id(i), shard(0)))
                    .collect(),
                &stop,
            )
            .unwrap();
        for c in clients {
            let _ = c.await;
        }
    });
}

#[test]
fn when_30_percent_of_clients_vanish_the_round_closes_at_its_deadline_with_the_quorum() {
    if std::env::var(SERVE_ENV).is_ok() || std::env::var(CLIENTS_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..FLEET).map(client_id).collect();
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let mut cfg = config();
    cfg.rounds = 4;
    cfg.min_connected = FLEET;
    cfg.quorum = FLEET - VANISHING;
    cfg.round_timeout_ms = 3_000;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (addr, run, _stop_server) = runtime.block_on(async {
        let server = deployment
            .bind(
                deployment
                    .server_options(
                        "127.0.0.1:0".parse().unwrap(),
                        None,
                        Some(dir.path().join("rounds.jsonl")),
                    )
                    .unwrap(),
            )
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (run, stop) = spawn_server(server, Engine::new(cfg.clone()).unwrap());
        (addr, run, stop)
    });
    let mut vanishing = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_clients",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove(SERVE_ENV)
        .env(
            CLIENTS_ENV,
            format!("{},{addr}", deployment.creds().display()),
        )
        .spawn()
        .unwrap();
    let (keep, stop) = watch::channel(false);
    let staying = runtime.block_on(async {
        deployment
            .spawn_clients(
                addr,
                (0..FLEET - VANISHING)
                    .map(|i| (client_id(i), shard(i)))
                    .collect(),
                &stop,
            )
            .unwrap()
    });
    // Once round 0 has closed, the child's clients vanish in the middle of round 1: they hold
    // as much data as client 0, the slow one, so they are still training; no one says goodbye.
    let started = Instant::now();
    while reports(dir.path()).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "round 0 never closed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    vanishing.kill().unwrap(); // SIGKILL
    vanishing.wait().unwrap();
    let summary = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), run).await })
        .expect("the run finished")
        .unwrap()
        .unwrap();
    drop(keep);
    runtime.block_on(async {
        for c in staying {
            assert_eq!(c.await.unwrap().unwrap().end, RunEnd::RunFinished);
        }
    });
    assert!(summary.finished);
    let log = reports(dir.path());
    for r in &log {
        println!(
            "round {} attempt {}: {:?}, {} accepted, {} ms",
            r.round, r.attempt, r.closed_by, r.accepted_count, r.duration_ms
        );
    }
    assert_eq!(log.len(), 4, "no round failed");
    assert_eq!(log[0].accepted_count, FLEET);
    let first_deadline = log
        .iter()
        .position(|r| r.closed_by == aggregator_core::engine::ClosedBy::Deadline)
        .expect("a round closed at its deadline");
    assert!(first_deadline <= 2, "the clients vanished late");
    for r in &log[first_deadline..] {
        // The vanished clients stay "connected" until their QUIC idle timeout (60 s), so
        // every later round asks them too and waits for its deadline.
        assert_eq!(
            r.closed_by,
            aggregator_core::engine::ClosedBy::Deadline,
            "round {}",
            r.round
        );
        assert_eq!(r.accepted_count, FLEET - VANISHING, "round {}", r.round);
        assert!(
            r.accepted
                .iter()
                .all(|c| ids[..FLEET - VANISHING].contains(c))
        );
    }
}

/// A UDP relay between clients and `server` that drops each datagram with probability
/// `loss` and delays the rest by `delay`, both directions: packet loss and latency on
/// loopback without kernel support (this machine's kernel has no netem qdisc).
async fn lossy_relay(server: SocketAddr, loss: f64, delay: Duration, seed: u64) -> SocketAddr {
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let rng = Arc::new(std::sync::Mutex::new(
        rand_chacha::ChaCha8Rng::seed_from_u64(seed),
    ));
    let pass = move |rng: &std::sync::Mutex<rand_chacha::ChaCha8Rng>| {
        rng.lock().unwrap().random::<f64>() >= loss
    };
    tokio::spawn(async move {
        let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, client)) = front.recv_from(&mut buf).await else {
                return;
            };
            let up = upstreams
                .entry(client)
                .or_insert_with(|| {
                    let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    std.set_nonblocking(true).unwrap();
                    let up = Arc::new(UdpSocket::from_std(std).unwrap());
                    // The way back: server → relay → this client.
                    let (up2, front2, rng2) = (up.clone(), front.clone(), rng.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok((n, _)) = up2.recv_from(&mut buf).await {
                            if pass(&rng2) {
                                let (data, front) = (buf[..n].to_vec(), front2.clone());
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = front.send_to(&data, client).await;
                                });
                            }
                        }
                    });
                    up
                })
                .clone();
            if pass(&rng) {
                let data = buf[..n].to_vec();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = up.send_to(&data, server).await;
                });
            }
        }
    });
    addr
}

/// Rounds complete through 10% datagram loss and 20 ms of delay in each direction: every
/// client's update is accepted in every round (QUIC retransmits; nothing times out).
#[test]
fn rounds_complete_through_packet_loss_and_delay() {
    if std::env::var(SERVE_ENV).is_ok() || std::env::var(CLIENTS_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..CLIENTS).map(client_id).collect();
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let mut cfg = config();
    cfg.rounds = 4;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let summary = runtime.block_on(async {
        let server = deployment
            .bind(
                deployment
                    .server_options("127.0.0.1:0".parse().unwrap(), None, None)
                    .unwrap(),
            )
            .unwrap();
        let server_addr = server.local_addr().unwrap();
        let relay = lossy_relay(server_addr, 0.10, Duration::from_millis(20), 9).await;
        let (run, _stop) = spawn_server(server, Engine::new(cfg).unwrap());
        let (_keep, stop) = watch::channel(false);
        let clients = deployment
            .spawn_clients(
                relay,
                (0..CLIENTS).map(|i| (client_id(i), small(i))).collect(),
                &stop,
            )
            .unwrap();
        let summary = tokio::time::timeout(Duration::from_secs(180), run)
            .await
            .expect("the run finished")
            .unwrap()
            .unwrap();
        for c in clients {
            assert_eq!(c.await.unwrap().unwrap().end, RunEnd::RunFinished);
        }
        summary
    });
    assert!(summary.finished);
    assert_eq!(summary.rounds.len(), 4, "no round failed");
    for line in &summary.rounds {
        let r = &line.report;
        println!(
            "round {}: {} accepted in {} ms",
            r.round, r.accepted_count, r.duration_ms
        );
        assert_eq!(r.accepted_count, CLIENTS, "round {}", r.round);
        assert_eq!(r.rejected_count, 0);
    }
}

fn small(client: usize) -> Arc<LabelledFeatures> {
    common::synthetic_shard(5, 100, 400 + client as u64)
}
