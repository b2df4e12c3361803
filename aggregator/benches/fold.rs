//! Throughput of the fold: N ∈ {10, 100, 1000} client updates × P ∈ {0.33M, 3.5M, 25M}
//! parameters, in GB/s of client data (4·P bytes per update), per backend and path:
//!
//! - `fold`: `add` with the update's measurement (the engine's path after its checks);
//! - `measure+fold`: `measure` then `add`, all an accepted update costs the backend;
//! - `batch8`: `add_batch` of 8 updates at a time (each checked, the sum passed once);
//! - `median` and `trimmed(0.1)`: the storing rules, add and finish, where N·P fits 2 GB.
//!
//! Each row also gives `fold_finish_gbps`, over the adds and the finish together: on the GPU an
//! add of a vector already on the device (a measured one still staged) only queues a kernel,
//! and the finish waits for them all.
//!
//! Next to them, in the same run: the CPU's memcpy bandwidth (bytes copied per second, one
//! thread and all threads) and, on a GPU, the device-to-device copy bandwidth and the fold of
//! device-resident data. Updates come from a pool of distinct vectors reused in turn (1000
//! distinct 25M vectors would be 100 GB): at least 8 and at least 256 MB of them, so that no
//! size is measured out of the CPU's cache.
//!
//! `cargo bench -p aggregator --bench fold [--features cuda] -- [--out DIR] [--quick] [--threads N]`
//! writes `DIR/fold.json` (default: the workspace's `target/bench/`). Without `--bench`
//! (as `cargo test --all-targets` runs it) it only smoke-tests itself on tiny sizes.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use aggregator_core::backend::{Backend, CpuBackend, FoldShape};
use aggregator_core::strategy::Aggregation;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// Distinct update vectors at least, and bytes of them at least: 256 MB is well past any
/// CPU's last-level cache, so small P is not measured out of cache.
const MIN_POOL: usize = 8;
const MIN_POOL_BYTES: usize = 256 << 20;
const BATCH: usize = 8;
/// Largest N·P·4 bytes a storing rule is benchmarked at.
const MAX_STORED_BYTES: usize = 2 << 30;

struct Options {
    threads: Option<usize>,
    full: bool,
    quick: bool,
    out: PathBuf,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("bench")
        });
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse().ok());
    Options {
        threads,
        full: args.iter().any(|a| a == "--bench"),
        quick: args.iter().any(|a| a == "--quick"),
        out,
    }
}

fn gbps(bytes: f64, seconds: f64) -> f64 {
    bytes / seconds / 1e9
}

/// Best of `reps` runs of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// memcpy of `bytes` bytes, one thread and `threads` threads: bytes copied per second.
fn memcpy_gbps(bytes: usize, threads: usize, reps: usize) -> (f64, f64) {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let one = best_of(reps, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    });
    let chunk = bytes.div_ceil(threads);
    let all = best_of(reps, || {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(black_box(c)));
            }
        });
        black_box(&dst);
    });
    (gbps(bytes as f64, one), gbps(bytes as f64, all))
}

/// A shape of `p` parameters shaped like a head: one big weight tensor, a gap, a small one.
fn shape_of(p: usize) -> FoldShape {
    let big = p - p / 100;
    FoldShape {
        len: p,
        tensors: vec![0..big - 10, big..p],
        eps: 1e-8,
    }
}

/// One cell: N updates of P parameters through one path; seconds of the N updates' folding
/// and of the finish (the storing rules' real work).
fn run_cell(
    backend: &dyn Backend,
    shape: &FoldShape,
    reference: &[f32],
    pool: &[Vec<f32>],
    n: usize,
    path: &str,
) -> Result<(f64, f64), String> {
    let rule = match path {
        "median" => Aggregation::Median,
        "trimmed(0.1)" => Aggregation::TrimmedMean { trim: 0.1 },
        _ => Aggregation::Mean,
    };
    let mut acc = backend
        .accumulator(shape, reference, rule, n + 1)
        .map_err(|e| e.to_string())?;
    let pool_len = pool.len();
    let measured: Vec<_> = pool
        .iter()
        .map(|w| acc.measure(w))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    // One untimed add first: it faults in the fresh sum's pages, a cost of the allocation
    // rather than of folding.
    acc.add(&pool[0], 1.0, Some(&measured[0]))
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    match path {
        "measure+fold" => {
            for k in 0..n {
                let m = acc
                    .measure(&pool[k % pool_len])
                    .map_err(|e| e.to_string())?;
                acc.add(&pool[k % pool_len], 1.0, Some(&m))
                    .map_err(|e| e.to_string())?;
            }
        }
        "batch8" => {
            // Batches of consecutive pool entries (the pool's length is a multiple of 8).
            let refs: Vec<&[f32]> = pool.iter().map(Vec::as_slice).collect();
            let ps = [1.0; BATCH];
            let mut done = 0;
            while done < n {
                let k = (n - done).min(BATCH);
                let at = done % pool_len;
                acc.add_batch(&refs[at..at + k], &ps[..k], Some(&measured[at..at + k]))
                    .map_err(|e| e.to_string())?;
                done += k;
            }
        }
        // "fold", and the storing rules' adds (their work is in the finish).
        _ => {
            for k in 0..n {
                acc.add(&pool[k % pool_len], 1.0, Some(&measured[k % pool_len]))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let folding = t.elapsed().as_secs_f64();
    let t = Instant::now();
    black_box(acc.finish().map_err(|e| e.to_string())?);
    Ok((folding, t.elapsed().as_secs_f64()))
}

/// Every cell on one backend: rows of `{n, p, path, seconds, gbps}`.
fn run_backend(backend: &dyn Backend, ns: &[usize], ps: &[usize], full: bool) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &p in ps {
        let shape = shape_of(p);
        let reference: Vec<f32> = (0..p).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let pool_len = (MIN_POOL_BYTES / (4 * p))
            .max(MIN_POOL)
            .next_multiple_of(BATCH);
        let pool: Vec<Vec<f32>> = (0..pool_len)
            .map(|_| {
                reference
                    .iter()
                    .map(|r| r + rng.random_range(-0.01f32..0.01))
                    .collect()
            })
            .collect();
        for &n in ns {
            for path in ["fold", "measure+fold", "batch8", "median", "trimmed(0.1)"] {
                let stores = matches!(path, "median" | "trimmed(0.1)");
                if stores && n * p * 4 > MAX_STORED_BYTES {
                    continue;
                }
                // Small cells repeat until they take long enough to time.
                let data = (n * p * 4) as f64;
                let reps = if !full {
                    1
                } else {
                    (2e9 / data).clamp(1.0, 5.0) as usize
                };
                let mut best = (f64::INFINITY, f64::INFINITY);
                let mut error = None;
                for _ in 0..reps {
                    match run_cell(backend, &shape, &reference, &pool, n, path) {
                        Ok((fold, finish)) => best = (best.0.min(fold), best.1.min(finish)),
                        Err(e) => error = Some(e),
                    }
                }
                // The storing rules' work is the finish; the means' is the folding.
                let seconds = if stores { best.0 + best.1 } else { best.0 };
                let row = match error {
                    Some(e) => {
                        json!({"backend": backend.name(), "n": n, "p": p, "path": path, "error": e})
                    }
                    // A device backend's adds may only queue work that its finish waits
                    // for (measured vectors stay on the device): there, the data over fold
                    // and finish together is the rate to read.
                    None => json!({"backend": backend.name(), "n": n, "p": p, "path": path,
                        "fold_seconds": best.0, "finish_seconds": best.1, "gbps": gbps(data, seconds),
                        "fold_finish_gbps": gbps(data, best.0 + best.1)}),
                };
                eprintln!("{row}");
                rows.push(row);
            }
        }
    }
    rows
}

#[cfg(feature = "cuda")]
fn cuda_section(ns: &[usize], ps: &[usize], full: bool) -> Value {
    use aggregator_cuda::{CudaBackend, probe};
    if let Err(reason) = probe() {
        eprintln!("cuda: skipped: no CUDA driver: {reason}");
        return json!({"available": false, "reason": reason});
    }
    let backend = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cuda: skipped: {e}");
            return json!({"available": false, "reason": e.to_string()});
        }
    };
    let mut resident = Vec::new();
    for &p in ps {
        match backend.resident_fold_bandwidth(p, MIN_POOL, if full { 10 } else { 1 }) {
            Ok(r) => {
                let row = json!({"p": p, "d2d_copy_gbps": r.copy_gbps, "fold_gbps": r.fold_gbps,
                    "batch_fold_gbps": r.batch_fold_gbps,
                    "fold_over_d2d": r.fold_gbps / r.copy_gbps,
                    "batch_fold_over_d2d": r.batch_fold_gbps / r.copy_gbps});
                eprintln!("{row}");
                resident.push(row);
            }
            Err(e) => resident.push(json!({"p": p, "error": e.to_string()})),
        }
    }
    json!({
        "available": true,
        "device": backend.device_name(),
        "resident": resident,
        "end_to_end": run_backend(&backend, ns, ps, full),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_section(_: &[usize], _: &[usize], _: bool) -> Value {
    eprintln!("cuda: skipped: built without the cuda feature");
    json!({"available": false, "reason": "built without the cuda feature"})
}

fn main() {
    let opts = options();
    let (ns, ps): (Vec<usize>, Vec<usize>) = if !opts.full {
        (vec![3, 10], vec![5_000, 300_000])
    } else if opts.quick {
        (vec![10, 100], vec![330_000, 3_500_000])
    } else {
        (vec![10, 100, 1000], vec![330_000, 3_500_000, 25_000_000])
    };
    let cpu = opts
        .threads
        .map_or_else(CpuBackend::default, CpuBackend::new);
    let copy_bytes = if opts.full { 256 << 20 } else { 8 << 20 };
    let (memcpy_one, memcpy_all) = memcpy_gbps(copy_bytes, cpu.threads(), 5);
    eprintln!(
        "memcpy: {memcpy_one:.2} GB/s one thread, {memcpy_all:.2} GB/s {} threads",
        cpu.threads()
    );
    let cpu_rows = run_backend(&cpu, &ns, &ps, opts.full);
    // Again after the cells: on a shared machine the bandwidth drifts, and the ratios use the
    // best figure seen, which makes them conservative.
    let (memcpy_one_after, memcpy_all_after) = memcpy_gbps(copy_bytes, cpu.threads(), 5);
    eprintln!("memcpy after: {memcpy_one_after:.2} GB/s one thread, {memcpy_all_after:.2} GB/s");
    let memcpy_best = memcpy_one
        .max(memcpy_all)
        .max(memcpy_one_after)
        .max(memcpy_all_after);
    let ratios: Vec<Value> = cpu_rows
        .iter()
        .filter_map(|r| {
            let g = r["gbps"].as_f64()?;
            Some(json!({"n": r["n"], "p": r["p"], "path": r["path"], "of_memcpy": g / memcpy_best}))
        })
        .collect();
    let report = json!({
        "unit": "GB/s of client data (4 bytes per parameter per update); memcpy: bytes copied per second",
        "threads": cpu.threads(),
        "memcpy_gbps": {"one_thread": memcpy_one, "all_threads": memcpy_all,
            "one_thread_after": memcpy_one_after, "all_threads_after": memcpy_all_after,
            "best": memcpy_best, "copied_bytes": copy_bytes},
        "cpu": cpu_rows,
        "cpu_over_memcpy": ratios,
        "cuda": cuda_section(&ns, &ps, opts.full),
    });
    if opts.full {
        std::fs::create_dir_all(&opts.out).expect("creating the output folder");
        let path = opts.out.join("fold.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json"))
            .expect("writing the report");
        eprintln!("wrote {}", path.display());
    }
}
