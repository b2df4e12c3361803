//! The wire protocol between edge clients and the aggregator.
//!
//! Every message is one [`Message`] encoded with postcard inside a frame whose fixed header
//! carries a magic, the [`PROTOCOL_VERSION`] and the body length ([`frame`]). Readers check
//! the header against configured [`Limits`] before reading the body, decode with
//! `take_from_bytes` and refuse trailing bytes, then check the counts inside. Head parameters
//! travel as [`EncodedParams`] in f32, f16 or int8 with per-row scales, in rows that follow the
//! head's one flat layout (`wsa::HeadSpec::flat_layout`). Nothing here does I/O but the `quic`
//! module (feature `quic`), which reads headers and bodies and hands them to these functions.
//!
//! The modules look only down: `encoding` (parameters and their errors) under `message` (the
//! messages, [`RejectReason`] with its names beside [`Message::kind`]) under `error` (bad
//! frames), `limits` and `frame`; `convert` and `digest` add to the messages.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

mod convert;
mod digest;
pub mod encoding;
mod error;
pub mod frame;
mod limits;
mod message;
#[cfg(feature = "quic")]
pub mod quic;
pub mod secure;

pub use digest::head_digest;
pub use encoding::{EncodedParams, Encoding, EncodingError, RowLayout};
pub use error::ProtocolError;
pub use frame::{
    FrameHeader, HEADER_LEN, MAGIC, PROTOCOL_VERSION, decode_body, decode_frame, encode_frame,
};
pub use limits::Limits;
pub use message::{
    Auth, Capabilities, FinalModel, Goodbye, GoodbyeReason, HeadRef, HeadShape, HeldOutEval, Hello,
    LocalNoise, MAX_SECAGG_NEIGHBOURS, Message, Outcome, RejectReason, RevealedShare, RoundTask,
    SealedShares, SecAgg, SecAggAdvertise, SecAggInbox, SecAggMasked, SecAggPeer, SecAggReveal,
    SecAggRoster, SecAggSetup, SecAggShares, SecAggUnmask, Subject, TrainSpec, Update,
    UpdateMetrics, Verdict, Welcome, WireScope, WsaSpec, client_id, client_index, indexed_classes,
};
