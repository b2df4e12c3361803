//! Secure aggregation: the aggregator learns the sum of a round's surviving clients' vectors
//! and nothing else about any one of them (SecAgg+, Bell et al. 2020, on the protocol of
//! Bonawitz et al. 2017).
//!
//! Each client adds to its vector, in the ring Z/2³², a pairwise mask per neighbour (the
//! ChaCha20 stream of an X25519 agreement, added by the lower index and subtracted by the
//! higher, so pairs cancel in the sum) and a self mask from a seed of its own. It deals Shamir
//! shares of its masking key and of its self-mask seed to its neighbours, sealed with
//! ChaCha20-Poly1305 under another agreement, through the aggregator. After the masked inputs
//! arrive, every survivor reveals, for each neighbour, exactly one kind of share: the self-mask
//! share of a neighbour that sent input, the masking-key share of one that dropped. The
//! aggregator rebuilds the dropped clients' pairwise masks and the survivors' self masks and
//! removes them. Neighbours form a Harary graph of even degree k over a seeded layout, so a
//! client's work grows with k ~ O(log n), not with the round's size.
//!
//! The thresholds keep the two kinds of share of one client apart: t is a strict majority of
//! k, so the aggregator cannot rebuild both secrets of one client from two disjoint halves of
//! its neighbours, and a client answers one unmask request per round and refuses one that
//! names a neighbour both ways. Rebuilt secrets are checked (the masking key against its
//! advertised public key, the self-mask seed against its commitment), so a bad share fails
//! the round with a typed error instead of corrupting the sum.
//!
//! Threat model: an honest-but-curious aggregator, and clients that may lie or drop at any
//! step. Not covered: an aggregator that lies about who dropped. Telling client V's
//! neighbours that V survived (its self mask) while telling each neighbour's other neighbours
//! that the neighbour dropped (its masking key, hence its pair mask with V) unmasks V's input
//! without any one client seeing a conflict; the malicious-server protocol stops that with a
//! consistency round of signed survivor sets under a PKI, which is not built. Nor are clients
//! colluding with the aggregator beyond t − 1 of one client's neighbours.
//!
//! This crate does no I/O: [`ClientRound`] and [`ServerRound`] take and return the wire
//! messages of [`protocol::SecAgg`], one call per step. [`ring`] maps real vectors to the ring.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

mod client;
mod crypto;
mod error;
mod graph;
pub mod noise;
pub mod ring;
mod server;

pub use client::ClientRound;
pub use error::SecAggError;
pub use graph::{FAILURE_TARGET, Graph, MAX_PARTICIPANTS, RoundParams};
pub use server::{Aggregate, Progress, ServerRound};
