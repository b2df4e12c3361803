//! A pool of virtual clients (`wsa-fl --workers`): worker processes act as each round's
//! sampled clients over real QUIC and give the run every client staying connected gives, bit
//! for bit: with a partition and with a recipe, through failed rounds, and with the workers
//! started by hand as they would be on other machines.

mod common;

use std::path::Path;
use std::process::{Command, Output};

/// 24 synthetic clients, 6 a round, 3 rounds: seconds to run.
const FLEET: [&str; 16] = [
    "--synthetic",
    "--clients",
    "24",
    "--per-round",
    "6",
    "--rounds",
    "3",
    "--train-limit",
    "2400",
    "--test-limit",
    "400",
    "--hidden",
    "16",
    "--seeds",
    "3",
    "--no-centralized",
];

fn wsa_fl(args: &[&str], out: &Path) -> Output {
    common::wsa_fl(&[&FLEET[..], args].concat(), out)
}

/// The model's trajectory in `rounds.csv`: the columns `scripts/compare-rounds.py` holds to
/// the bit, and the attempts. (Timing, frame sizes and the drift diagnostics, summed in
/// arrival order, differ between any two runs.)
fn trajectory(out: &Path) -> Vec<String> {
    let csv = std::fs::read_to_string(out.join("rounds.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let keep: Vec<usize> = [
        "strategy",
        "seed",
        "round",
        "test_accuracy",
        "validation_accuracy",
        "test_loss",
        "train_loss",
        "accepted",
        "attempt",
        "failed",
    ]
    .iter()
    .map(|c| header.iter().position(|h| h == c).unwrap())
    .collect();
    csv.lines()
        .map(|l| {
            let values: Vec<&str> = l.split(',').collect();
            keep.iter()
                .map(|&i| values[i])
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// Runs `args` with every client connected and with a pool of 3 workers; the trajectories
/// must be equal, and the pool's fleet has no token file per client.
fn pool_matches_all_alive(args: &[&str]) -> Vec<String> {
    let (alive, pool) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    wsa_fl(args, alive.path());
    let run = wsa_fl(&[args, &["--workers", "3"]].concat(), pool.path());
    let (a, b) = (trajectory(alive.path()), trajectory(pool.path()));
    assert!(a.len() > 3, "{a:?}");
    assert_eq!(a, b);
    let tokens = std::fs::read_dir(pool.path().join("creds/clients"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("token".as_ref()))
        .count();
    assert_eq!(tokens, 0, "a pool derives its tokens");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pool.path().join("summary.json")).unwrap()).unwrap();
    let workers = summary["workers_peak_rss_mib"].as_array().unwrap();
    assert_eq!(workers.len(), 3);
    assert!(
        workers.iter().all(|w| w.as_f64().unwrap() > 1.0),
        "{summary}"
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("peak RSS of the workers"));
    a
}

#[test]
fn a_pool_of_workers_gives_the_all_alive_run_bit_for_bit() {
    pool_matches_all_alive(&["--strategies", "fedavg,wsa:10:mean-std:mu=0.1"]);
}

#[test]
fn a_recipe_fleet_in_a_pool_gives_the_all_alive_run_bit_for_bit() {
    pool_matches_all_alive(&[
        "--strategies",
        "fedprox:0.1",
        "--partition",
        "recipe",
        "--rows",
        "40",
        "--alpha",
        "0.3",
    ]);
}

#[test]
fn workers_follow_failed_rounds_to_their_retries() {
    // A scope-collapsing attacker fails every round it is sampled in (quorum = the sample),
    // and the retry samples afresh: the workers must act as the retry's sample.
    let rows = pool_matches_all_alive(&[
        "--strategies",
        "fedavg",
        "--quorum",
        "6",
        "--byzantine",
        "0.125",
        "--attack",
        "scope-collapse",
    ]);
    let failed = rows.iter().filter(|r| r.ends_with(",true")).count();
    assert!(failed > 0, "no failed attempt to follow:\n{rows:#?}");
}

#[test]
fn workers_started_by_hand_join_a_run_that_waits_for_them() {
    let out = tempfile::tempdir().unwrap();
    // A free port for the aggregator, as a user would pick one.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("127.0.0.1:{port}");
    let coordinator = Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .args(FLEET)
        .args([
            "--strategies",
            "fedavg",
            "--workers",
            "2",
            "--external-workers",
        ])
        .args(["--listen", &server])
        .arg("--out")
        .arg(out.path())
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    // The workers need the run folder's config and credentials, as a copy on another machine
    // would hold them.
    let config = out.path().join("config.json");
    let key = out.path().join("creds/clients/derived-tokens.key");
    for _ in 0..600 {
        if config.exists() && key.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(&config, copy.path().join("config.json")).unwrap();
    std::fs::create_dir_all(copy.path().join("creds/clients")).unwrap();
    for file in ["ca.pem", "clients/derived-tokens.key"] {
        std::fs::copy(
            out.path().join("creds").join(file),
            copy.path().join("creds").join(file),
        )
        .unwrap();
    }
    let workers: Vec<_> = (0..2)
        .map(|index| {
            Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
                .args(["worker", "--fleet"])
                .arg(copy.path())
                .args(["--server", &server, "--seed", "3"])
                .args(["--index", &index.to_string(), "--workers", "2"])
                .env("RUST_LOG", "error")
                .spawn()
                .unwrap()
        })
        .collect();
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
    let output = coordinator.wait_with_output().unwrap();
    assert!(output.status.success());
    let rows = trajectory(out.path());
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(copy.path().join("workers/seed3-worker1.rss").exists());
}
