//! Feature cache files: arbitrary bytes through `read_cache`, with the header's key fields
//! (magic, version, preprocessing, side, model and source digests) overwritten to match the
//! reader's key when the input is long enough, so the fuzzer reaches the bounds checks and
//! the rows instead of stopping at "stale".
#![no_main]

use edge_client::cache::{CacheKey, FORMAT_VERSION, MAGIC, read_cache};
use edge_client::preprocess::PREPROCESSING_ID;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const KEY: CacheKey = CacheKey {
    backbone_sha256: [7; 32],
    side: 32,
    preprocessing: PREPROCESSING_ID,
    source_digest: [9; 32],
};

fuzz_target!(|data: &[u8]| {
    let mut file = data.to_vec();
    if file.len() >= 104 && data[0] & 1 == 1 {
        file[..8].copy_from_slice(&MAGIC);
        file[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        file[12..16].copy_from_slice(&KEY.preprocessing.to_le_bytes());
        file[16..20].copy_from_slice(&KEY.side.to_le_bytes());
        file[40..72].copy_from_slice(&KEY.backbone_sha256);
        file[72..104].copy_from_slice(&KEY.source_digest);
    }
    let path = common::scratch("cache");
    std::fs::write(&path, &file).unwrap();
    let _ = read_cache(&path, &KEY);
});
