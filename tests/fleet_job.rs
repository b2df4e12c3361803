//! The main job's binary: a small fleet (8 clients, 3 rounds, synthetic features) through real
//! QUIC writes a complete run folder: config, partition, per-round CSV and JSON lines, a
//! summary, the markdown table and the plot; a sweep cut short resumes where it stopped.

mod common;

use std::path::Path;
use std::process::Command;

use common::wsa_fl;

/// A fleet of 8 synthetic clients, 4 a round, 3 rounds, small data and head: seconds to run.
const SMALL_FLEET: [&str; 13] = [
    "--synthetic",
    "--clients",
    "8",
    "--per-round",
    "4",
    "--rounds",
    "3",
    "--train-limit",
    "1600",
    "--test-limit",
    "400",
    "--hidden",
    "32",
];

#[test]
fn a_small_fleet_writes_its_run_folder() {
    let out = tempfile::tempdir().unwrap();
    let run = wsa_fl(
        &[
            &SMALL_FLEET[..],
            &[
                "--strategies",
                "fedavg,fedprox:0.01,wsa:10:mixture",
                "--target",
                "0.3",
                "--validation-fraction",
                "0.1",
            ],
        ]
        .concat(),
        out.path(),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    for row in [
        "| fedavg |",
        "| fedprox:0.01 |",
        "| wsa:10:mixture |",
        "| centralized |",
    ] {
        assert!(stdout.contains(row), "{row} missing from\n{stdout}");
    }

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).unwrap()).unwrap();
    let strategies = summary["strategies"].as_array().unwrap();
    assert_eq!(strategies.len(), 4);
    for s in strategies {
        let (mean, _) = (
            s["final_accuracy"][0].as_f64().unwrap(),
            s["final_accuracy"][1].as_f64().unwrap(),
        );
        // Ten classes: anything learned shows above chance.
        assert!(mean > 0.2, "{s}");
    }
    let csv = std::fs::read_to_string(out.path().join("rounds.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4 * 3, "{csv}");
    // Held-out validation accuracy is reported beside the test accuracy, every round.
    for s in strategies {
        let val = s["last10_validation_accuracy"][0].as_f64().unwrap();
        assert!((0.2..=1.0).contains(&val), "{s}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["validation_fraction"].as_f64(), Some(0.1));
    for plot in ["accuracy.png", "drift.png", "targets.png"] {
        let png = std::fs::read(out.path().join(plot)).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000,
            "{plot}"
        );
    }
    for file in [
        "config.json",
        "rounds.jsonl",
        "table.md",
        "partition-seed0.json",
    ] {
        assert!(out.path().join(file).is_file(), "{file}");
    }

    // The same fleet with its clients in two other processes: the same partition and seeds,
    // so the same accepted updates and the same global heads.
    let apart = tempfile::tempdir().unwrap();
    wsa_fl(
        &[
            &SMALL_FLEET[..],
            &[
                "--strategies",
                "fedavg",
                "--no-centralized",
                "--client-processes",
                "2",
                "--validation-fraction",
                "0.1",
            ],
        ]
        .concat(),
        apart.path(),
    );
    let rows = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("rounds.csv"))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("fedavg,"))
            // strategy, seed, round, test and validation accuracy: wall times differ.
            .map(|l| l.split(',').take(5).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(rows(apart.path()), rows(out.path()));

    let bad = Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .args(["--synthetic", "--clients", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let bad = Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .args(["--synthetic", "--strategies", "fedsgd"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown strategy"));
}

/// Attacking clients through the real stack: 30% of the fleet sends its step reversed and
/// stretched; the plain mean follows them, the coordinate-wise median does not.
#[test]
fn sign_flipping_clients_break_the_mean_and_not_the_median() {
    let out = tempfile::tempdir().unwrap();
    // The scope bound refuses some reversed steps; a round of all ten clients must still
    // close with the rest (with the default quorum of all, it retried forever).
    wsa_fl(
        &[
            "--synthetic",
            "--clients",
            "10",
            "--per-round",
            "10",
            "--rounds",
            "6",
            "--partition",
            "iid",
            "--train-limit",
            "2000",
            "--test-limit",
            "500",
            "--hidden",
            "32",
            "--strategies",
            "fedavg",
            "--aggregations",
            "mean,median",
            "--byzantine",
            "0.3",
            "--attack",
            "sign-flip:4",
            "--quorum",
            "6",
            "--no-centralized",
        ],
        out.path(),
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).unwrap()).unwrap();
    let best = |label: &str| {
        summary["strategies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["strategy"] == label)
            .unwrap_or_else(|| panic!("{label} missing from {summary}"))["best_accuracy"][0]
            .as_f64()
            .unwrap()
    };
    let (mean, median) = (best("fedavg"), best("fedavg+median"));
    assert!(
        median > 0.45 && median > mean + 0.25,
        "median {median}, mean {mean}"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["byzantine"]["attack"][0]["kind"], "sign-flip");

    let bad = Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .args(["--synthetic", "--byzantine", "0.2", "--attack", "flip:2"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown attack"));
}

/// A round attempt that fails its quorum stays in the record: one client of eight collapses a
/// tensor (refused at admission), and a round needs every one of its 4 selected clients, so
/// each attempt that selects it fails and the round is tried again with a new selection.
#[test]
fn failed_attempts_stay_in_rounds_csv() {
    let out = tempfile::tempdir().unwrap();
    wsa_fl(
        &[
            &SMALL_FLEET[..],
            &[
                "--quorum",
                "4",
                "--strategies",
                "fedavg",
                "--byzantine",
                "0.125",
                "--attack",
                "scope-collapse",
                "--no-centralized",
            ],
        ]
        .concat(),
        out.path(),
    );
    let csv = std::fs::read_to_string(out.path().join("rounds.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let (failed, closed): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r[12] == "true");
    assert!(!failed.is_empty(), "no failed attempt recorded:\n{csv}");
    // Each failed row names its attempt and has no evaluation; the closed rounds are 0, 1, 2.
    assert!(failed.iter().all(|r| r[3] == "NaN"), "{csv}");
    let rounds: Vec<&str> = closed.iter().map(|r| r[2]).collect();
    assert_eq!(rounds, ["0", "1", "2"], "{csv}");
    let jsonl = std::fs::read_to_string(out.path().join("aggregator-rounds.jsonl")).unwrap();
    assert_eq!(
        jsonl
            .lines()
            .filter(|l| l.contains("\"closed_by\":\"failed\""))
            .count(),
        failed.len()
    );
}

/// Clients hold a fifth of their rows out and report each round's head on them; the sweep is
/// then cut short as a crash would leave it (one run finished, one half done, a torn last
/// line) and `--resume` finishes it: the finished run's rows are kept as they were, the rest
/// run again to the same figures.
#[test]
fn federated_evaluation_and_a_sweep_that_resumes_after_a_crash() {
    let out = tempfile::tempdir().unwrap();
    let args = [
        &SMALL_FLEET[..],
        &["--strategies", "fedavg,wsa:10", "--eval-fraction", "0.2"],
    ]
    .concat();
    wsa_fl(&args, out.path());
    let csv_path = out.path().join("rounds.csv");
    let full = std::fs::read_to_string(&csv_path).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    assert_eq!(lines.len(), 1 + 3 * 3, "{full}");
    let column = |name: &str| lines[0].split(',').position(|c| c == name).unwrap();
    let federated = column("federated_accuracy");
    for line in &lines[1..] {
        let accuracy: f64 = line.split(',').nth(federated).unwrap().parse().unwrap();
        if line.starts_with("centralized,") {
            assert!(accuracy.is_nan(), "{line}");
        } else {
            assert!(accuracy > 0.0 && accuracy <= 1.0, "{line}");
        }
    }
    let jsonl = std::fs::read_to_string(out.path().join("aggregator-rounds.jsonl")).unwrap();
    for line in jsonl.lines() {
        let round: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(round["federated_eval"]["clients"], 4, "{line}");
        // 1,600 rows less a tenth of validation... none here: 1,600 rows over 8 clients, a
        // fifth of the 4 asked clients' rows held out.
        let samples = round["federated_eval"]["samples"].as_u64().unwrap();
        assert!((100..=500).contains(&samples), "{line}");
    }
    let json_rows = std::fs::read_to_string(out.path().join("rounds.jsonl")).unwrap();
    assert_eq!(json_rows.lines().count(), 3 * 3);

    // The crash: fedavg finished, wsa one round in, its second row torn.
    let wsa_rows: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("wsa"))
        .collect();
    let fedavg_rows: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("fedavg,"))
        .collect();
    let torn = &wsa_rows[1][..wsa_rows[1].len() / 3];
    let cut = [&[lines[0]][..], &fedavg_rows, &[wsa_rows[0], torn]]
        .concat()
        .join("\n");
    std::fs::write(&csv_path, cut).unwrap();
    std::fs::remove_file(out.path().join("summary.json")).unwrap();

    let resumed = Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .arg("--resume")
        .arg(out.path())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let after = std::fs::read_to_string(&csv_path).unwrap();
    let after: Vec<&str> = after.lines().collect();
    assert_eq!(after.len(), lines.len(), "{after:?}");
    // Kept byte for byte, wall times included: they did not run again.
    assert_eq!(&after[1..4], &fedavg_rows[..]);
    // strategy, seed, round, test and validation accuracy: the rerun computes the same.
    let figures = |rows: &[&str], prefix: &str| -> Vec<String> {
        rows.iter()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.split(',').take(5).collect::<Vec<_>>().join(","))
            .collect()
    };
    for prefix in ["wsa", "centralized,"] {
        assert_eq!(figures(&after, prefix), figures(&lines, prefix), "{prefix}");
    }
    assert!(out.path().join("summary.json").is_file());
    assert_eq!(
        std::fs::read_to_string(out.path().join("rounds.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3 * 3
    );
}

/// Client-level DP over real QUIC: every counted round reports the ε a second accountant gives
/// for its sampling rate (4 of 8 clients) and noise, and the run ends at its budget, here after
/// two of ten rounds, for FedAvg and for WSA (whose targets are released through the same
/// noised sums).
#[test]
fn a_private_fleet_reports_epsilon_and_stops_at_its_budget() {
    use aggregator_core::privacy::RdpAccountant;
    let (q, z, delta) = (0.5, 1.5, 1.0 / 8.0);
    let mut accountant = RdpAccountant::default();
    let mut expected = Vec::new();
    for _ in 0..3 {
        accountant.compose(q, z, 1);
        expected.push(accountant.epsilon(delta));
    }
    let budget = format!("{}", (expected[1] + expected[2]) / 2.0);
    let out = tempfile::tempdir().unwrap();
    let mut args = SMALL_FLEET.to_vec();
    args[6] = "10"; // --rounds
    wsa_fl(
        &[
            &args[..],
            &[
                "--strategies",
                "fedavg,wsa:10",
                "--no-centralized",
                "--dp-noise",
                "1.5",
                "--dp-clip",
                "adaptive:0.5",
                "--dp-budget",
                &budget,
            ],
        ]
        .concat(),
        out.path(),
    );
    let mut csv = csv::Reader::from_path(out.path().join("rounds.csv")).unwrap();
    let header = csv.headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (strategy, round, epsilon, clip) = (
        column("strategy"),
        column("round"),
        column("epsilon"),
        column("dp_clip"),
    );
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    for name in ["fedavg", "wsa:10:mean-std"] {
        let runs: Vec<&csv::StringRecord> = rows.iter().filter(|r| &r[strategy] == name).collect();
        let rounds: Vec<&str> = runs.iter().map(|r| &r[round]).collect();
        assert_eq!(rounds, ["0", "1"], "{name}: the budget fits two rounds");
        for (r, want) in runs.iter().zip(&expected) {
            let got: f64 = r[epsilon].parse().unwrap();
            assert!((got - want).abs() < 1e-9, "{name}: ε {got} vs {want}");
        }
        assert_eq!(&runs[0][clip], "0.5");
        assert_ne!(&runs[1][clip], "0.5", "{name}: the adaptive clip moved");
    }
}

/// Secure aggregation over real QUIC against the plain protocol, on the same fleet, seeds and
/// uniform weights: every round counts the same clients, and the test accuracy of each round
/// is the plain run's (the ring code moves the head by ~1e-9 a value, the test loss by as
/// little), for FedAvg and for WSA, whose targets are fused from the securely summed scopes.
#[test]
fn a_secure_fleet_matches_the_plain_fleet_within_the_ring_code() {
    let common = [
        "--strategies",
        "fedavg,wsa:10",
        "--no-centralized",
        "--weighting",
        "uniform",
        "--target-fusion",
        "follow-rule",
    ];
    let (plain_dir, secure_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    wsa_fl(&[&SMALL_FLEET[..], &common[..]].concat(), plain_dir.path());
    wsa_fl(
        &[&SMALL_FLEET[..], &common[..], &["--secure"]].concat(),
        secure_dir.path(),
    );
    let rows = |dir: &Path| -> Vec<(String, String, f64, f64, String)> {
        let mut csv = csv::Reader::from_path(dir.join("rounds.csv")).unwrap();
        let header = csv.headers().unwrap().clone();
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let (s, r, acc, loss, n) = (
            col("strategy"),
            col("round"),
            col("test_accuracy"),
            col("test_loss"),
            col("accepted"),
        );
        csv.records()
            .map(Result::unwrap)
            .map(|row| {
                (
                    row[s].to_owned(),
                    row[r].to_owned(),
                    row[acc].parse().unwrap(),
                    row[loss].parse().unwrap(),
                    row[n].to_owned(),
                )
            })
            .collect()
    };
    let (plain, secure) = (rows(plain_dir.path()), rows(secure_dir.path()));
    assert_eq!(plain.len(), 6, "two strategies, three rounds: {plain:?}");
    assert_eq!(plain.len(), secure.len());
    for (p, s) in plain.iter().zip(&secure) {
        assert_eq!(
            (&p.0, &p.1, &p.4),
            (&s.0, &s.1, &s.4),
            "same round, same clients"
        );
        assert_eq!(p.2, s.2, "{} round {}: test accuracy", p.0, p.1);
        assert!(
            (p.3 - s.3).abs() < 1e-5,
            "{} round {}: loss {} vs {}",
            p.0,
            p.1,
            p.3,
            s.3
        );
    }
    let report =
        std::fs::read_to_string(secure_dir.path().join("aggregator-rounds.jsonl")).unwrap();
    assert!(
        report.contains("\"secure\":{\"participants\":4"),
        "{report}"
    );
}

/// DP under secure aggregation over real QUIC: the clients clip and noise their own steps
/// (the aggregator sees only the noised sum), every round reports the ε a second accountant
/// gives for q = 4/8 and z, and the head learns as under central DP with the same clip (which
/// slows this small fleet to ~0.17 after three rounds, either way).
#[test]
fn a_secure_private_fleet_reports_epsilon_from_client_noise() {
    use aggregator_core::privacy::RdpAccountant;
    let out = tempfile::tempdir().unwrap();
    wsa_fl(
        &[
            &SMALL_FLEET[..],
            &[
                "--strategies",
                "fedavg",
                "--no-centralized",
                "--secure",
                "--dp-noise",
                "0.3",
                "--dp-clip",
                "0.5",
            ],
        ]
        .concat(),
        out.path(),
    );
    let mut csv = csv::Reader::from_path(out.path().join("rounds.csv")).unwrap();
    let header = csv.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (epsilon, accuracy) = (col("epsilon"), col("test_accuracy"));
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3);
    let mut accountant = RdpAccountant::default();
    for row in &rows {
        accountant.compose(0.5, 0.3, 1);
        let got: f64 = row[epsilon].parse().unwrap();
        let want = accountant.epsilon(1.0 / 8.0);
        assert!((got - want).abs() < 1e-9, "ε {got} vs {want}");
    }
    let last: f64 = rows[2][accuracy].parse().unwrap();
    assert!(
        last > 0.12,
        "ten classes, three clipped and noised rounds: {last}"
    );
    let report = std::fs::read_to_string(out.path().join("aggregator-rounds.jsonl")).unwrap();
    assert!(report.contains("\"secure\":{"), "{report}");
}
