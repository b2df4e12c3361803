//! What secure aggregation costs: whole rounds of n clients and the aggregator in one process,
//! for the linear head (1280→10) and the 1280→256→10 MLP head, each with the WSA sums of its
//! scoped tensors appended. Per round: CPU per client (all four steps; mean and max), the
//! aggregator's CPU over all steps, and bytes per client each way, with no client dropping and
//! with 10% dropping after sharing their keys (the aggregator then rebuilds their pairwise
//! masks). The plain protocol's figures come from the same process: the f32 bytes of the head
//! and an f32 sum of the n heads, the least the aggregator does without masks.
//! Writes JSON to the workspace's `target/bench/secagg.json`.
//!
//! `cargo bench -p secagg --bench secagg`

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use protocol::{Message, SecAgg, encode_frame};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use secagg::{ClientRound, RoundParams, ServerRound};

/// `cargo bench` passes `--bench`; `cargo test --all-targets` only smoke-tests a tiny round.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn frame_len(step: SecAgg) -> usize {
    encode_frame(&Message::SecAgg(step)).expect("encodes").len()
}

struct Row {
    head: &'static str,
    n: u32,
    len: u32,
    design_dropout: f64,
    dropped: usize,
    neighbours: u32,
    client_ms_mean: f64,
    client_ms_max: f64,
    server_ms: f64,
    up_bytes: f64,
    down_bytes: f64,
    plain_bytes: usize,
    plain_server_ms: f64,
}

fn round(head: &'static str, n: u32, len: u32, design_dropout: f64, drop: f64) -> Row {
    let params = RoundParams::for_round(1, 1, n, [3; 32], len, design_dropout, 1.0).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(n));
    let input: Vec<u32> = (0..len).map(|_| rng.random::<u32>() >> 12).collect();
    let gone: BTreeSet<u32> = (0..n).filter(|_| rng.random::<f64>() < drop).collect();
    let mut client_ms = vec![0.0; n as usize];
    let (mut up, mut down) = (0usize, 0usize);
    let mut server_ms = 0.0;
    let timed = |acc: &mut f64, start: Instant| *acc += start.elapsed().as_secs_f64() * 1e3;

    let start = Instant::now();
    let mut server = ServerRound::new(params.clone(), params.threshold as usize + 1).unwrap();
    timed(&mut server_ms, start);
    let mut clients = Vec::new();
    for c in 0..n {
        let setup = params.setup_for(c);
        down += frame_len(SecAgg::Setup(setup.clone()));
        let start = Instant::now();
        let (client, advert) = ClientRound::join(&setup).unwrap();
        timed(&mut client_ms[c as usize], start);
        up += frame_len(SecAgg::Advertise(advert.clone()));
        let start = Instant::now();
        server.advertise(c, advert).unwrap();
        timed(&mut server_ms, start);
        clients.push(client);
    }
    let start = Instant::now();
    let rosters = server.rosters().unwrap();
    timed(&mut server_ms, start);
    for (c, roster) in rosters {
        down += frame_len(SecAgg::Roster(roster.clone()));
        let start = Instant::now();
        let shares = clients[c as usize].share(&roster).unwrap();
        timed(&mut client_ms[c as usize], start);
        up += frame_len(SecAgg::Shares(shares.clone()));
        let start = Instant::now();
        server.shares(c, shares).unwrap();
        timed(&mut server_ms, start);
    }
    let start = Instant::now();
    let inboxes = server.inboxes().unwrap();
    timed(&mut server_ms, start);
    for (c, inbox) in inboxes {
        down += frame_len(SecAgg::Inbox(inbox.clone()));
        if gone.contains(&c) {
            continue;
        }
        let start = Instant::now();
        let masked = clients[c as usize].mask(&inbox, &input).unwrap();
        timed(&mut client_ms[c as usize], start);
        up += encode_frame(&Message::SecAgg(SecAgg::Masked(masked.clone())))
            .unwrap()
            .len();
        let start = Instant::now();
        server.masked(c, &masked).unwrap();
        timed(&mut server_ms, start);
    }
    let start = Instant::now();
    let requests = server.unmask_requests().unwrap();
    timed(&mut server_ms, start);
    for (c, request) in requests {
        down += frame_len(SecAgg::Unmask(request.clone()));
        let start = Instant::now();
        let reveal = clients[c as usize].reveal(&request).unwrap();
        timed(&mut client_ms[c as usize], start);
        up += frame_len(SecAgg::Reveal(reveal.clone()));
        let start = Instant::now();
        server.reveal(c, reveal).unwrap();
        timed(&mut server_ms, start);
    }
    let start = Instant::now();
    let aggregate = server.finish().unwrap();
    timed(&mut server_ms, start);
    let expected: Vec<u32> = input
        .iter()
        .map(|x| x.wrapping_mul(aggregate.survivors.len() as u32))
        .collect();
    assert_eq!(aggregate.sum, expected, "the bench's round must be right");

    // The plain protocol's floor at the aggregator: n f32 heads summed.
    let heads: Vec<Vec<f32>> = (0..n.min(64))
        .map(|_| (0..len).map(|_| rng.random::<f32>()).collect())
        .collect();
    let start = Instant::now();
    let mut sum = vec![0f32; len as usize];
    for i in 0..n as usize {
        for (s, x) in sum.iter_mut().zip(&heads[i % heads.len()]) {
            *s += x;
        }
    }
    black_box(&sum);
    let plain_server_ms = start.elapsed().as_secs_f64() * 1e3;

    let live = n as usize - gone.len();
    let active: Vec<f64> = client_ms
        .iter()
        .enumerate()
        .filter(|(c, _)| !gone.contains(&(*c as u32)))
        .map(|(_, &ms)| ms)
        .collect();
    Row {
        head,
        n,
        len,
        design_dropout,
        dropped: gone.len(),
        neighbours: params.neighbours,
        client_ms_mean: active.iter().sum::<f64>() / live as f64,
        client_ms_max: active.iter().copied().fold(0.0, f64::max),
        server_ms,
        up_bytes: up as f64 / n as f64,
        down_bytes: down as f64 / n as f64,
        plain_bytes: 4 * len as usize,
        plain_server_ms,
    }
}

fn main() {
    // Head parameters plus Σμ, Σσ², Σ(σ²+μ²) per scoped tensor and a count.
    let linear = 1280 * 10 + 10 + 3 + 1;
    let mlp = 1280 * 256 + 256 + 256 * 10 + 10 + 2 * 3 + 1;
    let cases: Vec<(&str, u32, u32, f64)> = if full_run() {
        let mut cases = Vec::new();
        for n in [10, 100, 1000] {
            cases.push(("linear", n, linear, 0.1));
            cases.push(("linear", n, linear, 0.3));
        }
        for n in [10, 100] {
            cases.push(("mlp", n, mlp, 0.1));
        }
        cases
    } else {
        vec![("tiny", 5, 64, 0.1)]
    };
    let mut rows = Vec::new();
    for (head, n, len, design) in cases {
        for drop in [0.0, 0.1] {
            let r = round(head, n, len, design, drop);
            println!(
                "{:>6} n={:>4} k={:>3} (design {:.0}%) dropped {:>3}: client {:>8.1} ms \
                 (max {:>8.1}), server {:>9.1} ms (plain sum {:>7.2} ms), up {:>9.0} B, \
                 down {:>7.0} B (plain f32 {} B)",
                r.head,
                r.n,
                r.neighbours,
                r.design_dropout * 100.0,
                r.dropped,
                r.client_ms_mean,
                r.client_ms_max,
                r.server_ms,
                r.plain_server_ms,
                r.up_bytes,
                r.down_bytes,
                r.plain_bytes
            );
            rows.push(format!(
                "{{\"head\":\"{}\",\"n\":{},\"vector_len\":{},\"design_dropout\":{},\
                 \"dropped\":{},\"neighbours\":{},\"client_ms_mean\":{:.3},\"client_ms_max\":{:.3},\
                 \"server_ms\":{:.3},\"up_bytes_per_client\":{:.0},\"down_bytes_per_client\":{:.0},\
                 \"plain_f32_bytes\":{},\"plain_sum_server_ms\":{:.3}}}",
                r.head,
                r.n,
                r.len,
                r.design_dropout,
                r.dropped,
                r.neighbours,
                r.client_ms_mean,
                r.client_ms_max,
                r.server_ms,
                r.up_bytes,
                r.down_bytes,
                r.plain_bytes,
                r.plain_server_ms
            ));
        }
    }
    if full_run() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench");
        std::fs::create_dir_all(dir).unwrap();
        let path = format!("{dir}/secagg.json");
        std::fs::write(&path, format!("[\n{}\n]\n", rows.join(",\n"))).unwrap();
        println!("wrote {path}");
    }
}
