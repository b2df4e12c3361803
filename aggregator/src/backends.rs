//! Which compute backend folds a run's updates, chosen at start-up: the CPU, or CUDA when this
//! build has it (feature `cuda`) and a GPU answers.

use std::str::FromStr;
use std::sync::Arc;

use aggregator_core::backend::{Backend, BackendError, CpuBackend};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Which backend `--backend` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// CUDA when the build has it and a driver and a device answer; else the CPU.
    #[default]
    Auto,
    /// The CPU, always.
    Cpu,
    /// CUDA or an error.
    Cuda,
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            _ => Err(format!("unknown backend {text:?}: auto, cpu or cuda")),
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// Opens the backend `choice` names. `Auto` never fails: without CUDA (not built in, no
/// driver library, no device, or a failing one) it logs why and returns the CPU backend.
/// The CUDA probe loads the driver library itself before any CUDA call, since cudarc's lazy
/// loader panics when the library is missing.
pub fn open_backend(choice: BackendChoice) -> Result<Arc<dyn Backend>, BackendError> {
    match choice {
        BackendChoice::Cpu => Ok(Arc::new(CpuBackend::default())),
        BackendChoice::Cuda => open_cuda(),
        BackendChoice::Auto => match open_cuda() {
            Ok(b) => {
                info!(backend = b.name(), "compute backend");
                Ok(b)
            }
            Err(e) => {
                let cpu = CpuBackend::default();
                warn!(reason = %e, threads = cpu.threads(), "no CUDA backend; folding on the CPU");
                Ok(Arc::new(cpu))
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(aggregator_cuda::CudaBackend::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::Device(
        "this build has no CUDA backend (cargo feature `cuda`)".into(),
    ))
}
