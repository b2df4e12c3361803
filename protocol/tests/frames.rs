//! Framing and decoding of hostile bytes: every failure is a typed error, never a panic.

mod common;

use proptest::prelude::*;
use protocol::{
    FrameHeader, HEADER_LEN, Limits, Message, PROTOCOL_VERSION, ProtocolError, RejectReason,
    RevealedShare, SecAgg, SecAggMasked, SecAggReveal, SecAggUnmask, decode_body, decode_frame,
    encode_frame,
};

fn frames() -> Vec<Vec<u8>> {
    common::samples()
        .iter()
        .map(|(_, m)| encode_frame(m).unwrap())
        .collect()
}

#[test]
fn truncated_frames_are_refused_at_every_length() {
    for frame in frames() {
        for cut in 0..frame.len() {
            let err = decode_frame(&frame[..cut], &Limits::default()).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }
}

#[test]
fn header_checks_come_before_the_body() {
    let frame = encode_frame(&common::samples()[0].1).unwrap();
    let limits = Limits::default();
    let mut bad_magic = frame.clone();
    bad_magic[0] = b'X';
    assert!(matches!(
        decode_frame(&bad_magic, &limits),
        Err(ProtocolError::BadMagic(_))
    ));
    let mut version = frame.clone();
    let other = PROTOCOL_VERSION + 1;
    version[4..6].copy_from_slice(&other.to_le_bytes());
    let err = decode_frame(&version, &limits).unwrap_err();
    assert_eq!(err, ProtocolError::UnsupportedVersion(other));
    assert_eq!(err.reject_reason(), RejectReason::UnsupportedVersion(other));
    // A length prefix of 4 GiB is refused from the header alone.
    let mut huge = [0u8; HEADER_LEN];
    huge.copy_from_slice(&frame[..HEADER_LEN]);
    huge[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        FrameHeader::parse(&huge, &limits),
        Err(ProtocolError::TooLarge { .. })
    ));
}

#[test]
fn trailing_bytes_are_refused_inside_and_after_the_body() {
    let limits = Limits::default();
    let mut frame = encode_frame(&common::samples()[1].1).unwrap();
    frame.push(0);
    assert_eq!(
        decode_frame(&frame, &limits),
        Err(ProtocolError::TrailingBytes(1))
    );
    // The same extra byte counted in the length prefix: the body itself has trailing bytes.
    let len = u32::from_le_bytes(frame[6..10].try_into().unwrap()) + 1;
    frame[6..10].copy_from_slice(&len.to_le_bytes());
    assert_eq!(
        decode_frame(&frame, &limits),
        Err(ProtocolError::TrailingBytes(1))
    );
}

#[test]
fn unknown_variants_are_decode_errors() {
    // Variant index 8 is past the last message kind, 8 past the last secure-aggregation step.
    assert!(matches!(
        decode_body(&[8], &Limits::default()),
        Err(ProtocolError::Decode(_))
    ));
    assert!(matches!(
        decode_body(&[7, 8], &Limits::default()),
        Err(ProtocolError::Decode(_))
    ));
    assert!(matches!(
        decode_body(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], &Limits::default()),
        Err(ProtocolError::Decode(_))
    ));
}

#[test]
fn counts_are_checked_against_configured_limits() {
    let tight = Limits {
        max_params: 10,
        max_client_id_bytes: 1,
        max_class_name_bytes: 2,
        ..Limits::default()
    };
    for (name, message) in common::samples() {
        let frame = encode_frame(&message).unwrap();
        let result = decode_frame(&frame, &tight);
        match message {
            Message::Hello(_)
            | Message::Welcome(_)
            | Message::RoundTask(_)
            | Message::Update(_)
            | Message::FinalModel(_) => assert!(
                matches!(result, Err(ProtocolError::LimitExceeded { .. })),
                "{name}: {result:?}"
            ),
            _ => assert!(result.is_ok(), "{name}"),
        }
    }
    let few_classes = Limits {
        max_classes: 1,
        ..Limits::default()
    };
    let welcome = encode_frame(&common::samples()[1].1).unwrap();
    assert!(matches!(
        decode_frame(&welcome, &few_classes),
        Err(ProtocolError::LimitExceeded {
            what: "classes",
            ..
        })
    ));
    let small = Limits {
        max_message_bytes: 8,
        ..Limits::default()
    };
    let frame = encode_frame(&common::samples()[0].1).unwrap();
    assert!(matches!(
        decode_frame(&frame, &small),
        Err(ProtocolError::TooLarge { .. })
    ));
}

#[test]
fn secure_aggregation_lists_and_shares_are_bounded() {
    let limits = Limits {
        max_params: 10,
        ..Limits::default()
    };
    let too_many = (0..=protocol::MAX_SECAGG_NEIGHBOURS).collect::<Vec<u32>>();
    let unmask = Message::SecAgg(SecAgg::Unmask(SecAggUnmask {
        run_id: 1,
        round: 1,
        survivors: too_many.clone(),
        dropped: vec![],
    }));
    let long_share = Message::SecAgg(SecAgg::Reveal(SecAggReveal {
        run_id: 1,
        round: 1,
        self_mask_shares: vec![RevealedShare {
            owner: 0,
            share: vec![0; 34],
        }],
        key_shares: vec![],
    }));
    let long_input = Message::SecAgg(SecAgg::Masked(SecAggMasked {
        run_id: 1,
        round: 1,
        masked: vec![0; 4 * (limits.max_params as usize + 4 * limits.max_scopes as usize + 17)],
    }));
    for message in [unmask, long_share, long_input] {
        let frame = encode_frame(&message).unwrap();
        let result = decode_frame(&frame, &limits);
        assert!(
            matches!(result, Err(ProtocolError::LimitExceeded { .. })),
            "{}: {result:?}",
            message.kind()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn garbage_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_body(&body, &Limits::default());
        let mut frame = protocol::MAGIC.to_vec();
        frame.extend_from_slice(&protocol::PROTOCOL_VERSION.to_le_bytes());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        let _ = decode_frame(&frame, &Limits::default());
    }

    #[test]
    fn mutated_frames_never_panic(
        which in 0usize..8,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut frame = frames()[which].clone();
        for (i, b) in flips {
            let i = i.index(frame.len());
            frame[i] ^= b;
        }
        if let Ok(Message::Update(u)) = decode_frame(&frame, &Limits::default()) {
            // Whatever decodes must still be checkable without panicking.
            let _ = u.digest_ok();
        }
    }
}

/// Inputs the fuzz targets (`fuzz/`, `scripts/fuzz.sh`) once broke the decoder with, run
/// through what the `decode_frame` target does: each must come back as a typed error or a
/// message, within bounded memory.
#[test]
fn fuzz_regressions_decode_to_errors_not_crashes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let limits = Limits {
            max_message_bytes: 1 << 20,
            ..Limits::default()
        };
        match protocol::decode_frame(&bytes, &limits) {
            // A round task whose shape claims ~2^31 values over a few bytes of data: the
            // decoder used to allocate the claimed output before checking the data's length.
            Ok(Message::RoundTask(t)) => {
                let decoded = t
                    .shape
                    .to_spec()
                    .map(|spec| t.global.decode(&protocol::RowLayout::of_head(&spec)));
                assert!(!matches!(decoded, Ok(Ok(_))));
            }
            Ok(Message::Update(u)) => {
                let _ = u.digest_ok();
            }
            _ => {}
        }
        seen += 1;
    }
    assert!(seen >= 1, "no regression inputs in {}", dir.display());
}
