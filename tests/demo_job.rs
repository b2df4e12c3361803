//! The main job's binary runs end to end on a small configuration and writes its results.

use std::process::Command;

#[test]
fn demo_binary_writes_results_for_every_strategy() {
    let out = std::env::temp_dir().join(format!("wsa-demo-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .args([
            "--clients",
            "4",
            "--rounds",
            "3",
            "--local-epochs",
            "1",
            "--train-samples",
            "800",
        ])
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run wsa-fl");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains("| fedavg |") && stdout.contains("| wsa("),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let strategies = json["strategies"].as_array().unwrap();
    assert_eq!(strategies.len(), 3);
    for s in strategies {
        let acc = s["test_accuracy"].as_array().unwrap();
        assert_eq!(acc.len(), 3);
        // Ten classes: anything learned shows above chance.
        assert!(acc[2].as_f64().unwrap() > 0.2, "{s}");
    }
    std::fs::remove_dir_all(&out).ok();

    let bad = Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .args(["--clients", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at least one client"));
}
