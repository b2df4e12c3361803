//! What a run needs to go on after a restart, and its file format.
//!
//! A [`Checkpoint`] is taken after every closed round. Sampling draws from an RNG derived from
//! `(seed, round, attempt)`, so the RNG's whole state is the seed and the round counters here;
//! clients, open rounds and connections are not saved (a resumed run opens its next round
//! afresh with whoever connects).
//!
//! File layout, all integers little-endian:
//!
//! ```text
//! magic "WSAC" | format version u16 | payload length u64 | sha256(payload) [32] | payload
//! ```
//!
//! The payload is the postcard encoding of [`Checkpoint`]. [`Checkpoint::save_atomic`]
//! writes it atomically, so a crash leaves either the old file or the new one. Loading checks
//! every part and never panics on any content.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wsa::Scope;

use crate::privacy::PrivacyState;

/// The first four bytes of a checkpoint file.
pub const MAGIC: [u8; 4] = *b"WSAC";
/// The format version this build writes (and the newest it reads).
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format version this build reads: version 1 lacks the trailing `privacy`.
pub const OLDEST_FORMAT_VERSION: u16 = 1;
/// Bytes before the payload: magic, version, payload length, sha256.
pub const HEADER_LEN: usize = 4 + 2 + 8 + 32;

/// Counters over the whole run, carried across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Rounds that met their quorum and moved the global head.
    pub rounds_closed: u64,
    /// Round attempts that closed below quorum.
    pub rounds_failed: u64,
    /// Updates folded into a global head, over all rounds.
    pub updates_accepted: u64,
    /// Updates refused, over all rounds.
    pub updates_rejected: u64,
}

/// The state of a run between rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// sha256 of the engine configuration it was taken under; resuming needs the same one.
    pub config_hash: [u8; 32],
    /// The run.
    pub run_id: u64,
    /// The run's seed (sampling and training seeds derive from it and the round counters).
    pub seed: u64,
    /// The round the run opens next.
    pub next_round: u64,
    /// Failed attempts at `next_round` so far (the next attempt's number).
    pub attempt: u32,
    /// The global head's flat parameters.
    pub global: Vec<f32>,
    /// The target scope of every scoped tensor for `next_round`.
    pub targets: Vec<Scope>,
    /// Run-wide counters.
    pub history: History,
    /// Under client-level DP: the clip norm and the privacy spent (format version 2).
    pub privacy: Option<PrivacyState>,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No file at the path (a fresh run, or a wrong path).
    #[error("no checkpoint at {0}")]
    Missing(PathBuf),
    /// Reading or writing failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Fewer bytes than the header or the announced payload length need (an interrupted copy).
    #[error("checkpoint truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// Not a checkpoint file.
    #[error("not a checkpoint file (magic {0:02x?}, expected \"WSAC\")")]
    BadMagic([u8; 4]),
    /// Written by a build with another format.
    #[error(
        "checkpoint format version {found}, this build reads {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
    )]
    BadVersion {
        /// The version in the file.
        found: u16,
    },
    /// The payload does not match its sha256 (corruption).
    #[error("checkpoint payload does not match its sha256")]
    DigestMismatch,
    /// The payload matches its digest but does not decode.
    #[error("checkpoint payload does not decode: {0}")]
    Undecodable(String),
    /// Bytes after the payload, or after the checkpoint inside the payload.
    #[error("{0} trailing bytes in the checkpoint")]
    TrailingBytes(u64),
    /// The checkpoint could not be encoded.
    #[error("cannot encode the checkpoint: {0}")]
    Encode(String),
}

impl Checkpoint {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let payload =
            postcard::to_stdvec(self).map_err(|e| CheckpointError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&payload));
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Parses a file's bytes, checking magic, version, length, digest and decoding in turn.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CheckpointError> {
        let have = bytes.len() as u64;
        if let Some(magic) = bytes.get(..4)
            && magic != MAGIC
        {
            let mut m = [0; 4];
            m.copy_from_slice(magic);
            return Err(CheckpointError::BadMagic(m));
        }
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(CheckpointError::Truncated {
                need: HEADER_LEN as u64,
                have,
            });
        };
        let (version, rest) = header[4..].split_at(2);
        let version = u16::from_le_bytes([version[0], version[1]]);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(CheckpointError::BadVersion { found: version });
        }
        let (len, digest) = rest.split_at(8);
        let mut len_bytes = [0; 8];
        len_bytes.copy_from_slice(len);
        let need = u64::from_le_bytes(len_bytes).saturating_add(HEADER_LEN as u64);
        if have < need {
            return Err(CheckpointError::Truncated { need, have });
        }
        if have > need {
            return Err(CheckpointError::TrailingBytes(have - need));
        }
        let payload = &bytes[HEADER_LEN..];
        if Sha256::digest(payload).as_slice() != digest {
            return Err(CheckpointError::DigestMismatch);
        }
        // Version 1 is version 2 without its last field, an `Option`: postcard writes `None`
        // as one zero byte, so appending it reads a version-1 payload as "no privacy".
        let widened;
        let payload = if version == 1 {
            widened = [payload, &[0]].concat();
            &widened[..]
        } else {
            payload
        };
        let (checkpoint, left) = postcard::take_from_bytes::<Checkpoint>(payload)
            .map_err(|e| CheckpointError::Undecodable(e.to_string()))?;
        if !left.is_empty() {
            return Err(CheckpointError::TrailingBytes(left.len() as u64));
        }
        Ok(checkpoint)
    }

    /// Writes the checkpoint so that `path` holds either the previous file or this one, never
    /// a mix ([`support::fs::write_atomic`]).
    pub fn save_atomic(&self, path: &Path) -> Result<(), CheckpointError> {
        let bytes = self.to_bytes()?;
        support::fs::write_atomic(path, &bytes).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and checks a checkpoint file.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = fs::read(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                CheckpointError::Missing(path.to_path_buf())
            } else {
                CheckpointError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            config_hash: [7; 32],
            run_id: 42,
            seed: 9,
            next_round: 3,
            attempt: 1,
            global: vec![0.5, -1.25, 3.0, f32::MIN_POSITIVE],
            targets: vec![Scope {
                mean: 0.01,
                std: 0.2,
            }],
            history: History {
                rounds_closed: 3,
                rounds_failed: 1,
                updates_accepted: 12,
                updates_rejected: 2,
            },
            privacy: None,
        }
    }

    #[test]
    fn privacy_state_round_trips_and_version_1_files_still_load() {
        let mut private = sample();
        let mut state = crate::privacy::PrivacyState::new(&crate::privacy::Privacy {
            noise_multiplier: 1.0,
            clip: crate::privacy::Clip::Fixed { norm: 0.5 },
            delta: 1e-5,
            scope_share: 0.1,
            epsilon_budget: Some(8.0),
        });
        state.accountant.compose(0.1, 1.0, 7);
        private.privacy = Some(state);
        let bytes = private.to_bytes().unwrap();
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), private);

        // A version-1 file: the payload without the trailing `None`, under its own header.
        let v2 = postcard::to_stdvec(&sample()).unwrap();
        let payload = &v2[..v2.len() - 1];
        let mut v1 = Vec::new();
        v1.extend_from_slice(&MAGIC);
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        v1.extend_from_slice(&Sha256::digest(payload));
        v1.extend_from_slice(payload);
        assert_eq!(Checkpoint::from_bytes(&v1).unwrap(), sample());
    }

    #[test]
    fn save_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.ckpt");
        sample().save_atomic(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), sample());
        // Overwriting replaces the file and leaves no temporary behind.
        let mut next = sample();
        next.next_round = 4;
        next.save_atomic(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), next);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Checkpoint::load(&dir.path().join("nope")),
            Err(CheckpointError::Missing(_))
        ));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample().to_bytes().unwrap();
        for cut in 0..bytes.len() {
            match Checkpoint::from_bytes(&bytes[..cut]) {
                Err(CheckpointError::Truncated { have, .. }) => assert_eq!(have, cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            Checkpoint::from_bytes(&bytes),
            Err(CheckpointError::BadMagic(m)) if &m == b"XSAC"
        ));
        let mut bytes = sample().to_bytes().unwrap();
        for version in [0u16, 3] {
            bytes[4..6].copy_from_slice(&version.to_le_bytes());
            assert!(matches!(
                Checkpoint::from_bytes(&bytes),
                Err(CheckpointError::BadVersion { found }) if found == version
            ));
        }
    }

    #[test]
    fn flipped_payload_bit_is_a_digest_mismatch() {
        let clean = sample().to_bytes().unwrap();
        for i in HEADER_LEN..clean.len() {
            let mut bytes = clean.clone();
            bytes[i] ^= 0x10;
            assert!(matches!(
                Checkpoint::from_bytes(&bytes),
                Err(CheckpointError::DigestMismatch)
            ));
        }
    }

    #[test]
    fn undecodable_payload_with_a_valid_digest() {
        let payload = [0xffu8; 5];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(payload));
        bytes.extend_from_slice(&payload);
        assert!(matches!(
            Checkpoint::from_bytes(&bytes),
            Err(CheckpointError::Undecodable(_))
        ));
    }

    #[test]
    fn trailing_bytes_after_and_inside_the_payload() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes.extend_from_slice(&[0, 0, 0]);
        assert!(matches!(
            Checkpoint::from_bytes(&bytes),
            Err(CheckpointError::TrailingBytes(3))
        ));
        let mut payload = postcard::to_stdvec(&sample()).unwrap();
        payload.push(0);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(&payload));
        bytes.extend_from_slice(&payload);
        assert!(matches!(
            Checkpoint::from_bytes(&bytes),
            Err(CheckpointError::TrailingBytes(1))
        ));
    }

    #[test]
    fn a_huge_announced_length_is_truncation_not_an_allocation() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[6..14].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Checkpoint::from_bytes(&bytes),
            Err(CheckpointError::Truncated { need: u64::MAX, .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = Checkpoint::from_bytes(&bytes);
            let mut with_header = MAGIC.to_vec();
            with_header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            with_header.extend_from_slice(&bytes);
            let _ = Checkpoint::from_bytes(&with_header);
        }
    }
}
