//! Typed errors of the codec.

use crate::message::RejectReason;

/// A parameter vector that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodingError {
    /// The value count does not match the layout.
    #[error("expected {expected} values, got {got}")]
    Length {
        /// From the layout.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// The data bytes do not match the count and encoding.
    #[error("expected {expected} data bytes, got {got}")]
    DataBytes {
        /// From count and encoding.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// The number of int8 scales does not match the rows.
    #[error("expected {expected} scales, got {got}")]
    Scales {
        /// Rows of the layout.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// An int8 scale is negative or non-finite.
    #[error("bad scale in row {row}")]
    BadScale {
        /// The row.
        row: usize,
    },
    /// A value to encode is NaN or infinite.
    #[error("value {index} is not finite")]
    NonFinite {
        /// Its index.
        index: usize,
    },
    /// A value does not fit the encoding (f16 above 65504).
    #[error("value {value} at {index} does not fit the encoding")]
    OutOfRange {
        /// Its index.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// Bytes that are not a valid frame or message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame does not start with the magic.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The frame's protocol version is not supported.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The length prefix is over the configured limit (checked before reading the body).
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Fewer bytes than the header or the length prefix announce.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Needed.
        need: usize,
        /// Available.
        have: usize,
    },
    /// Bytes left after the message inside its frame.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// postcard could not decode the body (unknown variant, bad varint, bad UTF-8, ...).
    #[error("undecodable message: {0}")]
    Decode(String),
    /// A count inside the message is over its configured limit.
    #[error("{what}: {got} exceeds the limit of {max}")]
    LimitExceeded {
        /// Which count.
        what: &'static str,
        /// Found.
        got: u64,
        /// Limit.
        max: u64,
    },
    /// The message could not be encoded (too large for a frame).
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl ProtocolError {
    /// The reason sent back to the peer.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            ProtocolError::UnsupportedVersion(v) => RejectReason::UnsupportedVersion(*v),
            other => RejectReason::Malformed(other.to_string()),
        }
    }
}
