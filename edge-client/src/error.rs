use std::path::PathBuf;

use thiserror::Error;

/// Failures of the backbone: loading the model, preparing inputs, running inference.
#[derive(Debug, Error)]
pub enum BackboneError {
    /// The model file could not be read.
    #[error(
        "cannot read the backbone model {path}: {source} (run scripts/fetch-model.sh to build it)"
    )]
    Io {
        /// The model path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// tract refused the model or failed while running it.
    #[error("backbone model {path}: {message}")]
    Model {
        /// The model path.
        path: PathBuf,
        /// tract's error chain.
        message: String,
    },
    /// The model's output is not one `[1, dim]` feature vector.
    #[error("backbone model {path} produced output of shape {shape:?}; expected [1, dim]")]
    UnexpectedOutput {
        /// The model path.
        path: PathBuf,
        /// The shape found.
        shape: Vec<usize>,
    },
    /// An input side outside the supported range.
    #[error("input side {side} is outside {min}..={max}")]
    BadInputSide {
        /// The side asked for.
        side: usize,
        /// Smallest supported side.
        min: usize,
        /// Largest supported side.
        max: usize,
    },
    /// An image whose size and pixel buffer disagree.
    #[error("invalid image: {reason}")]
    InvalidImage {
        /// What is wrong with it.
        reason: String,
    },
}

/// Failures of turning a data set into (cached) features.
#[derive(Debug, Error)]
pub enum FeatureError {
    /// The backbone failed.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// The cache could not be written.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The features were refused by the core (e.g. non-finite values).
    #[error("features: {0}")]
    Data(#[from] wsa::Error),
}
