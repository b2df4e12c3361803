//! What the root integration tests share: the real backbone and data, or synthetic clients.
// Each test file compiles this module whole and uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use datasets::{ImageSet, Limits, Split};

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The features ONNX and the first `n` Fashion-MNIST test images, or `None` after saying
/// SKIPPED when either is missing; with `WSA_REQUIRE_MODEL=1` (the test script sets it after
/// fetching both) their absence fails the test instead.
pub fn model_and_test_images(n: usize) -> Option<(PathBuf, ImageSet)> {
    let model = root().join("models/mobilenet_v2_features.onnx");
    let data = root().join("data/fashion-mnist");
    if !model.exists() || !data.join("t10k-images-idx3-ubyte.gz").exists() {
        assert!(
            std::env::var("WSA_REQUIRE_MODEL").as_deref() != Ok("1"),
            "WSA_REQUIRE_MODEL=1 but the model or Fashion-MNIST is missing"
        );
        eprintln!(
            "SKIPPED: model or Fashion-MNIST missing (scripts/fetch-model.sh, scripts/fetch-fashion-mnist.sh)"
        );
        return None;
    }
    let mut set = datasets::read_fashion_mnist(&data, Split::Test, &Limits::default()).unwrap();
    set.images.truncate(n);
    set.labels.truncate(n);
    Some((model, set))
}

/// Feature dimensions and classes of the synthetic problem the QUIC tests without a model use.
pub const SYNTHETIC_DIM: usize = 16;
/// See [`SYNTHETIC_DIM`].
pub const SYNTHETIC_CLASSES: usize = 4;

/// `n` labelled rows of synthetic problem `problem_seed`, drawn with `seed`: one client's data.
pub fn synthetic_shard(
    problem_seed: u64,
    n: usize,
    seed: u64,
) -> std::sync::Arc<wsa::LabelledFeatures> {
    let spec = wsa::synthetic::SyntheticSpec {
        classes: SYNTHETIC_CLASSES,
        dim: SYNTHETIC_DIM,
        ..wsa::synthetic::SyntheticSpec::default()
    };
    let problem = wsa::synthetic::SyntheticProblem::new(spec, problem_seed).unwrap();
    std::sync::Arc::new(problem.sample(n, seed).unwrap())
}

/// Runs `wsa-fl` with `args` into `out` and asserts it succeeded.
pub fn wsa_fl(args: &[&str], out: &Path) -> std::process::Output {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_wsa-fl"))
        .args(args)
        .arg("--out")
        .arg(out)
        .env("RUST_LOG", "error")
        .output()
        .expect("run wsa-fl");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    run
}
