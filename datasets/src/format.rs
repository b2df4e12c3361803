//! One entry point for every format a user's labelled images come in, so the edge client, the
//! aggregator's evaluation set and the simulator read data the same way.

use std::path::{Path, PathBuf};

use crate::classes::{FASHION_MNIST_CLASSES, MNIST_CLASSES};
use crate::idx::read_idx_split;
use crate::{CifarKind, DatasetError, ImageSet, Limits, Split, read_cifar};

/// The layouts [`read_set`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// The four gzipped IDX files of Fashion-MNIST under their canonical names, with its class
    /// names (`idx` is accepted for it too).
    FashionMnist,
    /// The same files of MNIST, classes named by digit.
    Mnist,
    /// CIFAR-10 binary batches: `data_batch_1..5.bin` (train) or `test_batch.bin` (test).
    Cifar10,
    /// CIFAR-100 binary `train.bin` or `test.bin`, fine labels.
    Cifar100,
    /// `root/<class>/<image>`; with `root/train` and `root/test` both present, the split's
    /// tree, else `root` itself whatever the split.
    ImageFolder,
}

impl DataFormat {
    /// Every format's name, as `FromStr` takes it.
    pub const NAMES: &'static str =
        "fashion-mnist (or idx), mnist, cifar10, cifar100, image-folder";
}

impl std::str::FromStr for DataFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "fashion-mnist" | "idx" => DataFormat::FashionMnist,
            "mnist" => DataFormat::Mnist,
            "cifar10" => DataFormat::Cifar10,
            "cifar100" => DataFormat::Cifar100,
            "image-folder" => DataFormat::ImageFolder,
            other => {
                return Err(format!(
                    "unknown data format {other:?}: use one of {}",
                    DataFormat::NAMES
                ));
            }
        })
    }
}

/// Reads one split of the labelled set at `path` in `format`, with its class names.
pub fn read_set(
    format: DataFormat,
    path: &Path,
    split: Split,
    limits: &Limits,
) -> Result<ImageSet, DatasetError> {
    match format {
        DataFormat::FashionMnist => read_idx_split(path, split, &FASHION_MNIST_CLASSES, limits),
        DataFormat::Mnist => read_idx_split(path, split, &MNIST_CLASSES, limits),
        DataFormat::Cifar10 => {
            let batches: Vec<PathBuf> = match split {
                Split::Train => (1..=5)
                    .map(|i| path.join(format!("data_batch_{i}.bin")))
                    .collect(),
                Split::Test => vec![path.join("test_batch.bin")],
            };
            read_cifar(&batches, CifarKind::Ten, limits)
        }
        DataFormat::Cifar100 => read_cifar(
            &[path.join(format!("{}.bin", split.name()))],
            CifarKind::HundredFine,
            limits,
        ),
        DataFormat::ImageFolder => {
            let (train, test) = (path.join("train"), path.join("test"));
            let root = if train.is_dir() && test.is_dir() {
                path.join(split.name())
            } else {
                path.to_owned()
            };
            crate::read_image_folder(&root, limits)
        }
    }
}
