use std::fmt::Debug;

use ndarray::{LinalgScalar, ScalarOperand};
use num_traits::Float;

/// The scalar types the heads and the trainer run on: `f32` for training, `f64` for
/// finite-difference checks of the very same code.
pub trait Real:
    LinalgScalar + Float + ScalarOperand + Debug + Default + Send + Sync + 'static
{
    /// Converts from `f64`, rounding to the nearest representable value.
    fn of_f64(x: f64) -> Self;
    /// Widens to `f64`.
    fn as_f64(self) -> f64;
}

impl Real for f32 {
    #[inline]
    fn of_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Real for f64 {
    #[inline]
    fn of_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
}
