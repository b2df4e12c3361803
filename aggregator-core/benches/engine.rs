//! CPU time of the round engine per accepted update, for the 1280→256→10 MLP head and 100
//! clients, per update encoding: `engine.handle(Update)` (every check, decode, measurement,
//! fold and bookkeeping; the digest is checked beforehand by `ReceivedUpdate::new`, which the
//! runtime calls in the connection tasks), the round's opening (encode the global head,
//! sample, tasks) and its close (finish the fold, fuse the scopes, checkpoint). The parts of
//! one update are also timed on their own (digest, decode, measure, add) to show where the
//! time goes.
//! Writes JSON to the workspace's `target/bench/engine.json`.
//!
//! `cargo bench -p aggregator-core --bench engine`

use std::hint::black_box;
use std::time::Instant;

use aggregator_core::backend::{Backend, CpuBackend, FoldShape};
use aggregator_core::engine::{Action, Engine, EngineConfig, Event, Millis, ReceivedUpdate};
use aggregator_core::strategy::{Aggregation, Strategy};
use protocol::{
    Capabilities, EncodedParams, Encoding, Outcome, RowLayout, Update, UpdateMetrics, WireScope,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wsa::{DEFAULT_SCOPE_EPS, FusionRule, Head, HeadSpec, ScopeSelection};

/// `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then this binary
/// only smoke-tests itself on a tiny head.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn micros(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Best of `reps` timings of `f`, in µs.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            micros(t)
        })
        .fold(f64::INFINITY, f64::min)
}

use protocol::client_id as client;

/// A client's update: the global head plus noise, scoped and encoded as a client would.
fn update(spec: &HeadSpec, global: &[f32], round: u64, i: usize, encoding: Encoding) -> Update {
    let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
    let params: Vec<f32> = global
        .iter()
        .map(|&w| w + rng.random_range(-0.01f32..0.01))
        .collect();
    let scopes = Head::from_flat(spec, &params)
        .unwrap()
        .scopes(ScopeSelection::default(), DEFAULT_SCOPE_EPS)
        .unwrap();
    let layout = RowLayout::of_head(spec);
    Update {
        run_id: 1,
        round,
        client_id: client(i),
        n_samples: 500 + i as u64,
        params: EncodedParams::encode(&params, &layout, encoding).unwrap(),
        scopes: scopes.into_iter().map(WireScope::from).collect(),
        metrics: UpdateMetrics {
            loss: 0.5,
            accuracy: 0.8,
            kl: 0.01,
            steps: 10,
            train_ms: 100,
            held_out: None,
        },
        digest: [0; 32],
    }
    .seal()
}

fn main() {
    let full = full_run();
    let (spec, clients) = if full {
        (HeadSpec::mlp(1280, &[256], 10), 100)
    } else {
        (HeadSpec::mlp(16, &[8], 3), 4)
    };
    let n = spec.param_count();
    println!(
        "head {spec:?}: {n} parameters; {clients} accepted updates per encoding (+1 straggler)"
    );
    println!(
        "engine µs: handle(Update) on the engine thread (digest already checked); \
         +digest: with the connection task's sha256, the CPU time per update in all"
    );
    println!(
        "{:<14} {:>9} {:>7} {:>7} {:>9} {:>9} | {:>7} {:>7} {:>7} {:>7} | {:>8} {:>8}",
        "encoding",
        "engine µs",
        "p50",
        "p90",
        "+digest",
        "GB/s f32",
        "digest",
        "decode",
        "measure",
        "add",
        "open ms",
        "close ms"
    );
    let mut rows = Vec::new();
    for encoding in [Encoding::F32, Encoding::F16, Encoding::Int8RowScaled] {
        let mut config =
            EngineConfig::new(1, spec.clone(), Strategy::wsa(1.0, FusionRule::MeanStd));
        config.rounds = 1;
        config.update_encoding = encoding;
        // One extra client never answers, so the round closes on the Tick, timed apart.
        config.min_connected = clients + 1;
        config.round_timeout_ms = 1_000_000;
        let mut engine = Engine::new(config).unwrap();
        let caps = Capabilities {
            f16: true,
            int8: true,
        };
        for i in 0..clients {
            let a = engine.handle(
                Millis(0),
                Event::Connected {
                    client: client(i),
                    n_samples: 1_000_000,
                    capabilities: caps,
                    held: None,
                },
            );
            assert!(a.is_empty());
        }
        let t = Instant::now();
        let opened = engine.handle(
            Millis(0),
            Event::Connected {
                client: client(clients),
                n_samples: 1_000_000,
                capabilities: caps,
                held: None,
            },
        );
        let open_us = micros(t);
        assert_eq!(opened.len(), clients + 1);

        let global = engine.global_params().to_vec();
        let updates: Vec<Update> = (0..clients)
            .map(|i| update(&spec, &global, 0, i, encoding))
            .collect();
        let payload = updates[0].params.payload_bytes();

        // The parts of one update, on their own.
        let reps = if full { 20 } else { 2 };
        let layout = RowLayout::of_head(&spec);
        let u0 = &updates[0];
        let digest_us = best_of(reps, || assert!(black_box(u0).digest_ok()));
        let mut scratch = vec![0f32; n];
        let decode_us = best_of(reps, || {
            u0.params
                .decode_into(&layout, black_box(&mut scratch))
                .unwrap()
        });
        let shape = FoldShape::of_head(&spec, ScopeSelection::default(), DEFAULT_SCOPE_EPS);
        let mut acc = CpuBackend::default()
            .accumulator(&shape, &global, Aggregation::Mean, 0)
            .unwrap();
        let measured = acc.measure(&scratch).unwrap();
        let measure_us = best_of(reps, || {
            black_box(acc.measure(black_box(&scratch)).unwrap());
        });
        let add_us = best_of(reps, || {
            acc.add(black_box(&scratch), 1.0, Some(&measured)).unwrap()
        });

        // The runtime checks digests in the connection tasks, in parallel; timed above.
        let received: Vec<ReceivedUpdate> = updates.into_iter().map(ReceivedUpdate::new).collect();
        let mut per_update = Vec::with_capacity(clients);
        for (i, u) in received.into_iter().enumerate() {
            let event = Event::Update {
                client: client(i),
                task_round: 0,
                update: Box::new(u),
                wire_bytes: payload as u64 + 200,
            };
            let t = Instant::now();
            let actions = engine.handle(Millis(1), event);
            per_update.push(micros(t));
            assert!(
                matches!(
                    &actions[..],
                    [Action::SendVerdict { verdict, .. }] if verdict.outcome == Outcome::Accepted
                ),
                "{actions:?}"
            );
            drop(black_box(actions));
        }
        let t = Instant::now();
        let closed = engine.handle(Millis(1_000_000), Event::Tick);
        let close_us = micros(t);
        assert!(matches!(closed.last(), Some(Action::Finished)));
        let report = closed.iter().find_map(|a| match a {
            Action::RoundClosed(r) => Some(r),
            _ => None,
        });
        assert_eq!(report.map(|r| r.accepted.len()), Some(clients));

        let upd = mean(&per_update);
        let total = upd + digest_us;
        let gbs = (4 * n) as f64 / (upd * 1e-6) / 1e9;
        println!(
            "{:<14} {:>9.1} {:>7.1} {:>7.1} {:>9.1} {:>9.2} | {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>8.2} {:>8.2}",
            format!("{encoding:?}"),
            upd,
            quantile(&per_update, 0.5),
            quantile(&per_update, 0.9),
            total,
            gbs,
            digest_us,
            decode_us,
            measure_us,
            add_us,
            open_us / 1e3,
            close_us / 1e3
        );
        rows.push(format!(
            "{{\"encoding\":\"{encoding:?}\",\"params\":{n},\"clients\":{clients},\
             \"payload_bytes\":{payload},\"update_us_mean\":{upd:.2},\
             \"update_us_p50\":{:.2},\"update_us_p90\":{:.2},\"update_us_max\":{:.2},\
             \"cpu_us_with_digest\":{total:.2},\"f32_gb_per_s\":{gbs:.3},\"digest_us\":{digest_us:.2},\
             \"decode_us\":{decode_us:.2},\"measure_us\":{measure_us:.2},\"add_us\":{add_us:.2},\
             \"open_round_ms\":{:.3},\"close_round_ms\":{:.3}}}",
            quantile(&per_update, 0.5),
            quantile(&per_update, 0.9),
            quantile(&per_update, 1.0),
            open_us / 1e3,
            close_us / 1e3
        ));
    }
    if full {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench");
        std::fs::create_dir_all(dir).unwrap();
        let path = format!("{dir}/engine.json");
        std::fs::write(&path, format!("[\n{}\n]\n", rows.join(",\n"))).unwrap();
        println!("wrote {path}");
    }
}
