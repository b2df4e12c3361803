//! Framing: `MAGIC (4) | protocol version (u16 LE) | body length (u32 LE) | postcard body`.
//!
//! The fixed header comes first so a reader can refuse a foreign peer, an unknown version or
//! an oversized body before reading or allocating anything for it.

use crate::error::ProtocolError;
use crate::limits::Limits;
use crate::message::Message;

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"WSA1";
/// The protocol version this crate speaks. 5 added the secure-aggregation steps
/// ([`crate::SecAgg`]), which a version-4 peer could not decode; 6 the round's attempt in
/// [`crate::Welcome`].
pub const PROTOCOL_VERSION: u16 = 7;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 10;

/// The checked header of a frame: what remains to read is `body_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The body's length, already checked against the limit.
    pub body_len: usize,
}

impl FrameHeader {
    /// Checks magic, version and the length prefix against `limits`.
    pub fn parse(header: &[u8; HEADER_LEN], limits: &Limits) -> Result<Self, ProtocolError> {
        let magic = [header[0], header[1], header[2], header[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        let len = u32::from_le_bytes([header[6], header[7], header[8], header[9]]);
        if len > limits.max_message_bytes {
            return Err(ProtocolError::TooLarge {
                len: len.into(),
                max: limits.max_message_bytes.into(),
            });
        }
        Ok(Self {
            body_len: len as usize,
        })
    }
}

/// Encodes `message` as one frame.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut out = vec![0u8; HEADER_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let mut out =
        postcard::to_extend(message, out).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    let body = u32::try_from(out.len() - HEADER_LEN)
        .map_err(|_| ProtocolError::Encode("message over 4 GiB".into()))?;
    out[6..10].copy_from_slice(&body.to_le_bytes());
    Ok(out)
}

/// Decodes a frame body (after [`FrameHeader::parse`]): the whole body must be one message,
/// and its counts must be within `limits`.
pub fn decode_body(body: &[u8], limits: &Limits) -> Result<Message, ProtocolError> {
    if body.len() > limits.max_message_bytes as usize {
        return Err(ProtocolError::TooLarge {
            len: body.len() as u64,
            max: limits.max_message_bytes.into(),
        });
    }
    let (message, rest) = postcard::take_from_bytes::<Message>(body)
        .map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes(rest.len()));
    }
    limits.check(&message)?;
    Ok(message)
}

/// Decodes one complete frame from `bytes` (header and body, nothing after).
pub fn decode_frame(bytes: &[u8], limits: &Limits) -> Result<Message, ProtocolError> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(ProtocolError::Truncated {
            need: HEADER_LEN,
            have: bytes.len(),
        })?;
    let FrameHeader { body_len } = FrameHeader::parse(header, limits)?;
    let body = &bytes[HEADER_LEN..];
    if body.len() < body_len {
        return Err(ProtocolError::Truncated {
            need: HEADER_LEN + body_len,
            have: bytes.len(),
        });
    }
    if body.len() > body_len {
        return Err(ProtocolError::TrailingBytes(body.len() - body_len));
    }
    decode_body(body, limits)
}
