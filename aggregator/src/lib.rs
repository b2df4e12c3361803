//! The aggregator as a service: the QUIC runtime around the sans-IO round engine of
//! [`aggregator_core`], in the way `quinn` wraps `quinn-proto`.
//!
//! - [`server`]: one task owns the [`Engine`](aggregator_core::engine::Engine) and carries out
//!   its actions (tasks, verdicts, checkpoints, round logs); one task per connection moves
//!   frames between QUIC streams and the engine.
//! - [`auth`] and [`tls`]: who may join (token hashes in a registry) and the credentials
//!   `gen-certs` makes (a private CA, the server certificate, per-client tokens).
//! - [`backends`]: which compute backend folds updates (`--backend auto|cpu|cuda`).
//! - [`eval`]: the evaluation set `serve --eval-data` scores every new global head on.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod auth;
pub mod backends;
pub mod eval;
pub mod server;
pub mod tls;
