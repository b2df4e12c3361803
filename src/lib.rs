//! Pieces shared by the fleet simulator, the cross-crate tests and the benchmarks: a local
//! deployment (credentials, a real aggregator and real edge clients in one process over
//! loopback QUIC).
#![warn(missing_docs, unreachable_pub)]

pub mod fleet;
