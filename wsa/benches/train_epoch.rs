//! One local training epoch of a 1280→256→10 MLP head (MobileNetV2 features → 10 classes), in
//! samples/s, next to the f32 GEMM rate on the very GEMMs a training step performs, timed in
//! the same run. Writes JSON to the workspace's `target/bench/train_epoch.json` (or the path in argv[1]).
//!
//! `cargo bench -p wsa --bench train_epoch`

use std::hint::black_box;
use std::time::Instant;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, s};
use wsa::synthetic::{SyntheticProblem, SyntheticSpec};
use wsa::{Head, HeadSpec, Init, LabelledFeatures, Sgd, TrainConfig, WsaTerm, train};

const INPUT: usize = 1280;
const HIDDEN: usize = 256;
const CLASSES: usize = 10;

/// `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then this binary
/// only smoke-tests itself on a tiny run and writes nothing.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The GEMMs of one training step at batch `b`, with the same operand layouts as the trainer.
struct StepGemms {
    x: Array2<f32>,
    w1: Array2<f32>,
    w2: Array2<f32>,
    a1: Array2<f32>,
    z2: Array2<f32>,
    dw1: Array2<f32>,
    dw2: Array2<f32>,
    da1: Array2<f32>,
}

impl StepGemms {
    fn new(b: usize) -> Self {
        let fill =
            |r, c| Array2::from_shape_fn((r, c), |(i, j)| ((i * 31 + j * 17) % 13) as f32 * 0.01);
        Self {
            x: fill(b, INPUT),
            w1: fill(INPUT, HIDDEN),
            w2: fill(HIDDEN, CLASSES),
            a1: fill(b, HIDDEN),
            z2: fill(b, CLASSES),
            dw1: fill(INPUT, HIDDEN),
            dw2: fill(HIDDEN, CLASSES),
            da1: fill(b, HIDDEN),
        }
    }

    fn flops(b: usize) -> f64 {
        2.0 * (b * INPUT * HIDDEN * 2 + b * HIDDEN * CLASSES * 3) as f64
    }

    fn run(&mut self) {
        general_mat_mul(1.0, &self.x, &self.w1, 1.0, &mut self.a1);
        general_mat_mul(1.0, &self.a1, &self.w2, 1.0, &mut self.z2);
        general_mat_mul(1.0, &self.a1.t(), &self.z2, 0.0, &mut self.dw2);
        general_mat_mul(1.0, &self.z2, &self.w2.t(), 0.0, &mut self.da1);
        general_mat_mul(1.0, &self.x.t(), &self.a1, 0.0, &mut self.dw1);
        // Keep values bounded across repetitions.
        self.a1.fill(0.0);
        self.z2.fill(0.0);
        black_box(&self.dw1);
    }
}

struct Row {
    name: String,
    batch: usize,
    samples_per_s: f64,
    train_gflops: f64,
    gemm_gflops: f64,
}

fn main() {
    let (samples, repeats) = if full_run() { (8192, 7) } else { (256, 1) };
    let out = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with("--"))
        .unwrap_or_else(|| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/bench/train_epoch.json"
            )
            .into()
        });
    let spec = SyntheticSpec {
        dim: INPUT,
        ..SyntheticSpec::default()
    };
    let data: LabelledFeatures = SyntheticProblem::new(spec, 1)
        .and_then(|p| p.sample(samples, 2))
        .expect("synthetic data");
    let head_spec = HeadSpec::mlp(INPUT, &[HIDDEN], CLASSES);
    let start = Head::init(&head_spec, Init::Standard, 0).expect("head");
    let targets = start
        .scopes(Default::default(), wsa::DEFAULT_SCOPE_EPS)
        .expect("scopes");

    let mut rows = Vec::new();
    for (name, batch, wsa_term) in [
        ("sgd", 32, None),
        ("sgd", 64, None),
        ("sgd+wsa", 64, Some(WsaTerm::new(10.0, targets.clone()))),
    ] {
        let cfg = TrainConfig {
            sgd: Sgd {
                epochs: 1,
                batch_size: batch,
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 1e-5,
            },
            seed: 3,
            prox_mu: None,
            wsa: wsa_term,
        };
        let steps = samples.div_ceil(batch);
        let mut gemms = StepGemms::new(batch);
        train(&start, &data, &cfg).expect("warm-up epoch");
        gemms.run();
        let (mut train_s, mut gemm_s) = (Vec::new(), Vec::new());
        // Interleave the two measurements so machine noise hits both alike.
        for _ in 0..repeats {
            let t = Instant::now();
            black_box(train(&start, &data, &cfg).expect("epoch"));
            train_s.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..steps {
                gemms.run();
            }
            gemm_s.push(t.elapsed().as_secs_f64());
        }
        let flops = StepGemms::flops(batch) * (samples / batch) as f64;
        let (train_t, gemm_t) = (median(train_s), median(gemm_s));
        rows.push(Row {
            name: name.into(),
            batch,
            samples_per_s: samples as f64 / train_t,
            train_gflops: flops / train_t / 1e9,
            gemm_gflops: flops / gemm_t / 1e9,
        });
    }

    // The machine's single-thread f32 GEMM rate on a large square, for scale.
    let n = 1024;
    let a = Array2::<f32>::from_elem((n, n), 0.5);
    let mut c = Array2::<f32>::zeros((n, n));
    general_mat_mul(1.0, &a, &a, 0.0, &mut c);
    let square = median(
        (0..repeats)
            .map(|_| {
                let t = Instant::now();
                general_mat_mul(1.0, &a, &a, 0.0, &mut c);
                black_box(c.slice(s![0, 0]));
                2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    );

    println!("head 1280→256→10, {samples} samples/epoch, median of {repeats}, single thread");
    println!(
        "| variant | batch | samples/s | train GFLOP/s | GEMM GFLOP/s (same shapes) | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    let mut json_rows = Vec::new();
    for r in &rows {
        let ratio = r.train_gflops / r.gemm_gflops;
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.2} |",
            r.name, r.batch, r.samples_per_s, r.train_gflops, r.gemm_gflops, ratio
        );
        json_rows.push(serde_json::json!({
            "variant": r.name, "batch": r.batch, "samples_per_s": r.samples_per_s,
            "train_gflops": r.train_gflops, "gemm_gflops": r.gemm_gflops, "ratio": ratio,
        }));
    }
    println!("square 1024³ f32 GEMM: {square:.1} GFLOP/s");
    let json = serde_json::json!({
        "bench": "train_epoch", "head": [INPUT, HIDDEN, CLASSES], "samples": samples,
        "repeats": repeats, "threads": 1, "square_gemm_gflops": square, "rows": json_rows,
    });
    if !full_run() {
        println!("smoke run only (no --bench): nothing written");
        return;
    }
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("create the output folder");
    }
    std::fs::write(&out, format!("{json:#}\n")).expect("write the JSON result");
    println!("wrote {out}");
}
