//! CIFAR loader: plane-to-HWC round trips for CIFAR-10 and CIFAR-100, and every rejection.

mod common;

use std::path::PathBuf;

use common::{Bytes, gzip, write};
use datasets::{
    CIFAR10_CLASSES, CIFAR100_COARSE_CLASSES, CIFAR100_FINE_CLASSES, CifarKind, DatasetError,
    Limits, read_cifar,
};
use tempfile::TempDir;

const PLANE: usize = 32 * 32;

/// A record: the label bytes, then the red, green and blue planes.
fn record(labels: &[u8], planes: &[u8]) -> Vec<u8> {
    assert_eq!(planes.len(), 3 * PLANE);
    [labels, planes].concat()
}

/// The sample at row `y`, column `x`, channel `c` as CIFAR stores it.
fn planar(planes: &[u8], y: usize, x: usize, c: usize) -> u8 {
    planes[c * PLANE + y * 32 + x]
}

fn assert_hwc_matches_planes(image: &datasets::Image, planes: &[u8]) {
    assert_eq!((image.width, image.height, image.channels), (32, 32, 3));
    assert_eq!(image.pixels.len(), 3 * PLANE);
    for y in 0..32 {
        for x in 0..32 {
            for c in 0..3 {
                assert_eq!(
                    image.pixels[(y * 32 + x) * 3 + c],
                    planar(planes, y, x, c),
                    "y={y} x={x} c={c}"
                );
            }
        }
    }
}

#[test]
fn cifar10_records_round_trip_as_interleaved_rgb() {
    let dir = TempDir::new().unwrap();
    let mut rng = Bytes::new(3);
    let planes: Vec<Vec<u8>> = (0..3).map(|_| rng.take(3 * PLANE)).collect();
    let labels = [7u8, 0, 9];
    let bytes: Vec<u8> = labels
        .iter()
        .zip(&planes)
        .flat_map(|(&l, p)| record(&[l], p))
        .collect();
    let batch = write(dir.path(), "data_batch_1.bin", &bytes);

    let set = read_cifar(&[batch], CifarKind::Ten, &Limits::default()).unwrap();
    assert_eq!(set.labels, [7, 0, 9]);
    assert_eq!(set.class_names, CIFAR10_CLASSES);
    assert_eq!(set.len(), 3);
    for (image, planes) in set.images.iter().zip(&planes) {
        assert_hwc_matches_planes(image, planes);
    }
}

#[test]
fn batches_are_concatenated_in_the_order_given() {
    let dir = TempDir::new().unwrap();
    let mut rng = Bytes::new(4);
    let (a, b) = (rng.take(3 * PLANE), rng.take(3 * PLANE));
    let first = write(dir.path(), "b1", &record(&[1], &a));
    let second = write(dir.path(), "b2.gz", &gzip(&record(&[2], &b)));

    let set = read_cifar(&[second, first], CifarKind::Ten, &Limits::default()).unwrap();
    assert_eq!(set.labels, [2, 1]);
    assert_hwc_matches_planes(&set.images[0], &b);
    assert_hwc_matches_planes(&set.images[1], &a);
}

#[test]
fn cifar100_returns_the_fine_or_the_coarse_label() {
    let dir = TempDir::new().unwrap();
    let mut rng = Bytes::new(5);
    let planes = rng.take(3 * PLANE);
    // (coarse, fine) pairs at the top of each range.
    let bytes = [record(&[19, 99], &planes), record(&[4, 0], &planes)].concat();
    let batch = write(dir.path(), "train.bin", &bytes);

    let fine = read_cifar(&[&batch], CifarKind::HundredFine, &Limits::default()).unwrap();
    assert_eq!(fine.labels, [99, 0]);
    assert_eq!(fine.class_names, CIFAR100_FINE_CLASSES);
    assert_hwc_matches_planes(&fine.images[0], &planes);

    let coarse = read_cifar(&[batch], CifarKind::HundredCoarse, &Limits::default()).unwrap();
    assert_eq!(coarse.labels, [19, 4]);
    assert_eq!(coarse.class_names, CIFAR100_COARSE_CLASSES);
    assert_eq!(coarse.images, fine.images);
}

#[test]
fn a_partial_record_is_truncated() {
    let dir = TempDir::new().unwrap();
    let mut bytes = record(&[1], &[0; 3 * PLANE]).repeat(2);
    bytes.truncate(3073 + 100);
    let raw = write(dir.path(), "short.bin", &bytes);
    match read_cifar(&[&raw], CifarKind::Ten, &Limits::default()).unwrap_err() {
        DatasetError::Truncated {
            path,
            expected,
            actual,
        } => {
            assert_eq!(path, raw);
            assert_eq!((expected, actual), (2 * 3073, 3073 + 100));
        }
        err => panic!("expected Truncated, got {err:?}"),
    }

    let gz = write(dir.path(), "short.bin.gz", &gzip(&bytes));
    let err = read_cifar(&[gz], CifarKind::Ten, &Limits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::Truncated {
                expected: 6146,
                actual: 3173,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_cifar10_batch_read_as_cifar100_is_rejected() {
    let dir = TempDir::new().unwrap();
    let batch = write(dir.path(), "b", &record(&[3], &[0; 3 * PLANE]).repeat(3));
    let err = read_cifar(&[batch], CifarKind::HundredFine, &Limits::default()).unwrap_err();
    assert!(matches!(err, DatasetError::Truncated { .. }), "{err:?}");
}

#[test]
fn empty_batch_file_and_empty_batch_list_are_empty_datasets() {
    let dir = TempDir::new().unwrap();
    for name in ["empty.bin", "empty.gz"] {
        let bytes = if name.ends_with(".gz") {
            gzip(&[])
        } else {
            vec![]
        };
        let batch = write(dir.path(), name, &bytes);
        let err = read_cifar(&[&batch], CifarKind::Ten, &Limits::default()).unwrap_err();
        assert!(
            matches!(&err, DatasetError::EmptyDataset { path, .. } if *path == batch),
            "{name}: {err:?}"
        );
    }
    let err = read_cifar::<PathBuf>(&[], CifarKind::Ten, &Limits::default()).unwrap_err();
    assert!(matches!(err, DatasetError::EmptyDataset { .. }), "{err:?}");
}

#[test]
fn labels_out_of_range_name_the_record() {
    let dir = TempDir::new().unwrap();
    let planes = [0u8; 3 * PLANE];
    let cases: [(CifarKind, Vec<u8>, u32, usize); 4] = [
        (
            CifarKind::Ten,
            [record(&[9], &planes), record(&[10], &planes)].concat(),
            10,
            10,
        ),
        (CifarKind::HundredFine, record(&[0, 100], &planes), 100, 100),
        // A bad coarse label is a damaged record even when the fine label is the one asked for.
        (CifarKind::HundredFine, record(&[20, 5], &planes), 20, 20),
        (
            CifarKind::HundredCoarse,
            record(&[3, 255], &planes),
            255,
            100,
        ),
    ];
    for (kind, bytes, bad, classes) in cases {
        let batch = write(dir.path(), "b", &bytes);
        let index = (bytes.len() / kind.record_len() - 1) as u64;
        let err = read_cifar(&[batch], kind, &Limits::default()).unwrap_err();
        assert!(
            matches!(err, DatasetError::LabelOutOfRange { index: i, label, num_classes, .. }
                if i == index && label == bad && num_classes == classes),
            "{kind:?}: {err:?}"
        );
    }
}

#[test]
fn image_count_limit_spans_all_batches() {
    let dir = TempDir::new().unwrap();
    let two = record(&[0], &[0; 3 * PLANE]).repeat(2);
    let batches: Vec<PathBuf> = ["a", "b.gz"]
        .into_iter()
        .map(|name| {
            let bytes = if name.ends_with(".gz") {
                gzip(&two)
            } else {
                two.clone()
            };
            write(dir.path(), name, &bytes)
        })
        .collect();
    let limits = Limits {
        max_images: 3,
        ..Limits::default()
    };
    let err = read_cifar(&batches, CifarKind::Ten, &limits).unwrap_err();
    assert!(
        matches!(&err, DatasetError::LimitExceeded { path, limit: "max_images", value: 4, max: 3 }
            if *path == batches[1]),
        "{err:?}"
    );
    // The raw file's length is checked before any record is read.
    let err = read_cifar(
        &batches[..1],
        CifarKind::Ten,
        &Limits {
            max_images: 1,
            ..limits
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LimitExceeded {
                limit: "max_images",
                value: 2,
                max: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn byte_and_side_limits_apply() {
    let dir = TempDir::new().unwrap();
    let batch = write(dir.path(), "b", &record(&[0], &[0; 3 * PLANE]).repeat(2));
    let small = Limits {
        max_total_bytes: 3 * PLANE as u64,
        ..Limits::default()
    };
    let err = read_cifar(&[&batch], CifarKind::Ten, &small).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LimitExceeded {
                limit: "max_total_bytes",
                ..
            }
        ),
        "{err:?}"
    );
    let narrow = Limits {
        max_side: 31,
        ..Limits::default()
    };
    let err = read_cifar(&[batch], CifarKind::Ten, &narrow).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LimitExceeded {
                limit: "max_side",
                value: 32,
                max: 31,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn missing_batch_is_io_naming_the_path() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("data_batch_9.bin");
    let err = read_cifar(&[&missing], CifarKind::Ten, &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, DatasetError::Io { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("data_batch_9.bin"), "{err}");
}

#[test]
fn class_name_tables_have_the_published_sizes_and_order() {
    assert_eq!(CIFAR10_CLASSES[0], "airplane");
    assert_eq!(CIFAR10_CLASSES[9], "truck");
    // The CIFAR-100 meta files list both tables alphabetically.
    for table in [&CIFAR100_FINE_CLASSES[..], &CIFAR100_COARSE_CLASSES[..]] {
        assert!(table.windows(2).all(|w| w[0] < w[1]), "{table:?}");
    }
    assert_eq!(CIFAR100_FINE_CLASSES.len(), 100);
    assert_eq!(CIFAR100_COARSE_CLASSES.len(), 20);
    assert_eq!(CifarKind::Ten.class_names().len(), 10);
}

#[test]
fn corrupted_records_never_panic() {
    let dir = TempDir::new().unwrap();
    let mut rng = Bytes::new(11);
    let valid = record(&[1, 2], &rng.take(3 * PLANE)).repeat(2);
    for round in 0..200 {
        let mut bytes = valid.clone();
        let cut = (rng.next_u64() % (bytes.len() as u64 + 1)) as usize;
        bytes.truncate(cut);
        if !bytes.is_empty() {
            let at = (rng.next_u64() % bytes.len() as u64) as usize;
            bytes[at] = rng.next_u64() as u8;
        }
        let bytes = if round % 2 == 0 { bytes } else { gzip(&bytes) };
        let batch = write(dir.path(), "fuzz", &bytes);
        for kind in [
            CifarKind::Ten,
            CifarKind::HundredFine,
            CifarKind::HundredCoarse,
        ] {
            let _ = read_cifar(&[&batch], kind, &Limits::default());
        }
    }
}
