//! The fleet simulator and the pieces it shares with the cross-crate tests and benchmarks: a
//! local deployment (credentials, a real aggregator and real edge clients in one process over
//! loopback QUIC), partitioners for non-IID splits, the simulation of a run per strategy, and
//! the plots of its results.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod fleet;
pub mod partition;
pub mod plot;
pub mod sim;
