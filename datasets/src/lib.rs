//! Image dataset loaders with typed errors and explicit bounds.
//!
//! Three loaders read the formats users bring: [`read_idx`] (MNIST and Fashion-MNIST IDX files,
//! gzip-compressed or raw), [`read_cifar`] (CIFAR-10 and CIFAR-100 binary batches, chosen by
//! [`CifarKind`]) and [`read_image_folder`] (a tree of `class_name/*.png|jpg`). Each returns an
//! [`ImageSet`]: decoded [`Image`]s (8-bit, interleaved channels), one label per image, and the
//! class names the labels index.
//!
//! Input is untrusted. Every size and count read from a header or a folder listing is checked
//! against [`Limits`] before the data it announces is read, memory grows only with data actually
//! present, and every failure is a [`DatasetError`] naming the file and what was expected; no
//! input bytes make a loader panic.
//!
//! The class names of the public datasets are here too: [`FASHION_MNIST_CLASSES`],
//! [`MNIST_CLASSES`], [`CIFAR10_CLASSES`], [`CIFAR100_FINE_CLASSES`] and
//! [`CIFAR100_COARSE_CLASSES`].

#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

mod cifar;
mod classes;
mod error;
mod folder;
mod format;
mod idx;
mod set;
mod source;

pub use cifar::{CifarKind, read_cifar};
pub use classes::{
    CIFAR10_CLASSES, CIFAR100_COARSE_CLASSES, CIFAR100_FINE_CLASSES, FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
};
pub use error::DatasetError;
pub use folder::{has_image_extension, read_image, read_image_folder};
pub use format::{DataFormat, read_set};
pub use idx::{Split, read_fashion_mnist, read_idx};
pub use set::{Image, ImageSet, Limits};
