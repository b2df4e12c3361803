//! What a round's tasks carry of the global head, and the head each client starts from.
//!
//! In f32 every client gets the global head itself. A lossy downlink (f16, int8) cannot carry
//! it exactly, so the aggregator keeps two things apart:
//!
//! - **The global head stays exact.** It is what the fold moves and what the next round
//!   starts from; quantization never enters it.
//! - **Each client's start is what it decodes.** A round has one or more *starts*: the global
//!   head quantized (the *keyframe*, for a client that holds nothing the aggregator knows), and,
//!   for each head a client reports holding from an earlier lossy task, that head plus the
//!   quantized change from it to the global head (`EncodedParams::add_to`, the same rule the
//!   client follows, so both hold the same bits, named by `protocol::head_digest`). The
//!   change is small next to the head, so its rounding is too.
//!
//! An update is measured against its client's start and moved onto the global head
//! ([`RoundDownlink::rebase`]: `global + (update − start)`) before any check or fold, so the
//! fold sees the step the client took, applied to the exact head.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use protocol::{EncodedParams, Encoding, EncodingError, HeadRef, RowLayout, head_digest};

/// Most heads kept for deltas, and most bytes they may take.
const MAX_HELD_HEADS: usize = 128;
const MAX_HELD_HEAD_BYTES: usize = 256 << 20;

/// Heads that recent lossy tasks gave clients, by digest: what a delta may start from. Oldest
/// out first; a client whose head has gone gets a keyframe.
#[derive(Debug, Default)]
pub(super) struct HeldHeads {
    heads: HashMap<[u8; 32], Arc<Vec<f32>>>,
    order: VecDeque<[u8; 32]>,
}

impl HeldHeads {
    fn get(&self, digest: &[u8; 32]) -> Option<&Arc<Vec<f32>>> {
        self.heads.get(digest)
    }

    fn insert(&mut self, digest: [u8; 32], head: Arc<Vec<f32>>) {
        let cap = (MAX_HELD_HEAD_BYTES / (head.len() * 4).max(1)).clamp(2, MAX_HELD_HEADS);
        if self.heads.insert(digest, head).is_none() {
            self.order.push_back(digest);
        }
        while self.order.len() > cap {
            if let Some(old) = self.order.pop_front() {
                self.heads.remove(&old);
            }
        }
    }
}

/// A head a round's tasks give: what they carry and what the client decodes from it.
#[derive(Debug)]
pub(super) struct Start {
    /// The head the client held, for a delta; `None` for the keyframe.
    pub base: Option<HeadRef>,
    /// What the task carries: the head, or the change from `base`.
    pub global: EncodedParams,
    /// What the client decodes; `None` when it is the global head itself (f32).
    head: Option<Arc<Vec<f32>>>,
    digest: [u8; 32],
}

/// The starts of one round.
#[derive(Debug)]
pub(super) struct RoundDownlink {
    round: u64,
    encoding: Encoding,
    deltas: bool,
    starts: Vec<Start>,
}

/// The keyframe's index in [`RoundDownlink::starts`].
pub(super) const KEYFRAME: usize = 0;

impl RoundDownlink {
    /// Round `round`'s downlink of `global` in `encoding`; with `deltas`, clients that hold a
    /// head in `held` get the change from it.
    pub(super) fn open(
        round: u64,
        global: &[f32],
        layout: &RowLayout,
        encoding: Encoding,
        deltas: bool,
        held: &mut HeldHeads,
    ) -> Result<Self, EncodingError> {
        let encoded = EncodedParams::encode(global, layout, encoding)?;
        let keyframe = if encoding == Encoding::F32 {
            Start {
                base: None,
                global: encoded,
                head: None,
                digest: [0; 32],
            }
        } else {
            let head = Arc::new(encoded.decode(layout)?);
            let digest = head_digest(&head);
            if deltas {
                held.insert(digest, Arc::clone(&head));
            }
            Start {
                base: None,
                global: encoded,
                head: Some(head),
                digest,
            }
        };
        Ok(Self {
            round,
            encoding,
            deltas: deltas && encoding != Encoding::F32,
            starts: vec![keyframe],
        })
    }

    /// The round whose starts these are.
    pub(super) fn round(&self) -> u64 {
        self.round
    }

    pub(super) fn start(&self, index: usize) -> &Start {
        &self.starts[index]
    }

    /// The head a client holds once it decodes start `index`'s task, for a delta from it;
    /// `None` without deltas, and for the global head itself (f32).
    pub(super) fn given(&self, index: usize) -> Option<HeadRef> {
        let start = &self.starts[index];
        start
            .head
            .as_ref()
            .filter(|_| self.deltas)
            .map(|_| HeadRef {
                round: self.round,
                digest: start.digest,
            })
    }

    /// The start for a client that reports holding `reported`, sent its first task of the
    /// round: a delta from that head if the aggregator still has it, else the keyframe.
    pub(super) fn start_for(
        &mut self,
        reported: Option<HeadRef>,
        global: &[f32],
        layout: &RowLayout,
        held: &mut HeldHeads,
    ) -> usize {
        let Some(reported) = reported.filter(|_| self.deltas) else {
            return KEYFRAME;
        };
        // Already holds one of this round's starts (from a failed attempt, or before a
        // reconnect): it keeps it.
        if let Some(i) = self
            .starts
            .iter()
            .position(|s| s.head.is_some() && s.digest == reported.digest)
        {
            return i;
        }
        if let Some(i) = self
            .starts
            .iter()
            .position(|s| s.base.is_some_and(|b| b.digest == reported.digest))
        {
            return i;
        }
        let Some(base) = held.get(&reported.digest).map(Arc::clone) else {
            return KEYFRAME;
        };
        match self.delta_start(reported, &base, global, layout) {
            Ok((start, head)) => {
                held.insert(start.digest, head);
                self.starts.push(start);
                self.starts.len() - 1
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a delta; the client gets the keyframe");
                KEYFRAME
            }
        }
    }

    /// The start for a client sent `current` earlier this round that reconnects reporting
    /// `reported`: the same task while the client can still decode it (it holds that task's
    /// base, or already its head), else the keyframe. Never a new delta: a client that
    /// reconnects reporting one head after another would make the aggregator build and keep
    /// a start for each.
    pub(super) fn start_on_return(&self, current: usize, reported: Option<HeadRef>) -> usize {
        let start = &self.starts[current];
        let decodable = match start.base {
            None => true,
            Some(base) => {
                reported.is_some_and(|r| r.digest == base.digest || r.digest == start.digest)
            }
        };
        if decodable { current } else { KEYFRAME }
    }

    fn delta_start(
        &self,
        base_ref: HeadRef,
        base: &[f32],
        global: &[f32],
        layout: &RowLayout,
    ) -> Result<(Start, Arc<Vec<f32>>), EncodingError> {
        let change: Vec<f32> = global.iter().zip(base).map(|(&g, &b)| g - b).collect();
        let encoded = EncodedParams::encode(&change, layout, self.encoding)?;
        let head = Arc::new(encoded.add_to(base, layout)?);
        let start = Start {
            base: Some(base_ref),
            digest: head_digest(&head),
            global: encoded,
            head: Some(Arc::clone(&head)),
        };
        Ok((start, head))
    }

    /// Moves `update`, trained from start `index`, onto `global`: `global + (update − start)`.
    /// Nothing to do for the global head itself.
    pub(super) fn rebase(&self, index: usize, global: &[f32], update: &mut [f32]) {
        if let Some(start) = &self.starts[index].head {
            for ((u, &g), &s) in update.iter_mut().zip(global).zip(start.iter()) {
                *u = g + (*u - s);
            }
        }
    }
}
