//! Real images through the real backbone into the feature cache: a first call builds it, a
//! second reads it back identically, another input side or a corrupted file forces a rebuild.
//! Needs the model (scripts/fetch-model.sh) and Fashion-MNIST (scripts/fetch-fashion-mnist.sh);
//! SKIPPED without them unless `WSA_REQUIRE_MODEL=1`.

use std::path::Path;

use datasets::{FASHION_MNIST_CLASSES, ImageSet, Limits};
use edge_client::cache::CacheOutcome;
use edge_client::{Backbone, cached_features};

#[test]
fn real_images_are_extracted_once_and_cached() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("models/mobilenet_v2_features.onnx");
    let data = root.join("data/fashion-mnist");
    if !model.exists() || !data.join("t10k-images-idx3-ubyte.gz").exists() {
        assert!(
            std::env::var("WSA_REQUIRE_MODEL").as_deref() != Ok("1"),
            "WSA_REQUIRE_MODEL=1 but the model or Fashion-MNIST is missing"
        );
        eprintln!(
            "SKIPPED: model or Fashion-MNIST missing (scripts/fetch-model.sh, scripts/fetch-fashion-mnist.sh)"
        );
        return;
    }
    let names = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let full = datasets::read_idx(
        &data.join("t10k-images-idx3-ubyte.gz"),
        &data.join("t10k-labels-idx1-ubyte.gz"),
        Some(names),
        &Limits::default(),
    )
    .unwrap();
    let set = ImageSet {
        images: full.images[..24].to_vec(),
        labels: full.labels[..24].to_vec(),
        class_names: full.class_names.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("t10k-head.feat");
    let backbone = Backbone::load(&model, 64).unwrap();

    let (first, outcome) = cached_features(&backbone, &set, &cache, 2, false).unwrap();
    assert!(matches!(outcome, CacheOutcome::Built { .. }));
    assert_eq!((first.len(), first.dim()), (24, 1280));
    assert_eq!(first.labels(), &set.labels[..]);
    // ReLU6 features of real images: non-negative, bounded, not all zero.
    assert!(first.x().iter().all(|&v| (0.0..=6.0).contains(&v)));
    assert!(first.x().iter().any(|&v| v > 0.1));
    // One thread or two: the same features.
    assert_eq!(backbone.extract(&set.images, 1, false).unwrap(), first.x());

    let (again, outcome) = cached_features(&backbone, &set, &cache, 2, false).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    assert_eq!(again, first);

    let other_side = Backbone::load(&model, 96).unwrap();
    let (resized, outcome) = cached_features(&other_side, &set, &cache, 2, false).unwrap();
    assert!(
        matches!(outcome, CacheOutcome::Built { ref reason } if reason.contains("input side")),
        "{outcome:?}"
    );
    assert_ne!(resized.x(), first.x());

    let mut bytes = std::fs::read(&cache).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&cache, bytes).unwrap();
    let (rebuilt, outcome) = cached_features(&other_side, &set, &cache, 2, false).unwrap();
    assert!(
        matches!(outcome, CacheOutcome::Built { ref reason } if reason.contains("corrupt")),
        "{outcome:?}"
    );
    assert_eq!(rebuilt, resized);
}
