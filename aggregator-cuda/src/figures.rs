//! Figures for the fold benchmark that only a device has: the bandwidth of a device-to-device
//! copy and of the folds on device-resident vectors, timed with CUDA events. The folds run
//! through the same kernel launchers as the accumulator's.

use aggregator_core::backend::BackendError;
use cudarc::driver::sys;

use crate::backend::CudaBackend;
use crate::probe::{dev, guarded};
use crate::program::{MAX_BATCH, alloc};

impl CudaBackend {
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
        let k = self.kernels();
        let ctx = self.context();
        let stream = ctx.new_stream().map_err(dev("creating a stream"))?;
        let mut pool = Vec::with_capacity(vectors);
        for j in 0..vectors {
            let mut v = alloc::<f32>(&stream, params)?;
            k.fill_pattern(&stream, &mut v, 1.0 + j as f32)?;
            pool.push(v);
        }
        let mut copy = alloc::<f32>(&stream, params)?;
        let mut sum = alloc::<f64>(&stream, params)?;

        let timed = |run: &mut dyn FnMut() -> Result<(), BackendError>| {
            let mut best = f64::INFINITY;
            // One untimed run first: the first launch of a kernel loads it.
            run()?;
            for _ in 0..reps {
                let start = ctx
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(dev("creating an event"))?;
                let end = ctx
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
        // The accumulator's own launchers, on device-resident vectors.
        let fold_s = timed(&mut || {
            for v in &pool {
                k.fold_scaled(&stream, &mut sum.as_view_mut(), &v.as_view(), 1.0, params)?;
            }
            Ok(())
        })?;
        let batch_s = timed(&mut || {
            for group in pool.chunks(MAX_BATCH) {
                let members: Vec<_> = group.iter().map(|v| (v.as_view(), 1.0)).collect();
                k.fold_batch(&stream, &mut sum.as_view_mut(), &members, params)?;
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
