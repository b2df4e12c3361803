//! Arbitrary secure-aggregation steps into an honest round of four clients, in place of client
//! 0's message (at the aggregator) or of the aggregator's message (at client 0); the round is
//! then driven to its end. Every outcome must be a typed error or a finished round, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{Limits, Message, SecAgg, decode_body};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use secagg::{ClientRound, RoundParams, ServerRound};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_message_bytes: 1 << 16,
        max_params: 64,
        ..Limits::default()
    };
    let Ok(Message::SecAgg(step)) = decode_body(data, &limits) else {
        return;
    };
    let params = RoundParams::for_round(1, 1, 4, [0; 32], 8, 0.1, 1.0).expect("valid parameters");
    let mut rng = ChaCha20Rng::seed_from_u64(0);
    if let SecAgg::Setup(setup) = &step {
        let _ = ClientRound::join_with(setup, &mut rng);
        return;
    }
    let mut server = ServerRound::new(params.clone(), 3).expect("valid minimum");
    let mut clients = Vec::new();
    for c in 0..4 {
        let (client, advert) =
            ClientRound::join_with(&params.setup_for(c), &mut rng).expect("valid setup");
        let advert = match (&step, c) {
            (SecAgg::Advertise(fuzzed), 0) => fuzzed.clone(),
            _ => advert,
        };
        let _ = server.advertise(c, advert);
        clients.push(client);
    }
    let Ok(rosters) = server.rosters() else {
        return;
    };
    for (c, mut roster) in rosters {
        if let (SecAgg::Roster(fuzzed), 0) = (&step, c) {
            roster = fuzzed.clone();
        }
        let Ok(mut shares) = clients[c as usize].share(&roster) else {
            continue;
        };
        if let (SecAgg::Shares(fuzzed), 0) = (&step, c) {
            shares = fuzzed.clone();
        }
        let _ = server.shares(c, shares);
    }
    let Ok(inboxes) = server.inboxes() else {
        return;
    };
    for (c, mut inbox) in inboxes {
        if let (SecAgg::Inbox(fuzzed), 0) = (&step, c) {
            inbox = fuzzed.clone();
        }
        let Ok(mut masked) = clients[c as usize].mask(&inbox, &[c; 8]) else {
            continue;
        };
        if let (SecAgg::Masked(fuzzed), 0) = (&step, c) {
            masked = fuzzed.clone();
        }
        let _ = server.masked(c, &masked);
    }
    let Ok(requests) = server.unmask_requests() else {
        return;
    };
    for (c, mut request) in requests {
        if let (SecAgg::Unmask(fuzzed), 0) = (&step, c) {
            request = fuzzed.clone();
        }
        let Ok(mut reveal) = clients[c as usize].reveal(&request) else {
            continue;
        };
        if let (SecAgg::Reveal(fuzzed), 0) = (&step, c) {
            reveal = fuzzed.clone();
        }
        let _ = server.reveal(c, reveal);
    }
    let _ = server.finish();
});
