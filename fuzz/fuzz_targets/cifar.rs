//! CIFAR binary batches (gzip or raw): the first byte picks the kind, the rest is the file.
#![no_main]

use datasets::CifarKind;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, file)) = data.split_first() else {
        return;
    };
    let kind = match pick % 3 {
        0 => CifarKind::Ten,
        1 => CifarKind::HundredFine,
        _ => CifarKind::HundredCoarse,
    };
    let path = common::scratch("cifar");
    std::fs::write(&path, file).unwrap();
    let _ = datasets::read_cifar(&[&path], kind, &common::small_limits());
});
