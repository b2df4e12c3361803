//! A client's side of one round.

use std::collections::{BTreeMap, BTreeSet};

use protocol::{
    RevealedShare, SealedShares, SecAggAdvertise, SecAggInbox, SecAggMasked, SecAggPeer,
    SecAggReveal, SecAggRoster, SecAggSetup, SecAggShares, SecAggUnmask,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroizing;

use crate::crypto::{self, Purpose, Secret};
use crate::error::SecAggError;
use crate::graph::{Graph, RoundParams};

/// Where a client's round is: each step may be taken once, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Advertised,
    Shared,
    Masked,
    Revealed,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Advertised => "waiting for the roster",
            Stage::Shared => "waiting for the inbox",
            Stage::Masked => "waiting for the unmask request",
            Stage::Revealed => "done",
        }
    }
}

/// The shares a neighbour dealt to this client: (self-mask share, masking-key share).
type HeldShares = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

/// One client's state for one round: its secrets, its neighbours' keys and the shares it
/// holds for them.
pub struct ClientRound {
    params: RoundParams,
    me: u32,
    neighbours: Vec<u32>,
    encryption: Secret,
    masking: Secret,
    self_mask: Secret,
    peers: BTreeMap<u32, SecAggPeer>,
    held: BTreeMap<u32, HeldShares>,
    stage: Stage,
}

impl std::fmt::Debug for ClientRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRound")
            .field("round", &self.params.round)
            .field("me", &self.me)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl ClientRound {
    /// Joins the round a setup describes: fresh keys and self-mask seed from the operating
    /// system's entropy, and the advertisement to send.
    pub fn join(setup: &SecAggSetup) -> Result<(Self, SecAggAdvertise), SecAggError> {
        Self::join_with(setup, &mut ChaCha20Rng::from_os_rng())
    }

    /// [`ClientRound::join`] with the secrets drawn from `rng` (tests and benches).
    pub fn join_with(
        setup: &SecAggSetup,
        rng: &mut ChaCha20Rng,
    ) -> Result<(Self, SecAggAdvertise), SecAggError> {
        let params = RoundParams::from_setup(setup)?;
        let neighbours = Graph::new(&params).neighbours(setup.index);
        let (encryption, masking, self_mask) = (
            crypto::fresh_secret(rng),
            crypto::fresh_secret(rng),
            crypto::fresh_secret(rng),
        );
        let advertise = SecAggAdvertise {
            run_id: params.run_id,
            round: params.round,
            encryption_key: crypto::public_key(&encryption),
            masking_key: crypto::public_key(&masking),
            self_mask_commitment: crypto::commitment(
                params.run_id,
                params.round,
                setup.index,
                &self_mask,
            ),
        };
        let round = Self {
            params,
            me: setup.index,
            neighbours,
            encryption,
            masking,
            self_mask,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
            stage: Stage::Advertised,
        };
        Ok((round, advertise))
    }

    /// This client's index in the round.
    pub fn index(&self) -> u32 {
        self.me
    }

    fn expect(
        &self,
        stage: Stage,
        got: &'static str,
        run_round: (u64, u64),
    ) -> Result<(), SecAggError> {
        self.params
            .check_turn(run_round, self.stage == stage, got, self.stage.name())
    }

    fn need(&self, stage: &'static str, have: usize) -> Result<(), SecAggError> {
        let need = self.params.threshold as usize;
        if have < need {
            return Err(SecAggError::TooFewNeighbours { stage, have, need });
        }
        Ok(())
    }

    /// Deals shares of the masking key and self-mask seed to the neighbours in the roster,
    /// each pair sealed to its recipient.
    pub fn share(&mut self, roster: &SecAggRoster) -> Result<SecAggShares, SecAggError> {
        self.expect(Stage::Advertised, "roster", (roster.run_id, roster.round))?;
        let mut peers = BTreeMap::new();
        for peer in &roster.peers {
            if self.neighbours.binary_search(&peer.index).is_err()
                || peers.insert(peer.index, *peer).is_some()
            {
                return Err(SecAggError::UnexpectedPeer(peer.index));
            }
        }
        self.need("the roster", peers.len())?;
        let (t, k) = (self.params.threshold, self.neighbours.len());
        let self_mask_shares = crypto::deal(&self.self_mask, t, k);
        let key_shares = crypto::deal(&self.masking, t, k);
        let mut sealed = Vec::with_capacity(peers.len());
        for (slot, &neighbour) in self.neighbours.iter().enumerate() {
            let Some(peer) = peers.get(&neighbour) else {
                continue;
            };
            let key = crypto::agree(
                &self.encryption,
                &peer.encryption_key,
                neighbour,
                Purpose::Sealing,
                self.params.run_id,
                self.params.round,
            )?;
            sealed.push(SealedShares {
                peer: neighbour,
                ciphertext: crypto::seal_shares(
                    &key,
                    (self.params.run_id, self.params.round),
                    (self.me, neighbour),
                    &self_mask_shares[slot],
                    &key_shares[slot],
                ),
            });
        }
        self.peers = peers;
        self.stage = Stage::Shared;
        Ok(SecAggShares {
            run_id: self.params.run_id,
            round: self.params.round,
            sealed,
        })
    }

    /// Opens the shares neighbours sent and masks `input`: the self mask, plus one pairwise
    /// mask per neighbour whose shares arrived (those are the neighbours the aggregator can
    /// unmask for if they drop).
    pub fn mask(
        &mut self,
        inbox: &SecAggInbox,
        input: &[u32],
    ) -> Result<SecAggMasked, SecAggError> {
        self.expect(Stage::Shared, "inbox", (inbox.run_id, inbox.round))?;
        if input.len() != self.params.vector_len as usize {
            return Err(SecAggError::Malformed {
                what: "input",
                why: format!(
                    "{} ring elements, the round has {}",
                    input.len(),
                    self.params.vector_len
                ),
            });
        }
        let mut held = BTreeMap::new();
        for sealed in &inbox.sealed {
            let Some(peer) = self.peers.get(&sealed.peer) else {
                return Err(SecAggError::UnexpectedPeer(sealed.peer));
            };
            if held.contains_key(&sealed.peer) {
                return Err(SecAggError::UnexpectedPeer(sealed.peer));
            }
            let key = crypto::agree(
                &self.encryption,
                &peer.encryption_key,
                peer.index,
                Purpose::Sealing,
                self.params.run_id,
                self.params.round,
            )?;
            let (self_mask_share, key_share) = crypto::open_shares(
                &key,
                (self.params.run_id, self.params.round),
                (peer.index, self.me),
                &sealed.ciphertext,
            )?;
            held.insert(
                peer.index,
                (Zeroizing::new(self_mask_share), Zeroizing::new(key_share)),
            );
        }
        self.need("the inbox", held.len())?;
        let mut masked = input.to_vec();
        crypto::apply_mask(&self.self_mask, false, &mut masked);
        for &neighbour in held.keys() {
            let peer = &self.peers[&neighbour];
            let seed = crypto::agree(
                &self.masking,
                &peer.masking_key,
                neighbour,
                Purpose::PairMask,
                self.params.run_id,
                self.params.round,
            )?;
            crypto::apply_mask(&seed, self.me > neighbour, &mut masked);
        }
        self.held = held;
        self.stage = Stage::Masked;
        Ok(SecAggMasked {
            run_id: self.params.run_id,
            round: self.params.round,
            masked: masked.iter().flat_map(|w| w.to_le_bytes()).collect(),
        })
    }

    /// Answers the one unmask request of the round: the self-mask share of each surviving
    /// neighbour and the masking-key share of each dropped one. Refuses a request that names a
    /// neighbour both ways, a second request, and one that leaves fewer than t survivors among
    /// its neighbours.
    pub fn reveal(&mut self, request: &SecAggUnmask) -> Result<SecAggReveal, SecAggError> {
        self.expect(Stage::Masked, "unmask", (request.run_id, request.round))?;
        // Whatever follows, this client never answers another request this round.
        self.stage = Stage::Revealed;
        let survivors: BTreeSet<u32> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<u32> = request.dropped.iter().copied().collect();
        if let Some(&both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::BothShares(both));
        }
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return Err(SecAggError::Malformed {
                what: "unmask request",
                why: "a neighbour listed twice".into(),
            });
        }
        if let Some(&stranger) = survivors
            .iter()
            .chain(&dropped)
            .find(|c| !self.held.contains_key(c))
        {
            return Err(SecAggError::UnexpectedPeer(stranger));
        }
        // Survivors here are neighbours whose input arrived, this client aside.
        self.need("the unmask request", survivors.len() + 1)?;
        let share = |owner: u32, key: bool| {
            let (self_mask_share, key_share) = &self.held[&owner];
            RevealedShare {
                owner,
                share: if key { key_share } else { self_mask_share }.to_vec(),
            }
        };
        let reveal = SecAggReveal {
            run_id: self.params.run_id,
            round: self.params.round,
            self_mask_shares: survivors.iter().map(|&o| share(o, false)).collect(),
            key_shares: dropped.iter().map(|&o| share(o, true)).collect(),
        };
        self.held.clear();
        Ok(reveal)
    }
}
