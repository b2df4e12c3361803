//! The ARM edge client end to end: the cross-built binary (scripts/cross-build.sh), run under
//! qemu-user, joins an x86-64 aggregator on loopback for 2 rounds on real Fashion-MNIST images
//! at a small input side; every update it sends is accepted, and the features it computed (NNEF
//! backbone, ARM kernels) equal the x86-64 ONNX features within 1e-4.
//!
//! `WSA_CROSS_TARGETS=aarch64,armv7` names the targets to check (their binaries must be in
//! `dist/`); unset, the test says SKIPPED. The test script sets it after cross-building.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use edge_client::Backbone;
use edge_client::cache::{CacheKey, digest_images, read_cache};
use edge_client::preprocess::PREPROCESSING_ID;
use protocol::client_id;
use sha2::{Digest, Sha256};
use wsa::{FusionRule, HeadSpec};
use wsa_fl::fleet::{Deployment, spawn_server};

const SIDE: usize = 32;
const IMAGES: usize = 32;
const ROUNDS: u64 = 2;

/// (Rust target, qemu binary, sysroot of the target's Debian libc).
fn target(arch: &str) -> (&'static str, &'static str, &'static str) {
    match arch {
        "aarch64" => (
            "aarch64-unknown-linux-gnu",
            "qemu-aarch64",
            "/usr/aarch64-linux-gnu",
        ),
        "armv7" => (
            "armv7-unknown-linux-gnueabihf",
            "qemu-arm",
            "/usr/arm-linux-gnueabihf",
        ),
        other => panic!("WSA_CROSS_TARGETS: unknown target {other:?} (aarch64, armv7)"),
    }
}

#[test]
fn cross_built_clients_join_an_x86_aggregator_under_qemu() {
    let Ok(arches) = std::env::var("WSA_CROSS_TARGETS") else {
        eprintln!("SKIPPED: WSA_CROSS_TARGETS unset (run scripts/cross-build.sh, then set it)");
        return;
    };
    let Some((onnx, set)) = common::model_and_test_images(IMAGES) else {
        return;
    };
    let reference = Backbone::load(&onnx, SIDE)
        .unwrap()
        .extract(&set.images, 2, false)
        .unwrap();
    for arch in arches.split(',').filter(|a| !a.is_empty()) {
        check_target(arch, &set, &reference);
    }
}

fn check_target(arch: &str, set: &datasets::ImageSet, reference: &ndarray::Array2<f32>) {
    let (triple, qemu, sysroot) = target(arch);
    let root = common::root();
    let binary = root.join("dist").join(triple).join("edge-client");
    let nnef = root.join("dist/mobilenet_v2_features.nnef.tgz");
    assert!(
        binary.exists() && nnef.exists(),
        "{} or {} missing: run scripts/cross-build.sh {arch}",
        binary.display(),
        nnef.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let id = client_id(0);
    let deployment =
        Deployment::generate(&dir.path().join("creds"), std::slice::from_ref(&id)).unwrap();
    let mut config = EngineConfig::new(
        5,
        HeadSpec::mlp(1280, &[16], 10),
        Strategy::wsa(10.0, FusionRule::MeanStd),
    );
    config.classes = datasets::FASHION_MNIST_CLASSES.map(String::from).to_vec();
    config.rounds = ROUNDS;
    config.min_connected = 1;
    config.quorum = 1;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let server = deployment.bind_loopback().unwrap();
    let addr = server.local_addr().unwrap();
    let (handle, _stop_server) = spawn_server(server, Engine::new(config).unwrap());

    let cache_dir = dir.path().join("cache");
    let report = dir.path().join("report.json");
    let kept_model = dir.path().join("model");
    let client_config = dir.path().join("client.toml");
    std::fs::write(
        &client_config,
        format!(
            "server = \"{addr}\"\nserver_name = \"localhost\"\nca_cert = {ca:?}\n\
             client_id = \"{id}\"\ntoken_file = {token:?}\ndata = {data:?}\n\
             data_format = \"idx\"\nsplit = \"test\"\nlimit = {IMAGES}\nmodel = {nnef:?}\n\
             side = {SIDE}\ncache_dir = {cache:?}\nthreads = 2\nmax_attempts = 20\n\
             report = {report:?}\nmodel_dir = {kept:?}\n",
            ca = deployment.creds().join(aggregator::tls::layout::CA_CERT),
            token = aggregator::tls::token_path(deployment.creds(), &id),
            data = root.join("data/fashion-mnist"),
            cache = cache_dir,
            kept = kept_model,
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .arg("-L")
        .arg(sysroot)
        .arg(&binary)
        .arg("join")
        .arg("--config")
        .arg(&client_config)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {qemu} (scripts/cross-build.sh installs it): {e}"));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(600) {
            child.kill().unwrap();
            panic!("{arch}: the client under qemu did not finish in 600 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "{arch}: edge-client exited with {status}");
    eprintln!(
        "{arch}: client under qemu finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let summary = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), handle).await })
        .expect("the run ended with the client")
        .unwrap()
        .unwrap();
    assert!(summary.finished, "{arch}: run did not finish");
    assert_eq!(summary.rounds.len() as u64, ROUNDS);
    for line in &summary.rounds {
        assert_eq!(
            line.report.accepted,
            vec![id.clone()],
            "{arch}: {:?}",
            line.report.rejected
        );
    }
    let client_report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let outcomes: Vec<&str> = client_report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["accepted"; ROUNDS as usize], "{arch}");
    // The ARM client kept the run's final model, readable here.
    let kept = wsa::saved::SavedModel::load(&kept_model).unwrap();
    assert_eq!(kept.card.provenance.rounds, ROUNDS, "{arch}");
    assert_eq!(
        kept.card.classes,
        datasets::FASHION_MNIST_CLASSES.map(String::from)
    );

    // The client's feature cache holds what the ARM build computed; its key also proves the
    // image digest and preprocessing id agree across architectures.
    let key = CacheKey {
        backbone_sha256: Sha256::digest(std::fs::read(&nnef).unwrap()).into(),
        side: SIDE as u32,
        preprocessing: PREPROCESSING_ID,
        source_digest: digest_images(set),
    };
    let arm = read_cache(&cache_dir.join(format!("{id}-{SIDE}.feat")), &key).unwrap();
    assert_eq!(arm.x().dim(), reference.dim());
    let max_mag = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_diff = arm
        .x()
        .iter()
        .zip(reference)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{arch}: max |arm nnef − x86-64 onnx| = {max_diff:e} (max |feature| {max_mag})");
    assert!(max_mag > 0.1, "features look empty");
    assert!(max_diff <= 1e-4, "{arch}: features differ by {max_diff}");
}
