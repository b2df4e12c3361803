//! The edge client: frozen features in, head updates out.
//!
//! A [`Backbone`] (tract running the MobileNetV2 features ONNX at a fixed input side) turns
//! images from the `datasets` loaders into feature vectors after [`preprocess`]ing them; the
//! [`cache`] keeps those features on disk, keyed by the backbone's hash, input side,
//! preprocessing and the source data, so they are computed once. [`local_round`] trains the
//! round's global head on them and packages the [`ClientUpdate`]. The [`session`] with the
//! aggregator is a sans-IO state machine (reconnects, goodbyes, verdicts, the report);
//! [`net`] is its thin QUIC glue.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod attack;
mod backbone;
pub mod cache;
mod error;
#[cfg(feature = "onnx")]
pub mod export;
mod features;
pub mod labels;
pub mod net;
pub mod predict;
pub mod preprocess;
mod round;
pub mod session;

pub use attack::{Adversary, Attack};
#[cfg(feature = "onnx")]
pub use backbone::convert_onnx_to_nnef;
pub use backbone::{Backbone, INPUT_SIDES};
pub use error::{BackboneError, FeatureError};
pub use features::cached_features;
pub use labels::{ClassError, LocalData};
pub use round::{ClientUpdate, TrainingTask, evaluate_held_out, local_round};
