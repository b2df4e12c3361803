//! Whether CUDA is there, asked without the risk of a panic: cudarc's lazy loader panics when
//! the driver library is missing, so the library is looked up first and every first call
//! runs under `catch_unwind`.

use std::panic::{AssertUnwindSafe, catch_unwind};

use aggregator_core::backend::BackendError;
use cudarc::driver::{CudaContext, DriverError, sys};

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
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, BackendError>,
) -> Result<T, BackendError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(BackendError::Device(format!(
            "{what}: the CUDA library panicked: {}",
            panic_text(panic.as_ref())
        )))
    })
}

/// A driver error as a device error, saying what was being done.
pub(crate) fn dev(what: &'static str) -> impl FnOnce(DriverError) -> BackendError {
    move |e| BackendError::Device(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        // Whatever the host has, an answer and no panic.
        match probe() {
            Ok(()) => eprintln!("a CUDA device answers"),
            Err(reason) => eprintln!("no CUDA: {reason}"),
        }
    }
}
