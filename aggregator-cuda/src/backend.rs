//! The backend: a context on one device and the compiled kernels; it hands out one
//! [`CudaAccumulator`](crate::accumulator::CudaAccumulator) per round.

use std::sync::Arc;

use aggregator_core::backend::contract::check_request;
use aggregator_core::backend::{Accumulator, Backend, BackendError, FoldShape};
use aggregator_core::strategy::{Aggregation, ColumnRule, Plan};
use cudarc::driver::CudaContext;
use cudarc::nvrtc::sys as rtc_sys;

use crate::accumulator::{CudaAccumulator, RING};
use crate::probe::{dev, guarded, probe};
use crate::program::{Kernels, MAX_STORED, load_kernels};

/// Device memory left free when sizing a storing rule's matrix: a tenth of the device plus
/// this, for the context, the kernels' local memory and other users.
const HEADROOM_BYTES: usize = 256 << 20;

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
    pub(crate) fn allocatable(&self) -> Result<usize, BackendError> {
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(dev("reading free device memory"))?;
        Ok(free.saturating_sub(total / 10 + HEADROOM_BYTES))
    }

    /// The context (for accumulators and figures).
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The loaded kernels.
    pub(crate) fn kernels(&self) -> &Arc<Kernels> {
        &self.kernels
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    /// The weighted sums, and the column rules `kernels.cu` has a kernel for.
    fn supports(&self, plan: &Plan) -> bool {
        matches!(
            plan,
            Plan::WeightedSum { .. }
                | Plan::Columns(ColumnRule::Median | ColumnRule::TrimmedMean { .. })
        )
    }

    fn accumulator(
        &self,
        shape: &FoldShape,
        reference: &[f32],
        aggregation: Aggregation,
        capacity: usize,
    ) -> Result<Box<dyn Accumulator>, BackendError> {
        check_request(shape, reference, aggregation)?;
        let plan = aggregation.plan();
        if !self.supports(&plan) {
            return Err(BackendError::Unsupported {
                op: "an accumulator on the GPU",
                rule: aggregation.label(),
            });
        }
        if plan.stores_updates() {
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
