//! The networked round on real features: Fashion-MNIST images through the real MobileNetV2
//! backbone (tract), two edge clients over loopback QUIC, int8 updates, two rounds; then the
//! server-side evaluation set is read from an image folder and from a feature cache; the
//! final model folder the run wrote classifies the same images through `Predictor`, as
//! `edge-client predict` does, and refuses a backbone the model does not name.
//! Needs the model (scripts/fetch-model.sh) and Fashion-MNIST (scripts/fetch-fashion-mnist.sh);
//! SKIPPED without them unless `WSA_REQUIRE_MODEL=1`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aggregator_core::checkpoint::Checkpoint;
use aggregator_core::engine::{Engine, EngineConfig};
use aggregator_core::strategy::Strategy;
use edge_client::net::RunEnd;
use edge_client::predict::Predictor;
use edge_client::{Backbone, LocalData};
use protocol::Encoding;
use protocol::client_id;
use tokio::sync::watch;
use wsa::{FusionRule, HeadSpec, LabelledFeatures};
use wsa_fl::fleet::{Deployment, spawn_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_train_on_real_backbone_features_over_quic() {
    let per_client = 24;
    let Some((model, set)) = common::model_and_test_images(2 * per_client + 150) else {
        return;
    };
    let backbone = Backbone::load(&model, 64).unwrap();
    let backbone_sha = backbone.sha256_hex();
    let shards: Vec<(String, LocalData)> = (0..2)
        .map(|c| {
            let range = c * per_client..(c + 1) * per_client;
            let x = backbone
                .extract(&set.images[range.clone()], 2, false)
                .unwrap();
            let features =
                LabelledFeatures::new(x, set.labels[range].to_vec(), set.class_names.len())
                    .unwrap();
            let data = LocalData::new(Arc::new(features), set.class_names.clone()).unwrap();
            (client_id(c), data)
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..2).map(client_id).collect();
    let deployment = Deployment::generate(&dir.path().join("creds"), &ids).unwrap();
    let mut config = EngineConfig::new(
        3,
        HeadSpec::mlp(1280, &[32], 10),
        Strategy::wsa(10.0, FusionRule::MeanStd),
    );
    config.rounds = 2;
    config.min_connected = 2;
    config.quorum = 2;
    config.update_encoding = Encoding::Int8RowScaled;
    config.classes = set.class_names.clone();
    config.backbone.sha256 = vec![backbone_sha];
    config.backbone.side = 64;
    let initial = Engine::new(config.clone())
        .unwrap()
        .global_params()
        .to_vec();
    let checkpoint = dir.path().join("checkpoint.bin");
    // Server-side evaluation on an image folder holding three of the ten classes, named as
    // the run names them (images the clients do not train on).
    let eval_dir = dir.path().join("eval");
    let eval_classes = ["Trouser", "Bag", "Sneaker"];
    let mut eval_rows = 0;
    for (i, (image, &label)) in set.images[2 * per_client..]
        .iter()
        .zip(&set.labels[2 * per_client..])
        .enumerate()
    {
        let name = &set.class_names[label as usize];
        if eval_classes.contains(&name.as_str()) {
            let folder = eval_dir.join(name);
            std::fs::create_dir_all(&folder).unwrap();
            image::GrayImage::from_raw(image.width, image.height, image.pixels.clone())
                .unwrap()
                .save(folder.join(format!("{i:04}.png")))
                .unwrap();
            eval_rows += 1;
        }
    }
    let eval_set = aggregator::eval::load_eval_set(
        &config,
        &eval_dir,
        "image-folder",
        "test",
        &model,
        &dir.path().join("cache"),
    )
    .unwrap();
    assert_eq!(eval_set.len(), eval_rows);
    assert_eq!(eval_set.classes(), 10);
    // The same set as a feature cache file (labels already the run's indices) evaluates the
    // same rows; one from a backbone the run does not name is refused.
    let cache_file = dir.path().join("eval.feat");
    let key = edge_client::cache::CacheKey {
        backbone_sha256: backbone.sha256(),
        side: 64,
        preprocessing: edge_client::preprocess::PREPROCESSING_ID,
        source_digest: [7; 32],
    };
    edge_client::cache::write_cache(&cache_file, &key, &eval_set).unwrap();
    let from_cache = |config: &EngineConfig| {
        aggregator::eval::load_eval_set(
            config,
            &cache_file,
            aggregator::eval::FEATURES_FORMAT,
            "test",
            &model,
            &dir.path().join("cache"),
        )
    };
    assert_eq!(from_cache(&config).unwrap(), eval_set);
    let mut other = config.clone();
    other.backbone.sha256 = vec!["ab".repeat(32)];
    let refused = from_cache(&other).unwrap_err().to_string();
    assert!(refused.contains("does not name"), "{refused}");
    let mut engine = Engine::new(config.clone()).unwrap();
    engine.set_test(eval_set).unwrap();

    let model_dir = dir.path().join("model");
    let mut options = deployment
        .server_options(
            "127.0.0.1:0".parse().unwrap(),
            Some(checkpoint.clone()),
            None,
        )
        .unwrap();
    options.model_dir = Some(model_dir.clone());
    let confusion = dir.path().join("confusion.csv");
    options.confusion_csv = Some(confusion.clone());
    let server = deployment.bind(options).unwrap();
    let addr = server.local_addr().unwrap();
    let (handle, _stop_server) = spawn_server(server, engine);
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
        // Evaluated on the three classes the set holds, by their run indices.
        let per_class = line.report.test_per_class.as_ref().unwrap();
        let held: Vec<usize> = (0..10).filter(|&k| per_class[k].is_some()).collect();
        let expected: Vec<usize> = eval_classes
            .iter()
            .map(|c| set.class_names.iter().position(|n| n == c).unwrap())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(held, expected);
        assert!(line.report.test_eval.is_some());
    }
    // The confusion matrix of the final head: a header and ten rows, the eval rows in all.
    let last_accuracy = summary
        .rounds
        .last()
        .unwrap()
        .report
        .test_eval
        .unwrap()
        .accuracy;
    let mut reader = csv::Reader::from_path(&confusion).unwrap();
    assert_eq!(reader.headers().unwrap().len(), 11);
    let rows: Vec<Vec<u64>> = reader
        .records()
        .map(|r| {
            r.unwrap()
                .iter()
                .skip(1)
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 10);
    let total: u64 = rows.iter().flatten().sum();
    let diagonal: u64 = (0..10).map(|k| rows[k][k]).sum();
    assert_eq!(total as usize, eval_rows);
    assert_eq!(diagonal as f64 / total as f64, last_accuracy);
    for client in clients {
        let report = client.await.unwrap().unwrap();
        assert_eq!(report.end, RunEnd::RunFinished);
        assert!(report.rounds.iter().all(|r| r.outcome == "accepted"));
    }
    let saved = Checkpoint::load(&checkpoint).unwrap();
    assert_eq!(saved.next_round, 2);
    assert_ne!(saved.global, initial);
    assert!(saved.global.iter().all(|v| v.is_finite()));

    // The final model: the checkpoint's head, the run's classes, and it classifies the images
    // as the head does on the features the clients trained on.
    let predictor = Predictor::open(&model_dir, &model).unwrap();
    let card = &predictor.model().card;
    assert_eq!(card.classes, set.class_names);
    assert_eq!(predictor.model().head.to_flat(), saved.global);
    let images = &set.images[..2 * per_client];
    let top = predictor.classify(images, 3, 2).unwrap();
    let features = backbone.extract(images, 2, false).unwrap();
    let logits = predictor.model().head.logits(features.view()).unwrap();
    for (row, top) in logits.rows().into_iter().zip(&top) {
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(top[0].index, best);
        assert_eq!(top[0].class, set.class_names[best]);
        let mass: f32 = top.iter().map(|s| s.probability).sum();
        assert!(top[0].probability >= top[1].probability && mass <= 1.0 + 1e-5);
    }
    // Another backbone file (the full classifier) is refused by its hash.
    let other = common::root().join("models/mobilenet_v2_classifier.onnx");
    if other.exists() {
        let err = Predictor::open(&model_dir, &other)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("trained on features of the backbone"), "{err}");
    }
}
