//! IDX loader: round trips (raw and gzip) and every rejection, each as its typed error.

mod common;

use std::path::{Path, PathBuf};

use common::{Bytes, gzip, idx_header, idx_images, idx_labels, write};
use datasets::{DatasetError, FASHION_MNIST_CLASSES, Limits, MNIST_CLASSES, read_idx};
use tempfile::TempDir;

const COUNT: u32 = 3;
const ROWS: u32 = 2;
const COLS: u32 = 4;
const LABELS: [u8; 3] = [0, 9, 4];

fn pixels() -> Vec<u8> {
    Bytes::new(1).take((COUNT * ROWS * COLS) as usize)
}

/// A valid images/labels pair, optionally gzip-compressed.
fn valid_pair(dir: &Path, gz: bool) -> (PathBuf, PathBuf) {
    let images = idx_images(COUNT, ROWS, COLS, &pixels());
    let labels = idx_labels(&LABELS);
    let (images, labels) = if gz {
        (gzip(&images), gzip(&labels))
    } else {
        (images, labels)
    };
    (
        write(dir, "images-idx3-ubyte", &images),
        write(dir, "labels-idx1-ubyte", &labels),
    )
}

fn load(images: &Path, labels: &Path) -> Result<datasets::ImageSet, DatasetError> {
    read_idx(images, labels, None, &Limits::default())
}

fn assert_matches_fixture(set: &datasets::ImageSet) {
    let pixels = pixels();
    assert_eq!(set.len(), COUNT as usize);
    assert_eq!(set.labels, LABELS.map(u32::from));
    assert_eq!(set.class_names, MNIST_CLASSES);
    for (i, image) in set.images.iter().enumerate() {
        assert_eq!((image.width, image.height, image.channels), (COLS, ROWS, 1));
        let size = (ROWS * COLS) as usize;
        assert_eq!(image.pixels, pixels[i * size..(i + 1) * size], "image {i}");
    }
}

#[test]
fn raw_files_round_trip_exact_pixels_and_labels() {
    let dir = TempDir::new().unwrap();
    let (images, labels) = valid_pair(dir.path(), false);
    assert_matches_fixture(&load(&images, &labels).unwrap());
}

#[test]
fn gzip_files_round_trip_exact_pixels_and_labels() {
    let dir = TempDir::new().unwrap();
    let (images, labels) = valid_pair(dir.path(), true);
    assert_matches_fixture(&load(&images, &labels).unwrap());
}

#[test]
fn compression_is_detected_by_content_not_by_extension() {
    let dir = TempDir::new().unwrap();
    let gz_images = write(
        dir.path(),
        "images.raw",
        &gzip(&idx_images(COUNT, ROWS, COLS, &pixels())),
    );
    let raw_labels = write(dir.path(), "labels.gz", &idx_labels(&LABELS));
    assert_matches_fixture(&load(&gz_images, &raw_labels).unwrap());
}

#[test]
fn concatenated_gzip_members_read_as_one_stream() {
    let dir = TempDir::new().unwrap();
    let whole = idx_images(COUNT, ROWS, COLS, &pixels());
    let (a, b) = whole.split_at(10);
    let images = write(dir.path(), "images", &[gzip(a), gzip(b)].concat());
    let labels = write(dir.path(), "labels", &idx_labels(&LABELS));
    assert_matches_fixture(&load(&images, &labels).unwrap());
}

#[test]
fn given_class_names_are_returned_and_bound_the_labels() {
    let dir = TempDir::new().unwrap();
    let (images, labels) = valid_pair(dir.path(), false);
    let names: Vec<String> = FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let set = read_idx(&images, &labels, Some(names.clone()), &Limits::default()).unwrap();
    assert_eq!(set.class_names, names);

    let five: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    let err = read_idx(&images, &labels, Some(five), &Limits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LabelOutOfRange {
                index: 1,
                label: 9,
                num_classes: 5,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn empty_or_too_many_class_names_are_rejected() {
    let dir = TempDir::new().unwrap();
    let (images, labels) = valid_pair(dir.path(), false);
    let err = read_idx(&images, &labels, Some(vec![]), &Limits::default()).unwrap_err();
    assert!(matches!(err, DatasetError::EmptyDataset { .. }), "{err:?}");

    let limits = Limits {
        max_classes: 9,
        ..Limits::default()
    };
    let names: Vec<String> = MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    let err = read_idx(&images, &labels, Some(names), &limits).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LimitExceeded {
                limit: "max_classes",
                value: 10,
                max: 9,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn truncated_raw_images_file_reports_expected_and_actual_lengths() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let mut bytes = idx_images(COUNT, ROWS, COLS, &pixels());
    bytes.pop();
    let images = write(dir.path(), "short", &bytes);
    let full = 16 + u64::from(COUNT * ROWS * COLS);
    match load(&images, &labels).unwrap_err() {
        DatasetError::Truncated {
            path,
            expected,
            actual,
        } => {
            assert_eq!(path, images);
            assert_eq!((expected, actual), (full, full - 1));
        }
        err => panic!("expected Truncated, got {err:?}"),
    }
}

#[test]
fn truncated_gzip_images_data_is_truncated() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let mut bytes = idx_images(COUNT, ROWS, COLS, &pixels());
    bytes.truncate(bytes.len() - 5);
    let images = write(dir.path(), "short.gz", &gzip(&bytes));
    let err = load(&images, &labels).unwrap_err();
    assert!(matches!(err, DatasetError::Truncated { .. }), "{err:?}");
}

#[test]
fn every_prefix_of_a_raw_file_is_truncated() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let full = idx_images(COUNT, ROWS, COLS, &pixels());
    for len in 0..full.len() {
        let images = write(dir.path(), "prefix", &full[..len]);
        match load(&images, &labels) {
            Err(DatasetError::Truncated { actual, .. }) => assert_eq!(actual, len as u64),
            other => panic!("prefix of {len} bytes: expected Truncated, got {other:?}"),
        }
    }
}

#[test]
fn every_prefix_of_a_gzip_file_is_rejected_as_truncated_or_corrupt() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let full = gzip(&idx_images(COUNT, ROWS, COLS, &pixels()));
    // From 2 bytes on the gzip signature is there; shorter prefixes are raw and truncated.
    for len in 0..full.len() {
        let images = write(dir.path(), "prefix", &full[..len]);
        match load(&images, &labels) {
            Err(DatasetError::Truncated { .. } | DatasetError::Gzip { .. }) => {}
            other => panic!("prefix of {len} bytes: expected Truncated or Gzip, got {other:?}"),
        }
    }
}

#[test]
fn truncated_header_is_truncated() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let images = write(dir.path(), "hdr", &idx_header(0x0803, &[COUNT, ROWS]));
    let err = load(&images, &labels).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::Truncated {
                expected: 16,
                actual: 12,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn trailing_bytes_are_rejected_raw_and_gzip() {
    let dir = TempDir::new().unwrap();
    let (images, _) = valid_pair(dir.path(), false);
    let mut long = idx_labels(&LABELS);
    long.push(0);
    for (name, bytes) in [("long", long.clone()), ("long.gz", gzip(&long))] {
        let labels = write(dir.path(), name, &bytes);
        match load(&images, &labels).unwrap_err() {
            DatasetError::TrailingBytes { path, expected } => {
                assert_eq!(path, labels);
                assert_eq!(expected, 8 + LABELS.len() as u64);
            }
            err => panic!("{name}: expected TrailingBytes, got {err:?}"),
        }
    }
}

#[test]
fn trailing_bytes_after_images_are_rejected() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let mut long = idx_images(COUNT, ROWS, COLS, &pixels());
    long.extend_from_slice(&[1, 2, 3]);
    let images = write(dir.path(), "long.gz", &gzip(&long));
    let err = load(&images, &labels).unwrap_err();
    assert!(matches!(err, DatasetError::TrailingBytes { .. }), "{err:?}");
}

#[test]
fn swapped_files_fail_on_the_magic_number() {
    let dir = TempDir::new().unwrap();
    let (images, labels) = valid_pair(dir.path(), false);
    match load(&labels, &images).unwrap_err() {
        DatasetError::BadMagic {
            path,
            expected,
            found,
            ..
        } => {
            assert_eq!(path, labels);
            assert_eq!((expected, found), (0x0803, 0x0801));
        }
        err => panic!("expected BadMagic, got {err:?}"),
    }
}

#[test]
fn wrong_element_type_or_rank_is_bad_magic() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    // 0x0D is IDX float, 0x0804 a rank-4 array.
    for magic in [0x0D03, 0x0804, 0x1f8c_0803] {
        let mut bytes = idx_header(magic, &[COUNT, ROWS, COLS]);
        bytes.extend_from_slice(&pixels());
        let images = write(dir.path(), "magic", &bytes);
        let err = load(&images, &labels).unwrap_err();
        assert!(
            matches!(err, DatasetError::BadMagic { expected: 0x0803, found, .. } if found == magic),
            "{magic:#x}: {err:?}"
        );
    }
}

#[test]
fn zero_rows_or_columns_are_bad_dimensions() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    for (rows, cols) in [(0, COLS), (ROWS, 0)] {
        let images = write(dir.path(), "zero", &idx_images(COUNT, rows, cols, &[]));
        let err = load(&images, &labels).unwrap_err();
        assert!(
            matches!(&err, DatasetError::BadDimensions { dims, .. }
                if *dims == [u64::from(COUNT), rows.into(), cols.into()]),
            "{rows}x{cols}: {err:?}"
        );
    }
}

#[test]
fn zero_images_is_an_empty_dataset() {
    let dir = TempDir::new().unwrap();
    let images = write(dir.path(), "i", &idx_images(0, ROWS, COLS, &[]));
    let labels = write(dir.path(), "l", &idx_labels(&[]));
    let err = load(&images, &labels).unwrap_err();
    assert!(matches!(err, DatasetError::EmptyDataset { .. }), "{err:?}");
}

#[test]
fn sides_over_the_limit_are_rejected_before_reading() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    // Header only: the data a 5000-pixel side announces is never there, and never read.
    let images = write(dir.path(), "big", &idx_header(0x0803, &[COUNT, 5000, 1]));
    let err = load(&images, &labels).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LimitExceeded {
                limit: "max_side",
                value: 5000,
                max: 4096,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn counts_over_the_limit_are_rejected_before_reading() {
    let dir = TempDir::new().unwrap();
    let n = 1_000_000;
    let images = write(dir.path(), "i", &idx_header(0x0803, &[n, 1, 1]));
    let labels = write(dir.path(), "l", &idx_header(0x0801, &[n]));
    let limits = Limits {
        max_images: 1000,
        ..Limits::default()
    };
    let err = read_idx(&images, &labels, None, &limits).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LimitExceeded {
                limit: "max_images",
                value: 1_000_000,
                max: 1000,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_small_gzip_claiming_huge_data_hits_the_byte_limit() {
    let dir = TempDir::new().unwrap();
    // Within max_images and max_side, yet 2e6 * 4096 * 4096 bytes: a decompression bomb's shape.
    let n = 2_000_000;
    let images = write(
        dir.path(),
        "i.gz",
        &gzip(&idx_header(0x0803, &[n, 4096, 4096])),
    );
    let labels = write(dir.path(), "l.gz", &gzip(&idx_header(0x0801, &[n])));
    let err = load(&images, &labels).unwrap_err();
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
}

#[test]
fn sizes_that_overflow_are_bad_dimensions_even_without_limits() {
    let dir = TempDir::new().unwrap();
    let max = u32::MAX;
    let images = write(dir.path(), "i", &idx_header(0x0803, &[max, max, max]));
    let labels = write(dir.path(), "l", &idx_header(0x0801, &[max]));
    let unlimited = Limits {
        max_images: usize::MAX,
        max_side: u32::MAX,
        max_classes: usize::MAX,
        max_total_bytes: u64::MAX,
    };
    let err = read_idx(&images, &labels, None, &unlimited).unwrap_err();
    assert!(
        matches!(err, DatasetError::BadDimensions { reason, .. } if reason.contains("overflow")),
        "{err:?}"
    );
}

#[test]
fn image_and_label_counts_must_match() {
    let dir = TempDir::new().unwrap();
    let (images, _) = valid_pair(dir.path(), false);
    let labels = write(dir.path(), "l", &idx_labels(&[1, 2]));
    match load(&images, &labels).unwrap_err() {
        DatasetError::CountMismatch {
            images_path,
            labels_path,
            images: 3,
            labels: 2,
        } => assert_eq!((images_path, labels_path), (images, labels)),
        err => panic!("expected CountMismatch, got {err:?}"),
    }
}

#[test]
fn labels_at_or_over_ten_are_out_of_range() {
    let dir = TempDir::new().unwrap();
    let (images, _) = valid_pair(dir.path(), false);
    let labels = write(dir.path(), "l", &idx_labels(&[3, 2, 10]));
    let err = load(&images, &labels).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::LabelOutOfRange {
                index: 2,
                label: 10,
                num_classes: 10,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn gzip_checksum_mismatch_is_a_gzip_error() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let mut bytes = gzip(&idx_images(COUNT, ROWS, COLS, &pixels()));
    // The trailer is CRC-32 then length; the data itself still inflates to the right size.
    let crc = bytes.len() - 8;
    bytes[crc] ^= 0xFF;
    let images = write(dir.path(), "bad-crc.gz", &bytes);
    let err = load(&images, &labels).unwrap_err();
    assert!(
        matches!(&err, DatasetError::Gzip { path, .. } if *path == images),
        "{err:?}"
    );
}

#[test]
fn gzip_signature_followed_by_garbage_is_a_gzip_error() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let images = write(
        dir.path(),
        "garbage.gz",
        &[0x1f, 0x8b, 0xFF, 0xFF, 1, 2, 3, 4, 5, 6, 7, 8],
    );
    let err = load(&images, &labels).unwrap_err();
    assert!(matches!(err, DatasetError::Gzip { .. }), "{err:?}");
}

#[test]
fn missing_file_is_io_naming_the_path() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let missing = dir.path().join("no-such-file");
    let err = load(&missing, &labels).unwrap_err();
    assert!(
        matches!(&err, DatasetError::Io { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-file"), "{err}");
}

#[test]
fn error_messages_name_the_file_and_what_was_expected() {
    let dir = TempDir::new().unwrap();
    let (images, labels) = valid_pair(dir.path(), false);
    let message = load(&labels, &images).unwrap_err().to_string();
    assert!(message.contains("labels-idx1-ubyte"), "{message}");
    assert!(message.contains("0x00000803"), "{message}");
}

#[test]
fn corrupted_bytes_never_panic() {
    let dir = TempDir::new().unwrap();
    let (_, labels) = valid_pair(dir.path(), false);
    let raw = idx_images(COUNT, ROWS, COLS, &pixels());
    let gz = gzip(&raw);
    let mut rng = Bytes::new(7);
    for round in 0..400 {
        let mut bytes = if round % 2 == 0 {
            raw.clone()
        } else {
            gz.clone()
        };
        for _ in 0..1 + rng.next_u64() % 4 {
            let at = (rng.next_u64() % bytes.len() as u64) as usize;
            bytes[at] = rng.next_u64() as u8;
        }
        let images = write(dir.path(), "fuzz", &bytes);
        // Any Ok or Err is fine; a panic fails the test.
        let _ = load(&images, &labels);
    }
}
