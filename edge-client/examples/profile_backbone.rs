//! Where tract spends its time on the features ONNX: wall time per operator kind over many
//! runs at one input side. A diagnostic for the backbone benchmark, not part of the client.
//!
//! `cargo run --release -p edge-client --example profile_backbone -- [side] [runs]`
//!
//! Environment: `MODEL=<onnx>` profiles another file (the int8 one from `models/quantize.py`);
//! `NCHW=1` skips the channel-last transform the client applies. With `--features
//! multithread-mm`, `MT=<n>` runs the image's matmuls on an n-thread pool, and `MACS=<n>` /
//! `PANELS=<n>` set tract's thresholds below which a matmul stays on one thread.

use std::collections::HashMap;
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let side: usize = args.next().map_or(96, |s| s.parse().expect("side"));
    let runs: usize = args.next().map_or(200, |s| s.parse().expect("runs"));
    let path = std::env::var("MODEL").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/mobilenet_v2_features.onnx"
        )
        .into()
    });
    let mut model = tract_onnx::onnx()
        .model_for_path(path)?
        .with_input_fact(0, f32::fact([1, 3, side, side]).into())?
        .into_typed()?;
    if std::env::var("NCHW").is_err() {
        let t = tract_onnx::tract_core::transform::get_transform("conv_nhwc")?.expect("conv_nhwc");
        model.transform(&*t)?;
    }
    let plan = model.into_optimized()?.into_runnable()?;
    #[cfg(not(feature = "multithread-mm"))]
    if std::env::var_os("MT").is_some() {
        eprintln!("MT is ignored: build the example with --features multithread-mm");
    }
    #[cfg(feature = "multithread-mm")]
    {
        use tract_linalg::multithread as mt;
        let env = |name: &str| std::env::var(name).ok().map(|v| v.parse().expect(name));
        if let Some(panels) = env("PANELS") {
            mt::set_threading_panel_threshold(panels);
        }
        if let Some(macs) = env("MACS") {
            mt::set_threading_mac_threshold(macs);
        }
        if let Some(threads) = env("MT").filter(|&n| n > 1) {
            return mt::multithread_tract_scope(mt::Executor::multithread(threads), || {
                profile(&plan, side, runs)
            });
        }
    }
    profile(&plan, side, runs)
}

fn profile(plan: &Arc<TypedSimplePlan>, side: usize, runs: usize) -> TractResult<()> {
    let mut state = TypedSimpleState::new(plan)?;
    let input = Tensor::zero::<f32>(&[1, 3, side, side])?;
    let mut per_op: HashMap<String, (f64, usize)> = HashMap::new();
    let total = Instant::now();
    for _ in 0..runs {
        state.run_plan_with_eval(
            tvec!(input.clone().into_tvalue()),
            |ctx, op_state, node, inputs| {
                let t = Instant::now();
                let out = eval(ctx, op_state, node, inputs);
                let e = per_op.entry(node.op().name().to_string()).or_default();
                e.0 += t.elapsed().as_secs_f64();
                e.1 += 1;
                out
            },
        )?;
    }
    let total = total.elapsed().as_secs_f64();
    let mut rows: Vec<_> = per_op.into_iter().collect();
    rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    println!(
        "side {side}: {:.3} ms per image over {runs} runs",
        total * 1e3 / runs as f64
    );
    for (op, (secs, n)) in rows {
        println!(
            "{op:>24}: {:7.3} ms/image  ({} nodes)",
            secs * 1e3 / runs as f64,
            n / runs
        );
    }
    Ok(())
}
