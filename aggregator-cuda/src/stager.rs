//! The pinned upload path: a candidate goes to the device through two pinned host buffers,
//! chunk by chunk, the host filling one while the DMA engine copies out of the other.

use std::sync::Arc;

use aggregator_core::backend::BackendError;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice, result as cu, sys};

use crate::probe::dev;
use crate::program::STAGE_CHUNK;

/// Two pinned host buffers a candidate goes up through, chunk by chunk (see the module
/// documentation).
pub(crate) struct Stager {
    bufs: [PinnedHostSlice<f32>; 2],
    /// Recorded on the stream behind the last copy out of the buffer of the same index.
    copied: [CudaEvent; 2],
    chunk: usize,
}

impl Stager {
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, BackendError> {
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
    pub(crate) fn upload(
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
