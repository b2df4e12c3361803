//! The aggregator's metrics endpoint scraped during a live run over real QUIC: three honest
//! clients and one whose every update collapses a tensor (refused at admission), with
//! federated evaluation on. The exposition is read back with a Prometheus text parser.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use aggregator::server::{Metrics, bind_metrics, serve_metrics};
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use edge_client::{Adversary, LocalData};
use protocol::client_id;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use wsa::HeadSpec;
use wsa_fl::fleet::{Deployment, spawn_server};

/// `GET path` over plain TCP: status line and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Each sample's value by metric name and its labels, `k=v` joined by commas in key order.
fn samples(body: &str) -> HashMap<(String, String), f64> {
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            let labels = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(f64::NAN, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            ((s.metric, labels), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_run_exposes_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..4).map(client_id).collect();
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let mut config = EngineConfig::new(
        9,
        HeadSpec::mlp(common::SYNTHETIC_DIM, &[8], common::SYNTHETIC_CLASSES),
        Strategy::FedAvg,
    );
    config.rounds = 4;
    config.min_connected = 4;
    config.quorum = 3;
    config.eval_fraction = 0.25;
    let metrics = Metrics::new();
    let listener = bind_metrics("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let metrics_addr = listener.local_addr().unwrap();
    let _endpoint = tokio::spawn(serve_metrics(listener, metrics.clone()));

    let (observer, mut lines) = mpsc::unbounded_channel();
    let mut options = deployment
        .server_options(
            "127.0.0.1:0".parse().unwrap(),
            Some(dir.path().join("checkpoint.bin")),
            None,
        )
        .unwrap();
    options.metrics = Some(metrics);
    options.round_observer = Some(observer);
    let server = deployment.bind(options).unwrap();
    let addr = server.local_addr().unwrap();
    let (handle, _stop_server) = spawn_server(server, Engine::new(config).unwrap());
    let shards: Vec<(String, LocalData)> = (0..4)
        .map(|i| {
            let data = common::synthetic_shard(3, 80, i as u64);
            (client_id(i), LocalData::from(data))
        })
        .collect();
    let (_keep, stop) = watch::channel(false);
    let liar = client_id(3);
    let clients = deployment
        .spawn_clients_with(addr, shards, &stop, move |id| {
            (id == liar).then(|| "scope-collapse".parse::<Adversary>().unwrap())
        })
        .unwrap();

    // Scraped mid-run, after the second round closed.
    lines.recv().await.unwrap();
    lines.recv().await.unwrap();
    let (status, body) = get(metrics_addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let values = samples(&body);
    let value = |name: &str, labels: &str| {
        *values
            .get(&(name.to_owned(), labels.to_owned()))
            .unwrap_or_else(|| panic!("{name}{{{labels}}} missing from\n{body}"))
    };
    assert!(value("wsa_rounds_opened_total", "") >= 2.0);
    assert!(value("wsa_rounds_closed_total", "outcome=counted") >= 2.0);
    assert!(value("wsa_round_duration_seconds_count", "") >= 2.0);
    assert!(value("wsa_updates_total", "outcome=accepted,reason=") >= 6.0);
    assert!(value("wsa_updates_total", "outcome=rejected,reason=bad-scope") >= 2.0);
    assert_eq!(value("wsa_clients_connected", ""), 4.0);
    assert!(value("wsa_received_bytes_total", "") > 0.0);
    assert!(value("wsa_sent_bytes_total", "") > 0.0);
    assert!(value("wsa_engine_update_seconds_count", "") >= 8.0);
    let accuracy = value("wsa_federated_accuracy", "");
    assert!((0.0..=1.0).contains(&accuracy), "{accuracy}");
    assert!(value("wsa_test_accuracy", "").is_nan(), "no evaluation set");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let checkpoint_age = now - value("wsa_checkpoint_timestamp_seconds", "");
    assert!((0.0..60.0).contains(&checkpoint_age), "{checkpoint_age}");
    eprintln!("{body}");

    let (status, _) = get(metrics_addr, "/").await;
    assert!(status.contains("404"), "{status}");

    let summary = tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(summary.finished);
    for c in clients {
        c.await.unwrap().unwrap();
    }
}
