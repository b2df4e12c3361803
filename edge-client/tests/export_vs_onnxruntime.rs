//! The exported files (backbone + head + softmax) give the probabilities `edge-client
//! predict`'s Rust path gives (tract backbone, our head) on real images: the ONNX under
//! onnxruntime, the NNEF archive under tract.
//!
//! Needs the model and onnxruntime from `scripts/fetch-model.sh` (its venv) and Fashion-MNIST;
//! SKIPPED without them unless `WSA_REQUIRE_MODEL=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use datasets::{Limits, Split, read_fashion_mnist};
use edge_client::Backbone;
use edge_client::predict::Predictor;
use edge_client::preprocess::preprocess_into;
use wsa::saved::{BackboneCard, Preprocessing, Provenance, SavedModel};
use wsa::{Head, HeadSpec, Init};

const SIDE: usize = 96;
const IMAGES: usize = 12;
/// The acceptance bound on any probability's difference.
const MAX_ABS_DIFF: f32 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A saved model on real images, with what the Rust path says of them.
struct Fixture {
    dir: tempfile::TempDir,
    backbone: PathBuf,
    saved: SavedModel,
    class_names: Vec<String>,
    /// The images, preprocessed, one after another.
    input: Vec<f32>,
    /// The Rust path's probabilities, by image, by class.
    ours: Vec<Vec<f32>>,
}

/// `None` (the test skips) without the model, its venv or the data.
fn fixture() -> Option<Fixture> {
    let model = root().join("models/mobilenet_v2_features.onnx");
    let python = root().join(".venv-models/bin/python");
    let data = root().join("data/fashion-mnist");
    if !model.exists() || !python.exists() || !data.exists() {
        assert!(
            std::env::var("WSA_REQUIRE_MODEL").as_deref() != Ok("1"),
            "WSA_REQUIRE_MODEL=1 but the model, its venv or Fashion-MNIST is missing"
        );
        eprintln!("SKIPPED: run scripts/fetch-model.sh and scripts/fetch-fashion-mnist.sh");
        return None;
    }
    let mut set = read_fashion_mnist(&data, Split::Test, &Limits::default()).unwrap();
    set.images.truncate(IMAGES);

    // A head with weights large enough that its probabilities are far from uniform.
    let dir = tempfile::tempdir().unwrap();
    let backbone = Backbone::load(&model, SIDE).unwrap();
    let sha = backbone.sha256_hex();
    let head = Head::init(&HeadSpec::mlp(backbone.dim(), &[32], 10), Init::He, 5).unwrap();
    let saved = SavedModel::new(
        head,
        set.class_names.clone(),
        BackboneCard {
            sha256: vec![sha],
            side: SIDE as u32,
            preprocessing: Preprocessing::imagenet(),
        },
        Provenance {
            run_id: 1,
            rounds: 0,
            strategy: "test".into(),
        },
    );
    let model_dir = dir.path().join("model");
    saved.save(&model_dir).unwrap();

    let predictor = Predictor::open(&model_dir, &model).unwrap();
    let ours: Vec<Vec<f32>> = predictor
        .classify(&set.images, 10, 2)
        .unwrap()
        .into_iter()
        .map(|top| {
            let mut by_class = vec![0.0; 10];
            for s in top {
                by_class[s.index] = s.probability;
            }
            by_class
        })
        .collect();
    assert!(
        ours.iter().flatten().any(|&p| p > 0.2),
        "probabilities too flat to compare"
    );

    let plane = 3 * SIDE * SIDE;
    let mut input = vec![0f32; IMAGES * plane];
    for (image, out) in set.images.iter().zip(input.chunks_exact_mut(plane)) {
        preprocess_into(image, SIDE, out).unwrap();
    }
    Some(Fixture {
        dir,
        backbone: model,
        saved,
        class_names: set.class_names,
        input,
        ours,
    })
}

fn max_abs_diff<'a>(ours: &[Vec<f32>], theirs: impl IntoIterator<Item = &'a f32>) -> f32 {
    ours.iter()
        .flatten()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
}

#[test]
fn exported_onnx_matches_the_rust_path_under_onnxruntime() {
    let Some(Fixture {
        dir,
        backbone: model,
        saved,
        class_names,
        input,
        ours,
    }) = fixture()
    else {
        return;
    };
    let python = root().join(".venv-models/bin/python");
    let exported = dir.path().join("model.onnx");
    let onnx = std::fs::read(&model).unwrap();
    edge_client::export::export_onnx(&model, &onnx, &saved, &exported).unwrap();
    let input_file = dir.path().join("input.f32");
    let output_file = dir.path().join("output.f32");
    std::fs::write(
        &input_file,
        input
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let script = format!(
        "import sys, json, numpy as np, onnxruntime as ort\n\
         s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
         x = np.fromfile(sys.argv[2], dtype='<f4').reshape({IMAGES}, 3, {SIDE}, {SIDE})\n\
         p = s.run(['probabilities'], {{'input': x}})[0]\n\
         p.astype('<f4').tofile(sys.argv[3])\n\
         print(json.loads(s.get_modelmeta().custom_metadata_map['classes'])[0])\n"
    );
    let run = Command::new(&python)
        .args(["-c", &script])
        .arg(&exported)
        .arg(&input_file)
        .arg(&output_file)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "onnxruntime: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        class_names[0],
        "the class list rides in the metadata"
    );
    let theirs: Vec<f32> = std::fs::read(&output_file)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(theirs.len(), IMAGES * 10);
    let diff = max_abs_diff(&ours, &theirs);
    eprintln!("exported ONNX vs the Rust path: max |Δp| = {diff:.2e} over {IMAGES} images");
    assert!(
        diff <= MAX_ABS_DIFF,
        "max abs probability difference {diff}"
    );
}

#[test]
fn exported_nnef_matches_the_rust_path_under_tract() {
    let Some(Fixture {
        dir,
        backbone,
        saved,
        class_names,
        input,
        ours,
    }) = fixture()
    else {
        return;
    };
    let exported = dir.path().join("model.nnef.tgz");
    let onnx = std::fs::read(&backbone).unwrap();
    edge_client::export::export_nnef(&backbone, &onnx, &saved, &exported).unwrap();
    // The archive is a network tract loads like any backbone: its "features" are the
    // probabilities.
    let network = Backbone::load(&exported, SIDE).unwrap();
    let theirs = network.features_of_inputs(&input, 2).unwrap();
    assert_eq!(theirs.dim(), (IMAGES, 10));
    let diff = max_abs_diff(&ours, theirs.iter());
    eprintln!("exported NNEF vs the Rust path: max |Δp| = {diff:.2e} over {IMAGES} images");
    assert!(
        diff <= MAX_ABS_DIFF,
        "max abs probability difference {diff}"
    );
    // The class list and the card ride inside.
    let mut labels = String::new();
    let mut card = false;
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(&exported).unwrap());
    for entry in tar::Archive::new(gz).entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        if path == Path::new("labels.txt") {
            std::io::Read::read_to_string(&mut entry, &mut labels).unwrap();
        }
        card |= path == Path::new("model.json");
    }
    assert_eq!(labels.lines().collect::<Vec<_>>(), class_names);
    assert!(card, "model.json missing from the archive");
}
