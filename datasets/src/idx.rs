//! IDX files, the format of MNIST and Fashion-MNIST: a magic number, big-endian `u32`
//! dimensions, then the samples as raw bytes.

use std::path::Path;

use crate::classes::{MNIST_CLASSES, owned};
use crate::source::Source;
use crate::{DatasetError, Image, ImageSet, Limits};

/// Two zero bytes, element type 0x08 (unsigned byte), 3 dimensions (count, rows, columns).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Two zero bytes, element type 0x08 (unsigned byte), 1 dimension (count).
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Images are not preallocated by the header's count: memory follows the data actually read.
const MAX_PREALLOCATED_IMAGES: usize = 1 << 16;

/// Reads an IDX images file and its labels file (MNIST, Fashion-MNIST), each gzip-compressed or
/// raw, whatever their names say.
///
/// `class_names` gives the classes by label; `None` means the ten digits ([`MNIST_CLASSES`]).
/// For Fashion-MNIST pass [`FASHION_MNIST_CLASSES`](crate::FASHION_MNIST_CLASSES). Images come
/// back with one channel, in file order.
///
/// Both files must have exactly the length their header implies, the same count, and every
/// label must be below the number of classes; headers are checked against `limits` before the
/// data they announce is read.
pub fn read_idx(
    images: &Path,
    labels: &Path,
    class_names: Option<Vec<String>>,
    limits: &Limits,
) -> Result<ImageSet, DatasetError> {
    let class_names = match class_names {
        None => owned(&MNIST_CLASSES),
        Some(names) if names.is_empty() => {
            return Err(DatasetError::EmptyDataset {
                path: labels.to_owned(),
                reason: "the class_names given are empty; pass None for the ten digits",
            });
        }
        Some(names) if names.len() > limits.max_classes => {
            return Err(DatasetError::LimitExceeded {
                path: labels.to_owned(),
                limit: "max_classes",
                value: names.len() as u64,
                max: limits.max_classes as u64,
            });
        }
        Some(names) => names,
    };

    let mut image_src = Source::open(images)?;
    let [count, rows, cols] = read_header(
        &mut image_src,
        IMAGES_MAGIC,
        "an IDX images file (unsigned bytes, 3 dimensions)",
    )?;
    let mut label_src = Source::open(labels)?;
    let [label_count] = read_header(
        &mut label_src,
        LABELS_MAGIC,
        "an IDX labels file (unsigned bytes, 1 dimension)",
    )?;

    if count != label_count {
        return Err(DatasetError::CountMismatch {
            images_path: images.to_owned(),
            labels_path: labels.to_owned(),
            images: count.into(),
            labels: label_count.into(),
        });
    }
    let shape = check_shape(images, count, rows, cols, limits)?;

    let labels_len = label_src.consumed() + u64::from(count);
    check_known_len(&label_src, labels_len)?;
    let raw_labels = label_src.read_vec(shape.count, labels_len)?;
    label_src.expect_end()?;
    let num_classes = class_names.len();
    let mut label_values = Vec::with_capacity(raw_labels.len());
    for (index, &label) in raw_labels.iter().enumerate() {
        if usize::from(label) >= num_classes {
            return Err(DatasetError::LabelOutOfRange {
                path: labels.to_owned(),
                index: index as u64,
                label: label.into(),
                num_classes,
            });
        }
        label_values.push(u32::from(label));
    }

    let images_len = image_src.consumed() + shape.total_bytes;
    check_known_len(&image_src, images_len)?;
    let mut decoded = Vec::with_capacity(shape.count.min(MAX_PREALLOCATED_IMAGES));
    for _ in 0..shape.count {
        let mut pixels = vec![0u8; shape.image_bytes];
        image_src.read_exact(&mut pixels, images_len)?;
        decoded.push(Image {
            width: cols,
            height: rows,
            channels: 1,
            pixels,
        });
    }
    image_src.expect_end()?;

    Ok(ImageSet {
        images: decoded,
        labels: label_values,
        class_names,
    })
}

/// Reads the magic number and `N` dimensions.
fn read_header<const N: usize>(
    src: &mut Source,
    magic: u32,
    what: &'static str,
) -> Result<[u32; N], DatasetError> {
    let header_len = 4 * (N as u64 + 1);
    let mut word = [0u8; 4];
    src.read_exact(&mut word, header_len)?;
    let found = u32::from_be_bytes(word);
    if found != magic {
        return Err(DatasetError::BadMagic {
            path: src.path().to_owned(),
            what,
            expected: magic,
            found,
        });
    }
    let mut dims = [0u32; N];
    for dim in &mut dims {
        src.read_exact(&mut word, header_len)?;
        *dim = u32::from_be_bytes(word);
    }
    Ok(dims)
}

struct Shape {
    count: usize,
    image_bytes: usize,
    total_bytes: u64,
}

fn check_shape(
    path: &Path,
    count: u32,
    rows: u32,
    cols: u32,
    limits: &Limits,
) -> Result<Shape, DatasetError> {
    let dims = || vec![count.into(), rows.into(), cols.into()];
    let over = |limit, value: u64, max: u64| DatasetError::LimitExceeded {
        path: path.to_owned(),
        limit,
        value,
        max,
    };
    if count == 0 {
        return Err(DatasetError::EmptyDataset {
            path: path.to_owned(),
            reason: "the IDX header declares 0 images",
        });
    }
    if rows == 0 || cols == 0 {
        return Err(DatasetError::BadDimensions {
            path: path.to_owned(),
            dims: dims(),
            reason: "images need at least one row and one column",
        });
    }
    let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
    if count_usize > limits.max_images {
        return Err(over("max_images", count.into(), limits.max_images as u64));
    }
    let side = rows.max(cols);
    if side > limits.max_side {
        return Err(over("max_side", side.into(), limits.max_side.into()));
    }
    // u32 * u32 always fits u64; the count on top may not.
    let image_bytes = u64::from(rows) * u64::from(cols);
    let Some(total_bytes) = image_bytes.checked_mul(count.into()) else {
        return Err(DatasetError::BadDimensions {
            path: path.to_owned(),
            dims: dims(),
            reason: "the total size overflows 64 bits",
        });
    };
    if total_bytes > limits.max_total_bytes {
        return Err(over("max_total_bytes", total_bytes, limits.max_total_bytes));
    }
    let (Ok(image_bytes), Ok(_)) = (usize::try_from(image_bytes), usize::try_from(total_bytes))
    else {
        return Err(DatasetError::BadDimensions {
            path: path.to_owned(),
            dims: dims(),
            reason: "the data would not fit in this platform's address space",
        });
    };
    Ok(Shape {
        count: count_usize,
        image_bytes,
        total_bytes,
    })
}

/// For an uncompressed file, checks the length on disk before reading, so a wrong file fails
/// before megabytes of it are read.
fn check_known_len(src: &Source, expected: u64) -> Result<(), DatasetError> {
    match src.known_len() {
        Some(actual) if actual < expected => Err(DatasetError::Truncated {
            path: src.path().to_owned(),
            expected,
            actual,
        }),
        Some(actual) if actual > expected => Err(DatasetError::TrailingBytes {
            path: src.path().to_owned(),
            expected,
        }),
        _ => Ok(()),
    }
}

/// A split of an MNIST-style data set, as the IDX file names spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// `train-*-idx?-ubyte.gz`.
    Train,
    /// `t10k-*-idx?-ubyte.gz`.
    Test,
}

impl Split {
    /// The split's name: `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    fn file_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split {other:?}: use train or test")),
        }
    }
}

/// Reads one split of Fashion-MNIST from `dir` as `scripts/fetch-fashion-mnist.sh` lays it out
/// (the four gzipped IDX files under their canonical names), with its class names.
pub fn read_fashion_mnist(
    dir: &Path,
    split: Split,
    limits: &Limits,
) -> Result<ImageSet, DatasetError> {
    read_idx_split(dir, split, &crate::FASHION_MNIST_CLASSES, limits)
}

/// One split of an MNIST-layout folder (the canonical gzipped file names) whose classes are
/// `class_names`.
pub(crate) fn read_idx_split(
    dir: &Path,
    split: Split,
    class_names: &[&str],
    limits: &Limits,
) -> Result<ImageSet, DatasetError> {
    let prefix = split.file_prefix();
    read_idx(
        &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
        Some(owned(class_names)),
        limits,
    )
}
