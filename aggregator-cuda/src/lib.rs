//! The CUDA backend: the same [`Backend`](aggregator_core::backend::Backend) and
//! [`Accumulator`](aggregator_core::backend::Accumulator) as the CPU's, with the round's
//! vectors on one GPU. A crate of its own (as tract keeps its GPU backend), so only builds that
//! ask for it (the `aggregator` crate's feature `cuda`) compile cudarc.
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
//!   [`aggregator_core::strategy::column_median`] and
//!   [`aggregator_core::strategy::column_trimmed_mean`] do.
//!
//! Agreement with the CPU backend (`aggregator/tests/cuda_backend.rs`): the mean and the
//! median to the bit (tested to 1 f32 ulp), the trimmed mean to 1 ulp; scopes and distances to
//! a relative 1e-5 (the CPU sums f32 blocks into f64, the GPU sums in f64); a clipped mean to
//! 1 ulp plus 1e-6 relative, from that difference in the distance.
//!
//! No device error panics: every failing driver call is a [`BackendError::Device`], and the
//! first calls into the CUDA libraries run under `catch_unwind` in case a symbol is missing.

//!
//! The modules: [`probe`] (is there a driver and a device; every CUDA call guarded against
//! panics), `program` (the NVRTC build of `kernels.cu` and one typed launcher per kernel),
//! `stager` (the pinned upload path), `backend` ([`CudaBackend`]), `accumulator` (one round's
//! buffers and folds) and [`figures`] (device-resident bandwidths for the fold benchmark,
//! through the same launchers).
#![warn(missing_docs, unreachable_pub)]

mod accumulator;
mod backend;
pub mod figures;
pub mod probe;
mod program;
mod stager;

pub use backend::CudaBackend;
pub use figures::ResidentFigures;
pub use probe::probe;
pub use program::{MAX_BATCH, MAX_STORED, STAGE_CHUNK};
