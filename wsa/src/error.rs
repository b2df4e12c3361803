use thiserror::Error;

/// Everything the core can refuse. Inputs that come from other machines (client updates, data
/// files) reach these functions, so bad input is a value of this type, never a panic.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Error {
    /// Two things that must agree in size do not.
    #[error("shape mismatch in {what}: expected {expected}, found {found}")]
    ShapeMismatch {
        /// What was being compared.
        what: &'static str,
        /// The size that was required.
        expected: usize,
        /// The size that was given.
        found: usize,
    },
    /// An input that must hold at least one element holds none.
    #[error("{what} is empty")]
    Empty {
        /// What was empty.
        what: &'static str,
    },
    /// A NaN or an infinity where only finite values are allowed.
    #[error("{what} contains a non-finite value")]
    NonFinite {
        /// Where the value was found.
        what: &'static str,
    },
    /// Weights of a fusion or an average sum to zero (or are negative), so no mean exists.
    #[error("total weight is {total}; weights must be finite, non-negative and not all zero")]
    ZeroTotalWeight {
        /// The offending sum.
        total: f64,
    },
    /// A class label outside `0..classes`.
    #[error("label {label} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// The label found.
        label: u32,
        /// The number of classes of the head.
        classes: usize,
    },
    /// A scope whose σ is not a positive finite number, or whose μ is not finite.
    #[error("invalid scope (mean {mean}, std {std}): std must be positive and both finite")]
    InvalidScope {
        /// The scope's mean.
        mean: f64,
        /// The scope's std.
        std: f64,
    },
    /// A configuration value outside its domain.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

/// The core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that every value is finite.
pub(crate) fn ensure_finite<F: crate::Real>(what: &'static str, values: &[F]) -> Result<()> {
    // Branch-free within a block so the check vectorizes (`all` exits per element and
    // does not); it runs over every client update on the aggregator.
    let finite = values
        .chunks(256)
        .all(|block| block.iter().fold(true, |ok, v| ok & v.is_finite()));
    if finite {
        Ok(())
    } else {
        Err(Error::NonFinite { what })
    }
}

pub(crate) fn ensure_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            found,
        })
    }
}
