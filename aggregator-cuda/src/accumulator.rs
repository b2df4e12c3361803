//! One round's fold on the GPU: the device buffers of an accumulator (reference, tiles,
//! partials, staged copies, scratch slots, the sum or the stored matrix) and the folds over
//! them, all on the accumulator's own stream.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aggregator_core::backend::contract::{
    batch_full, check_batch, check_len, check_weight, full, inverse_total, nothing_to_aggregate,
    unsupported,
};
use aggregator_core::backend::{Accumulator, BackendError, FoldShape, Measurement};
use aggregator_core::strategy::{Aggregation, ColumnRule, Plan};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, DevicePtrMut};
use wsa::{ParamSum, Scope};

use crate::backend::CudaBackend;
use crate::probe::{dev, guarded};
use crate::program::{Kernels, MAX_BATCH, TILE, alloc};
use crate::stager::Stager;

/// Staged copies of measured candidates an accumulator keeps, so that `measure` ×k then
/// `add_batch` (or `add`) with those measurements folds without uploading again.
pub(crate) const RING: usize = MAX_BATCH;

/// Staging tickets, unique in the process so a measurement from one accumulator never names
/// another's staged copy.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

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
pub(crate) struct CudaAccumulator {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Arc<Kernels>,
    shape: FoldShape,
    aggregation: Aggregation,
    plan: Plan,
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
    pub(crate) fn new(
        backend: &CudaBackend,
        shape: &FoldShape,
        reference: &[f32],
        aggregation: Aggregation,
        capacity: usize,
    ) -> Result<Self, BackendError> {
        let ctx = backend.context().clone();
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
        let plan = aggregation.plan();
        let stores = plan.stores_updates();
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
            k: backend.kernels().clone(),
            shape: shape.clone(),
            aggregation,
            plan,
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

    fn full(&self) -> BackendError {
        full(self.aggregation, self.capacity)
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
        let ticket = m.staged();
        if ticket == 0 {
            return None;
        }
        self.ring_keys.iter().position(|k| {
            k.is_some_and(|k| {
                k.ticket == ticket && k.address == w.as_ptr() as usize && k.len == w.len()
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
        let w = view_of(&self.ring, &self.slots, &self.matrix, on, self.shape.len)?;
        let mut out = self
            .partials
            .try_slice_mut(block * 4 * tiles..(block + 1) * 4 * tiles)
            .ok_or_else(|| BackendError::Device(format!("no partials block {block}")))?;
        // Every tile's (start, end, shift index) lies inside the shape's length, the length
        // of `w` and of the reference.
        self.k.measure_tiles(
            &self.stream,
            &w,
            &self.reference,
            &self.tiles,
            tiles,
            &mut out,
        )
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
        let w = view_of(&self.ring, &self.slots, &self.matrix, on, len)?;
        let mut sum = self.sum.as_mut().ok_or_else(Self::no_sum)?.as_view_mut();
        match pull {
            None => self.k.fold_scaled(&self.stream, &mut sum, &w, a, len),
            Some(b) => self
                .k
                .fold_pulled(&self.stream, &mut sum, &w, &self.reference, a, b, len),
        }
    }

    /// Folds the checked vector at `on` with weight `p` under a weighted-sum plan, as the
    /// CPU's `fold_checked`; `distance` is its distance from the reference (clipping only).
    fn fold_mean_rule(&mut self, on: On, p: f64, distance: f64) -> Result<(), BackendError> {
        let c = self.plan.step_scale(distance);
        let pull = (c < 1.0).then_some(p * (1.0 - c));
        self.fold_from(on, p * c, pull)?;
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
        // Views of buffers this accumulator owns, all used on its one stream, which orders
        // the kernel after their uploads and before their next rewrite.
        let members = group
            .iter()
            .map(|&(on, p)| Ok((view_of(&self.ring, &self.slots, &self.matrix, on, len)?, p)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        let mut sum = self.sum.as_mut().ok_or_else(Self::no_sum)?.as_view_mut();
        self.k.fold_batch(&self.stream, &mut sum, &members, len)
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
            return Err(batch_full(ws.len(), self.count, self.capacity));
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
        let m = self.upload_and_measure(w, On::Ring(i))?;
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        self.ring_keys[i] = Some(Staged {
            ticket,
            address: w.as_ptr() as usize,
            len: w.len(),
            folded: false,
        });
        Ok(m.staged_as(ticket))
    }

    fn add_inner(
        &mut self,
        w: &[f32],
        p: f64,
        measured: Option<&Measurement>,
    ) -> Result<(), BackendError> {
        check_weight(p)?;
        check_len(self.len(), w)?;
        if self.plan.stores_updates() {
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
        match self.plan {
            Plan::WeightedSum { max_step: None } => self.add_batch_mean(ws, ps, measured),
            Plan::WeightedSum { max_step: Some(_) } => self.add_batch_clipped(ws, ps, measured),
            Plan::Columns(_) => self.add_batch_stored(ws, ps, measured),
        }
    }

    fn merge_inner(&mut self, partial: &ParamSum) -> Result<(), BackendError> {
        if self.plan.stores_updates() {
            return Err(unsupported("merge", self.aggregation));
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
        if len > 0 {
            // A pageable upload: the driver has read `other` when the call returns;
            // `incoming` is freed in stream order, after the kernel.
            let incoming = self
                .stream
                .clone_htod(other)
                .map_err(dev("copying a partial sum"))?;
            let mut sum = self.sum.as_mut().ok_or_else(Self::no_sum)?.as_view_mut();
            self.k.add_f64(&self.stream, &mut sum, &incoming, len)?;
        }
        self.total_weight += partial.total_weight();
        Ok(())
    }

    fn partial_inner(&self) -> Result<ParamSum, BackendError> {
        if self.plan.stores_updates() {
            return Err(unsupported("partial", self.aggregation));
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
        // The same refusals as the CPU, before any work.
        let inv = match self.plan {
            Plan::WeightedSum { .. } => Some(inverse_total(self.total_weight)?),
            Plan::Columns(_) if self.count == 0 => return Err(nothing_to_aggregate()),
            Plan::Columns(_) => None,
        };
        if len == 0 {
            return Ok(out);
        }
        let mut out_dev = alloc::<f32>(&self.stream, len)?;
        match (inv, self.plan) {
            (Some(inv), _) => {
                let sum = self.sum.as_ref().ok_or_else(Self::no_sum)?;
                self.k
                    .finish_mean(&self.stream, &mut out_dev, sum, inv, len)?;
            }
            (None, Plan::Columns(rule)) => {
                let count = self.count;
                let (cut, median) = match rule {
                    ColumnRule::Median => (0, true),
                    ColumnRule::TrimmedMean { trim } => {
                        (Aggregation::trimmed_per_end(trim, count), false)
                    }
                    // `supports` lets no other rule reach an accumulator.
                    _ => return Err(unsupported("finish", self.aggregation)),
                };
                let stored = self
                    .matrix
                    .as_ref()
                    .ok_or_else(|| BackendError::Device("no stored updates".into()))?;
                self.k
                    .robust(&self.stream, stored, len, count, cut, median, &mut out_dev)?;
            }
            (None, Plan::WeightedSum { .. }) => return Err(Self::no_sum()),
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
