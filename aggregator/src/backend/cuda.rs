//! The CUDA backend (cargo feature `cuda`): the same [`Backend`] and [`Accumulator`] as the
//! CPU's, with the round's vectors on one GPU.
//!
//! What runs where:
//!
//! - The driver library and NVRTC are loaded at run time (cudarc's dynamic loading), so the
//!   build needs neither; [`probe`] loads the driver library itself first, since cudarc's lazy
//!   loader panics when it is missing. [`CudaBackend::new`] compiles `kernels.cu` with NVRTC
//!   for the device (a cubin, else PTX the driver JITs) with `--fmad=false`, so every product
//!   is rounded before it is added, as on the CPU.
//! - Per accumulator (one per round), on the device: the round's reference vector, the f64
//!   sum of the mean rules or the `capacity × P` f32 matrix of the storing rules (checked
//!   against free device memory up front), staged copies of up to [`MAX_BATCH`] measured
//!   candidates (an `add` or `add_batch` with their measurements folds them without a second
//!   upload; a measure rewrites a folded copy first), and scratch slots for everything else. Everything runs on
//!   the accumulator's own stream, so stream order alone orders its copies and kernels.
//! - A candidate goes up through two pinned host buffers of [`STAGE_CHUNK`] values: while the
//!   DMA engine copies chunk k−1 out of one, the host copies chunk k of the caller's slice
//!   into the other; a buffer is rewritten only after the event recorded behind its last copy
//!   has completed. Kernels queue behind the copies on the same stream; the host goes on to
//!   the next chunk without waiting for them. (The measure kernel runs once, after the last
//!   chunk: at HBM speed it costs about 1% of the PCIe copy, so splitting it per chunk would
//!   not pay for the bookkeeping.)
//! - `measure` is one kernel pass: per tile (a stretch of at most 4096 values inside one scoped
//!   tensor or unscoped gap) the f64 sums Σd, Σd² (d = w − the tensor's first value), Σ(w−r)²
//!   and the count of non-finite values; the host adds the tiles in order (deterministic, no
//!   atomics) and forms the scopes and the distance exactly as the CPU does.
//! - The folds are element-wise f64 kernels with the CPU's operation order, so the mean rules'
//!   sums are the CPU's to the bit; `finish` multiplies by `1/Σp` computed on the host, as
//!   [`ParamSum::finish`]. The robust rules sort each coordinate's stored values on the device
//!   (one thread per coordinate) and take the median or the trimmed mean as
//!   [`super::column_median`] and [`super::column_trimmed_mean`] do.
//!
//! Agreement with the CPU backend (`aggregator/tests/cuda_backend.rs`): the mean and the
//! median to the bit (tested to 1 f32 ulp), the trimmed mean to 1 ulp; scopes and distances to
//! a relative 1e-5 (the CPU sums f32 blocks into f64, the GPU sums in f64); a clipped mean to
//! 1 ulp plus 1e-6 relative, from that difference in the distance.
//!
//! No device error panics: every failing driver call is a [`BackendError::Device`], and the
//! first calls into the CUDA libraries run under `catch_unwind` in case a symbol is missing.

use std::ffi::{CString, c_char};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
    result as cu, sys,
};
use cudarc::nvrtc::{Ptx, result as rtc, sys as rtc_sys};
use wsa::{ParamSum, Scope};

use super::{
    Accumulator, Aggregation, Backend, BackendError, FoldShape, Measurement, check_batch,
    check_len, check_request, check_weight, clip_factor, inverse_total, nothing_to_aggregate,
};

/// The kernels' source, compiled by NVRTC when a backend opens.
const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block (`BLOCK` in `kernels.cu`; the reductions need a power of two).
const BLOCK: u32 = 256;
/// Most blocks of a grid-stride kernel: plenty to fill any current GPU.
const MAX_GRID: usize = 1 << 16;
/// Values per tile of the measure pass: 16 per thread.
const TILE: usize = 16 * BLOCK as usize;
/// Vectors one batched fold adds (`MAX_BATCH` in `kernels.cu`).
pub const MAX_BATCH: usize = 8;
/// Values per pinned staging buffer (4 MiB each, two of them per accumulator): large enough
/// for the PCIe copy to run at full speed, small enough to pipeline a 3.5M-parameter head.
pub const STAGE_CHUNK: usize = 1 << 20;
/// Most updates a storing rule keeps on the device: each coordinate's values are sorted in
/// the thread's local memory, sized at compile time (`robust_1024`).
pub const MAX_STORED: usize = 1024;
/// Staged copies of measured candidates an accumulator keeps, so that `measure` ×k then
/// `add_batch` (or `add`) with those measurements folds without uploading again.
const RING: usize = MAX_BATCH;
/// The robust kernels by the largest count they sort.
const ROBUST_SIZES: [usize; 4] = [16, 64, 256, MAX_STORED];
/// Device memory left free when sizing a storing rule's matrix: a tenth of the device plus
/// this, for the context, the kernels' local memory and other users.
const HEADROOM_BYTES: usize = 256 << 20;

/// Staging tickets, unique in the process so a measurement from one accumulator never names
/// another's staged copy.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// Whether a CUDA driver library and at least one device answer. Never panics: the driver
/// library is looked up before cudarc's loader (which panics without it) is touched, and the
/// first driver calls run under `catch_unwind`.
pub fn probe() -> Result<(), String> {
    // SAFETY: `is_culib_present` only tries `dlopen` on the driver library's usual names and
    // closes what it opened; loading the vendor's driver library (and running its
    // initializers) is exactly what using CUDA requires.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err("no CUDA driver library (libcuda.so) on this host".into());
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("the CUDA driver reports no device".into()),
        Ok(Err(e)) => Err(format!("the CUDA driver did not initialize: {e}")),
        Err(panic) => Err(format!(
            "the CUDA driver library failed to load: {}",
            panic_text(panic.as_ref())
        )),
    }
}

/// The text of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic inside the CUDA libraries (a missing symbol, an assertion) into
/// a device error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(BackendError::Device(format!(
            "{what}: the CUDA library panicked: {}",
            panic_text(panic.as_ref())
        )))
    })
}

/// A driver error as a device error, saying what was being done.
fn dev(what: &'static str) -> impl FnOnce(DriverError) -> BackendError {
    move |e| BackendError::Device(format!("{what}: {e}"))
}

/// A grid-stride launch over `n` values; `None` when there is nothing to do (a grid of zero
/// blocks is an error).
fn grid(n: usize) -> Option<LaunchConfig> {
    (n > 0).then(|| LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).min(MAX_GRID) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The loaded kernels (see `kernels.cu`).
#[derive(Debug)]
struct Kernels {
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

/// The CUDA backend: a context on one device and the compiled kernels. Each accumulator gets
/// its own stream, so rounds on several threads do not serialize on one queue.
#[derive(Debug)]
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    kernels: Arc<Kernels>,
    name: String,
    capability: (i32, i32),
    /// How the kernels were built (`sm_90 cubin`, `compute_90 PTX`, ...), for logs.
    build: String,
}

impl CudaBackend {
    /// Opens device `ordinal`: probes the driver, creates a context, compiles and loads the
    /// kernels. Every failure (no driver, no device, no NVRTC library, a compile or load
    /// error) is a [`BackendError::Device`].
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        probe().map_err(BackendError::Device)?;
        guarded("opening the CUDA device", || Self::open(ordinal))
    }

    fn open(ordinal: usize) -> Result<Self, BackendError> {
        // SAFETY: as in `probe`: `dlopen` of NVRTC's usual names, closed again.
        if !unsafe { rtc_sys::is_culib_present() } {
            return Err(BackendError::Device(
                "the CUDA driver is present but the NVRTC library (libnvrtc.so) was not found; \
                 install the CUDA toolkit's runtime compiler or put its directory on \
                 LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev("creating a CUDA context"))?;
        let name = ctx.name().map_err(dev("reading the device name"))?;
        let capability = ctx
            .compute_capability()
            .map_err(dev("reading the compute capability"))?;
        let (kernels, build) = load_kernels(&ctx, capability)?;
        Ok(Self {
            ctx,
            kernels: Arc::new(kernels),
            name,
            capability,
            build,
        })
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// What the kernels were compiled to (a cubin for the device, or PTX for the driver to
    /// compile), for logs and reports.
    pub fn kernel_build(&self) -> &str {
        &self.build
    }

    /// Device memory that may still be allocated, in bytes: free memory less a tenth of the
    /// device and [`HEADROOM_BYTES`].
    fn allocatable(&self) -> Result<usize, BackendError> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(dev("reading free device memory"))?;
        Ok(free.saturating_sub(total / 10 + HEADROOM_BYTES))
    }

    /// Bandwidths on device-resident data, for the fold benchmark: `vectors` f32 vectors of
    /// `params` values filled on the device, each figure the best of `reps` runs timed with
    /// CUDA events.
    ///
    /// - `copy_gbps`: a device-to-device copy of one vector, counting the bytes read and the
    ///   bytes written (`2·4·params` per copy), as memcpy bandwidths are usually quoted;
    /// - `fold_gbps`: `vectors` single folds (`fold_scaled`) into an f64 sum, in bytes of
    ///   client data folded (`4·params·vectors`), the unit of the host-side fold figures;
    /// - `batch_fold_gbps`: the same folds by the batched kernel ([`MAX_BATCH`] vectors per
    ///   pass over the sum), in the same unit.
    pub fn resident_fold_bandwidth(
        &self,
        params: usize,
        vectors: usize,
        reps: usize,
    ) -> Result<ResidentFigures, BackendError> {
        if params == 0 || vectors == 0 || reps == 0 {
            return Err(wsa::Error::InvalidConfig(format!(
                "resident bandwidth needs params, vectors and reps > 0; got {params}, \
                 {vectors}, {reps}"
            ))
            .into());
        }
        let bytes = vectors
            .checked_add(1)
            .and_then(|v| v.checked_mul(params))
            .and_then(|v| v.checked_mul(4))
            .and_then(|v| v.checked_add(params.checked_mul(8)?));
        match bytes {
            Some(b) if b <= self.allocatable()? => {}
            _ => {
                return Err(BackendError::Capacity(format!(
                    "{vectors} resident vectors of {params} parameters do not fit the device"
                )));
            }
        }
        guarded("measuring resident bandwidth", || {
            self.resident_figures(params, vectors, reps)
        })
    }

    fn resident_figures(
        &self,
        params: usize,
        vectors: usize,
        reps: usize,
    ) -> Result<ResidentFigures, BackendError> {
        let k = &self.kernels;
        let stream = self.ctx.new_stream().map_err(dev("creating a stream"))?;
        let n = params as u64;
        let cfg = grid(params).ok_or_else(|| BackendError::Device("empty vectors".into()))?;
        let mut pool = Vec::with_capacity(vectors);
        for j in 0..vectors {
            let mut v = alloc::<f32>(&stream, params)?;
            let scale = 1.0f32 + j as f32;
            let mut launch = stream.launch_builder(&k.fill_pattern);
            launch.arg(&mut v).arg(&scale).arg(&n);
            // SAFETY: `fill_pattern(float*, float, u64)` with a buffer of `params` floats and
            // n = params.
            unsafe { launch.launch(cfg) }.map_err(dev("filling a vector"))?;
            pool.push(v);
        }
        let mut copy = alloc::<f32>(&stream, params)?;
        let mut sum = alloc::<f64>(&stream, params)?;

        let timed = |run: &mut dyn FnMut() -> Result<(), BackendError>| {
            let mut best = f64::INFINITY;
            // One untimed run first: the first launch of a kernel loads it.
            run()?;
            for _ in 0..reps {
                let start = self
                    .ctx
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(dev("creating an event"))?;
                let end = self
                    .ctx
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(dev("creating an event"))?;
                start.record(&stream).map_err(dev("recording an event"))?;
                run()?;
                end.record(&stream).map_err(dev("recording an event"))?;
                let ms = start
                    .elapsed_ms(&end)
                    .map_err(dev("timing on the device"))?;
                best = best.min(f64::from(ms) / 1e3);
            }
            Ok::<f64, BackendError>(best)
        };

        let copy_s = timed(&mut || {
            stream
                .memcpy_dtod(&pool[0], &mut copy)
                .map_err(dev("copying on the device"))
        })?;
        let fold_s = timed(&mut || {
            for v in &pool {
                let a = 1.0f64;
                let mut launch = stream.launch_builder(&k.fold_scaled);
                launch.arg(&mut sum).arg(v).arg(&a).arg(&n);
                // SAFETY: `fold_scaled(double*, const float*, double, u64)` with buffers of
                // `params` values each.
                unsafe { launch.launch(cfg) }.map_err(dev("folding on the device"))?;
            }
            Ok(())
        })?;
        let batch_s = timed(&mut || {
            for group in pool.chunks(MAX_BATCH) {
                let mut args = BatchArgs {
                    w: [0; MAX_BATCH],
                    p: [0.0; MAX_BATCH],
                    count: group.len() as u32,
                    pad: 0,
                };
                // The guards record the reads when they drop, after the launch.
                let mut guards = Vec::with_capacity(group.len());
                for (j, v) in group.iter().enumerate() {
                    let (ptr, guard) = v.device_ptr(&stream);
                    args.w[j] = ptr;
                    args.p[j] = 1.0;
                    guards.push(guard);
                }
                let mut launch = stream.launch_builder(&k.fold_batch);
                launch.arg(&mut sum).arg(&args).arg(&n);
                // SAFETY: `fold_batch(double*, Batch, u64)`: `args` holds `group.len()`
                // pointers to live buffers of `params` floats on this stream's device.
                unsafe { launch.launch(cfg) }.map_err(dev("folding a batch on the device"))?;
                drop(guards);
            }
            Ok(())
        })?;
        let per_vector = 4.0 * params as f64;
        Ok(ResidentFigures {
            copy_gbps: 2.0 * per_vector / copy_s / 1e9,
            fold_gbps: per_vector * vectors as f64 / fold_s / 1e9,
            batch_fold_gbps: per_vector * vectors as f64 / batch_s / 1e9,
        })
    }
}

/// Device-resident bandwidths, GB/s (10⁹ bytes per second); see
/// [`CudaBackend::resident_fold_bandwidth`] for what each counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResidentFigures {
    /// Device-to-device copy: bytes read plus bytes written per second.
    pub copy_gbps: f64,
    /// Single-vector folds: bytes of client data folded per second.
    pub fold_gbps: f64,
    /// Batched folds: bytes of client data folded per second.
    pub batch_fold_gbps: f64,
}

/// Compiles the kernels for the device and loads them: a cubin for the device's own
/// architecture first (runs on any driver of the toolkit's major version, even an older
/// minor one), else PTX for its virtual architecture, else PTX for NVRTC's default one.
fn load_kernels(
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

/// A device buffer of `len` values (at least one allocated: the driver refuses empty
/// allocations), zeroed.
fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>, BackendError> {
    stream
        .alloc_zeros::<T>(len.max(1))
        .map_err(dev("allocating device memory"))
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn accumulator(
        &self,
        shape: &FoldShape,
        reference: &[f32],
        aggregation: Aggregation,
        capacity: usize,
    ) -> Result<Box<dyn Accumulator>, BackendError> {
        check_request(shape, reference, aggregation)?;
        let stores = aggregation.stores_updates();
        if stores {
            if capacity > MAX_STORED {
                return Err(BackendError::Capacity(format!(
                    "the {} rule keeps at most {MAX_STORED} updates on the GPU, asked for \
                     {capacity}",
                    aggregation.label()
                )));
            }
            // The matrix, the staged copies, a scratch slot and the reference.
            let bytes = capacity
                .checked_add(RING + 2)
                .and_then(|rows| rows.checked_mul(shape.len))
                .and_then(|v| v.checked_mul(4));
            let room = self.allocatable()?;
            if bytes.is_none_or(|b| b > room) {
                return Err(BackendError::Capacity(format!(
                    "{capacity} updates of {} parameters for the {} rule do not fit the \
                     device's free memory ({room} bytes may be allocated)",
                    shape.len,
                    aggregation.label()
                )));
            }
        }
        guarded("starting a CUDA accumulator", || {
            CudaAccumulator::new(self, shape, reference, aggregation, capacity)
                .map(|a| Box::new(a) as Box<dyn Accumulator>)
        })
    }
}

/// Two pinned host buffers a candidate goes up through, chunk by chunk (see the module
/// documentation).
struct Stager {
    bufs: [PinnedHostSlice<f32>; 2],
    /// Recorded on the stream behind the last copy out of the buffer of the same index.
    copied: [CudaEvent; 2],
    chunk: usize,
}

impl Stager {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, BackendError> {
        let chunk = len.clamp(1, STAGE_CHUNK);
        let pinned = || -> Result<PinnedHostSlice<f32>, BackendError> {
            // SAFETY: the memory is uninitialized; it is zeroed through the raw pointer below
            // before any slice of it exists.
            let mut buf = unsafe { ctx.alloc_pinned::<f32>(chunk) }
                .map_err(dev("allocating pinned host memory"))?;
            let ptr = buf
                .as_mut_ptr()
                .map_err(dev("allocating pinned host memory"))?;
            // SAFETY: `ptr` points to `chunk` f32s of host memory this buffer owns, aligned
            // (alloc_pinned asserts it), and nothing else refers to it yet.
            unsafe { std::ptr::write_bytes(ptr, 0, chunk) };
            Ok(buf)
        };
        let event = || ctx.new_event(None).map_err(dev("creating an event"));
        Ok(Self {
            bufs: [pinned()?, pinned()?],
            copied: [event()?, event()?],
            chunk,
        })
    }

    /// Queues the copy of `w` to the device address `dst` (room for `w.len()` f32s) on
    /// `stream`. When it returns, `w` is no longer needed: every chunk has been copied into
    /// a pinned buffer, whose DMA the stream orders before later work.
    fn upload(
        &mut self,
        ctx: &CudaContext,
        stream: &CudaStream,
        w: &[f32],
        dst: sys::CUdeviceptr,
    ) -> Result<(), BackendError> {
        ctx.bind_to_thread().map_err(dev("binding the context"))?;
        for (k, piece) in w.chunks(self.chunk).enumerate() {
            let b = k % 2;
            // The DMA that last read this buffer (chunk k − 2) must be over before the host
            // rewrites it; the copy of chunk k − 1 from the other buffer runs meanwhile.
            self.copied[b]
                .synchronize()
                .map_err(dev("waiting for a host-to-device copy"))?;
            let host = self.bufs[b]
                .as_mut_slice()
                .map_err(dev("reaching pinned host memory"))?;
            let host = &mut host[..piece.len()];
            host.copy_from_slice(piece);
            let offset = (k * self.chunk * std::mem::size_of::<f32>()) as u64;
            // SAFETY: `dst + offset` has room for `piece.len()` f32s (the caller's buffer
            // holds `w.len()`); the source is pinned memory owned by `self`, not rewritten
            // until `copied[b]`, recorded right behind this copy, has completed (above, or in
            // `Drop`), and freed only after that too. The context is bound to this thread.
            unsafe { cu::memcpy_htod_async(dst + offset, host, stream.cu_stream()) }
                .map_err(dev("copying to the device"))?;
            self.copied[b]
                .record(stream)
                .map_err(dev("recording an event"))?;
        }
        Ok(())
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        // The pinned buffers free themselves after this; a copy still reading them must be
        // over first. A failure here has no one to report to; the context keeps the error.
        for event in &self.copied {
            let _ = event.synchronize();
        }
    }
}

/// Sums of one measure pass, tiles added up in order.
struct Sums {
    /// Σd and Σd² per scoped tensor.
    tensors: Vec<(f64, f64)>,
    distance_sq: f64,
    non_finite: bool,
}

/// A device vector of `len` values an accumulator keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    /// A staged copy of a measured candidate (a position of the ring).
    Ring(usize),
    /// A scratch slot: candidates added without a staged copy, and a batch's uploads.
    Slot(usize),
    /// A row of the storing rules' matrix.
    Row(usize),
}

/// `on`'s buffer and the row of it that holds the vector.
fn locate<'a>(
    ring: &'a [CudaSlice<f32>],
    slots: &'a Option<CudaSlice<f32>>,
    matrix: &'a Option<CudaSlice<f32>>,
    on: On,
) -> Result<(&'a CudaSlice<f32>, usize), BackendError> {
    let found = match on {
        On::Ring(i) => ring.get(i).map(|b| (b, 0)),
        On::Slot(r) => slots.as_ref().map(|b| (b, r)),
        On::Row(r) => matrix.as_ref().map(|b| (b, r)),
    };
    found.ok_or_else(|| BackendError::Device(format!("no device buffer for {on:?}")))
}

/// `on`'s vector as a view of `len` values (bounds checked: never a panic).
fn view_of<'a>(
    ring: &'a [CudaSlice<f32>],
    slots: &'a Option<CudaSlice<f32>>,
    matrix: &'a Option<CudaSlice<f32>>,
    on: On,
    len: usize,
) -> Result<CudaView<'a, f32>, BackendError> {
    let (buf, row) = locate(ring, slots, matrix, on)?;
    let len = len.max(1);
    buf.try_slice(row * len..(row + 1) * len)
        .ok_or_else(|| BackendError::Device(format!("{on:?} is outside its device buffer")))
}

/// What a ring position holds: the staged copy of a measured host slice.
#[derive(Debug, Clone, Copy)]
struct Staged {
    /// The ticket its measurement carries.
    ticket: u64,
    /// Address and length of the host slice measured (with the ticket: the same slice).
    address: usize,
    len: usize,
    /// Whether it was folded since (it stays usable; the position is reused first).
    folded: bool,
}

/// One round's fold on the GPU.
struct CudaAccumulator {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Arc<Kernels>,
    shape: FoldShape,
    aggregation: Aggregation,
    capacity: usize,
    reference: CudaSlice<f32>,
    /// Tiles of the measure pass, (start, end, shift index) each.
    tiles: CudaSlice<u64>,
    /// The scoped tensor of each tile, or `None` in a gap.
    tile_tensor: Vec<Option<usize>>,
    /// 4 f64 per tile for each of up to [`MAX_BATCH`] vectors measured before a download.
    partials: CudaSlice<f64>,
    /// Staged copies of the last measured candidates (up to [`RING`], allocated as needed).
    ring: Vec<CudaSlice<f32>>,
    /// Per ring position: what it holds, or `None` (being rewritten, or its measure failed).
    ring_keys: Vec<Option<Staged>>,
    /// Scratch slots, `slot_rows` rows of `len`.
    slots: Option<CudaSlice<f32>>,
    slot_rows: usize,
    stager: Option<Stager>,
    /// The f64 sum of the mean rules.
    sum: Option<CudaSlice<f64>>,
    /// A copy of the sum taken before a batch, to undo it when an update is refused.
    backup: Option<CudaSlice<f64>>,
    /// `capacity × len` stored updates of the storing rules.
    matrix: Option<CudaSlice<f32>>,
    total_weight: f64,
    count: usize,
}

impl fmt::Debug for CudaAccumulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaAccumulator")
            .field("len", &self.shape.len)
            .field("tensors", &self.shape.tensors.len())
            .field("aggregation", &self.aggregation)
            .field("capacity", &self.capacity)
            .field("count", &self.count)
            .field("total_weight", &self.total_weight)
            .field("staged", &self.ring_keys.iter().flatten().count())
            .finish_non_exhaustive()
    }
}

impl CudaAccumulator {
    fn new(
        backend: &CudaBackend,
        shape: &FoldShape,
        reference: &[f32],
        aggregation: Aggregation,
        capacity: usize,
    ) -> Result<Self, BackendError> {
        let ctx = backend.ctx.clone();
        let stream = ctx.new_stream().map_err(dev("creating a stream"))?;
        let len = shape.len;

        let mut tiles = Vec::new();
        let mut tile_tensor = Vec::new();
        let mut push = |start: usize, end: usize, tensor: Option<usize>| {
            let mut at = start;
            while at < end {
                let stop = (at + TILE).min(end);
                // A gap's sums of d are discarded; its shift index is any valid one.
                tiles.extend([at as u64, stop as u64, start as u64]);
                tile_tensor.push(tensor);
                at = stop;
            }
        };
        let mut at = 0;
        for (i, t) in shape.tensors.iter().enumerate() {
            push(at, t.start, None);
            push(t.start, t.end, Some(i));
            at = t.end;
        }
        push(at, len, None);

        let mut reference_dev = alloc::<f32>(&stream, len)?;
        let mut tiles_dev = alloc::<u64>(&stream, tiles.len())?;
        if len > 0 {
            // Pageable copies: the driver has read the host slices when the calls return.
            stream
                .memcpy_htod(reference, &mut reference_dev)
                .map_err(dev("copying the reference"))?;
            stream
                .memcpy_htod(&tiles, &mut tiles_dev)
                .map_err(dev("copying the tiles"))?;
        }
        let stores = aggregation.stores_updates();
        Ok(Self {
            partials: alloc::<f64>(&stream, MAX_BATCH * 4 * tile_tensor.len())?,
            sum: if stores {
                None
            } else {
                Some(alloc::<f64>(&stream, len)?)
            },
            matrix: if stores {
                Some(alloc::<f32>(&stream, capacity * len)?)
            } else {
                None
            },
            ctx,
            k: backend.kernels.clone(),
            shape: shape.clone(),
            aggregation,
            capacity,
            reference: reference_dev,
            tiles: tiles_dev,
            tile_tensor,
            ring: Vec::new(),
            ring_keys: Vec::new(),
            slots: None,
            slot_rows: 0,
            stager: None,
            backup: None,
            total_weight: 0.0,
            count: 0,
            stream,
        })
    }

    fn len(&self) -> usize {
        self.shape.len
    }

    fn no_sum() -> BackendError {
        BackendError::Device("this rule keeps no sum on the device".into())
    }

    fn unsupported(&self, op: &'static str) -> BackendError {
        BackendError::Unsupported {
            op,
            rule: self.aggregation.label(),
        }
    }

    fn full(&self) -> BackendError {
        BackendError::Capacity(format!(
            "the {} rule was given room for {} updates",
            self.aggregation.label(),
            self.capacity
        ))
    }

    /// The ring position the next measure stages into: an empty one, else the oldest copy
    /// already folded (the engine measures and folds one update at a time: one position
    /// serves it), else a new one, else the oldest.
    fn ring_position(&mut self) -> Result<usize, BackendError> {
        if let Some(i) = self.ring_keys.iter().position(Option::is_none) {
            return Ok(i);
        }
        let oldest = |folded_only: bool| {
            self.ring_keys
                .iter()
                .enumerate()
                .filter_map(|(i, k)| k.map(|k| (i, k)))
                .filter(|(_, k)| k.folded || !folded_only)
                .min_by_key(|(_, k)| k.ticket)
                .map(|(i, _)| i)
        };
        if let Some(i) = oldest(true) {
            return Ok(i);
        }
        if self.ring.len() < RING {
            self.ring.push(alloc::<f32>(&self.stream, self.len())?);
            self.ring_keys.push(None);
            return Ok(self.ring.len() - 1);
        }
        Ok(oldest(false).unwrap_or(0))
    }

    /// The ring position holding the staged copy `m` names, if it is of this very slice.
    fn staged(&self, w: &[f32], m: &Measurement) -> Option<usize> {
        if m.staged == 0 {
            return None;
        }
        self.ring_keys.iter().position(|k| {
            k.is_some_and(|k| {
                k.ticket == m.staged && k.address == w.as_ptr() as usize && k.len == w.len()
            })
        })
    }

    /// Makes sure there are `rows` scratch slots.
    fn ensure_slots(&mut self, rows: usize) -> Result<(), BackendError> {
        if self.slot_rows < rows {
            // Free the old slots first (in stream order, after their last use).
            self.slots = None;
            self.slots = Some(alloc::<f32>(&self.stream, rows * self.len())?);
            self.slot_rows = rows;
        }
        Ok(())
    }

    /// Queues the upload of `w` (checked length) to `on`. When it returns, `w` has been read.
    fn upload(&mut self, w: &[f32], on: On) -> Result<(), BackendError> {
        let len = self.len();
        if len == 0 {
            return Ok(());
        }
        if let On::Ring(i) = on {
            // The staged copy changes: no measurement names it any more.
            if let Some(key) = self.ring_keys.get_mut(i) {
                *key = None;
            }
        }
        if self.stager.is_none() {
            self.stager = Some(Stager::new(&self.ctx, len)?);
        }
        let buf = match on {
            On::Ring(i) => self.ring.get_mut(i),
            On::Slot(_) => self.slots.as_mut(),
            On::Row(_) => self.matrix.as_mut(),
        }
        .ok_or_else(|| BackendError::Device(format!("no device buffer for {on:?}")))?;
        let row = match on {
            On::Ring(_) => 0,
            On::Slot(r) | On::Row(r) => r,
        };
        if (row + 1) * len > buf.len() {
            return Err(BackendError::Device(format!(
                "{on:?} is outside its device buffer"
            )));
        }
        let (base, _written) = buf.device_ptr_mut(&self.stream);
        let dst = base + (row * len * std::mem::size_of::<f32>()) as u64;
        let Some(stager) = self.stager.as_mut() else {
            return Err(BackendError::Device("no staging buffers".into()));
        };
        stager.upload(&self.ctx, &self.stream, w, dst)
    }

    /// Queues the measure pass over the vector at `on`, its tile sums going to partials
    /// block `block` (< [`MAX_BATCH`]).
    fn launch_measure(&mut self, on: On, block: usize) -> Result<(), BackendError> {
        let tiles = self.tile_tensor.len();
        if tiles == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let w = view_of(&self.ring, &self.slots, &self.matrix, on, self.shape.len)?;
        let mut out = self
            .partials
            .try_slice_mut(block * 4 * tiles..(block + 1) * 4 * tiles)
            .ok_or_else(|| BackendError::Device(format!("no partials block {block}")))?;
        let mut launch = self.stream.launch_builder(&self.k.measure_tiles);
        launch
            .arg(&w)
            .arg(&self.reference)
            .arg(&self.tiles)
            .arg(&mut out);
        // SAFETY: `measure_tiles(const float*, const float*, const u64*, double*)`, one block
        // of BLOCK threads per tile: every tile's (start, end, shift index) lies inside `len`,
        // the length of `w` and of the reference; `out` has 4 f64 per tile.
        unsafe { launch.launch(cfg) }.map_err(dev("measuring on the device"))?;
        Ok(())
    }

    /// Downloads partials blocks `0..blocks` (waiting for the stream) and adds each block's
    /// tiles up in order.
    fn collect(&self, blocks: usize) -> Result<Vec<Sums>, BackendError> {
        let tiles = self.tile_tensor.len();
        let mut host = vec![0f64; blocks * 4 * tiles];
        if !host.is_empty() {
            let part = self
                .partials
                .try_slice(0..host.len())
                .ok_or_else(|| BackendError::Device(format!("no {blocks} partials blocks")))?;
            self.stream
                .memcpy_dtoh(&part, &mut host)
                .map_err(dev("reading the measurement"))?;
        }
        self.stream
            .synchronize()
            .map_err(dev("waiting for the device"))?;
        let sums_of = |block: &[f64]| {
            let mut sums = Sums {
                tensors: vec![(0.0, 0.0); self.shape.tensors.len()],
                distance_sq: 0.0,
                non_finite: false,
            };
            for (tensor, p) in self.tile_tensor.iter().zip(block.chunks_exact(4)) {
                sums.distance_sq += p[2];
                sums.non_finite |= p[3] != 0.0;
                if let Some(i) = *tensor {
                    sums.tensors[i].0 += p[0];
                    sums.tensors[i].1 += p[1];
                }
            }
            sums
        };
        if tiles == 0 {
            return Ok((0..blocks).map(|_| sums_of(&[])).collect());
        }
        Ok(host.chunks_exact(4 * tiles).map(sums_of).collect())
    }

    /// Measures the vector already at `on` (`w` is its host copy, for the tensors' first
    /// values).
    fn measure_on(&mut self, w: &[f32], on: On) -> Result<Measurement, BackendError> {
        self.launch_measure(on, 0)?;
        let sums = self
            .collect(1)?
            .pop()
            .ok_or_else(|| BackendError::Device("no measurement".into()))?;
        if sums.non_finite {
            return Err(wsa::Error::NonFinite { what: "parameters" }.into());
        }
        let scopes = self
            .shape
            .tensors
            .iter()
            .zip(&sums.tensors)
            .map(|(t, &(s1, s2))| {
                // As the CPU: sums shifted by the tensor's first value.
                let shift = f64::from(w[t.start]);
                let n = t.len() as f64;
                let mean_shift = s1 / n;
                let var = (s2 / n - mean_shift * mean_shift).max(0.0);
                Scope {
                    mean: shift + mean_shift,
                    std: (var + self.shape.eps).sqrt(),
                }
            })
            .collect();
        Ok(Measurement::new(scopes, sums.distance_sq.sqrt()))
    }

    /// Uploads `w` (checked length) to `on` and measures it there.
    fn upload_and_measure(&mut self, w: &[f32], on: On) -> Result<Measurement, BackendError> {
        self.upload(w, on)?;
        self.measure_on(w, on)
    }

    /// Where `w` is on the device for a fold, with its distance: the staged copy `m` names,
    /// else uploaded to scratch slot `slot` (trusting `m`'s checks), else (no measurement)
    /// uploaded to the slot and measured there.
    fn place(
        &mut self,
        w: &[f32],
        m: Option<&Measurement>,
        slot: usize,
    ) -> Result<(On, f64), BackendError> {
        if let Some(m) = m {
            if let Some(i) = self.staged(w, m) {
                return Ok((On::Ring(i), m.distance));
            }
            self.ensure_slots(slot + 1)?;
            self.upload(w, On::Slot(slot))?;
            return Ok((On::Slot(slot), m.distance));
        }
        self.ensure_slots(slot + 1)?;
        let m = self.upload_and_measure(w, On::Slot(slot))?;
        Ok((On::Slot(slot), m.distance))
    }

    /// Marks a staged copy as folded: still there for another fold with its measurement, but
    /// the first to be rewritten by the next measure.
    fn release(&mut self, on: On) {
        if let On::Ring(i) = on
            && let Some(Some(key)) = self.ring_keys.get_mut(i)
        {
            key.folded = true;
        }
    }

    /// Queues `sum += a·(vector at on)` (`+ b·reference` with `pull`).
    fn fold_from(&mut self, on: On, a: f64, pull: Option<f64>) -> Result<(), BackendError> {
        let len = self.len();
        let Some(cfg) = grid(len) else {
            return Ok(());
        };
        let n = len as u64;
        let w = view_of(&self.ring, &self.slots, &self.matrix, on, len)?;
        let sum = self.sum.as_mut().ok_or_else(Self::no_sum)?;
        match pull {
            None => {
                let mut launch = self.stream.launch_builder(&self.k.fold_scaled);
                launch.arg(sum).arg(&w).arg(&a).arg(&n);
                // SAFETY: `fold_scaled(double*, const float*, double, u64)` with two buffers
                // of `len` values.
                unsafe { launch.launch(cfg) }
            }
            Some(b) => {
                let mut launch = self.stream.launch_builder(&self.k.fold_pulled);
                launch
                    .arg(sum)
                    .arg(&w)
                    .arg(&self.reference)
                    .arg(&a)
                    .arg(&b)
                    .arg(&n);
                // SAFETY: `fold_pulled(double*, const float*, const float*, double, double,
                // u64)` with three buffers of `len` values.
                unsafe { launch.launch(cfg) }
            }
        }
        .map_err(dev("folding on the device"))?;
        Ok(())
    }

    /// Folds the checked vector at `on` with weight `p` under a mean rule, as the CPU's
    /// `fold_checked`; `distance` is its distance from the reference (clipping only).
    fn fold_mean_rule(&mut self, on: On, p: f64, distance: f64) -> Result<(), BackendError> {
        match self.aggregation {
            Aggregation::NormClipped { max_norm } => {
                let c = clip_factor(max_norm, distance);
                let pull = (c < 1.0).then_some(p * (1.0 - c));
                self.fold_from(on, p * c, pull)?;
            }
            _ => self.fold_from(on, p, None)?,
        }
        self.release(on);
        self.total_weight += p;
        self.count += 1;
        Ok(())
    }

    /// Queues the copy of ring position `i` into matrix row `row`.
    fn store_staged(&mut self, i: usize, row: usize) -> Result<(), BackendError> {
        let len = self.len();
        if len == 0 {
            return Ok(());
        }
        let src = self
            .ring
            .get(i)
            .and_then(|b| b.try_slice(0..len))
            .ok_or_else(|| BackendError::Device(format!("no staged copy {i}")))?;
        let mut dst = self
            .matrix
            .as_mut()
            .and_then(|m| m.try_slice_mut(row * len..(row + 1) * len))
            .ok_or_else(|| BackendError::Device(format!("no matrix row {row}")))?;
        self.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(dev("copying on the device"))?;
        self.release(On::Ring(i));
        Ok(())
    }

    /// Writes a measured update into matrix row `row` (< capacity): from its staged copy, or
    /// uploaded.
    fn store_measured(
        &mut self,
        w: &[f32],
        m: &Measurement,
        row: usize,
    ) -> Result<(), BackendError> {
        match self.staged(w, m) {
            Some(i) => self.store_staged(i, row),
            None => self.upload(w, On::Row(row)),
        }
    }

    /// A storing rule's add: row `count` is written, and `count` moved past it only when
    /// every check passed.
    fn add_stored(
        &mut self,
        w: &[f32],
        p: f64,
        measured: Option<&Measurement>,
    ) -> Result<(), BackendError> {
        let row = self.count;
        match measured {
            Some(m) => {
                if row >= self.capacity {
                    return Err(self.full());
                }
                self.store_measured(w, m, row)?;
            }
            None => {
                if row >= self.capacity {
                    // The CPU reports a non-finite update before a full store.
                    self.place(w, None, 0)?;
                    return Err(self.full());
                }
                self.upload_and_measure(w, On::Row(row))?;
            }
        }
        self.total_weight += p;
        self.count += 1;
        Ok(())
    }

    /// Copies the sum to the backup (allocated on first use).
    fn back_up_sum(&mut self) -> Result<(), BackendError> {
        if self.backup.is_none() {
            self.backup = Some(alloc::<f64>(&self.stream, self.len())?);
        }
        match (self.sum.as_ref(), self.backup.as_mut()) {
            (Some(sum), Some(backup)) => self
                .stream
                .memcpy_dtod(sum, backup)
                .map_err(dev("backing up the sum")),
            _ => Err(Self::no_sum()),
        }
    }

    /// Puts the backup back into the sum.
    fn restore_sum(&mut self) -> Result<(), BackendError> {
        match (self.sum.as_mut(), self.backup.as_ref()) {
            (Some(sum), Some(backup)) => self
                .stream
                .memcpy_dtod(backup, sum)
                .map_err(dev("restoring the sum")),
            _ => Err(Self::no_sum()),
        }
    }

    /// Fails with `NonFinite` when a vector measured into one of the partials blocks
    /// `measured` is not finite.
    fn check_measured(&self, measured: &[usize]) -> Result<(), BackendError> {
        let Some(&last) = measured.iter().max() else {
            return Ok(());
        };
        let sums = self.collect(last + 1)?;
        if measured.iter().any(|&b| sums[b].non_finite) {
            return Err(wsa::Error::NonFinite { what: "parameters" }.into());
        }
        Ok(())
    }

    /// Queues one batched fold of `group` (≤ [`MAX_BATCH`] vectors and weights).
    fn fold_group(&mut self, group: &[(On, f64)]) -> Result<(), BackendError> {
        let len = self.len();
        let Some(cfg) = grid(len) else {
            return Ok(());
        };
        let n = len as u64;
        let mut args = BatchArgs {
            w: [0; MAX_BATCH],
            p: [0.0; MAX_BATCH],
            count: group.len() as u32,
            pad: 0,
        };
        // The guards record the reads on drop, after the launch is queued.
        let mut guards = Vec::with_capacity(group.len());
        for (j, &(on, p)) in group.iter().enumerate() {
            let view = view_of(&self.ring, &self.slots, &self.matrix, on, len)?;
            let (ptr, guard) = view.view_ptr(&self.stream);
            args.w[j] = ptr;
            args.p[j] = p;
            guards.push(guard);
        }
        let sum = self.sum.as_mut().ok_or_else(Self::no_sum)?;
        let mut launch = self.stream.launch_builder(&self.k.fold_batch);
        launch.arg(sum).arg(&args).arg(&n);
        // SAFETY: `fold_batch(double*, Batch, u64)`: `args` holds `group.len()` ≤ MAX_BATCH
        // pointers to vectors of `len` floats (bounds-checked views) in buffers this
        // accumulator owns, all used on this one stream, which orders the kernel after their
        // uploads and before their next rewrite, and frees them only after it.
        unsafe { launch.launch(cfg) }.map_err(dev("folding a batch on the device"))?;
        drop(guards);
        Ok(())
    }

    /// The plain mean's batch: groups of up to [`MAX_BATCH`] vectors (staged copies, or
    /// uploads to scratch slots measured there when there is no measurement), each group
    /// checked and then folded in one pass over the sum. A refused update undoes the groups
    /// already folded from a backup of the sum.
    fn add_batch_mean(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
    ) -> Result<(), BackendError> {
        let width = ws.len().min(MAX_BATCH);
        // Before any upload: reallocating the slots later would lose a group's uploads.
        self.ensure_slots(width)?;
        if ws.len() > width {
            self.back_up_sum()?;
        }
        let mut folded = false;
        match self.fold_mean_groups(ws, ps, measured, width, &mut folded) {
            Ok(()) => {
                // As the CPU: the batch's weights summed, then added.
                self.total_weight += ps.iter().sum::<f64>();
                self.count += ws.len();
                Ok(())
            }
            Err(e) => {
                if folded {
                    self.restore_sum()?;
                }
                Err(e)
            }
        }
    }

    /// The loop of [`Self::add_batch_mean`]; `folded` tells whether a group reached the sum.
    fn fold_mean_groups(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
        width: usize,
        folded: &mut bool,
    ) -> Result<(), BackendError> {
        let mut group: Vec<(On, f64)> = Vec::with_capacity(width);
        // Partials blocks (= places in the group) of the members measured here.
        let mut checks: Vec<usize> = Vec::with_capacity(width);
        let mut uploads = 0;
        for (k, (w, &p)) in ws.iter().zip(ps).enumerate() {
            if let Err(e) = check_weight(p).and_then(|()| check_len(self.len(), w)) {
                // An earlier member that is not finite is reported first, as the CPU checks
                // in order.
                self.check_measured(&checks)?;
                return Err(e);
            }
            let staged = measured.and_then(|ms| self.staged(w, &ms[k]));
            let on = match staged {
                Some(i) => On::Ring(i),
                None => {
                    let on = On::Slot(uploads);
                    uploads += 1;
                    self.upload(w, on)?;
                    if measured.is_none() {
                        self.launch_measure(on, group.len())?;
                        checks.push(group.len());
                    }
                    on
                }
            };
            group.push((on, p));
            if group.len() == width || k + 1 == ws.len() {
                self.check_measured(&checks)?;
                self.fold_group(&group)?;
                *folded = true;
                for &(on, _) in &group {
                    self.release(on);
                }
                group.clear();
                checks.clear();
                uploads = 0;
            }
        }
        Ok(())
    }

    /// A clipped batch: each update placed (and measured, without a measurement) and folded
    /// in turn, the sum restored from a backup when one is refused.
    fn add_batch_clipped(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
    ) -> Result<(), BackendError> {
        self.back_up_sum()?;
        let (count, total) = (self.count, self.total_weight);
        let mut result = Ok(());
        for (k, (w, &p)) in ws.iter().zip(ps).enumerate() {
            result = check_weight(p)
                .and_then(|()| check_len(self.len(), w))
                .and_then(|()| self.place(w, measured.map(|ms| &ms[k]), 0))
                .and_then(|(on, d)| self.fold_mean_rule(on, p, d));
            if result.is_err() {
                break;
            }
        }
        if result.is_err() {
            self.count = count;
            self.total_weight = total;
            self.restore_sum()?;
        }
        result
    }

    /// A storing rule's batch: every update checked (unmeasured ones uploaded to their row
    /// and measured there), then the capacity, then `count` moved past them all.
    fn add_batch_stored(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
    ) -> Result<(), BackendError> {
        for (k, (w, &p)) in ws.iter().zip(ps).enumerate() {
            check_weight(p)?;
            check_len(self.len(), w)?;
            if measured.is_none() {
                let row = self.count + k;
                if row < self.capacity {
                    self.upload_and_measure(w, On::Row(row))?;
                } else {
                    // Checked all the same: the CPU reports a non-finite update before a
                    // full store.
                    self.place(w, None, 0)?;
                }
            }
        }
        if self.count + ws.len() > self.capacity {
            return Err(BackendError::Capacity(format!(
                "a batch of {} with {} of {} places taken",
                ws.len(),
                self.count,
                self.capacity
            )));
        }
        if let Some(ms) = measured {
            for (k, (w, m)) in ws.iter().zip(ms).enumerate() {
                self.store_measured(w, m, self.count + k)?;
            }
        }
        for &p in ps {
            self.total_weight += p;
        }
        self.count += ws.len();
        Ok(())
    }
}

impl CudaAccumulator {
    fn measure_inner(&mut self, w: &[f32]) -> Result<Measurement, BackendError> {
        check_len(self.len(), w)?;
        let i = self.ring_position()?;
        let mut m = self.upload_and_measure(w, On::Ring(i))?;
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        self.ring_keys[i] = Some(Staged {
            ticket,
            address: w.as_ptr() as usize,
            len: w.len(),
            folded: false,
        });
        m.staged = ticket;
        Ok(m)
    }

    fn add_inner(
        &mut self,
        w: &[f32],
        p: f64,
        measured: Option<&Measurement>,
    ) -> Result<(), BackendError> {
        check_weight(p)?;
        check_len(self.len(), w)?;
        if self.aggregation.stores_updates() {
            return self.add_stored(w, p, measured);
        }
        let (on, distance) = self.place(w, measured, 0)?;
        self.fold_mean_rule(on, p, distance)
    }

    fn add_batch_inner(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
    ) -> Result<(), BackendError> {
        check_batch(ws, ps, measured)?;
        if ws.is_empty() {
            return Ok(());
        }
        match self.aggregation {
            Aggregation::Mean => self.add_batch_mean(ws, ps, measured),
            Aggregation::NormClipped { .. } => self.add_batch_clipped(ws, ps, measured),
            Aggregation::TrimmedMean { .. } | Aggregation::Median => {
                self.add_batch_stored(ws, ps, measured)
            }
        }
    }

    fn merge_inner(&mut self, partial: &ParamSum) -> Result<(), BackendError> {
        if self.aggregation.stores_updates() {
            return Err(self.unsupported("merge"));
        }
        let other = partial.weighted();
        let len = self.len();
        if other.len() != len {
            return Err(wsa::Error::ShapeMismatch {
                what: "partial sum",
                expected: len,
                found: other.len(),
            }
            .into());
        }
        check_weight(partial.total_weight())?;
        if let Some(cfg) = grid(len) {
            // A pageable upload: the driver has read `other` when the call returns.
            let incoming = self
                .stream
                .clone_htod(other)
                .map_err(dev("copying a partial sum"))?;
            let n = len as u64;
            let sum = self.sum.as_mut().ok_or_else(Self::no_sum)?;
            let mut launch = self.stream.launch_builder(&self.k.add_f64);
            launch.arg(sum).arg(&incoming).arg(&n);
            // SAFETY: `add_f64(double*, const double*, u64)` with two buffers of `len`
            // doubles; `incoming` is freed in stream order, after the kernel.
            unsafe { launch.launch(cfg) }.map_err(dev("merging on the device"))?;
        }
        self.total_weight += partial.total_weight();
        Ok(())
    }

    fn partial_inner(&self) -> Result<ParamSum, BackendError> {
        if self.aggregation.stores_updates() {
            return Err(self.unsupported("partial"));
        }
        let len = self.len();
        let mut weighted = vec![0f64; len];
        if len > 0 {
            let sum = self
                .sum
                .as_ref()
                .and_then(|s| s.try_slice(0..len))
                .ok_or_else(Self::no_sum)?;
            self.stream
                .memcpy_dtoh(&sum, &mut weighted)
                .map_err(dev("reading the sum"))?;
            self.stream
                .synchronize()
                .map_err(dev("waiting for the device"))?;
        }
        Ok(ParamSum::from_parts(self.total_weight, weighted)?)
    }

    fn finish_inner(&mut self) -> Result<Vec<f32>, BackendError> {
        let len = self.len();
        let mut out = vec![0f32; len];
        let n = len as u64;
        // The same refusals as the CPU, before any work.
        let inv = match self.aggregation {
            Aggregation::Mean | Aggregation::NormClipped { .. } => {
                Some(inverse_total(self.total_weight)?)
            }
            _ if self.count == 0 => return Err(nothing_to_aggregate()),
            _ => None,
        };
        let Some(cfg) = grid(len) else {
            return Ok(out);
        };
        let mut out_dev = alloc::<f32>(&self.stream, len)?;
        if let Some(inv) = inv {
            let sum = self.sum.as_ref().ok_or_else(Self::no_sum)?;
            let mut launch = self.stream.launch_builder(&self.k.finish_mean);
            launch.arg(&mut out_dev).arg(sum).arg(&inv).arg(&n);
            // SAFETY: `finish_mean(float*, const double*, double, u64)` with two buffers of
            // `len` values.
            unsafe { launch.launch(cfg) }.map_err(dev("finishing on the device"))?;
        } else {
            let count = self.count;
            let kernel = ROBUST_SIZES
                .iter()
                .position(|&size| count <= size)
                .and_then(|i| self.k.robust.get(i))
                .ok_or_else(|| self.full())?;
            let (cut, median) = match self.aggregation {
                Aggregation::TrimmedMean { trim } => {
                    (Aggregation::trimmed_per_end(trim, count) as u32, 0i32)
                }
                _ => (0u32, 1i32),
            };
            let stored = self
                .matrix
                .as_ref()
                .ok_or_else(|| BackendError::Device("no stored updates".into()))?;
            let rows = count as u32;
            let mut launch = self.stream.launch_builder(kernel);
            launch
                .arg(stored)
                .arg(&n)
                .arg(&rows)
                .arg(&cut)
                .arg(&median)
                .arg(&mut out_dev);
            // SAFETY: `robust_N(const float*, u64, unsigned, unsigned, int, float*)`: `stored`
            // holds ≥ count rows of `len` floats, count ≤ N (the kernel's local array) and
            // cut ≤ (count − 1) / 2; `out_dev` has `len` floats.
            unsafe { launch.launch(cfg) }.map_err(dev("finishing on the device"))?;
        }
        let result = out_dev
            .try_slice(0..len)
            .ok_or_else(|| BackendError::Device("no aggregate buffer".into()))?;
        self.stream
            .memcpy_dtoh(&result, &mut out)
            .map_err(dev("reading the aggregate"))?;
        self.stream
            .synchronize()
            .map_err(dev("waiting for the device"))?;
        Ok(out)
    }
}

// Every entry point runs under `guarded`: a panic inside cudarc (an assertion, a symbol the
// driver lacks) becomes a device error instead of unwinding into the engine.
impl Accumulator for CudaAccumulator {
    fn measure(&mut self, w: &[f32]) -> Result<Measurement, BackendError> {
        guarded("measuring on the GPU", || self.measure_inner(w))
    }

    fn add(
        &mut self,
        w: &[f32],
        p: f64,
        measured: Option<&Measurement>,
    ) -> Result<(), BackendError> {
        guarded("folding on the GPU", || self.add_inner(w, p, measured))
    }

    fn add_batch(
        &mut self,
        ws: &[&[f32]],
        ps: &[f64],
        measured: Option<&[Measurement]>,
    ) -> Result<(), BackendError> {
        guarded("folding a batch on the GPU", || {
            self.add_batch_inner(ws, ps, measured)
        })
    }

    fn merge(&mut self, partial: &ParamSum) -> Result<(), BackendError> {
        guarded("merging on the GPU", || self.merge_inner(partial))
    }

    fn partial(&self) -> Result<ParamSum, BackendError> {
        guarded("reading the GPU's sum", || self.partial_inner())
    }

    fn count(&self) -> usize {
        self.count
    }

    fn total_weight(&self) -> f64 {
        self.total_weight
    }

    fn finish(&mut self) -> Result<Vec<f32>, BackendError> {
        guarded("finishing on the GPU", || self.finish_inner())
    }
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

    #[test]
    fn probe_never_panics() {
        // Whatever the host has, an answer and no panic.
        match probe() {
            Ok(()) => eprintln!("a CUDA device answers"),
            Err(reason) => eprintln!("no CUDA: {reason}"),
        }
    }
}
