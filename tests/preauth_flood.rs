//! Strangers flooding the aggregator before authentication, while honest clients join: a real
//! aggregator over QUIC in this process, honest clients on 127.0.0.1, and a flood from a child
//! process on 127.0.0.2 (loopback, another address), so this process's memory is the
//! aggregator's (and the honest clients'):
//!
//! - handshake-less: a captured QUIC Initial replayed from many ports, as a spoofing flooder
//!   sends it. Address validation answers each with a stateless retry, so the server keeps no
//!   connection for any of them;
//! - hello-less: real QUIC clients that finish the handshake and then say nothing, in a loop.
//!   The per-address cap refuses all but a few at once, and those are closed at the hello
//!   deadline.
//!
//! The same flood runs against the shipped limits (`ServerOptions::new`) and against the
//! limits the server had before them (no address validation, no per-address cap or separate
//! budget, 10 s to say hello). The test times how long the honest clients take from
//! connecting to their welcome, quiet and flooded, and reads this process's memory. The
//! figures go to stderr (`--nocapture`) and `target/bench/preauth_flood.json`;
//! docs/reliability.md quotes them.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aggregator::server::ServerOptions;
use aggregator::tls::{layout, token_path};
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use protocol::quic::{QuicLimits, read_message, write_message};
use protocol::{Auth, Capabilities, Hello, Limits, Message, PROTOCOL_VERSION, client_id};
use serde_json::{Value, json};
use wsa::HeadSpec;
use wsa_fl::fleet::{Deployment, spawn_server};

const HONEST: usize = 4;
/// Hello-less connection attempts running at once (each reconnects when refused or closed),
/// over `SILENT_ENDPOINTS` sockets.
const SILENT: usize = 2500;
const SILENT_ENDPOINTS: usize = 25;
/// Distinct Initials (each a new connection id) replayed, at this rate.
const INITIALS: usize = 2500;
const REPLAYS_PER_S: usize = 5000;
/// How long an honest client keeps trying to join before the test calls it locked out.
const JOIN_PATIENCE: Duration = Duration::from_secs(15);
/// The flood's target and credentials, for the child process.
const FLOOD_ENV: &str = "WSA_FLOOD_TARGET";

/// This process's resident memory, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn client_endpoint(ca: &std::path::Path, bind: &str) -> quinn::Endpoint {
    let config = protocol::quic::client_config(ca, &QuicLimits::default()).unwrap();
    let mut endpoint = quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// Connects as `id`, says hello and returns how long the welcome took (refused at the gate, it
/// retries, as the edge client does), or `None` when it got no welcome within
/// [`JOIN_PATIENCE`].
async fn join(deployment: &Deployment, addr: SocketAddr, id: &str) -> Option<Duration> {
    let endpoint = client_endpoint(&deployment.creds().join(layout::CA_CERT), "127.0.0.1:0");
    let token = std::fs::read_to_string(token_path(deployment.creds(), id)).unwrap();
    let started = Instant::now();
    loop {
        let attempt = async {
            let conn = endpoint.connect(addr, "localhost").ok()?.await.ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let hello = Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client_id: id.into(),
                auth: Auth::Token(token.trim().as_bytes().to_vec()),
                capabilities: Capabilities::default(),
                n_samples: 10,
                held: None,
            });
            write_message(&mut send, &hello).await.ok()?;
            match read_message(&mut recv, &Limits::default())
                .await
                .ok()?
                .message
            {
                Message::Welcome(_) => Some(conn),
                _ => None,
            }
        };
        let left = JOIN_PATIENCE.checked_sub(started.elapsed())?;
        if let Ok(Some(conn)) = tokio::time::timeout(left, attempt).await {
            let took = started.elapsed();
            conn.close(0u32.into(), b"measured");
            return Some(took);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` distinct QUIC Initials (each with a connection id of its own), as clients send them,
/// captured on a socket of ours: what a spoofing flooder sends.
async fn captured_initials(ca: &std::path::Path, n: usize) -> Vec<Vec<u8>> {
    let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let endpoint = client_endpoint(ca, "127.0.0.1:0");
    let mut seen = std::collections::HashSet::new();
    let mut initials = Vec::new();
    let mut pending = Vec::new();
    while initials.len() < n {
        pending.push(
            endpoint
                .connect(trap.local_addr().unwrap(), "localhost")
                .unwrap(),
        );
        let mut packet = vec![0u8; 2048];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), trap.recv_from(&mut packet))
            .await
            .expect("the client sends its Initial")
            .unwrap();
        packet.truncate(len);
        // Retransmissions of an earlier attempt repeat its connection id.
        if packet.len() >= 1200 && seen.insert(packet[..32].to_vec()) {
            initials.push(packet);
        }
    }
    initials
}

/// The flood, in a child process: `WSA_FLOOD_TARGET=ADDR,CA_PEM`. Runs until killed; prints
/// its counts every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_flood() {
    let Ok(target) = std::env::var(FLOOD_ENV) else {
        return;
    };
    let (addr, ca) = target.split_once(',').unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    let ca = std::path::PathBuf::from(ca);
    let initials = captured_initials(&ca, INITIALS).await;
    let attempts = Arc::new(AtomicU64::new(0));
    let endpoints: Vec<quinn::Endpoint> = (0..SILENT_ENDPOINTS)
        .map(|_| client_endpoint(&ca, "127.0.0.2:0"))
        .collect();
    for i in 0..SILENT {
        let endpoint = endpoints[i % SILENT_ENDPOINTS].clone();
        let attempts = Arc::clone(&attempts);
        tokio::spawn(async move {
            loop {
                attempts.fetch_add(1, Ordering::Relaxed);
                match endpoint.connect(addr, "localhost") {
                    Ok(connecting) => {
                        if let Ok(conn) = connecting.await {
                            // Silent until the server gives up on it.
                            let _ =
                                tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
    let replayed = Arc::new(AtomicU64::new(0));
    std::thread::spawn({
        let replayed = Arc::clone(&replayed);
        move || {
            let sockets: Vec<UdpSocket> = (0..20)
                .map(|_| UdpSocket::bind("127.0.0.2:0").unwrap())
                .collect();
            for (k, initial) in initials.iter().cycle().enumerate() {
                let _ = sockets[k % sockets.len()].send_to(initial, addr);
                replayed.fetch_add(1, Ordering::Relaxed);
                if k % (REPLAYS_PER_S / 10) == 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "FLOOD {} {}",
            attempts.load(Ordering::Relaxed),
            replayed.load(Ordering::Relaxed)
        );
    }
}

/// The flood in its child process, and its latest counts as it prints them: hello-less
/// connection attempts, replayed Initials.
struct Flood {
    child: Child,
    counts: Arc<std::sync::Mutex<Option<(u64, u64)>>>,
    reader: std::thread::JoinHandle<()>,
}

fn start_flood(addr: SocketAddr, deployment: &Deployment) -> Flood {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_flood", "--nocapture", "--test-threads=1"])
        .env(
            FLOOD_ENV,
            format!(
                "{addr},{}",
                deployment.creds().join(layout::CA_CERT).display()
            ),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let counts = Arc::new(std::sync::Mutex::new(None));
    let reader = std::thread::spawn({
        let counts = Arc::clone(&counts);
        move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let parsed = line.strip_prefix("FLOOD ").and_then(|l| {
                    let mut parts = l.split_whitespace().map(|x| x.parse().ok());
                    Some((parts.next()??, parts.next()??))
                });
                if parsed.is_some() {
                    *counts.lock().unwrap() = parsed;
                }
            }
        }
    });
    Flood {
        child,
        counts,
        reader,
    }
}

impl Flood {
    fn counts(&self) -> Option<(u64, u64)> {
        *self.counts.lock().unwrap()
    }

    /// Waits until the flood is under way: it captures its Initials first, which takes
    /// seconds on a loaded machine, and the honest clients must meet the flood, not its set-up.
    async fn under_way(&self) {
        let started = Instant::now();
        while self.counts().is_none_or(|(_, replayed)| replayed == 0) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the flood did not start within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the flood; its last counts.
    fn finish(mut self) -> (u64, u64) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let last = Arc::clone(&self.counts);
        let _ = self.reader.join();
        let counts = *last.lock().unwrap();
        counts.unwrap_or((0, 0))
    }
}

/// Honest joins quiet and flooded against a server with `options`; the figures as JSON.
async fn measure(deployment: &Deployment, ids: &[String], options: ServerOptions) -> Value {
    let limits = json!({
        "max_unauthenticated": options.max_unauthenticated,
        "max_per_address": if options.max_per_address == usize::MAX { None } else { Some(options.max_per_address) },
        "validate_addresses": options.validate_addresses,
        "hello_timeout_s": options.hello_timeout.as_secs_f64(),
    });
    let server = deployment.bind(options).unwrap();
    let addr = server.local_addr().unwrap();
    // A run that never opens a round (it waits for more clients than there are): only
    // joining is measured.
    let mut config = EngineConfig::new(9, HeadSpec::linear(8, 2), Strategy::FedAvg);
    config.min_connected = HONEST + 1;
    config.quorum = HONEST + 1;
    let (handle, stop) = spawn_server(server, Engine::new(config).unwrap());
    let rss_quiet = rss_kib();
    let mut quiet = Vec::new();
    for id in ids {
        quiet.push(join(deployment, addr, id).await);
    }
    let flood = start_flood(addr, deployment);
    // Let the flood fill the gate before the honest clients come, then join them twice.
    flood.under_way().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut flooded = Vec::new();
    for _ in 0..2 {
        for id in ids {
            flooded.push(join(deployment, addr, id).await);
        }
    }
    let rss_flooded = rss_kib();
    let (attempts, replayed) = flood.finish();
    let _ = stop.send(true);
    handle.await.unwrap().unwrap();
    // Milliseconds to the welcome, or null for a client locked out.
    let ms = |d: &[Option<Duration>]| {
        d.iter()
            .map(|d| d.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0))
            .collect::<Vec<_>>()
    };
    json!({
        "limits": limits,
        "join_ms_quiet": ms(&quiet),
        "join_ms_flooded": ms(&flooded),
        "silent_connection_attempts": attempts,
        "replayed_initials": replayed,
        "rss_kib_quiet": rss_quiet,
        "rss_kib_flooded": rss_flooded,
        "locked_out": flooded.iter().filter(|d| d.is_none()).count(),
        "slowest_flooded_ms": flooded.iter().flatten().max().map(|d| d.as_secs_f64() * 1e3),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_clients_join_through_a_pre_auth_flood() {
    if std::env::var(FLOOD_ENV).is_ok() {
        return;
    }
    support::logging::init_for_tests("error");
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..HONEST).map(client_id).collect();
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let any = ([127, 0, 0, 1], 0).into();

    let shipped = ServerOptions::new(any, deployment.creds()).unwrap();
    let guarded = measure(&deployment, &ids, shipped).await;
    let before = ServerOptions {
        max_unauthenticated: 2048,
        max_per_address: usize::MAX,
        validate_addresses: false,
        hello_timeout: Duration::from_secs(10),
        ..ServerOptions::new(any, deployment.creds()).unwrap()
    };
    let unguarded = measure(&deployment, &ids, before).await;
    let report = json!({
        "honest_clients": HONEST,
        "silent_connection_attempts_at_once": SILENT,
        "distinct_initials": INITIALS,
        "replays_per_s": REPLAYS_PER_S,
        "shipped_limits": guarded,
        "limits_before_issue_16": unguarded,
    });
    eprintln!("{report:#}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("preauth_flood.json"), format!("{report:#}\n"));

    // Under the shipped limits every honest client gets in within a few seconds, and the
    // flood holds no more than the gate lets it (memory within tens of MiB).
    assert_eq!(guarded["locked_out"], 0, "{guarded:#}");
    let slowest = guarded["slowest_flooded_ms"].as_f64().unwrap();
    assert!(
        slowest < 5_000.0,
        "an honest client took {slowest} ms to join"
    );
    let (quiet, flooded) = (
        guarded["rss_kib_quiet"].as_u64().unwrap(),
        guarded["rss_kib_flooded"].as_u64().unwrap(),
    );
    assert!(
        flooded < quiet + 100 * 1024,
        "memory grew from {quiet} to {flooded} KiB"
    );
    assert!(guarded["replayed_initials"].as_u64().unwrap() > 1000);
}
