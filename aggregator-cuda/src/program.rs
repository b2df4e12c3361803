//! The kernels: `kernels.cu` built by NVRTC for the device at run time, and one typed launcher
//! per kernel. Every launch of the crate goes through these launchers — the accumulator's and
//! the benchmark figures' alike — so each kernel's argument list and its safety argument are
//! written once, next to each other.

use std::ffi::{CString, c_char};
use std::sync::Arc;

use aggregator_core::backend::BackendError;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{Ptx, result as rtc, sys as rtc_sys};

use crate::probe::dev;

/// The kernels' source, compiled by NVRTC when a backend opens.
pub(crate) const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block (`BLOCK` in `kernels.cu`; the reductions need a power of two).
pub(crate) const BLOCK: u32 = 256;
/// Most blocks of a grid-stride kernel: plenty to fill any current GPU.
const MAX_GRID: usize = 1 << 16;
/// Values per tile of the measure pass: 16 per thread.
pub(crate) const TILE: usize = 16 * BLOCK as usize;
/// Vectors one batched fold adds (`MAX_BATCH` in `kernels.cu`).
pub const MAX_BATCH: usize = 8;
/// Values per pinned staging buffer (4 MiB each, two of them per accumulator): large enough
/// for the PCIe copy to run at full speed, small enough to pipeline a 3.5M-parameter head.
pub const STAGE_CHUNK: usize = 1 << 20;
/// Most updates a storing rule keeps on the device: each coordinate's values are sorted in
/// the thread's local memory, sized at compile time (`robust_1024`).
pub const MAX_STORED: usize = 1024;
/// The robust kernels by the largest count they sort.
pub(crate) const ROBUST_SIZES: [usize; 4] = [16, 64, 256, MAX_STORED];

/// A grid-stride launch over `n` values; `None` when there is nothing to do (a grid of zero
/// blocks is an error).
fn grid(n: usize) -> Option<LaunchConfig> {
    (n > 0).then(|| LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).min(MAX_GRID) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Refuses a launch over `n` values when a buffer holds fewer (never a read past its end).
fn ensure_holds(what: &str, len: usize, n: usize) -> Result<(), BackendError> {
    if len >= n {
        Ok(())
    } else {
        Err(BackendError::Device(format!(
            "{what} holds {len} values, the launch covers {n}"
        )))
    }
}

/// A device buffer of `len` values (at least one allocated: the driver refuses empty
/// allocations), zeroed.
pub(crate) fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>, BackendError> {
    stream
        .alloc_zeros::<T>(len.max(1))
        .map_err(dev("allocating device memory"))
}

/// The loaded kernels (see `kernels.cu`).
#[derive(Debug)]
pub(crate) struct Kernels {
    measure_tiles: CudaFunction,
    fold_scaled: CudaFunction,
    fold_pulled: CudaFunction,
    fold_batch: CudaFunction,
    add_f64: CudaFunction,
    finish_mean: CudaFunction,
    fill_pattern: CudaFunction,
    /// `robust_N` for each of [`ROBUST_SIZES`].
    robust: Vec<CudaFunction>,
}

/// The kernel argument of `fold_batch`: the layout of `struct Batch` in `kernels.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct BatchArgs {
    w: [u64; MAX_BATCH],
    p: [f64; MAX_BATCH],
    count: u32,
    pad: u32,
}

// SAFETY: plain old data, `#[repr(C)]` with the field order, types and size (136 bytes, 8
// aligned) of the kernel's `struct Batch { const float* w[8]; double p[8]; unsigned count,
// pad; }` on a 64-bit device; the pointers are device addresses the host never dereferences.
unsafe impl DeviceRepr for BatchArgs {}

impl Kernels {
    /// Queues `measure_tiles`: one block per tile of `tiles` (start, end, shift index each),
    /// writing 4 f64 per tile to `out` (Σd, Σd², Σ(w−r)², non-finite count).
    pub(crate) fn measure_tiles(
        &self,
        stream: &CudaStream,
        w: &CudaView<'_, f32>,
        reference: &CudaSlice<f32>,
        tiles: &CudaSlice<u64>,
        tile_count: usize,
        out: &mut CudaViewMut<'_, f64>,
    ) -> Result<(), BackendError> {
        if tile_count == 0 {
            return Ok(());
        }
        ensure_holds("the tile list", tiles.len(), 3 * tile_count)?;
        ensure_holds("the partials", out.len(), 4 * tile_count)?;
        let cfg = LaunchConfig {
            grid_dim: (tile_count as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&self.measure_tiles);
        launch.arg(w).arg(reference).arg(tiles).arg(out);
        // SAFETY: `measure_tiles(const float*, const float*, const u64*, double*)`, one block
        // of BLOCK threads per tile. The caller's tiles lie inside the length of `w` and of
        // the reference (built from the same shape); `out` has 4 f64 per tile (checked).
        unsafe { launch.launch(cfg) }.map_err(dev("measuring on the device"))?;
        Ok(())
    }

    /// Queues `sum[..n] += a·w[..n]`.
    pub(crate) fn fold_scaled(
        &self,
        stream: &CudaStream,
        sum: &mut CudaViewMut<'_, f64>,
        w: &CudaView<'_, f32>,
        a: f64,
        n: usize,
    ) -> Result<(), BackendError> {
        let Some(cfg) = grid(n) else { return Ok(()) };
        ensure_holds("the sum", sum.len(), n)?;
        ensure_holds("the vector", w.len(), n)?;
        let n = n as u64;
        let mut launch = stream.launch_builder(&self.fold_scaled);
        launch.arg(sum).arg(w).arg(&a).arg(&n);
        // SAFETY: `fold_scaled(double*, const float*, double, u64)` with two buffers of at
        // least n values (checked).
        unsafe { launch.launch(cfg) }.map_err(dev("folding on the device"))?;
        Ok(())
    }

    /// Queues `sum[..n] += a·w[..n] + b·r[..n]` (a clipped step pulled toward the reference).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fold_pulled(
        &self,
        stream: &CudaStream,
        sum: &mut CudaViewMut<'_, f64>,
        w: &CudaView<'_, f32>,
        r: &CudaSlice<f32>,
        a: f64,
        b: f64,
        n: usize,
    ) -> Result<(), BackendError> {
        let Some(cfg) = grid(n) else { return Ok(()) };
        ensure_holds("the sum", sum.len(), n)?;
        ensure_holds("the vector", w.len(), n)?;
        ensure_holds("the reference", r.len(), n)?;
        let n = n as u64;
        let mut launch = stream.launch_builder(&self.fold_pulled);
        launch.arg(sum).arg(w).arg(r).arg(&a).arg(&b).arg(&n);
        // SAFETY: `fold_pulled(double*, const float*, const float*, double, double, u64)`
        // with three buffers of at least n values (checked).
        unsafe { launch.launch(cfg) }.map_err(dev("folding on the device"))?;
        Ok(())
    }

    /// Queues `sum[..n] += Σ_j p_j·w_j[..n]` in one pass for up to [`MAX_BATCH`] members.
    pub(crate) fn fold_batch(
        &self,
        stream: &CudaStream,
        sum: &mut CudaViewMut<'_, f64>,
        members: &[(CudaView<'_, f32>, f64)],
        n: usize,
    ) -> Result<(), BackendError> {
        let Some(cfg) = grid(n) else { return Ok(()) };
        if members.len() > MAX_BATCH {
            return Err(BackendError::Device(format!(
                "a batch of {} vectors, the kernel takes {MAX_BATCH}",
                members.len()
            )));
        }
        ensure_holds("the sum", sum.len(), n)?;
        let mut args = BatchArgs {
            w: [0; MAX_BATCH],
            p: [0.0; MAX_BATCH],
            count: members.len() as u32,
            pad: 0,
        };
        // The guards record the reads on drop, after the launch is queued.
        let mut guards = Vec::with_capacity(members.len());
        for (j, (view, p)) in members.iter().enumerate() {
            ensure_holds("a batch member", view.len(), n)?;
            let (ptr, guard) = view.device_ptr(stream);
            args.w[j] = ptr;
            args.p[j] = *p;
            guards.push(guard);
        }
        let n = n as u64;
        let mut launch = stream.launch_builder(&self.fold_batch);
        launch.arg(sum).arg(&args).arg(&n);
        // SAFETY: `fold_batch(double*, Batch, u64)`: `args` holds `members.len()` ≤ MAX_BATCH
        // pointers to live device vectors of at least n floats (checked), borrowed for the
        // launch and used on this stream, which orders the kernel after their writes and
        // before their next rewrite.
        unsafe { launch.launch(cfg) }.map_err(dev("folding a batch on the device"))?;
        drop(guards);
        Ok(())
    }

    /// Queues `sum[..n] += other[..n]` (f64).
    pub(crate) fn add_f64(
        &self,
        stream: &CudaStream,
        sum: &mut CudaViewMut<'_, f64>,
        other: &CudaSlice<f64>,
        n: usize,
    ) -> Result<(), BackendError> {
        let Some(cfg) = grid(n) else { return Ok(()) };
        ensure_holds("the sum", sum.len(), n)?;
        ensure_holds("the partial sum", other.len(), n)?;
        let n = n as u64;
        let mut launch = stream.launch_builder(&self.add_f64);
        launch.arg(sum).arg(other).arg(&n);
        // SAFETY: `add_f64(double*, const double*, u64)` with two buffers of at least n
        // doubles (checked).
        unsafe { launch.launch(cfg) }.map_err(dev("merging on the device"))?;
        Ok(())
    }

    /// Queues `out[..n] = (float)(sum[..n] · inv)`.
    pub(crate) fn finish_mean(
        &self,
        stream: &CudaStream,
        out: &mut CudaSlice<f32>,
        sum: &CudaSlice<f64>,
        inv: f64,
        n: usize,
    ) -> Result<(), BackendError> {
        let Some(cfg) = grid(n) else { return Ok(()) };
        ensure_holds("the output", out.len(), n)?;
        ensure_holds("the sum", sum.len(), n)?;
        let n = n as u64;
        let mut launch = stream.launch_builder(&self.finish_mean);
        launch.arg(out).arg(sum).arg(&inv).arg(&n);
        // SAFETY: `finish_mean(float*, const double*, double, u64)` with two buffers of at
        // least n values (checked).
        unsafe { launch.launch(cfg) }.map_err(dev("finishing on the device"))?;
        Ok(())
    }

    /// Queues the robust reduction of the first `rows` rows of `stored` (rows of `len`
    /// floats) into `out`: the median when `median`, else the mean without `cut` values at
    /// each end of each column.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn robust(
        &self,
        stream: &CudaStream,
        stored: &CudaSlice<f32>,
        len: usize,
        rows: usize,
        cut: usize,
        median: bool,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        let Some(cfg) = grid(len) else { return Ok(()) };
        let kernel = ROBUST_SIZES
            .iter()
            .position(|&size| rows <= size)
            .and_then(|i| self.robust.get(i))
            .ok_or_else(|| {
                BackendError::Capacity(format!(
                    "{rows} stored updates, the kernels sort at most {MAX_STORED}"
                ))
            })?;
        if rows == 0 || 2 * cut >= rows {
            return Err(BackendError::Device(format!(
                "cannot reduce {rows} values cutting {cut} at each end"
            )));
        }
        ensure_holds("the stored updates", stored.len(), rows.saturating_mul(len))?;
        ensure_holds("the output", out.len(), len)?;
        let (n, rows, cut, median) = (len as u64, rows as u32, cut as u32, i32::from(median));
        let mut launch = stream.launch_builder(kernel);
        launch
            .arg(stored)
            .arg(&n)
            .arg(&rows)
            .arg(&cut)
            .arg(&median)
            .arg(out);
        // SAFETY: `robust_N(const float*, u64, unsigned, unsigned, int, float*)`: `stored`
        // holds ≥ rows rows of `len` floats and `out` `len` floats (checked); rows ≤ N (the
        // kernel's local array, by the choice of kernel) and 2·cut < rows.
        unsafe { launch.launch(cfg) }.map_err(dev("finishing on the device"))?;
        Ok(())
    }

    /// Queues `w[i] = scale · (i mod 1021) / 1021` over all of `w`: benchmark data made on the
    /// device.
    pub(crate) fn fill_pattern(
        &self,
        stream: &CudaStream,
        w: &mut CudaSlice<f32>,
        scale: f32,
    ) -> Result<(), BackendError> {
        let Some(cfg) = grid(w.len()) else {
            return Ok(());
        };
        let n = w.len() as u64;
        let mut launch = stream.launch_builder(&self.fill_pattern);
        launch.arg(w).arg(&scale).arg(&n);
        // SAFETY: `fill_pattern(float*, float, u64)` with n the buffer's own length.
        unsafe { launch.launch(cfg) }.map_err(dev("filling a vector"))?;
        Ok(())
    }
}

/// Compiles the kernels for the device and loads them: a cubin for the device's own
/// architecture first (runs on any driver of the toolkit's major version, even an older
/// minor one), else PTX for its virtual architecture, else PTX for NVRTC's default one.
pub(crate) fn load_kernels(
    ctx: &Arc<CudaContext>,
    (major, minor): (i32, i32),
) -> Result<(Kernels, String), BackendError> {
    let attempts = [
        (Some(format!("sm_{major}{minor}")), true),
        (Some(format!("compute_{major}{minor}")), false),
        (None, false),
    ];
    let mut failures = Vec::new();
    for (arch, cubin) in attempts {
        let label = format!(
            "{} {}",
            arch.as_deref().unwrap_or("default architecture"),
            if cubin { "cubin" } else { "PTX" }
        );
        let loaded = compile(arch.as_deref(), cubin).and_then(|image| {
            let module = ctx
                .load_module(Ptx::from_binary(image))
                .map_err(|e| format!("loading the module: {e}"))?;
            let f = |name: &str| {
                module
                    .load_function(name)
                    .map_err(|e| format!("kernel {name}: {e}"))
            };
            Ok(Kernels {
                measure_tiles: f("measure_tiles")?,
                fold_scaled: f("fold_scaled")?,
                fold_pulled: f("fold_pulled")?,
                fold_batch: f("fold_batch")?,
                add_f64: f("add_f64")?,
                finish_mean: f("finish_mean")?,
                fill_pattern: f("fill_pattern")?,
                robust: ROBUST_SIZES
                    .iter()
                    .map(|n| f(&format!("robust_{n}")))
                    .collect::<Result<_, _>>()?,
            })
        });
        match loaded {
            Ok(kernels) => return Ok((kernels, label)),
            Err(e) => failures.push(format!("{label}: {e}")),
        }
    }
    Err(BackendError::Device(format!(
        "the CUDA kernels did not build: {}",
        failures.join("; ")
    )))
}

/// An NVRTC program, destroyed on drop.
struct Program(rtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create_program` and is destroyed only here. A failure
        // leaks the program, nothing worse.
        let _ = unsafe { rtc::destroy_program(self.0) };
    }
}

/// Compiles `KERNELS` for `arch` (NVRTC's default when `None`) and returns the image
/// `cuModuleLoadData` takes: the cubin, or the PTX text with its terminating NUL.
fn compile(arch: Option<&str>, cubin: bool) -> Result<Vec<u8>, String> {
    let src = CString::new(KERNELS).map_err(|e| format!("kernel source: {e}"))?;
    let name = c"kernels.cu";
    let program = Program(
        rtc::create_program(&src, Some(name)).map_err(|e| format!("nvrtcCreateProgram: {e}"))?,
    );
    let mut options = vec!["--fmad=false".to_string()];
    if let Some(arch) = arch {
        options.push(format!("--gpu-architecture={arch}"));
    }
    // SAFETY: `program.0` is a live program from `create_program`; `src` and `name` outlive
    // it (declared before it, dropped after it).
    if let Err(e) = unsafe { rtc::compile_program(program.0, &options) } {
        // SAFETY: as above; the log is NUL-terminated text of the size NVRTC reported.
        let log = unsafe { rtc::get_program_log(program.0) }
            .map(|chars| c_chars_text(&chars))
            .unwrap_or_default();
        return Err(format!("nvrtcCompileProgram {options:?}: {e}: {log}"));
    }
    if cubin {
        let mut size = 0usize;
        // SAFETY: a compiled program; `size` is a valid out-pointer.
        unsafe { rtc_sys::nvrtcGetCUBINSize(program.0, &mut size) }
            .result()
            .map_err(|e| format!("nvrtcGetCUBINSize: {e}"))?;
        if size == 0 {
            return Err("NVRTC produced no cubin".into());
        }
        let mut image = vec![0u8; size];
        // SAFETY: `image` has the `size` bytes NVRTC asked for.
        unsafe { rtc_sys::nvrtcGetCUBIN(program.0, image.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| format!("nvrtcGetCUBIN: {e}"))?;
        Ok(image)
    } else {
        // SAFETY: a compiled program; `get_ptx` sizes its buffer from nvrtcGetPTXSize, which
        // counts the terminating NUL that cuModuleLoadData needs.
        let ptx = unsafe { rtc::get_ptx(program.0) }.map_err(|e| format!("nvrtcGetPTX: {e}"))?;
        let mut image: Vec<u8> = ptx.iter().map(|&c| c as u8).collect();
        if image.last() != Some(&0) {
            image.push(0);
        }
        Ok(image)
    }
}

/// C chars up to the first NUL, as text.
fn c_chars_text(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile with NVRTC for a cubin and for PTX, where an NVRTC library is
    /// found (no GPU needed: NVRTC is a compiler); elsewhere the test says it skipped.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: as in `CudaBackend::open`: `dlopen` of NVRTC's usual names, closed again.
        if !unsafe { rtc_sys::is_culib_present() } {
            eprintln!("skipped: no NVRTC library (libnvrtc.so) on the loader's path");
            return;
        }
        for (arch, cubin) in [
            (Some("sm_90"), true),
            (Some("compute_90"), false),
            (None, false),
        ] {
            let image = compile(arch, cubin).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
            if cubin {
                // An ELF image.
                assert_eq!(&image[..4], b"\x7fELF", "{arch:?}");
            } else {
                let text = String::from_utf8_lossy(&image);
                assert_eq!(image.last(), Some(&0), "PTX ends with its NUL");
                for kernel in ["measure_tiles", "fold_batch", "robust_1024"] {
                    assert!(text.contains(&format!(".entry {kernel}(")), "{kernel}");
                }
                // --fmad=false: no fused multiply-add anywhere.
                assert!(
                    !text.contains("fma."),
                    "{arch:?}: fused multiply-add in the PTX"
                );
            }
        }
    }

    #[test]
    fn batch_arguments_have_the_kernels_layout() {
        // `struct Batch` in kernels.cu: 8 pointers, 8 doubles, 2 unsigned ints.
        assert_eq!(std::mem::size_of::<BatchArgs>(), 8 * 8 + 8 * 8 + 4 + 4);
        assert_eq!(std::mem::align_of::<BatchArgs>(), 8);
        assert!(KERNELS.contains(&format!("#define MAX_BATCH {MAX_BATCH}\n")));
        assert!(KERNELS.contains(&format!("#define BLOCK {BLOCK}\n")));
        for size in ROBUST_SIZES {
            assert!(
                KERNELS.contains(&format!("ROBUST({size})")),
                "robust_{size}"
            );
        }
    }
}
