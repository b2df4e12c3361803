//! Bounds on what a peer may send, from configuration.

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::message::{MAX_SECAGG_NEIGHBOURS, Message, RevealedShare, SealedShares, SecAgg};

/// Size and count limits. The frame length is checked before its body is read, so no
/// allocation exceeds `max_message_bytes`; the counts are checked after decoding, before the
/// message is acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame body.
    pub max_message_bytes: u32,
    /// Most parameters in a head.
    pub max_params: u32,
    /// Most hidden layers in a head.
    pub max_hidden_layers: u32,
    /// Most scopes (scoped tensors) in a message.
    pub max_scopes: u32,
    /// Longest client id, in bytes.
    pub max_client_id_bytes: u32,
    /// Longest auth token, in bytes.
    pub max_token_bytes: u32,
    /// Most classes a run may name.
    pub max_classes: u32,
    /// Longest class name, in bytes.
    pub max_class_name_bytes: u32,
}

impl Default for Limits {
    /// Room for heads of up to 16M parameters in f32.
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 20,
            max_params: 16 << 20,
            max_hidden_layers: 16,
            max_scopes: 64,
            max_client_id_bytes: 128,
            max_token_bytes: 256,
            max_classes: 10_000,
            max_class_name_bytes: 256,
        }
    }
}

impl Limits {
    /// Checks the counts inside a decoded message.
    pub fn check(&self, message: &Message) -> Result<(), ProtocolError> {
        let over = |what: &'static str, got: usize, max: u32| {
            if got as u64 > u64::from(max) {
                Err(ProtocolError::LimitExceeded {
                    what,
                    got: got as u64,
                    max: max.into(),
                })
            } else {
                Ok(())
            }
        };
        let check_classes = |classes: &[String]| {
            over("classes", classes.len(), self.max_classes)?;
            let longest = classes.iter().map(String::len).max().unwrap_or(0);
            over("class name bytes", longest, self.max_class_name_bytes)
        };
        match message {
            Message::Hello(h) => {
                over(
                    "client id bytes",
                    h.client_id.len(),
                    self.max_client_id_bytes,
                )?;
                if let crate::Auth::Token(t) = &h.auth {
                    over("token bytes", t.len(), self.max_token_bytes)?;
                }
            }
            Message::RoundTask(t) => {
                over(
                    "hidden layers",
                    t.shape.hidden.len(),
                    self.max_hidden_layers,
                )?;
                over("parameters", t.global.count as usize, self.max_params)?;
                over("scopes", t.targets.len(), self.max_scopes)?;
            }
            Message::Update(u) => {
                over(
                    "client id bytes",
                    u.client_id.len(),
                    self.max_client_id_bytes,
                )?;
                over("parameters", u.params.count as usize, self.max_params)?;
                over("scopes", u.scopes.len(), self.max_scopes)?;
            }
            Message::Welcome(w) => check_classes(&w.classes)?,
            Message::FinalModel(m) => {
                over(
                    "hidden layers",
                    m.shape.hidden.len(),
                    self.max_hidden_layers,
                )?;
                over("parameters", m.params.count as usize, self.max_params)?;
                check_classes(&m.classes)?;
                // A few backbone files of 64 hex digits each; short labels.
                over("backbone hashes", m.backbone_sha256.len(), 16)?;
                let longest = m.backbone_sha256.iter().map(String::len).max().unwrap_or(0);
                over("backbone hash bytes", longest, 64)?;
                over("strategy bytes", m.strategy.len(), 256)?;
                over("preprocessing bytes", m.preprocessing.len(), 256)?;
            }
            Message::SecAgg(step) => self.check_secagg(step)?,
            Message::Verdict(_) | Message::Goodbye(_) => {}
        }
        Ok(())
    }

    /// A secure-aggregation step's counts: lists of neighbours (at most
    /// [`MAX_SECAGG_NEIGHBOURS`]), fixed-size shares, and a masked input no longer than a head
    /// plus its scope sums.
    fn check_secagg(&self, step: &SecAgg) -> Result<(), ProtocolError> {
        let over = |what: &'static str, got: usize, max: u64| {
            if got as u64 > max {
                Err(ProtocolError::LimitExceeded {
                    what,
                    got: got as u64,
                    max,
                })
            } else {
                Ok(())
            }
        };
        let neighbours = u64::from(MAX_SECAGG_NEIGHBOURS);
        let sealed = |list: &[SealedShares]| {
            over("secagg neighbours", list.len(), neighbours)?;
            let longest = list.iter().map(|s| s.ciphertext.len()).max().unwrap_or(0);
            over("secagg sealed bytes", longest, MAX_SEALED_SHARES_BYTES)
        };
        let revealed = |list: &[RevealedShare]| {
            over("secagg neighbours", list.len(), neighbours)?;
            let longest = list.iter().map(|s| s.share.len()).max().unwrap_or(0);
            over("secagg share bytes", longest, MAX_SHARE_BYTES)
        };
        let max_vector = u64::from(self.max_params) + 4 * u64::from(self.max_scopes) + 16;
        match step {
            SecAgg::Setup(s) => {
                over("secagg neighbours", s.neighbours as usize, neighbours)?;
                over("secagg vector length", s.vector_len as usize, max_vector)?;
            }
            SecAgg::Advertise(_) => {}
            SecAgg::Roster(r) => over("secagg neighbours", r.peers.len(), neighbours)?,
            SecAgg::Shares(s) => sealed(&s.sealed)?,
            SecAgg::Inbox(s) => sealed(&s.sealed)?,
            SecAgg::Masked(m) => over("secagg masked bytes", m.masked.len(), 4 * max_vector)?,
            SecAgg::Unmask(u) => {
                over("secagg neighbours", u.survivors.len(), neighbours)?;
                over("secagg neighbours", u.dropped.len(), neighbours)?;
            }
            SecAgg::Reveal(r) => {
                revealed(&r.self_mask_shares)?;
                revealed(&r.key_shares)?;
            }
        }
        Ok(())
    }
}

/// A share is its x coordinate and one byte per byte of a 32-byte secret.
const MAX_SHARE_BYTES: u64 = 33;
/// Two shares, the sender and recipient indices and a Poly1305 tag, with room to spare.
const MAX_SEALED_SHARES_BYTES: u64 = 256;
