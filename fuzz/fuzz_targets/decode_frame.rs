//! Arbitrary bytes through the frame decoder and, when they decode, through everything a
//! receiver does next with a message (digest check, parameter decode against its shape).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{Limits, Message, RowLayout, decode_frame};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_message_bytes: 1 << 20,
        ..Limits::default()
    };
    match decode_frame(data, &limits) {
        Ok(Message::Update(u)) => {
            let _ = u.digest_ok();
            let _ = u
                .params
                .decode(&RowLayout::uniform(u.params.count as usize, 16));
        }
        Ok(Message::RoundTask(t)) => {
            if let Ok(spec) = t.shape.to_spec() {
                let _ = t.global.decode(&RowLayout::of_head(&spec));
            }
        }
        _ => {}
    }
});
