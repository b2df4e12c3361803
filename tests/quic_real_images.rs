//! The networked round on real features: Fashion-MNIST images through the real MobileNetV2
//! backbone (tract), two edge clients over loopback QUIC, int8 updates, two rounds.
//! Needs the model (scripts/fetch-model.sh) and Fashion-MNIST (scripts/fetch-fashion-mnist.sh);
//! SKIPPED without them unless `WSA_REQUIRE_MODEL=1`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aggregator_core::checkpoint::Checkpoint;
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use edge_client::Backbone;
use edge_client::net::RunEnd;
use protocol::Encoding;
use protocol::client_id;
use tokio::sync::watch;
use wsa::{FusionRule, HeadSpec, LabelledFeatures};
use wsa_fl::fleet::{Deployment, spawn_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_train_on_real_backbone_features_over_quic() {
    let per_client = 24;
    let Some((model, set)) = common::model_and_test_images(2 * per_client) else {
        return;
    };
    let backbone = Backbone::load(&model, 64).unwrap();
    let shards: Vec<(String, Arc<LabelledFeatures>)> = (0..2)
        .map(|c| {
            let range = c * per_client..(c + 1) * per_client;
            let x = backbone
                .extract(&set.images[range.clone()], 2, false)
                .unwrap();
            let features =
                LabelledFeatures::new(x, set.labels[range].to_vec(), set.class_names.len())
                    .unwrap();
            (client_id(c), Arc::new(features))
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..2).map(client_id).collect();
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let mut config = EngineConfig::new(
        3,
        HeadSpec::mlp(1280, &[32], 10),
        Strategy::Wsa {
            lambda: 10.0,
            rule: FusionRule::MeanStd,
        },
    );
    config.rounds = 2;
    config.min_connected = 2;
    config.quorum = 2;
    config.update_encoding = Encoding::Int8RowScaled;
    let initial = Engine::new(config.clone())
        .unwrap()
        .global_params()
        .to_vec();
    let checkpoint = dir.path().join("checkpoint.bin");
    let server = deployment
        .bind(
            deployment
                .server_options(
                    "127.0.0.1:0".parse().unwrap(),
                    Some(checkpoint.clone()),
                    None,
                )
                .unwrap(),
        )
        .unwrap();
    let addr = server.local_addr().unwrap();
    let (handle, _stop_server) = spawn_server(server, Engine::new(config).unwrap());
    let (_keep, stop) = watch::channel(false);
    let clients = deployment.spawn_clients(addr, shards, &stop).unwrap();

    let summary = tokio::time::timeout(Duration::from_secs(120), handle)
        .await
        .expect("run finished in time")
        .unwrap()
        .unwrap();
    assert!(summary.finished);
    assert_eq!(summary.rounds.len(), 2);
    for line in &summary.rounds {
        assert_eq!(line.report.accepted.len(), 2, "{:?}", line.report.rejected);
        // int8: about a quarter of the f32 bytes.
        assert!(line.report.accepted_payload_bytes < 2 * 4 * initial.len() as u64 / 3);
    }
    for client in clients {
        let report = client.await.unwrap().unwrap();
        assert_eq!(report.end, RunEnd::RunFinished);
        assert!(report.rounds.iter().all(|r| r.outcome == "accepted"));
    }
    let saved = Checkpoint::load(&checkpoint).unwrap();
    assert_eq!(saved.next_round, 2);
    assert_ne!(saved.global, initial);
    assert!(saved.global.iter().all(|v| v.is_finite()));
}
