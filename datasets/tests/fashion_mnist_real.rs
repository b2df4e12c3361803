//! Reads the real Fashion-MNIST test split when it is on this machine (Debian package
//! `dataset-fashion-mnist`, or `scripts/fetch-fashion-mnist.sh` into `data/`).

use std::path::{Path, PathBuf};

use datasets::{FASHION_MNIST_CLASSES, Limits, read_idx};

fn find_dataset() -> Option<PathBuf> {
    let repo_copy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist");
    [
        PathBuf::from("/usr/share/datasets/fashion-mnist"),
        repo_copy,
    ]
    .into_iter()
    .find(|dir| dir.join("t10k-images-idx3-ubyte.gz").is_file())
}

#[test]
fn real_fashion_mnist_test_split_loads_completely() {
    let Some(dir) = find_dataset() else {
        eprintln!(
            "SKIPPED real_fashion_mnist_test_split_loads_completely: Fashion-MNIST not found in \
             /usr/share/datasets/fashion-mnist or data/fashion-mnist \
             (run scripts/fetch-fashion-mnist.sh)"
        );
        return;
    };
    let names = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let set = read_idx(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        Some(names),
        &Limits::default(),
    )
    .unwrap();

    assert_eq!(set.len(), 10_000);
    assert_eq!(set.labels.len(), 10_000);
    assert!(
        set.images
            .iter()
            .all(|im| (im.width, im.height, im.channels, im.pixels.len()) == (28, 28, 1, 784))
    );
    // The test split is balanced: 1,000 of each class.
    let mut per_class = [0usize; 10];
    for &label in &set.labels {
        per_class[label as usize] += 1;
    }
    assert_eq!(per_class, [1000; 10]);
    // Real photos of clothing, not blank or saturated frames.
    let mean = set
        .images
        .iter()
        .flat_map(|im| &im.pixels)
        .map(|&p| p as f64)
        .sum::<f64>()
        / (10_000.0 * 784.0);
    assert!((40.0..120.0).contains(&mean), "mean pixel {mean}");
}
