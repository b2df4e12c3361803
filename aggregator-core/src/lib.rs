//! The aggregator's round logic, free of sockets, clocks and async runtimes (the way
//! `quinn-proto` sits under `quinn`): the QUIC service in the `aggregator` crate and the fleet
//! simulator drive it; tests drive it with a fake clock.
//!
//! - [`engine`]: the [`Engine`](engine::Engine) state machine — events in (a client joined or
//!   left, an update arrived, time passed), actions out (send a task or a verdict, log a round,
//!   write a checkpoint) — with its configuration, events and admission checks.
//! - [`strategy`]: what a round asks of clients and how results combine: the
//!   [`Strategy`](strategy::Strategy) (FedAvg, FedProx, WSA), the
//!   [`Aggregation`](strategy::Aggregation) rules, and the [`RoundFold`](strategy::RoundFold)
//!   that folds one round's parameters and scopes together.
//! - [`backend`]: the compute seam the fold runs on ([`Backend`](backend::Backend),
//!   [`Accumulator`](backend::Accumulator)) and the threaded
//!   [`CpuBackend`](backend::CpuBackend), the reference other backends are tested against.
//! - [`checkpoint`]: the state a run resumes from, and its file format.
//! - [`privacy`]: client-level differential privacy (DP-FedAvg) and its Rényi-DP accountant.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod checkpoint;
pub mod engine;
pub mod privacy;
pub mod strategy;
