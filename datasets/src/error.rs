//! The one error type every loader returns.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Why a dataset could not be loaded.
///
/// Every variant names the file (or folder) at fault, so a message can be shown to a user as is.
/// Sizes are in bytes of decoded data: for a gzip file, after decompression.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// The file or folder could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or folder that failed.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },

    /// The file starts with the gzip signature but its compressed stream is corrupt.
    #[error("{} is not a valid gzip stream ({source}); re-download it", path.display())]
    Gzip {
        /// The compressed file.
        path: PathBuf,
        /// What the decompressor said.
        source: io::Error,
    },

    /// The file ends before the data its header (or record layout) promises.
    #[error(
        "{} is truncated: it holds {actual} bytes of data but {expected} are needed; \
         re-download or re-extract it",
        path.display()
    )]
    Truncated {
        /// The short file.
        path: PathBuf,
        /// Bytes needed: the size the header implies, or the next whole record.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },

    /// The file goes on after the data its header describes.
    #[error(
        "{} has data after the {expected} bytes its header describes; \
         is it the right file, or several files joined together?",
        path.display()
    )]
    TrailingBytes {
        /// The long file.
        path: PathBuf,
        /// Bytes the header describes.
        expected: u64,
    },

    /// The file does not start with the magic number of the expected format.
    #[error(
        "{} is not {what}: expected magic number {expected:#010x}, found {found:#010x}",
        path.display()
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The kind of file that was expected, in words.
        what: &'static str,
        /// The magic number that was expected.
        expected: u32,
        /// The first four bytes of the file, big-endian.
        found: u32,
    },

    /// The header gives dimensions no image can have.
    #[error("{} declares dimensions {dims:?}: {reason}", path.display())]
    BadDimensions {
        /// The file.
        path: PathBuf,
        /// The dimensions as declared (count first where the format has one).
        dims: Vec<u64>,
        /// What is wrong with them.
        reason: &'static str,
    },

    /// A size or count is over one of the configured [`Limits`](crate::Limits).
    #[error(
        "{}: {value} is over the limit of {max} set by Limits::{limit}; \
         raise the limit if this data is expected",
        path.display()
    )]
    LimitExceeded {
        /// The file or folder.
        path: PathBuf,
        /// The name of the [`Limits`](crate::Limits) field that was exceeded.
        limit: &'static str,
        /// The value found.
        value: u64,
        /// The limit it was checked against.
        max: u64,
    },

    /// The images file and the labels file disagree on how many items there are.
    #[error(
        "{} holds {images} images but {} holds {labels} labels; are they from the same split?",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        /// The images file.
        images_path: PathBuf,
        /// The labels file.
        labels_path: PathBuf,
        /// Number of images declared.
        images: u64,
        /// Number of labels declared.
        labels: u64,
    },

    /// A label is not a valid class index.
    #[error(
        "{}: label {label} of item {index} is out of range: there are {num_classes} classes \
         (labels 0..{num_classes})",
        path.display()
    )]
    LabelOutOfRange {
        /// The file holding the label.
        path: PathBuf,
        /// Zero-based index of the item within that file.
        index: u64,
        /// The label found.
        label: u32,
        /// The number of classes labels must be below.
        num_classes: usize,
    },

    /// An image file could not be decoded.
    #[error("cannot decode image {}: {source}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// What the decoder said.
        source: image::ImageError,
    },

    /// A class folder's name is not valid UTF-8, so it cannot serve as a class name.
    #[error("class folder {} has a name that is not valid UTF-8; rename it", path.display())]
    NonUtf8Name {
        /// The folder.
        path: PathBuf,
    },

    /// There is nothing to load.
    #[error("{}: {reason}", path.display())]
    EmptyDataset {
        /// The file or folder that is empty.
        path: PathBuf,
        /// What was missing.
        reason: &'static str,
    },
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            source,
        }
    }
}
