//! Feature cache files through `read_cache`, two ways. Raw: the input is the file (the
//! header checks). Sealed (first byte odd): the input picks dim and classes and gives the
//! labels and features; the target writes a header that matches the reader's key, the
//! payload's length and its sha256, so the fuzzer reaches the payload's decoding and
//! validation (labels against classes, finiteness) instead of stopping at "stale" or
//! "corrupt". (A first version patched only the key fields; coverage stalled at the digest.)
#![no_main]

use edge_client::cache::{CacheKey, FORMAT_VERSION, MAGIC, read_cache};
use edge_client::preprocess::PREPROCESSING_ID;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

#[path = "common.rs"]
mod common;

const KEY: CacheKey = CacheKey {
    backbone_sha256: [7; 32],
    side: 32,
    preprocessing: PREPROCESSING_ID,
    source_digest: [9; 32],
};

/// A file the reader's key accepts, around `payload` (labels then features).
fn sealed(dim: u32, classes: u32, payload: &[u8]) -> Vec<u8> {
    let row = 4 + 4 * dim as usize;
    let count = payload.len() / row;
    let payload = &payload[..count * row];
    let mut file = vec![0u8; 136];
    file[..8].copy_from_slice(&MAGIC);
    file[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    file[12..16].copy_from_slice(&KEY.preprocessing.to_le_bytes());
    file[16..20].copy_from_slice(&KEY.side.to_le_bytes());
    file[20..24].copy_from_slice(&dim.to_le_bytes());
    file[24..28].copy_from_slice(&classes.to_le_bytes());
    file[32..40].copy_from_slice(&(count as u64).to_le_bytes());
    file[40..72].copy_from_slice(&KEY.backbone_sha256);
    file[72..104].copy_from_slice(&KEY.source_digest);
    file[104..136].copy_from_slice(&Sha256::digest(payload));
    file.extend_from_slice(payload);
    file
}

fuzz_target!(|data: &[u8]| {
    let file = match data {
        [pick, dim, classes, payload @ ..] if pick & 1 == 1 => {
            sealed(1 + u32::from(*dim % 8), u32::from(*classes % 12), payload)
        }
        _ => data.to_vec(),
    };
    let path = common::scratch("cache");
    std::fs::write(&path, &file).unwrap();
    let _ = read_cache(&path, &KEY);
});
