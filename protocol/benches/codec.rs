//! Bytes on the wire and codec speed for one update of the 1280→256→10 MLP head, per
//! encoding: raw parameter bytes, payload bytes, full frame bytes; encode and decode of the
//! parameters and of the whole frame (digest included), as GB/s of f32 parameters.
//! Writes JSON to the workspace's `target/bench/codec.json`.
//!
//! `cargo bench -p protocol --bench codec`

use std::hint::black_box;
use std::time::Instant;

use protocol::*;
use wsa::HeadSpec;

/// `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then this binary
/// only smoke-tests itself on a tiny head.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn time_per_iter(mut f: impl FnMut(), min_secs: f64) -> f64 {
    f();
    let mut iters = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        let secs = start.elapsed().as_secs_f64();
        if secs >= min_secs {
            return secs / iters as f64;
        }
        iters *= 2;
    }
}

fn main() {
    let full = full_run();
    let shape = if full {
        HeadSpec::mlp(1280, &[256], 10)
    } else {
        HeadSpec::mlp(16, &[8], 3)
    };
    let min_secs = if full { 0.5 } else { 0.001 };
    let layout = RowLayout::of_head(&shape);
    let n = layout.len();
    // He-like weights: what a trained head looks like to the quantizer.
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.08)
        .collect();
    let raw = 4 * n;
    let mut rows = Vec::new();
    println!("head {shape:?}: {n} parameters, {raw} raw f32 bytes");
    println!(
        "{:<16} {:>10} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "encoding", "frame B", "of f32", "enc µs", "dec µs", "dec GB/s", "frame dec µs"
    );
    for encoding in [Encoding::F32, Encoding::F16, Encoding::Int8RowScaled] {
        let params = EncodedParams::encode(&values, &layout, encoding).unwrap();
        let update = Update {
            run_id: 1,
            round: 1,
            client_id: "client-0001".into(),
            n_samples: 600,
            params: params.clone(),
            scopes: vec![
                WireScope {
                    mean: 0.0,
                    std: 0.02,
                };
                2
            ],
            metrics: UpdateMetrics::default(),
            digest: [0; 32],
        }
        .seal();
        let frame = encode_frame(&Message::Update(update)).unwrap();
        let enc = time_per_iter(
            || {
                black_box(EncodedParams::encode(black_box(&values), &layout, encoding).unwrap());
            },
            min_secs,
        );
        let mut out = vec![0f32; n];
        let dec = time_per_iter(
            || {
                params.decode_into(&layout, black_box(&mut out)).unwrap();
            },
            min_secs,
        );
        let limits = Limits::default();
        let frame_dec = time_per_iter(
            || {
                let Message::Update(u) = decode_frame(black_box(&frame), &limits).unwrap() else {
                    unreachable!()
                };
                assert!(u.digest_ok());
                u.params.decode_into(&layout, &mut out).unwrap();
            },
            min_secs,
        );
        let frame_enc = time_per_iter(
            || {
                let p = EncodedParams::encode(&values, &layout, encoding).unwrap();
                let u = Update {
                    run_id: 1,
                    round: 1,
                    client_id: "client-0001".into(),
                    n_samples: 600,
                    params: p,
                    scopes: vec![],
                    metrics: UpdateMetrics::default(),
                    digest: [0; 32],
                }
                .seal();
                black_box(encode_frame(&Message::Update(u)).unwrap());
            },
            min_secs,
        );
        let dec_gbs = raw as f64 / dec / 1e9;
        println!(
            "{:<16} {:>10} {:>7.1}% {:>10.1} {:>10.1} {:>12.2} {:>12.1}",
            format!("{encoding:?}"),
            frame.len(),
            100.0 * frame.len() as f64 / raw as f64,
            enc * 1e6,
            dec * 1e6,
            dec_gbs,
            frame_dec * 1e6
        );
        rows.push(format!(
            "{{\"encoding\":\"{encoding:?}\",\"params\":{n},\"raw_f32_bytes\":{raw},\
             \"payload_bytes\":{},\"frame_bytes\":{},\"frame_of_f32\":{:.4},\
             \"encode_us\":{:.2},\"decode_us\":{:.2},\"decode_gb_per_s\":{:.3},\
             \"frame_encode_us\":{:.2},\"frame_decode_with_digest_us\":{:.2}}}",
            params.payload_bytes(),
            frame.len(),
            frame.len() as f64 / raw as f64,
            enc * 1e6,
            dec * 1e6,
            dec_gbs,
            frame_enc * 1e6,
            frame_dec * 1e6
        ));
    }
    if full {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench");
        std::fs::create_dir_all(dir).unwrap();
        let path = format!("{dir}/codec.json");
        std::fs::write(&path, format!("[\n{}\n]\n", rows.join(",\n"))).unwrap();
        println!("wrote {path}");
    }
}
