//! The update digest: sha256 over a canonical byte sequence of the update's fields; and the
//! digest that names a head.

use sha2::{Digest, Sha256};

use crate::message::Update;

const DOMAIN: &[u8] = b"wsa-fl update v3\0";
const HEAD_DOMAIN: &[u8] = b"wsa-fl head v1\0";

/// sha256 of a head's values, bit for bit: the name a client and the aggregator give the head
/// a task left the client with ([`crate::HeadRef`]).
pub fn head_digest(values: &[f32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HEAD_DOMAIN);
    h.update((values.len() as u64).to_le_bytes());
    for v in values {
        h.update(v.to_le_bytes());
    }
    h.finalize().into()
}

impl Update {
    /// sha256 of everything but the digest itself. Run, round and client are inside, so an
    /// update cannot be replayed under another round or client without the check failing.
    pub fn compute_digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(self.run_id.to_le_bytes());
        h.update(self.round.to_le_bytes());
        h.update((self.client_id.len() as u64).to_le_bytes());
        h.update(self.client_id.as_bytes());
        h.update(self.n_samples.to_le_bytes());
        h.update([self.params.encoding as u8]);
        h.update(self.params.count.to_le_bytes());
        h.update((self.params.data.len() as u64).to_le_bytes());
        h.update(&self.params.data);
        h.update((self.params.scales.len() as u64).to_le_bytes());
        for s in &self.params.scales {
            h.update(s.to_le_bytes());
        }
        h.update((self.scopes.len() as u64).to_le_bytes());
        for s in &self.scopes {
            h.update(s.mean.to_le_bytes());
            h.update(s.std.to_le_bytes());
        }
        let m = &self.metrics;
        for v in [m.loss, m.accuracy, m.kl] {
            h.update(v.to_le_bytes());
        }
        h.update(m.steps.to_le_bytes());
        h.update(m.train_ms.to_le_bytes());
        match &m.held_out {
            None => h.update([0]),
            Some(e) => {
                h.update([1]);
                h.update(e.samples.to_le_bytes());
                h.update(e.loss.to_le_bytes());
                h.update(e.accuracy.to_le_bytes());
            }
        }
        h.finalize().into()
    }

    /// Sets the digest from the current fields.
    pub fn seal(mut self) -> Self {
        self.digest = self.compute_digest();
        self
    }

    /// Whether the digest matches the fields.
    pub fn digest_ok(&self) -> bool {
        self.digest == self.compute_digest()
    }
}
