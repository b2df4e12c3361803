//! tract images/s on the features ONNX at 96² and 224², 1 and 2 threads, preprocessing
//! excluded (inputs are prepared before the clock starts); also on the same network with int8
//! weights (`models/convert.py`) and statically quantized (`models/quantize.py`), when those
//! files are there. Writes `target/bench/tract_backbone.json`; `models/verify.py --bench` and
//! `models/quantize.py` write the onnxruntime figures for the same files and settings, and
//! `scripts/bench.sh` prints the ratios.
//!
//! `cargo bench -p edge-client --bench backbone`

use std::path::Path;
use std::time::Instant;

use edge_client::Backbone;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let f32_model = models.join("mobilenet_v2_features.onnx");
    if !f32_model.exists() {
        eprintln!(
            "SKIPPED: {} missing (run scripts/fetch-model.sh)",
            f32_model.display()
        );
        return;
    }
    // int8 weights (scripts/fetch-model.sh) and static int8 (models/quantize.py), when there.
    let mut files = vec![("f32", f32_model)];
    for (weights, file) in [
        ("int8w", "mobilenet_v2_features_int8w.onnx"),
        ("int8", "mobilenet_v2_features_int8.onnx"),
    ] {
        if models.join(file).exists() {
            files.push((weights, models.join(file)));
        }
    }
    let repeats = if full { 5 } else { 1 };
    let mut rows = Vec::new();
    for ((weights, model), (side, images)) in files
        .iter()
        .flat_map(|f| [(f, (96usize, 64usize)), (f, (224, 16))])
    {
        let images = if full { images } else { 2 };
        let backbone = Backbone::load(model, side).expect("load the backbone");
        // Deterministic, image-like inputs (values in the normalised range).
        let inputs: Vec<f32> = (0..images * 3 * side * side)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 4096) as f32 / 1024.0 - 2.0)
            .collect();
        for threads in [1usize, 2] {
            backbone
                .features_of_inputs(&inputs, threads)
                .expect("warm-up");
            let mut rates: Vec<f64> = (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(
                        backbone.features_of_inputs(&inputs, threads).expect("run"),
                    );
                    images as f64 / t.elapsed().as_secs_f64()
                })
                .collect();
            rates.sort_by(f64::total_cmp);
            let rate = rates[rates.len() / 2];
            println!("tract {weights} side {side} threads {threads}: {rate:.1} images/s");
            rows.push(serde_json::json!({
                "model": weights, "side": side, "threads": threads, "images_per_s": rate,
            }));
        }
    }
    if !full {
        println!("smoke run only (no --bench): nothing written");
        return;
    }
    let json = serde_json::json!({
        "bench": "tract_backbone",
        "models": files.iter().map(|(w, m)| {
            let name = m.file_name().unwrap_or_default().to_string_lossy();
            (w.to_string(), format!("models/{name}"))
        }).collect::<std::collections::BTreeMap<_, _>>(),
        "batch": 1, "threading": "one plan, one state per thread, images split across threads",
        "repeats": repeats, "rows": rows,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("create target/bench");
    std::fs::write(out.join("tract_backbone.json"), format!("{json:#}\n")).expect("write JSON");
    println!("wrote {}", out.join("tract_backbone.json").display());
}
