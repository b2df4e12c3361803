//! Weight Scope Alignment (WSA) for federated heads: the pure, socket-free core.
//!
//! A layer's *scope* ([`Scope`]) is the mean and std of its weights, seen as one Gaussian.
//! Models trained on different data drift to different scopes, which hurts plain averaging.
//! WSA adds `λ · Σ_l KL(N(μ_l,σ_l²) ‖ N(μ̃_l,σ̃_l²))` to the local loss ([`regularizer`],
//! [`WsaTerm`]) and, each round, fuses the client scopes into the next targets
//! ([`ScopeFusion`], with the σ̃ rules of [`FusionRule`]). The head weights themselves are
//! averaged as in FedAvg ([`ParamSum`]). Both fusion and averaging are carried as weighted
//! sums, so tiers of aggregators can pre-fuse groups and combine them exactly.
//!
//! The heads ([`Head`], shaped by [`HeadSpec`]) are linear or ReLU MLPs over frozen backbone
//! features ([`LabelledFeatures`]); every flat parameter vector follows
//! [`HeadSpec::flat_layout`]. [`train`] runs local SGD ([`Sgd`]: the one home of the training
//! settings a run configures and a task carries) with momentum, weight decay and the optional
//! FedProx and WSA terms ([`TrainConfig`]). Everything is deterministic from its seed and generic
//! over [`Real`] so the f32 code is checked against finite differences in f64.
#![warn(missing_docs, unreachable_pub)]
#![deny(unsafe_code)] // not forbid: ndarray's s! macro allows unsafe in its expansion

mod average;
mod data;
mod error;
mod fusion;
mod head;
mod real;
pub mod regularizer;
pub mod saved;
mod scope;
pub mod synthetic;
mod train;

pub use average::ParamSum;
pub use data::LabelledFeatures;
pub use error::{Error, Result};
pub use fusion::{FusionRule, ScopeFusion, ScopeSums, Weighting};
pub use head::{Dense, Evaluation, FlatTensor, Head, HeadSpec, Init, TensorKind, Workspace};
pub use real::Real;
pub use regularizer::{add_kl_grad, add_kl_grad_for_step, kl};
pub use scope::{DEFAULT_SCOPE_EPS, Scope, ScopeSelection};
pub use train::{
    RegularizerValue, Regularizers, Sgd, TrainConfig, TrainMetrics, TrainOutcome, WsaTerm, train,
};
