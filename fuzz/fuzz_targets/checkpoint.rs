//! Checkpoint files: arbitrary bytes through `Checkpoint::from_bytes`, and the same bytes as
//! the payload of a well-formed header (magic, version, length, the payload's sha256), so the
//! fuzzer reaches the payload decoder instead of stopping at the digest.
#![no_main]

use aggregator_core::checkpoint::{Checkpoint, FORMAT_VERSION, MAGIC};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let _ = Checkpoint::from_bytes(data);
    let mut sealed = MAGIC.to_vec();
    sealed.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    sealed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    sealed.extend_from_slice(&Sha256::digest(data));
    sealed.extend_from_slice(data);
    if let Ok(c) = Checkpoint::from_bytes(&sealed) {
        // Whatever decodes must survive a save and load unchanged. (Not byte-equal to the
        // input: postcard reads non-minimal varints, and writes minimal ones.)
        let saved = c.to_bytes().unwrap();
        let again = Checkpoint::from_bytes(&saved).unwrap();
        assert_eq!(again.to_bytes().unwrap(), saved);
    }
});
