//! The wire protocol between edge clients and the aggregator.
//!
//! Every message is one [`Message`] encoded with postcard inside a frame whose fixed header
//! carries a magic, the [`PROTOCOL_VERSION`] and the body length ([`frame`]). Readers check
//! the header against configured [`Limits`] before reading the body, decode with
//! `take_from_bytes` and refuse trailing bytes, then check the counts inside. Head parameters
//! travel as [`EncodedParams`] in f32, f16 or int8 with per-row scales. Nothing here does I/O;
//! the QUIC code reads headers and bodies and hands them to these functions.
#![warn(missing_docs, unreachable_pub)]

mod convert;
mod digest;
pub mod encoding;
mod error;
pub mod frame;
mod limits;
mod message;
#[cfg(feature = "quic")]
pub mod quic;

pub use encoding::{EncodedParams, Encoding, RowLayout};
pub use error::{EncodingError, ProtocolError};
pub use frame::{
    FrameHeader, HEADER_LEN, MAGIC, PROTOCOL_VERSION, decode_body, decode_frame, encode_frame,
};
pub use limits::Limits;
pub use message::{
    Auth, Capabilities, Goodbye, GoodbyeReason, HeadShape, Hello, Message, Outcome, RejectReason,
    RoundTask, Subject, TrainSpec, Update, UpdateMetrics, Verdict, Welcome, WireScope, WsaSpec,
};
