//! The protocol's uses of the primitives: agreement, key derivation, sealing, mask streams,
//! commitments, and the share format.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::{aead, hkdf};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::SecAggError;

/// A 32-byte secret that is wiped when dropped.
pub(crate) type Secret = Zeroizing<[u8; 32]>;

/// What a derived key is for; each purpose gets its own key from one agreement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Purpose {
    /// Sealing shares between two neighbours.
    Sealing,
    /// The pairwise mask of two neighbours.
    PairMask,
}

/// Bytes of one share: x, then one byte per secret byte.
pub(crate) const SHARE_LEN: usize = 33;
/// Bytes of an opened share pair: sender, recipient, self-mask share, masking-key share.
const SHARES_PLAINTEXT_LEN: usize = 8 + 2 * SHARE_LEN;
/// Bytes of a sealed share pair.
pub(crate) const SEALED_LEN: usize = SHARES_PLAINTEXT_LEN + 16;

/// A fresh secret from the operating system's entropy (through ChaCha20).
pub(crate) fn fresh_secret(rng: &mut ChaCha20Rng) -> Secret {
    let mut out = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(out.as_mut());
    out
}

/// The X25519 public key of a secret.
pub(crate) fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// The key for `purpose` that `secret` and `peer`'s public key agree on in this round;
/// refuses a low-order public key, whose agreement anyone could predict.
pub(crate) fn agree(
    secret: &[u8; 32],
    public: &[u8; 32],
    peer: u32,
    purpose: Purpose,
    run_id: u64,
    round: u64,
) -> Result<Secret, SecAggError> {
    let shared = StaticSecret::from(*secret).diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(SecAggError::WeakKey(peer));
    }
    let label: &[u8] = match purpose {
        Purpose::Sealing => b"sealing",
        Purpose::PairMask => b"pair-mask",
    };
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"wsa-secagg v1").extract(shared.as_bytes());
    let (run, round) = (run_id.to_le_bytes(), round.to_le_bytes());
    let info = [label, &run[..], &round[..]];
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(&info, Len32)
        .and_then(|okm| okm.fill(out.as_mut()))
        .expect("HKDF-SHA256 gives 32 bytes");
    Ok(out)
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn sealing_key(key: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key).expect("a 32-byte key"),
    )
}

/// One key serves both directions of a pair for one round; the nonce names the direction.
fn nonce(from: u32, to: u32) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    n[4..8].copy_from_slice(&to.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn aad(run_id: u64, round: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&run_id.to_le_bytes());
    a[8..].copy_from_slice(&round.to_le_bytes());
    a
}

/// The two shares `from` deals to `to`, sealed.
pub(crate) fn seal_shares(
    key: &[u8; 32],
    (run_id, round): (u64, u64),
    (from, to): (u32, u32),
    self_mask_share: &[u8],
    key_share: &[u8],
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(SEALED_LEN);
    buf.extend_from_slice(&from.to_le_bytes());
    buf.extend_from_slice(&to.to_le_bytes());
    buf.extend_from_slice(self_mask_share);
    buf.extend_from_slice(key_share);
    debug_assert_eq!(buf.len(), SHARES_PLAINTEXT_LEN);
    sealing_key(key)
        .seal_in_place_append_tag(
            nonce(from, to),
            aead::Aad::from(aad(run_id, round)),
            &mut buf,
        )
        .expect("a share pair is far below ChaCha20-Poly1305's length limit");
    buf
}

/// The shares in a sealed pair from `from` to `to`: (self-mask share, masking-key share).
pub(crate) fn open_shares(
    key: &[u8; 32],
    (run_id, round): (u64, u64),
    (from, to): (u32, u32),
    sealed: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), SecAggError> {
    if sealed.len() != SEALED_LEN {
        return Err(SecAggError::Unsealing(from));
    }
    let mut buf = Zeroizing::new(sealed.to_vec());
    let plain = sealing_key(key)
        .open_in_place(
            nonce(from, to),
            aead::Aad::from(aad(run_id, round)),
            &mut buf,
        )
        .map_err(|_| SecAggError::Unsealing(from))?;
    // The tag covers the addressing too: a pair re-addressed by the aggregator does not open
    // under the other nonce, and the indices inside must agree.
    if plain[..4] != from.to_le_bytes() || plain[4..8] != to.to_le_bytes() {
        return Err(SecAggError::Unsealing(from));
    }
    let body = &plain[8..];
    Ok((
        body[..SHARE_LEN].to_vec(),
        body[SHARE_LEN..2 * SHARE_LEN].to_vec(),
    ))
}

/// Adds (or subtracts) the ChaCha20 stream of `seed`, read as little-endian u32s, to `acc`.
pub(crate) fn apply_mask(seed: &[u8; 32], subtract: bool, acc: &mut [u32]) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u8; 4096];
    for chunk in acc.chunks_mut(block.len() / 4) {
        let bytes = &mut block[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        for (a, word) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            *a = if subtract {
                a.wrapping_sub(m)
            } else {
                a.wrapping_add(m)
            };
        }
    }
}

/// The commitment a client publishes to its self-mask seed.
pub(crate) fn commitment(run_id: u64, round: u64, index: u32, seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"wsa-secagg v1 self-mask");
    h.update(run_id.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update(index.to_le_bytes());
    h.update(seed);
    h.finalize().into()
}

/// `count` Shamir shares (threshold `threshold`) of a 32-byte secret, the i-th at x = i + 1.
pub(crate) fn deal(secret: &[u8; 32], threshold: u32, count: usize) -> Vec<Zeroizing<Vec<u8>>> {
    blahaj::Sharks(threshold as u8)
        .dealer(secret)
        .take(count)
        .map(|share| Zeroizing::new(Vec::from(&share)))
        .collect()
}

/// The secret behind `shares` (each already checked to sit at its holder's x, so all x are
/// distinct), if there are at least `threshold`.
pub(crate) fn rebuild(shares: &[&[u8]], threshold: u32) -> Option<Secret> {
    let parsed: Vec<blahaj::Share> = shares
        .iter()
        .take(threshold as usize)
        .map(|s| blahaj::Share::try_from(*s))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes = Zeroizing::new(blahaj::Sharks(threshold as u8).recover(&parsed).ok()?);
    let mut out = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return None;
    }
    out.copy_from_slice(&bytes);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_of_an_agreement_get_one_key_per_purpose_and_round() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (pa, pb) = (public_key(&a), public_key(&b));
        let ab = agree(&a, &pb, 1, Purpose::PairMask, 9, 3).unwrap();
        let ba = agree(&b, &pa, 0, Purpose::PairMask, 9, 3).unwrap();
        assert_eq!(*ab, *ba);
        let sealing = agree(&a, &pb, 1, Purpose::Sealing, 9, 3).unwrap();
        let next_round = agree(&a, &pb, 1, Purpose::PairMask, 9, 4).unwrap();
        assert_ne!(*ab, *sealing);
        assert_ne!(*ab, *next_round);
    }

    #[test]
    fn a_low_order_key_is_refused() {
        // The identity point: every agreement with it is zero.
        let zero = [0u8; 32];
        assert_eq!(
            agree(&[1; 32], &zero, 4, Purpose::Sealing, 0, 0).unwrap_err(),
            SecAggError::WeakKey(4)
        );
    }

    #[test]
    fn sealed_shares_open_only_for_their_direction_and_round() {
        let key = [5u8; 32];
        let (s, k) = ([1u8; SHARE_LEN], [2u8; SHARE_LEN]);
        let sealed = seal_shares(&key, (1, 2), (3, 4), &s, &k);
        assert_eq!(sealed.len(), SEALED_LEN);
        let (os, ok) = open_shares(&key, (1, 2), (3, 4), &sealed).unwrap();
        assert_eq!((os.as_slice(), ok.as_slice()), (&s[..], &k[..]));
        assert!(open_shares(&key, (1, 2), (4, 3), &sealed).is_err());
        assert!(open_shares(&key, (1, 3), (3, 4), &sealed).is_err());
        let mut flipped = sealed.clone();
        flipped[10] ^= 1;
        assert!(open_shares(&key, (1, 2), (3, 4), &flipped).is_err());
        assert!(open_shares(&key, (1, 2), (3, 4), &sealed[..40]).is_err());
    }

    #[test]
    fn a_mask_added_then_subtracted_leaves_the_input() {
        let input: Vec<u32> = (0..5000).collect();
        let mut v = input.clone();
        apply_mask(&[9; 32], false, &mut v);
        assert_ne!(v, input);
        apply_mask(&[9; 32], true, &mut v);
        assert_eq!(v, input);
    }

    #[test]
    fn any_threshold_of_shares_rebuilds_and_fewer_do_not() {
        let secret = [0xab; 32];
        let shares = deal(&secret, 3, 5);
        let refs: Vec<&[u8]> = shares.iter().map(|s| s.as_slice()).collect();
        for pick in [[0, 1, 2], [2, 3, 4], [0, 2, 4]] {
            let chosen: Vec<&[u8]> = pick.iter().map(|&i| refs[i]).collect();
            assert_eq!(*rebuild(&chosen, 3).unwrap(), secret);
        }
        assert!(rebuild(&refs[..2], 3).is_none());
        assert_eq!(shares[0][0], 1);
        assert_eq!(shares[4][0], 5);
    }
}
