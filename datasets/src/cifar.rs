//! CIFAR-10 and CIFAR-100 binary batches: fixed-size records of label bytes followed by a
//! 32x32 image stored as three colour planes.

use std::path::{Path, PathBuf};

use crate::classes::{CIFAR10_CLASSES, CIFAR100_COARSE_CLASSES, CIFAR100_FINE_CLASSES, owned};
use crate::source::Source;
use crate::{DatasetError, Image, ImageSet, Limits};

const SIDE: u32 = 32;
const PLANE: usize = (SIDE * SIDE) as usize;
const PIXEL_BYTES: usize = 3 * PLANE;

/// Which CIFAR binary format the batches are in, and which label to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// CIFAR-10 (`data_batch_*.bin`, `test_batch.bin`): records of 1 label byte + 3072 pixels.
    Ten,
    /// CIFAR-100 (`train.bin`, `test.bin`) with its 100 fine labels: records of coarse label,
    /// fine label, 3072 pixels.
    HundredFine,
    /// CIFAR-100 with its 20 coarse labels (superclasses).
    HundredCoarse,
}

/// A label byte in a record: where it is and how many classes it ranges over.
struct LabelField {
    offset: usize,
    num_classes: u8,
}

const TEN_LABEL: LabelField = LabelField {
    offset: 0,
    num_classes: 10,
};
const COARSE_LABEL: LabelField = LabelField {
    offset: 0,
    num_classes: 20,
};
const FINE_LABEL: LabelField = LabelField {
    offset: 1,
    num_classes: 100,
};

impl CifarKind {
    fn label_fields(self) -> &'static [LabelField] {
        match self {
            CifarKind::Ten => &[TEN_LABEL],
            CifarKind::HundredFine | CifarKind::HundredCoarse => &[COARSE_LABEL, FINE_LABEL],
        }
    }

    fn returned_label(self) -> LabelField {
        match self {
            CifarKind::Ten => TEN_LABEL,
            CifarKind::HundredFine => FINE_LABEL,
            CifarKind::HundredCoarse => COARSE_LABEL,
        }
    }

    /// Bytes per record.
    pub fn record_len(self) -> usize {
        self.label_fields().len() + PIXEL_BYTES
    }

    /// The class names of the label this kind returns.
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            CifarKind::Ten => &CIFAR10_CLASSES,
            CifarKind::HundredFine => &CIFAR100_FINE_CLASSES,
            CifarKind::HundredCoarse => &CIFAR100_COARSE_CLASSES,
        }
    }
}

/// Reads CIFAR binary batch files (each gzip-compressed or raw; any `&Path`, `PathBuf` or
/// `&str`) into one set, in the order given, converting each image from colour planes to interleaved RGB.
///
/// Every file must hold at least one record and a whole number of records. Both labels of a
/// CIFAR-100 record are range-checked, since a bad one of either means a damaged file.
pub fn read_cifar<P: AsRef<Path>>(
    batches: &[P],
    kind: CifarKind,
    limits: &Limits,
) -> Result<ImageSet, DatasetError> {
    let Some(first) = batches.first().map(AsRef::as_ref) else {
        return Err(DatasetError::EmptyDataset {
            path: PathBuf::from("<no CIFAR batch files>"),
            reason: "pass at least one batch file",
        });
    };
    if SIDE > limits.max_side {
        return Err(DatasetError::LimitExceeded {
            path: first.to_owned(),
            limit: "max_side",
            value: SIDE.into(),
            max: limits.max_side.into(),
        });
    }
    let class_names = owned(kind.class_names());
    if class_names.len() > limits.max_classes {
        return Err(DatasetError::LimitExceeded {
            path: first.to_owned(),
            limit: "max_classes",
            value: class_names.len() as u64,
            max: limits.max_classes as u64,
        });
    }

    let mut set = ImageSet {
        images: Vec::new(),
        labels: Vec::new(),
        class_names,
    };
    for path in batches {
        read_batch(path.as_ref(), kind, limits, &mut set)?;
    }
    Ok(set)
}

fn read_batch(
    path: &Path,
    kind: CifarKind,
    limits: &Limits,
    set: &mut ImageSet,
) -> Result<(), DatasetError> {
    let record_len = kind.record_len();
    let mut src = Source::open(path)?;
    if let Some(len) = src.known_len() {
        check_len(path, len, record_len)?;
        check_count(path, set.len() as u64 + len / record_len as u64, limits)?;
    }

    let mut record = vec![0u8; record_len];
    let mut records = 0u64;
    loop {
        let start = src.consumed();
        let expected = start + record_len as u64;
        let n = src.fill(&mut record, expected)?;
        if n == 0 {
            break;
        }
        if n < record_len {
            return Err(src.truncated(expected));
        }
        check_count(path, set.len() as u64 + 1, limits)?;

        for field in kind.label_fields() {
            let label = record[field.offset];
            if label >= field.num_classes {
                return Err(DatasetError::LabelOutOfRange {
                    path: path.to_owned(),
                    index: records,
                    label: label.into(),
                    num_classes: field.num_classes.into(),
                });
            }
        }
        set.labels.push(record[kind.returned_label().offset].into());
        set.images
            .push(planes_to_hwc(&record[kind.label_fields().len()..]));
        records += 1;
    }
    if records == 0 {
        return Err(DatasetError::EmptyDataset {
            path: path.to_owned(),
            reason: "the batch file holds no records",
        });
    }
    Ok(())
}

fn check_len(path: &Path, len: u64, record_len: usize) -> Result<(), DatasetError> {
    let record_len = record_len as u64;
    if len == 0 {
        return Err(DatasetError::EmptyDataset {
            path: path.to_owned(),
            reason: "the batch file is empty",
        });
    }
    if !len.is_multiple_of(record_len) {
        return Err(DatasetError::Truncated {
            path: path.to_owned(),
            expected: len.div_ceil(record_len) * record_len,
            actual: len,
        });
    }
    Ok(())
}

/// Checks the running image count, and with it the pixel bytes, which grow in step.
fn check_count(path: &Path, images: u64, limits: &Limits) -> Result<(), DatasetError> {
    let over = |limit, value, max| DatasetError::LimitExceeded {
        path: path.to_owned(),
        limit,
        value,
        max,
    };
    if images > limits.max_images as u64 {
        return Err(over("max_images", images, limits.max_images as u64));
    }
    let bytes = images.saturating_mul(PIXEL_BYTES as u64);
    if bytes > limits.max_total_bytes {
        return Err(over("max_total_bytes", bytes, limits.max_total_bytes));
    }
    Ok(())
}

/// CIFAR stores all red samples, then all green, then all blue; [`Image`] interleaves them.
fn planes_to_hwc(planes: &[u8]) -> Image {
    let (red, rest) = planes.split_at(PLANE);
    let (green, blue) = rest.split_at(PLANE);
    let mut pixels = Vec::with_capacity(PIXEL_BYTES);
    for ((&r, &g), &b) in red.iter().zip(green).zip(blue) {
        pixels.extend_from_slice(&[r, g, b]);
    }
    Image {
        width: SIDE,
        height: SIDE,
        channels: 3,
        pixels,
    }
}
