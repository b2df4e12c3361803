//! tract and onnxruntime agree on the features of the same preprocessed inputs (real ImageNet
//! images and a random tensor) at 96² and 224²; our normalisation reproduces the reference
//! inputs from the same resized pixels; the NNEF archive converted from the ONNX gives the
//! ONNX's features at every side.
//!
//! The model and the onnxruntime reference come from `scripts/fetch-model.sh` (which runs
//! `models/verify.py`). Without them the test says SKIPPED, unless `WSA_REQUIRE_MODEL=1` (set
//! by the test script after fetching), where their absence fails it.

use std::path::{Path, PathBuf};

use datasets::Image;
use edge_client::Backbone;
use edge_client::preprocess::preprocess_into;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn require_model() -> bool {
    std::env::var("WSA_REQUIRE_MODEL").is_ok_and(|v| v == "1")
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The model and the reference's index, or `None` (after saying SKIPPED) when absent.
fn model_and_reference() -> Option<(PathBuf, PathBuf, Vec<serde_json::Value>)> {
    let model = root().join("models/mobilenet_v2_features.onnx");
    let reference = root().join("models/testdata/reference");
    let index = reference.join("index.json");
    if !model.exists() || !index.exists() {
        assert!(
            !require_model(),
            "WSA_REQUIRE_MODEL=1 but {} or {} is missing",
            model.display(),
            index.display()
        );
        eprintln!("SKIPPED: no model or reference (run scripts/fetch-model.sh)");
        return None;
    }
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let cases = index["cases"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 2);
    Some((model, reference, cases))
}

fn max_abs_diff(a: impl IntoIterator<Item = f32>, b: impl IntoIterator<Item = f32>) -> f32 {
    a.into_iter()
        .zip(b)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
}

#[test]
fn tract_matches_onnxruntime_at_96_and_224() {
    let Some((model, reference, cases)) = model_and_reference() else {
        return;
    };
    for case in &cases {
        let side = case["size"].as_u64().unwrap() as usize;
        let inputs = read_f32(&reference.join(case["input"]["file"].as_str().unwrap()));
        let want = read_f32(&reference.join(case["features"]["file"].as_str().unwrap()));
        let backbone = Backbone::load(&model, side).unwrap();
        assert_eq!(backbone.dim(), 1280);
        let got = backbone.features_of_inputs(&inputs, 2).unwrap();
        assert_eq!(got.len(), want.len());
        let max_mag = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max_diff = max_abs_diff(got.iter().copied(), want.iter().copied());
        eprintln!(
            "side {side}: max |tract − onnxruntime| = {max_diff:e}, max |feature| = {max_mag}"
        );
        assert!(max_mag > 0.1, "reference features look empty");
        assert!(
            max_diff <= 1e-4 * max_mag,
            "side {side}: {max_diff} > 1e-4 × {max_mag}"
        );

        // The reference's real-image inputs are normalised from already-resized RGB bytes:
        // preprocessing those bytes at the same side must give the same floats.
        let rgb = std::fs::read(reference.join(case["rgb"]["file"].as_str().unwrap())).unwrap();
        let per = 3 * side * side;
        for (i, pixels) in rgb.chunks_exact(per).enumerate() {
            let image = Image {
                width: side as u32,
                height: side as u32,
                channels: 3,
                pixels: pixels.to_vec(),
            };
            let mut ours = vec![0.0; per];
            preprocess_into(&image, side, &mut ours).unwrap();
            let diff = max_abs_diff(ours, inputs[i * per..(i + 1) * per].iter().copied());
            assert!(
                diff < 1e-5,
                "image {i} at {side}: normalisation differs by {diff}"
            );
        }
    }
}

#[test]
fn the_nnef_archive_gives_the_onnx_features() {
    let Some((model, reference, cases)) = model_and_reference() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let nnef = dir.path().join("features.nnef.tgz");
    edge_client::convert_onnx_to_nnef(&model, &nnef).unwrap();
    // One archive, several sides: the side is a symbol bound at load time.
    for case in &cases {
        let side = case["size"].as_u64().unwrap() as usize;
        let inputs = read_f32(&reference.join(case["input"]["file"].as_str().unwrap()));
        let want = read_f32(&reference.join(case["features"]["file"].as_str().unwrap()));
        let from_onnx = Backbone::load(&model, side)
            .unwrap()
            .features_of_inputs(&inputs, 2)
            .unwrap();
        let from_nnef = Backbone::load(&nnef, side)
            .unwrap()
            .features_of_inputs(&inputs, 2)
            .unwrap();
        let max_mag = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let vs_onnx = max_abs_diff(from_nnef.iter().copied(), from_onnx.iter().copied());
        let vs_ort = max_abs_diff(from_nnef.iter().copied(), want.iter().copied());
        eprintln!(
            "side {side}: max |nnef − onnx| = {vs_onnx:e}, max |nnef − onnxruntime| = {vs_ort:e}"
        );
        assert!(vs_onnx <= 1e-6 * max_mag, "side {side}: {vs_onnx}");
        assert!(vs_ort <= 1e-4 * max_mag, "side {side}: {vs_ort}");
    }
}

/// `mobilenet_v2_features_int8w.onnx` (int8 conv weights, float arithmetic; models/convert.py):
/// tract folds the dequantization at load, so it must agree with onnxruntime as closely as the
/// f32 file does, from the ONNX and from its NNEF archive alike.
#[test]
fn int8_weights_give_onnxruntimes_features() {
    let Some((model, reference, cases)) = model_and_reference() else {
        return;
    };
    let model = model.with_file_name("mobilenet_v2_features_int8w.onnx");
    if !model.exists() || cases.iter().any(|c| c.get("features_int8w").is_none()) {
        let why = "no int8-weights model or reference (run scripts/fetch-model.sh, then \
                   .venv-models/bin/python models/verify.py)";
        assert!(!require_model(), "WSA_REQUIRE_MODEL=1 but {why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nnef = dir.path().join("int8w.nnef.tgz");
    edge_client::convert_onnx_to_nnef(&model, &nnef).unwrap();
    for case in &cases {
        let side = case["size"].as_u64().unwrap() as usize;
        let inputs = read_f32(&reference.join(case["input"]["file"].as_str().unwrap()));
        let want = read_f32(&reference.join(case["features_int8w"]["file"].as_str().unwrap()));
        let f32_features = read_f32(&reference.join(case["features"]["file"].as_str().unwrap()));
        let max_mag = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for path in [&model, &nnef] {
            let got = Backbone::load(path, side)
                .unwrap()
                .features_of_inputs(&inputs, 2)
                .unwrap();
            assert_eq!(got.len(), want.len());
            let max_diff = max_abs_diff(got.iter().copied(), want.iter().copied());
            eprintln!(
                "side {side}, {}: max |tract − onnxruntime| = {max_diff:e}",
                path.display()
            );
            assert!(
                max_diff <= 1e-4 * max_mag,
                "side {side}: {max_diff} > 1e-4 × {max_mag}"
            );
        }
        // The reference itself is the int8 file's, not the f32 one's under another name.
        let moved = max_abs_diff(want.iter().copied(), f32_features.iter().copied());
        assert!(
            moved > 1e-3 * max_mag,
            "int8 weights left the features unchanged"
        );
    }
}

#[test]
fn a_missing_or_broken_model_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.onnx");
    assert!(matches!(
        Backbone::load(&missing, 96),
        Err(edge_client::BackboneError::Io { .. })
    ));
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"definitely not protobuf").unwrap();
    assert!(matches!(
        Backbone::load(&garbage, 96),
        Err(edge_client::BackboneError::Model { .. })
    ));
    assert!(matches!(
        Backbone::load(&garbage, 8),
        Err(edge_client::BackboneError::BadInputSide { .. })
    ));
}
