//! What the integration tests that run the real backbone share.

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
