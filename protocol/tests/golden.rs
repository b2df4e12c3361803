//! Golden bytes: the exact frames of sample messages. A change here is a wire-format change:
//! bump `PROTOCOL_VERSION` (and keep decoding the old one if deployed clients need it).

mod common;

use protocol::{Limits, decode_frame, encode_frame};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_message_encodes_to_its_pinned_bytes() {
    let golden: std::collections::BTreeMap<&str, &str> = include_str!("golden.txt")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once(' ').expect("name hex"))
        .collect();
    let mut fresh = String::new();
    let mut mismatches = Vec::new();
    for (name, message) in common::samples() {
        let frame = encode_frame(&message).unwrap();
        fresh.push_str(&format!("{name} {}\n", hex(&frame)));
        if golden.get(name) != Some(&hex(&frame).as_str()) {
            mismatches.push(name);
        }
        assert_eq!(decode_frame(&frame, &Limits::default()).unwrap(), message);
    }
    assert!(
        mismatches.is_empty(),
        "wire bytes changed for {mismatches:?}; if intended, bump PROTOCOL_VERSION and \
         replace tests/golden.txt with:\n{fresh}"
    );
    assert_eq!(
        golden.len(),
        common::samples().len(),
        "stale entries in golden.txt"
    );
}
