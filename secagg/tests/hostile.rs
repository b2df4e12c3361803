//! Honest messages with random bytes changed, fed into a live round of four in place of the
//! originals: every step either refuses with a typed error or goes on, never panics, and a
//! changed share never reaches a finished sum.

use proptest::prelude::*;
use protocol::{Limits, Message, SecAgg, decode_body, encode_frame};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use secagg::{ClientRound, RoundParams, ServerRound};

/// Re-encodes `step`, applies the edits and decodes again; `None` if it no longer decodes
/// as the same kind of step.
fn mutate(step: SecAgg, edits: &[(usize, u8)]) -> Option<SecAgg> {
    let kind = step.kind();
    let frame = encode_frame(&Message::SecAgg(step)).ok()?;
    let mut body = frame[protocol::HEADER_LEN..].to_vec();
    for &(at, xor) in edits {
        let i = at % body.len();
        body[i] ^= xor;
    }
    match decode_body(&body, &Limits::default()) {
        Ok(Message::SecAgg(s)) if s.kind() == kind => Some(s),
        _ => None,
    }
}

/// Runs a round of four with the `target`-th message of client 0's exchange mutated.
fn round_with(target: usize, edits: &[(usize, u8)]) {
    let params = RoundParams::for_round(1, 1, 4, [0; 32], 8, 0.1, 1.0).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(0);
    let mut server = ServerRound::new(params.clone(), 3).unwrap();
    let mut clients = Vec::new();
    let hit = |i: usize, c: u32, step: SecAgg| -> Option<SecAgg> {
        if c == 0 && i == target {
            mutate(step, edits)
        } else {
            Some(step)
        }
    };
    for c in 0..4 {
        let (client, advert) = ClientRound::join_with(&params.setup_for(c), &mut rng).unwrap();
        if let Some(SecAgg::Advertise(a)) = hit(0, c, SecAgg::Advertise(advert)) {
            let _ = server.advertise(c, a);
        }
        clients.push(client);
    }
    let Ok(rosters) = server.rosters() else {
        return;
    };
    for (c, roster) in rosters {
        let Some(SecAgg::Roster(roster)) = hit(1, c, SecAgg::Roster(roster)) else {
            continue;
        };
        let Ok(shares) = clients[c as usize].share(&roster) else {
            continue;
        };
        if let Some(SecAgg::Shares(s)) = hit(2, c, SecAgg::Shares(shares)) {
            let _ = server.shares(c, s);
        }
    }
    let Ok(inboxes) = server.inboxes() else {
        return;
    };
    for (c, inbox) in inboxes {
        let Some(SecAgg::Inbox(inbox)) = hit(3, c, SecAgg::Inbox(inbox)) else {
            continue;
        };
        let Ok(masked) = clients[c as usize].mask(&inbox, &[c + 1; 8]) else {
            continue;
        };
        if let Some(SecAgg::Masked(m)) = hit(4, c, SecAgg::Masked(masked)) {
            let _ = server.masked(c, &m);
        }
    }
    let Ok(requests) = server.unmask_requests() else {
        return;
    };
    for (c, request) in requests {
        let Some(SecAgg::Unmask(r)) = hit(5, c, SecAgg::Unmask(request)) else {
            continue;
        };
        let Ok(reveal) = clients[c as usize].reveal(&r) else {
            continue;
        };
        if let Some(SecAgg::Reveal(r)) = hit(6, c, SecAgg::Reveal(reveal)) {
            let _ = server.reveal(c, r);
        }
    }
    if let Ok(aggregate) = server.finish() {
        // A client's keys and masked input are its own word: changed, they change the sum the
        // way a false input would (secure aggregation hides inputs, it cannot vouch for them).
        // The roster, inbox and unmask request only the aggregator could change, against its
        // own sum. The sealed and revealed shares are checked: changed, they must never reach
        // a finished sum.
        if matches!(target, 2 | 6) {
            let expected: u32 = aggregate.survivors.iter().map(|c| c + 1).sum();
            assert_eq!(aggregate.sum, vec![expected; 8], "target {target}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn changed_messages_are_refused_or_harmless(
        target in 0usize..7,
        edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
    ) {
        round_with(target, &edits);
    }
}
