//! Round latency over loopback QUIC with tiny local work: a real aggregator and N real edge
//! clients in one process, the 1280→256→10 MLP head, 16 synthetic rows per client and one
//! local epoch, so the aggregator and the transport, not training, dominate. Reports per
//! round wall time (p50, max) and the engine's CPU time per accepted update (validation,
//! decode, fold, bookkeeping; the digest is checked in the connection tasks and is measured
//! by the protocol codec bench). Writes the workspace's `target/bench/round_latency.json`.
//!
//! `cargo bench -p wsa-fl --bench round_latency`

use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use protocol::Encoding;
use protocol::client_id;
use serde::Serialize;
use tokio::sync::watch;
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
use wsa::{FusionRule, HeadSpec, Sgd};
use wsa_fl::fleet::{Deployment, spawn_server};

#[derive(Serialize)]
struct Row {
    clients: usize,
    encoding: String,
    downlink: String,
    params: usize,
    rounds: usize,
    round_ms_p50: f64,
    round_ms_max: f64,
    engine_us_per_update: f64,
    wire_bytes_in_per_update: f64,
    bytes_out_per_round: f64,
    setup_s: f64,
}

fn run(clients: usize, encoding: Encoding, downlink: Encoding, rounds: u64, head: HeadSpec) -> Row {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let setup = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..clients).map(client_id).collect();
        let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
        let problem = SyntheticProblem::new(
            SyntheticSpec {
                classes: head.classes,
                dim: head.input,
                ..SyntheticSpec::default()
            },
            1,
        )
        .unwrap();
        let shards = (0..clients)
            .map(|i| {
                (
                    client_id(i),
                    Arc::new(problem.sample(16, i as u64).unwrap()),
                )
            })
            .collect();
        let mut config =
            EngineConfig::new(1, head.clone(), Strategy::wsa(10.0, FusionRule::MeanStd));
        config.rounds = rounds;
        config.min_connected = clients;
        config.quorum = clients;
        config.update_encoding = encoding;
        config.downlink_encoding = downlink;
        config.train = Sgd {
            epochs: 1,
            batch_size: 16,
            ..Sgd::default()
        };
        let params = head.param_count();
        let server = deployment.bind_loopback().unwrap();
        let addr = server.local_addr().unwrap();
        let (handle, _stop) = spawn_server(server, Engine::new(config).unwrap());
        let (_keep, stop) = watch::channel(false);
        let client_tasks = deployment.spawn_clients(addr, shards, &stop).unwrap();
        let summary = tokio::time::timeout(Duration::from_secs(600), handle)
            .await
            .expect("bench run finished")
            .unwrap()
            .unwrap();
        for c in client_tasks {
            c.await.unwrap().unwrap();
        }
        // The first round also waits for every client to connect; time the rest.
        let lines = &summary.rounds[1.min(summary.rounds.len() - 1)..];
        let mut walls: Vec<f64> = lines.iter().map(|l| l.report.duration_ms as f64).collect();
        walls.sort_by(f64::total_cmp);
        let updates: u64 = lines.iter().map(|l| l.transport.engine_updates).sum();
        let engine_us: u64 = lines.iter().map(|l| l.transport.engine_update_us).sum();
        let wire_in: u64 = lines.iter().map(|l| l.report.wire_bytes_in).sum();
        let out: u64 = lines.iter().map(|l| l.transport.bytes_out).sum();
        Row {
            clients,
            encoding: encoding.to_string(),
            downlink: downlink.to_string(),
            params,
            rounds: lines.len(),
            round_ms_p50: walls[walls.len() / 2],
            round_ms_max: *walls.last().unwrap(),
            engine_us_per_update: engine_us as f64 / updates.max(1) as f64,
            wire_bytes_in_per_update: wire_in as f64 / updates.max(1) as f64,
            bytes_out_per_round: out as f64 / lines.len() as f64,
            setup_s: setup.elapsed().as_secs_f64(),
        }
    })
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mut rows = Vec::new();
    if full {
        let (f32, int8) = (Encoding::F32, Encoding::Int8RowScaled);
        for clients in [10, 100] {
            for (encoding, downlink) in [(f32, f32), (int8, f32), (int8, int8)] {
                let head = HeadSpec::mlp(1280, &[256], 10);
                rows.push(run(clients, encoding, downlink, 6, head));
            }
        }
    } else {
        rows.push(run(
            3,
            Encoding::F16,
            Encoding::F16,
            2,
            HeadSpec::mlp(16, &[8], 4),
        ));
    }
    println!(
        "| clients | update | downlink | round p50 ms | round max ms | engine µs/update | wire B/update | bytes out/round |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.clients,
            r.encoding,
            r.downlink,
            r.round_ms_p50,
            r.round_ms_max,
            r.engine_us_per_update,
            r.wire_bytes_in_per_update,
            r.bytes_out_per_round
        );
    }
    if full {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench");
        std::fs::create_dir_all(dir).unwrap();
        let path = format!("{dir}/round_latency.json");
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap() + "\n").unwrap();
        println!("wrote {path}");
    }
}
