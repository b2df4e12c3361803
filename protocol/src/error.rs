//! Bytes that are not a frame or a message, and the reason the peer is told.

use crate::message::RejectReason;

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
