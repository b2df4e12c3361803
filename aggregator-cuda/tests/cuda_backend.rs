//! The CUDA backend against the CPU backend, operation by operation, on random inputs.
//!
//! Without a driver or a device every test prints `skipped: no CUDA driver: …`. On a GPU they
//! run for real (`scripts/gpu-check.sh run`).
//!
//! Tolerances (see the crate's documentation): the mean rules' f64 sums are compared
//! bit for bit and their f32 results to 1 ulp; scopes and distances to a relative 1e-5 (the
//! CPU sums f32 blocks, the GPU f64); a clipped mean to 1 ulp plus 1e-6 of the largest value
//! (its clip factor comes from that distance); the median exactly, the trimmed mean to 1 ulp.

macro_rules! cuda_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            if let Some(gpu) = on_gpu::backend() {
                on_gpu::$name(gpu);
            }
        }
    )*};
}

cuda_tests!(
    opens_and_names_the_device,
    measure_matches_the_cpu,
    measure_refuses_non_finite_and_wrong_length,
    huge_finite_values_are_measured_not_called_non_finite,
    mean_matches_the_cpu_with_and_without_measurements,
    staged_copies_are_reused_and_replaced,
    norm_clipped_matches_the_cpu,
    add_batch_matches_sequential_adds_and_the_cpu,
    a_refused_update_leaves_the_fold_unchanged,
    merge_and_partial_round_trip_between_backends,
    robust_rules_match_the_cpu,
    capacity_is_enforced,
    finish_on_empty_is_refused_as_on_the_cpu,
    long_vectors_stream_through_the_pinned_buffers,
    accumulators_work_from_other_threads,
    resident_bandwidth_is_measured,
);

mod on_gpu {
    use std::sync::OnceLock;

    use aggregator_core::backend::{
        Accumulator, Backend, BackendError, CpuBackend, FoldShape, Measurement,
    };
    use aggregator_core::strategy::Aggregation;
    use aggregator_cuda::{CudaBackend, MAX_STORED, probe};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use wsa::{HeadSpec, ParamSum, ScopeSelection};

    /// The backend, opened once per test binary (NVRTC compiles the kernels each time), or
    /// `None` with the skip line when there is no driver or device. A device that answers
    /// but does not open is a failure.
    pub fn backend() -> Option<&'static CudaBackend> {
        static BACKEND: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
        if let Err(reason) = probe() {
            eprintln!("skipped: no CUDA driver: {reason}");
            return None;
        }
        match BACKEND.get_or_init(|| CudaBackend::new(0).map_err(|e| e.to_string())) {
            Ok(gpu) => Some(gpu),
            Err(e) => panic!("a CUDA device answers but the backend does not open: {e}"),
        }
    }

    fn cpu() -> CpuBackend {
        CpuBackend::default()
    }

    /// Head shapes: biases unscoped (gaps between the scoped tensors and after the last),
    /// and every tensor scoped.
    fn shapes() -> Vec<FoldShape> {
        vec![
            FoldShape::of_head(
                &HeadSpec::mlp(64, &[32], 10),
                ScopeSelection::default(),
                wsa::DEFAULT_SCOPE_EPS,
            ),
            FoldShape::of_head(
                &HeadSpec::mlp(40, &[24], 10),
                ScopeSelection {
                    include_biases: true,
                },
                0.0,
            ),
        ]
    }

    fn head_shape() -> FoldShape {
        shapes().swap_remove(0)
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Values around `center` with a spread, as trained weights look.
    fn vector(rng: &mut ChaCha8Rng, len: usize, center: f32, spread: f32) -> Vec<f32> {
        (0..len)
            .map(|_| center + spread * rng.random_range(-1.0f32..1.0))
            .collect()
    }

    fn weights(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(0.25..4.0)).collect()
    }

    fn pair(
        gpu: &CudaBackend,
        shape: &FoldShape,
        reference: &[f32],
        rule: Aggregation,
        capacity: usize,
    ) -> (Box<dyn Accumulator>, Box<dyn Accumulator>) {
        (
            gpu.accumulator(shape, reference, rule, capacity)
                .expect("GPU accumulator"),
            cpu()
                .accumulator(shape, reference, rule, capacity)
                .expect("CPU accumulator"),
        )
    }

    /// Every value within 1 f32 ulp of the other's, plus `extra` (absolute).
    fn assert_ulp(what: &str, got: &[f32], want: &[f32], extra: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = f32::EPSILON * g.abs().max(w.abs()) + extra;
            assert!(
                (g - w).abs() <= tol,
                "{what}: param {i}: gpu {g} vs cpu {w}"
            );
        }
    }

    fn largest(v: &[f32]) -> f32 {
        v.iter().fold(0f32, |m, x| m.max(x.abs()))
    }

    fn assert_measurements_close(what: &str, gpu: &Measurement, cpu: &Measurement) {
        assert_eq!(gpu.scopes.len(), cpu.scopes.len(), "{what}: scopes");
        for (t, (g, c)) in gpu.scopes.iter().zip(&cpu.scopes).enumerate() {
            let tol = 1e-5 * c.std.max(1e-12);
            assert!(
                (g.mean - c.mean).abs() <= tol,
                "{what}: tensor {t} mean: gpu {g:?} vs cpu {c:?}"
            );
            assert!(
                (g.std - c.std).abs() <= tol,
                "{what}: tensor {t} std: gpu {g:?} vs cpu {c:?}"
            );
        }
        assert!(
            (gpu.distance - cpu.distance).abs() <= 1e-5 * cpu.distance.max(1e-12),
            "{what}: distance gpu {} vs cpu {}",
            gpu.distance,
            cpu.distance
        );
    }

    fn partial_sum(acc: &dyn Accumulator) -> ParamSum {
        acc.partial().expect("partial sum")
    }

    pub fn opens_and_names_the_device(gpu: &CudaBackend) {
        assert_eq!(gpu.name(), "cuda");
        assert!(!gpu.device_name().is_empty());
        let (major, minor) = gpu.compute_capability();
        assert!(major >= 3, "compute capability {major}.{minor}");
        eprintln!(
            "device: {} (compute {major}.{minor}), kernels: {}",
            gpu.device_name(),
            gpu.kernel_build()
        );
    }

    pub fn measure_matches_the_cpu(gpu: &CudaBackend) {
        let mut rng = rng(1);
        for shape in shapes() {
            // A large common offset: the shift by the tensor's first value keeps σ exact.
            for (center, spread) in [(0.0, 0.05), (3.0, 0.5), (1000.0, 0.01)] {
                let reference = vector(&mut rng, shape.len, center, spread);
                let (mut g, mut c) = pair(gpu, &shape, &reference, Aggregation::Mean, 0);
                for k in 0..3 {
                    let w = vector(&mut rng, shape.len, center, spread);
                    let mg = g.measure(&w).expect("GPU measure");
                    let mc = c.measure(&w).expect("CPU measure");
                    assert_measurements_close(
                        &format!("len {} center {center} #{k}", shape.len),
                        &mg,
                        &mc,
                    );
                }
                // The reference itself: distance 0 on both.
                assert_eq!(g.measure(&reference).unwrap().distance, 0.0);
            }
        }
    }

    pub fn measure_refuses_non_finite_and_wrong_length(gpu: &CudaBackend) {
        let mut rng = rng(2);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        let (mut g, mut c) = pair(gpu, &shape, &reference, Aggregation::Mean, 0);
        // The first value of a tensor, the first bias (an unscoped gap), the last value.
        let gap = shape.tensors[0].end;
        for at in [0, gap, shape.len / 2, shape.len - 1] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut w = vector(&mut rng, shape.len, 0.0, 0.1);
                w[at] = bad;
                let eg = g
                    .measure(&w)
                    .expect_err("GPU measure of a non-finite value");
                let ec = c
                    .measure(&w)
                    .expect_err("CPU measure of a non-finite value");
                assert_eq!(eg, ec, "value {bad} at {at}");
                assert!(matches!(
                    eg,
                    BackendError::Core(wsa::Error::NonFinite { .. })
                ));
            }
        }
        let w = vector(&mut rng, shape.len, 0.0, 0.1);
        for bad_len in [&w[1..], &[][..]] {
            assert_eq!(
                g.measure(bad_len).unwrap_err(),
                c.measure(bad_len).unwrap_err()
            );
        }
        let longer = [w.as_slice(), &[0.0]].concat();
        assert_eq!(
            g.measure(&longer).unwrap_err(),
            c.measure(&longer).unwrap_err()
        );
        // The refusals left the accumulator working.
        assert_measurements_close(
            "after refusals",
            &g.measure(&w).unwrap(),
            &c.measure(&w).unwrap(),
        );
        assert_eq!(g.count(), 0);
    }

    pub fn huge_finite_values_are_measured_not_called_non_finite(gpu: &CudaBackend) {
        let shape = FoldShape {
            len: 3000,
            tensors: std::iter::once(0..3000).collect(),
            eps: 0.0,
        };
        let reference = vec![0.0; 3000];
        let (mut g, mut c) = pair(gpu, &shape, &reference, Aggregation::Mean, 0);
        for huge in [1e30f32, -1e30, f32::MAX] {
            let mut w = vec![0.1f32; 3000];
            w[1500] = huge;
            let mg = g.measure(&w).expect("a huge finite value is measured");
            let mc = c
                .measure(&w)
                .expect("a huge finite value is measured (CPU)");
            assert!(mg.distance.is_finite());
            assert!(
                (mg.distance - mc.distance).abs() <= 1e-5 * mc.distance,
                "{huge}: gpu {} vs cpu {}",
                mg.distance,
                mc.distance
            );
            // And folded: the f64 sum holds it.
            g.add(&w, 1.0, Some(&mg)).unwrap();
            c.add(&w, 1.0, Some(&mc)).unwrap();
        }
        assert_ulp(
            "huge values",
            &g.finish().unwrap(),
            &c.finish().unwrap(),
            0.0,
        );
    }

    pub fn mean_matches_the_cpu_with_and_without_measurements(gpu: &CudaBackend) {
        let mut rng = rng(3);
        for shape in shapes() {
            let reference = vector(&mut rng, shape.len, 0.0, 0.1);
            let n = 12;
            let ws: Vec<Vec<f32>> = (0..n)
                .map(|_| vector(&mut rng, shape.len, 0.1, 0.2))
                .collect();
            let mut ps = weights(&mut rng, n);
            ps[3] = 0.0; // a zero weight folds nothing but counts
            let rule = Aggregation::Mean;
            let (mut measured, mut cpu_acc) = pair(gpu, &shape, &reference, rule, 0);
            let mut unmeasured = gpu.accumulator(&shape, &reference, rule, 0).unwrap();
            let mut measured_first = gpu.accumulator(&shape, &reference, rule, 0).unwrap();
            let mut cpu_measured = gpu.accumulator(&shape, &reference, rule, 0).unwrap();
            // Measured long before the add: more than the staged copies kept, so the first
            // ones go up again.
            let early: Vec<_> = ws
                .iter()
                .map(|w| measured_first.measure(w).unwrap())
                .collect();
            for (k, (w, &p)) in ws.iter().zip(&ps).enumerate() {
                let m = measured.measure(w).unwrap();
                measured.add(w, p, Some(&m)).unwrap();
                unmeasured.add(w, p, None).unwrap();
                measured_first.add(w, p, Some(&early[k])).unwrap();
                let mc = cpu_acc.measure(w).unwrap();
                cpu_acc.add(w, p, None).unwrap();
                // A measurement made elsewhere names no staged copy: uploaded again.
                cpu_measured.add(w, p, Some(&mc)).unwrap();
            }
            let want = partial_sum(cpu_acc.as_ref());
            for (what, acc) in [
                ("measured", &measured),
                ("unmeasured", &unmeasured),
                ("measured first", &measured_first),
                ("cpu-measured", &cpu_measured),
            ] {
                assert_eq!(acc.count(), n, "{what}");
                assert_eq!(acc.total_weight(), cpu_acc.total_weight(), "{what}");
                // Same operations in the same order, products rounded: the same bits.
                assert_eq!(partial_sum(acc.as_ref()), want, "{what}: f64 sums");
            }
            let expected = cpu_acc.finish().unwrap();
            for (what, acc) in [
                ("measured", &mut measured),
                ("unmeasured", &mut unmeasured),
                ("measured first", &mut measured_first),
                ("cpu-measured", &mut cpu_measured),
            ] {
                assert_ulp(what, &acc.finish().unwrap(), &expected, 0.0);
            }
        }
    }

    pub fn staged_copies_are_reused_and_replaced(gpu: &CudaBackend) {
        let mut rng = rng(12);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        let ws: Vec<Vec<f32>> = (0..10)
            .map(|_| vector(&mut rng, shape.len, 0.0, 0.3))
            .collect();
        let ps = weights(&mut rng, 10);
        for rule in [Aggregation::Mean, Aggregation::Median] {
            let label = rule.label();
            let (mut g, mut c) = pair(gpu, &shape, &reference, rule, 40);
            // The engine's way: one scratch buffer, rewritten for every update, measured and
            // folded with its measurement.
            let mut scratch = vec![0f32; shape.len];
            for (w, &p) in ws.iter().zip(&ps) {
                scratch.copy_from_slice(w);
                let m = g.measure(&scratch).unwrap();
                g.add(&scratch, p, Some(&m)).unwrap();
                c.add(w, p, None).unwrap();
            }
            // One measurement folded twice: the staged copy stays after its first fold.
            let m = g.measure(&ws[0]).unwrap();
            g.add(&ws[0], 1.0, Some(&m)).unwrap();
            g.add(&ws[0], 2.0, Some(&m)).unwrap();
            c.add(&ws[0], 1.0, None).unwrap();
            c.add(&ws[0], 2.0, None).unwrap();
            // The same values at another address: not the staged slice, uploaded again.
            let copy = ws[1].clone();
            let m = g.measure(&ws[1]).unwrap();
            g.add(&copy, 0.5, Some(&m)).unwrap();
            c.add(&copy, 0.5, None).unwrap();
            // Measured in one order, folded in another, with more measurements than copies
            // kept in between.
            let ms: Vec<_> = ws.iter().map(|w| g.measure(w).unwrap()).collect();
            for k in (0..10).rev() {
                g.add(&ws[k], ps[k], Some(&ms[k])).unwrap();
                c.add(&ws[k], ps[k], None).unwrap();
            }
            assert_eq!(g.count(), c.count(), "{label}");
            if rule == Aggregation::Mean {
                assert_eq!(partial_sum(g.as_ref()), partial_sum(c.as_ref()), "{label}");
            }
            assert_ulp(&label, &g.finish().unwrap(), &c.finish().unwrap(), 0.0);
        }
    }

    pub fn norm_clipped_matches_the_cpu(gpu: &CudaBackend) {
        let mut rng = rng(4);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        let max_norm = 0.5;
        let rule = Aggregation::NormClipped { max_norm };
        let (mut g, mut c) = pair(gpu, &shape, &reference, rule, 0);
        let mut g_unmeasured = gpu.accumulator(&shape, &reference, rule, 0).unwrap();
        let mut g_cpu_measured = gpu.accumulator(&shape, &reference, rule, 0).unwrap();
        let mut clipped = 0;
        for (k, scale) in [0.2f32, 3.0, 0.5, 1.5, 0.05, 8.0, 0.9]
            .into_iter()
            .enumerate()
        {
            let step = vector(&mut rng, shape.len, 0.0, 1.0);
            let norm = step
                .iter()
                .map(|&x| f64::from(x).powi(2))
                .sum::<f64>()
                .sqrt();
            let s = scale / norm as f32;
            let w: Vec<f32> = reference
                .iter()
                .zip(&step)
                .map(|(r, d)| r + s * d)
                .collect();
            let p = 1.0 + k as f64;
            let mg = g.measure(&w).unwrap();
            let mc = c.measure(&w).unwrap();
            clipped += usize::from(mc.distance > max_norm);
            g.add(&w, p, Some(&mg)).unwrap();
            c.add(&w, p, Some(&mc)).unwrap();
            g_unmeasured.add(&w, p, None).unwrap();
            g_cpu_measured.add(&w, p, Some(&mc)).unwrap();
        }
        assert!((2..=5).contains(&clipped), "{clipped} of 7 clipped");
        let want = c.finish().unwrap();
        let extra = 1e-6 * largest(&want);
        let got = g.finish().unwrap();
        assert_ulp("own measurements", &got, &want, extra);
        // The GPU's own measurement, whether passed or taken in `add`: the same bits.
        assert_eq!(g_unmeasured.finish().unwrap(), got);
        // The CPU's distances: the same clip factors, so the CPU's bits.
        assert_ulp(
            "the CPU's measurements",
            &g_cpu_measured.finish().unwrap(),
            &want,
            0.0,
        );
        assert_eq!(g.count(), 7);
        assert_eq!(g.total_weight(), c.total_weight());
    }

    pub fn add_batch_matches_sequential_adds_and_the_cpu(gpu: &CudaBackend) {
        let mut rng = rng(5);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        // 19: two full groups of 8 and a short one.
        let n = 19;
        let ws: Vec<Vec<f32>> = (0..n)
            .map(|_| vector(&mut rng, shape.len, 0.0, 0.3))
            .collect();
        let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
        let ps = weights(&mut rng, n);
        for rule in [
            Aggregation::Mean,
            Aggregation::NormClipped { max_norm: 0.4 },
            Aggregation::Median,
            Aggregation::TrimmedMean { trim: 0.2 },
        ] {
            let (mut g_batch, mut c_batch) = pair(gpu, &shape, &reference, rule, n);
            let mut g_seq = gpu.accumulator(&shape, &reference, rule, n).unwrap();
            let mut g_measured = gpu.accumulator(&shape, &reference, rule, n).unwrap();
            g_batch.add_batch(&refs, &ps, None).unwrap();
            c_batch.add_batch(&refs, &ps, None).unwrap();
            for (w, &p) in refs.iter().zip(&ps) {
                g_seq.add(w, p, None).unwrap();
            }
            // Measured in pieces: the last measurements of a piece are staged, the earlier
            // ones go up again.
            for (wp, pp) in refs.chunks(11).zip(ps.chunks(11)) {
                let ms: Vec<_> = wp.iter().map(|w| g_measured.measure(w).unwrap()).collect();
                g_measured.add_batch(wp, pp, Some(&ms)).unwrap();
            }
            let label = rule.label();
            for acc in [&g_batch, &g_seq, &g_measured] {
                assert_eq!(acc.count(), n, "{label}");
            }
            let want = c_batch.finish().unwrap();
            let got = g_batch.finish().unwrap();
            match rule {
                Aggregation::Mean => {
                    let sum = partial_sum(g_batch.as_ref());
                    assert_eq!(
                        sum,
                        partial_sum(c_batch.as_ref()),
                        "mean batch vs CPU batch"
                    );
                    assert_eq!(sum.weighted(), partial_sum(g_seq.as_ref()).weighted());
                    // Two batches: the weights summed in two parts.
                    assert_eq!(sum.weighted(), partial_sum(g_measured.as_ref()).weighted());
                    assert_ulp("mean batch", &got, &want, 0.0);
                    assert_ulp("mean sequential", &g_seq.finish().unwrap(), &want, 0.0);
                }
                Aggregation::NormClipped { .. } => {
                    let extra = 1e-6 * largest(&want);
                    assert_ulp("clipped batch", &got, &want, extra);
                    assert_eq!(g_seq.finish().unwrap(), got, "clipped batch vs sequential");
                    assert_eq!(g_measured.finish().unwrap(), got, "clipped measured batch");
                }
                Aggregation::Median => {
                    assert_eq!(got, want, "median batch");
                    assert_eq!(g_seq.finish().unwrap(), want);
                    assert_eq!(g_measured.finish().unwrap(), want);
                }
                Aggregation::TrimmedMean { .. } => {
                    assert_ulp("trimmed batch", &got, &want, 0.0);
                    assert_ulp("trimmed sequential", &g_seq.finish().unwrap(), &want, 0.0);
                    assert_ulp(
                        "trimmed measured",
                        &g_measured.finish().unwrap(),
                        &want,
                        0.0,
                    );
                }
            }
        }
    }

    pub fn a_refused_update_leaves_the_fold_unchanged(gpu: &CudaBackend) {
        let mut rng = rng(6);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        for rule in [
            Aggregation::Mean,
            Aggregation::NormClipped { max_norm: 0.3 },
            Aggregation::Median,
            Aggregation::TrimmedMean { trim: 0.25 },
        ] {
            let label = rule.label();
            let (mut g, mut c) = pair(gpu, &shape, &reference, rule, 64);
            for _ in 0..3 {
                let w = vector(&mut rng, shape.len, 0.0, 0.3);
                let p = rng.random_range(0.5..2.0);
                g.add(&w, p, None).unwrap();
                c.add(&w, p, None).unwrap();
            }
            let before = g.finish().unwrap();
            let (count, total) = (g.count(), g.total_weight());
            let good = vector(&mut rng, shape.len, 0.0, 0.3);
            let mut nan = good.clone();
            nan[shape.len / 3] = f32::NAN;
            let mut inf = good.clone();
            inf[shape.len - 1] = f32::INFINITY;
            // Single adds: a non-finite value, a bad weight, a wrong length.
            for (w, p) in [
                (&nan[..], 1.0),
                (&inf[..], 1.0),
                (&good[..], -1.0),
                (&good[..], f64::NAN),
                (&good[..], f64::INFINITY),
                (&good[1..], 1.0),
            ] {
                let eg = g.add(w, p, None).expect_err("GPU refuses");
                let ec = c.add(w, p, None).expect_err("CPU refuses");
                // As text: a NaN weight in the error is not equal to itself.
                assert_eq!(
                    format!("{eg:?}"),
                    format!("{ec:?}"),
                    "{label}: add of len {} weight {p}",
                    w.len()
                );
            }
            // Batches: a bad member past the first group of 8, a bad weight, a short one.
            let members: Vec<Vec<f32>> = (0..13)
                .map(|_| vector(&mut rng, shape.len, 0.0, 0.3))
                .collect();
            let mut with_nan: Vec<&[f32]> = members.iter().map(Vec::as_slice).collect();
            with_nan[11] = &nan;
            let ps = vec![1.0; 13];
            let mut bad_weight = ps.clone();
            bad_weight[9] = -2.0;
            let plain: Vec<&[f32]> = members.iter().map(Vec::as_slice).collect();
            let mut short: Vec<&[f32]> = plain.clone();
            short[10] = &good[2..];
            // A non-finite member before a short one: reported first, as on the CPU.
            let mut nan_then_short = plain.clone();
            nan_then_short[1] = &inf;
            nan_then_short[2] = &good[1..];
            for (what, ws, ps) in [
                ("NaN member", &with_nan, &ps),
                ("bad weight", &plain, &bad_weight),
                ("short member", &short, &ps),
                ("inf then short", &nan_then_short, &ps),
                ("weights missing", &plain, &ps[..12].to_vec()),
            ] {
                let eg = g
                    .add_batch(ws, ps, None)
                    .expect_err("GPU refuses the batch");
                let ec = c
                    .add_batch(ws, ps, None)
                    .expect_err("CPU refuses the batch");
                assert_eq!(eg, ec, "{label}: {what}");
            }
            assert_eq!((g.count(), g.total_weight()), (count, total), "{label}");
            assert_eq!(g.finish().unwrap(), before, "{label}: the fold changed");
            // And it still folds.
            g.add(&good, 1.0, None).unwrap();
            c.add(&good, 1.0, None).unwrap();
            let want = c.finish().unwrap();
            assert_ulp(&label, &g.finish().unwrap(), &want, 1e-6 * largest(&want));
        }
    }

    pub fn merge_and_partial_round_trip_between_backends(gpu: &CudaBackend) {
        let mut rng = rng(7);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        let ws: Vec<Vec<f32>> = (0..9)
            .map(|_| vector(&mut rng, shape.len, 0.0, 0.3))
            .collect();
        let ps = weights(&mut rng, 9);
        for rule in [
            Aggregation::Mean,
            Aggregation::NormClipped { max_norm: 2.0 },
        ] {
            let label = rule.label();
            // GPU a: the first 5; CPU b: the other 4; CPU c: the same 5 as a.
            let (mut a, mut b) = pair(gpu, &shape, &reference, rule, 0);
            let mut c = cpu().accumulator(&shape, &reference, rule, 0).unwrap();
            for (w, &p) in ws[..5].iter().zip(&ps) {
                a.add(w, p, None).unwrap();
                c.add(w, p, None).unwrap();
            }
            for (w, &p) in ws[5..].iter().zip(&ps[5..]) {
                b.add(w, p, None).unwrap();
            }
            let from_gpu = partial_sum(a.as_ref());
            let from_cpu = partial_sum(b.as_ref());
            if rule == Aggregation::Mean {
                assert_eq!(from_gpu, partial_sum(c.as_ref()), "{label}: GPU partial");
            }
            // CPU partial into the GPU, GPU partial into the CPU.
            a.merge(&from_cpu).unwrap();
            let mut d = cpu().accumulator(&shape, &reference, rule, 0).unwrap();
            d.merge(&from_gpu).unwrap();
            d.merge(&from_cpu).unwrap();
            c.merge(&from_cpu).unwrap();
            assert_eq!(a.count(), 5, "{label}: merge does not count updates");
            assert_eq!(a.total_weight(), c.total_weight(), "{label}");
            let want = c.finish().unwrap();
            let extra = 1e-6 * largest(&want);
            assert_ulp(
                &format!("{label} merged on GPU"),
                &a.finish().unwrap(),
                &want,
                extra,
            );
            assert_ulp(
                &format!("{label} merged on CPU"),
                &d.finish().unwrap(),
                &want,
                extra,
            );
            // The GPU's partial after a merge is what the CPU gets.
            if rule == Aggregation::Mean {
                assert_eq!(partial_sum(a.as_ref()), partial_sum(c.as_ref()));
            }
            // A partial of another length.
            let other = ParamSum::new(shape.len + 1);
            assert_eq!(a.merge(&other).unwrap_err(), c.merge(&other).unwrap_err());
        }
        // The storing rules have no partial sum.
        for rule in [Aggregation::Median, Aggregation::TrimmedMean { trim: 0.1 }] {
            let (mut g, mut c) = pair(gpu, &shape, &reference, rule, 4);
            let sum = ParamSum::new(shape.len);
            assert_eq!(g.merge(&sum).unwrap_err(), c.merge(&sum).unwrap_err());
            assert_eq!(g.partial().unwrap_err(), c.partial().unwrap_err());
            assert!(matches!(
                g.partial().unwrap_err(),
                BackendError::Unsupported { op: "partial", .. }
            ));
        }
    }

    pub fn robust_rules_match_the_cpu(gpu: &CudaBackend) {
        let mut rng = rng(8);
        let small = FoldShape::of_head(&HeadSpec::linear(16, 4), ScopeSelection::default(), 0.0);
        let tiny = FoldShape::of_head(&HeadSpec::linear(4, 2), ScopeSelection::default(), 0.0);
        // Counts across the kernels' size classes (16, 64, 256, 1024), odd and even.
        let cases: Vec<(FoldShape, usize)> = [1, 2, 3, 7, 8, 16, 17, 63, 64, 65, 256, 301]
            .into_iter()
            .map(|n| (small.clone(), n))
            .chain([(head_shape(), 7), (head_shape(), 8), (tiny, MAX_STORED)])
            .collect();
        for (shape, n) in cases {
            let reference = vector(&mut rng, shape.len, 0.0, 0.1);
            // Values on a grid of 0.01, so ties are common.
            let ws: Vec<Vec<f32>> = (0..n)
                .map(|_| {
                    (0..shape.len)
                        .map(|_| (rng.random_range(-100i32..100) as f32) * 0.01)
                        .collect()
                })
                .collect();
            for rule in [
                Aggregation::Median,
                Aggregation::TrimmedMean { trim: 0.0 },
                Aggregation::TrimmedMean { trim: 0.2 },
                Aggregation::TrimmedMean { trim: 0.45 },
            ] {
                let (mut g, mut c) = pair(gpu, &shape, &reference, rule, n);
                for w in &ws {
                    // Weights are ignored by the robust rules.
                    let p = rng.random_range(0.0..5.0);
                    g.add(w, p, None).unwrap();
                    c.add(w, p, None).unwrap();
                }
                let got = g.finish().unwrap();
                let want = c.finish().unwrap();
                let what = format!("{} of {n} (len {})", rule.label(), shape.len);
                if rule == Aggregation::Median {
                    assert_eq!(got, want, "{what}");
                } else {
                    assert_ulp(&what, &got, &want, 0.0);
                }
                assert_eq!(g.count(), n);
            }
        }
    }

    pub fn capacity_is_enforced(gpu: &CudaBackend) {
        let mut rng = rng(9);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        let ws: Vec<Vec<f32>> = (0..4)
            .map(|_| vector(&mut rng, shape.len, 0.0, 0.3))
            .collect();
        for rule in [Aggregation::Median, Aggregation::TrimmedMean { trim: 0.1 }] {
            let (mut g, mut c) = pair(gpu, &shape, &reference, rule, 2);
            for w in &ws[..2] {
                let m = g.measure(w).unwrap();
                g.add(w, 1.0, Some(&m)).unwrap();
                c.add(w, 1.0, None).unwrap();
            }
            let before = g.finish().unwrap();
            assert_eq!(before, c.finish().unwrap());
            // Full: refused with and without a measurement, and as a batch.
            assert!(matches!(
                g.add(&ws[2], 1.0, None),
                Err(BackendError::Capacity(_))
            ));
            let m = g.measure(&ws[2]).unwrap();
            assert!(matches!(
                g.add(&ws[2], 1.0, Some(&m)),
                Err(BackendError::Capacity(_))
            ));
            assert!(matches!(
                c.add(&ws[2], 1.0, None),
                Err(BackendError::Capacity(_))
            ));
            // A non-finite update is reported as such even when the store is full.
            let mut nan = ws[2].clone();
            nan[0] = f32::NAN;
            assert_eq!(
                g.add(&nan, 1.0, None).unwrap_err(),
                c.add(&nan, 1.0, None).unwrap_err()
            );
            let batch: Vec<&[f32]> = ws[2..].iter().map(Vec::as_slice).collect();
            assert_eq!(
                g.add_batch(&batch, &[1.0, 1.0], None).unwrap_err(),
                c.add_batch(&batch, &[1.0, 1.0], None).unwrap_err()
            );
            assert_eq!(g.count(), 2);
            assert_eq!(g.finish().unwrap(), before, "{}", rule.label());
            // A batch that does not fit is refused whole.
            let mut h = gpu.accumulator(&shape, &reference, rule, 3).unwrap();
            h.add(&ws[0], 1.0, None).unwrap();
            let three: Vec<&[f32]> = ws[1..].iter().map(Vec::as_slice).collect();
            assert!(matches!(
                h.add_batch(&three, &[1.0; 3], None),
                Err(BackendError::Capacity(_))
            ));
            assert_eq!(h.count(), 1);
            // Room for none: created, refuses every add, nothing to finish.
            let (mut g0, mut c0) = pair(gpu, &shape, &reference, rule, 0);
            assert!(matches!(
                g0.add(&ws[0], 1.0, None),
                Err(BackendError::Capacity(_))
            ));
            assert_eq!(g0.finish().unwrap_err(), c0.finish().unwrap_err());
            assert!(c0.add(&ws[0], 1.0, None).is_err());
            // More than the GPU sorts per coordinate.
            assert!(matches!(
                gpu.accumulator(&shape, &reference, rule, MAX_STORED + 1),
                Err(BackendError::Capacity(_))
            ));
        }
        // The mean rules have no bound.
        assert!(
            gpu.accumulator(&shape, &reference, Aggregation::Mean, usize::MAX)
                .is_ok()
        );
        // The shape and rule checks of every backend.
        assert_eq!(
            gpu.accumulator(&shape, &reference[1..], Aggregation::Mean, 0)
                .unwrap_err(),
            cpu()
                .accumulator(&shape, &reference[1..], Aggregation::Mean, 0)
                .unwrap_err()
        );
        let bad_rule = Aggregation::NormClipped { max_norm: -1.0 };
        assert_eq!(
            gpu.accumulator(&shape, &reference, bad_rule, 0)
                .unwrap_err(),
            cpu()
                .accumulator(&shape, &reference, bad_rule, 0)
                .unwrap_err()
        );
    }

    pub fn finish_on_empty_is_refused_as_on_the_cpu(gpu: &CudaBackend) {
        let mut rng = rng(10);
        let shape = head_shape();
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        for rule in [
            Aggregation::Mean,
            Aggregation::NormClipped { max_norm: 1.0 },
            Aggregation::Median,
            Aggregation::TrimmedMean { trim: 0.1 },
        ] {
            let (mut g, mut c) = pair(gpu, &shape, &reference, rule, 4);
            let eg = g.finish().unwrap_err();
            assert_eq!(eg, c.finish().unwrap_err(), "{}", rule.label());
            if !rule.stores_updates() {
                // Only weight 0 folded: still no mean.
                let w = vector(&mut rng, shape.len, 0.0, 0.3);
                g.add(&w, 0.0, None).unwrap();
                c.add(&w, 0.0, None).unwrap();
                assert_eq!(g.finish().unwrap_err(), c.finish().unwrap_err());
                assert!(matches!(
                    g.finish().unwrap_err(),
                    BackendError::Core(wsa::Error::ZeroTotalWeight { .. })
                ));
            }
        }
    }

    pub fn long_vectors_stream_through_the_pinned_buffers(gpu: &CudaBackend) {
        let mut rng = rng(11);
        // More than three staging chunks and not a multiple of one; tensors with gaps.
        let len = 3_500_001;
        let shape = FoldShape {
            len,
            tensors: vec![0..2_000_000, 2_000_100..3_400_000, 3_400_001..3_500_000],
            eps: 1e-8,
        };
        let reference = vector(&mut rng, len, 0.0, 0.05);
        let ws: Vec<Vec<f32>> = (0..3).map(|_| vector(&mut rng, len, 0.01, 0.05)).collect();
        let ps = [1.0, 2.5, 0.5];
        let (mut g, mut c) = pair(gpu, &shape, &reference, Aggregation::Mean, 0);
        for (k, (w, &p)) in ws.iter().zip(&ps).enumerate() {
            let mg = g.measure(w).unwrap();
            let mc = c.measure(w).unwrap();
            assert_measurements_close(&format!("long #{k}"), &mg, &mc);
            if k == 1 {
                g.add(w, p, None).unwrap();
            } else {
                g.add(w, p, Some(&mg)).unwrap();
            }
            c.add(w, p, None).unwrap();
        }
        assert_eq!(partial_sum(g.as_ref()), partial_sum(c.as_ref()));
        assert_ulp("long mean", &g.finish().unwrap(), &c.finish().unwrap(), 0.0);
        // The same vectors as one batch, and a non-finite value in the last chunk.
        let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
        let (mut gb, mut cb) = pair(gpu, &shape, &reference, Aggregation::Mean, 0);
        gb.add_batch(&refs, &ps, None).unwrap();
        cb.add_batch(&refs, &ps, None).unwrap();
        assert_eq!(partial_sum(gb.as_ref()), partial_sum(cb.as_ref()));
        let mut bad = ws[0].clone();
        bad[len - 2] = f32::NAN;
        assert_eq!(gb.measure(&bad).unwrap_err(), cb.measure(&bad).unwrap_err());
        assert_eq!(
            gb.add(&bad, 1.0, None).unwrap_err(),
            cb.add(&bad, 1.0, None).unwrap_err()
        );
        assert_eq!(partial_sum(gb.as_ref()), partial_sum(cb.as_ref()));
    }

    pub fn accumulators_work_from_other_threads(gpu: &CudaBackend) {
        let shape = head_shape();
        std::thread::scope(|s| {
            for seed in 0..3u64 {
                let shape = &shape;
                s.spawn(move || {
                    let mut rng = rng(100 + seed);
                    let reference = vector(&mut rng, shape.len, 0.0, 0.1);
                    let (mut g, mut c) = pair(gpu, shape, &reference, Aggregation::Mean, 0);
                    for _ in 0..10 {
                        let w = vector(&mut rng, shape.len, 0.0, 0.3);
                        let p = rng.random_range(0.5..2.0);
                        let m = g.measure(&w).unwrap();
                        g.add(&w, p, Some(&m)).unwrap();
                        c.add(&w, p, None).unwrap();
                    }
                    assert_eq!(partial_sum(g.as_ref()), partial_sum(c.as_ref()));
                });
            }
        });
        // An accumulator made on one thread and used on another.
        let mut rng = rng(200);
        let reference = vector(&mut rng, shape.len, 0.0, 0.1);
        let (mut g, mut c) = pair(gpu, &shape, &reference, Aggregation::Mean, 0);
        let w = vector(&mut rng, shape.len, 0.0, 0.3);
        std::thread::scope(|s| {
            s.spawn(|| g.add(&w, 1.5, None).unwrap());
        });
        c.add(&w, 1.5, None).unwrap();
        assert_eq!(partial_sum(g.as_ref()), partial_sum(c.as_ref()));
    }

    pub fn resident_bandwidth_is_measured(gpu: &CudaBackend) {
        let figures = gpu
            .resident_fold_bandwidth(1 << 22, 8, 3)
            .expect("resident bandwidth");
        for (what, v) in [
            ("copy", figures.copy_gbps),
            ("fold", figures.fold_gbps),
            ("batch fold", figures.batch_fold_gbps),
        ] {
            assert!(v.is_finite() && v > 0.0, "{what}: {v} GB/s");
        }
        eprintln!("resident bandwidth (4 Mi params, 8 vectors): {figures:?}");
        assert!(gpu.resident_fold_bandwidth(0, 8, 3).is_err());
    }
}
