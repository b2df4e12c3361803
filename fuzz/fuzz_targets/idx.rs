//! IDX files (MNIST, Fashion-MNIST): the input is split into an images file and a labels file
//! (the first two bytes give the split), gzip or raw, and read with small limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((split, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(u16::from_le_bytes(*split)).min(rest.len());
    let (images, labels) = rest.split_at(at);
    let (ip, lp) = (common::scratch("images"), common::scratch("labels"));
    std::fs::write(&ip, images).unwrap();
    std::fs::write(&lp, labels).unwrap();
    let _ = datasets::read_idx(&ip, &lp, None, &common::small_limits());
});
