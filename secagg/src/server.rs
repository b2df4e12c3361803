//! The aggregator's side of one round.

use std::collections::{BTreeMap, BTreeSet};

use protocol::{
    SealedShares, SecAggAdvertise, SecAggInbox, SecAggMasked, SecAggPeer, SecAggReveal,
    SecAggRoster, SecAggShares, SecAggUnmask,
};

use crate::crypto::{self, Purpose, SEALED_LEN, SHARE_LEN};
use crate::error::SecAggError;
use crate::graph::{Graph, RoundParams};

/// Where the round is. Each step collects one message per client until the caller closes it
/// (on its deadline or when everyone answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Advertising,
    Sharing,
    Masking,
    Unmasking,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Advertising => "collecting keys",
            Stage::Sharing => "collecting shares",
            Stage::Masking => "collecting masked inputs",
            Stage::Unmasking => "collecting revealed shares",
        }
    }
}

/// The round's result: the sum of the survivors' inputs, masks removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// Σ inputs in Z/2³² (decode with [`crate::ring::FixedPoint::decode_sum`]).
    pub sum: Vec<u32>,
    /// The clients whose inputs it holds, ascending.
    pub survivors: Vec<u32>,
    /// Clients that shared keys but sent no input: their pairwise masks were rebuilt.
    pub dropped: Vec<u32>,
}

/// Clients that completed each step of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Sent their keys.
    pub advertised: usize,
    /// Sent their sealed shares.
    pub shared: usize,
    /// Sent their masked input.
    pub masked: usize,
    /// Answered the unmask request.
    pub revealed: usize,
}

/// Revealed shares per owner: holder → share.
type Revealed = BTreeMap<u32, BTreeMap<u32, Vec<u8>>>;

/// One round at the aggregator. Memory is one running sum of the inputs plus O(n·k) keys and
/// sealed shares; the inputs themselves are added as they arrive.
#[derive(Debug)]
pub struct ServerRound {
    params: RoundParams,
    graph: Graph,
    min_clients: usize,
    stage: Stage,
    advertised: BTreeMap<u32, SecAggAdvertise>,
    /// Sealed pairs per recipient: sender → ciphertext.
    mailbox: BTreeMap<u32, BTreeMap<u32, Vec<u8>>>,
    sharers: BTreeSet<u32>,
    sum: Vec<u32>,
    maskers: BTreeSet<u32>,
    /// What each survivor was asked to reveal.
    asked: BTreeMap<u32, SecAggUnmask>,
    self_mask_shares: Revealed,
    key_shares: Revealed,
    revealers: BTreeSet<u32>,
}

impl ServerRound {
    /// Opens a round; it fails cleanly at any step that leaves fewer than `min_clients`.
    pub fn new(params: RoundParams, min_clients: usize) -> Result<Self, SecAggError> {
        params.validate()?;
        let floor = params.threshold as usize + 1;
        if min_clients < floor {
            return Err(SecAggError::BadParams(format!(
                "a minimum of {min_clients} clients: at least t + 1 = {floor}, or one client's \
                 input could be the whole sum"
            )));
        }
        let graph = Graph::new(&params);
        Ok(Self {
            sum: vec![0; params.vector_len as usize],
            params,
            graph,
            min_clients,
            stage: Stage::Advertising,
            advertised: BTreeMap::new(),
            mailbox: BTreeMap::new(),
            sharers: BTreeSet::new(),
            maskers: BTreeSet::new(),
            asked: BTreeMap::new(),
            self_mask_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
            revealers: BTreeSet::new(),
        })
    }

    /// The round's parameters.
    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    /// How many clients got through each step so far.
    pub fn progress(&self) -> Progress {
        Progress {
            advertised: self.advertised.len(),
            shared: self.sharers.len(),
            masked: self.maskers.len(),
            revealed: self.revealers.len(),
        }
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

    fn enough(&self, stage: &'static str, have: usize) -> Result<(), SecAggError> {
        if have < self.min_clients {
            return Err(SecAggError::TooFewClients {
                stage,
                have,
                need: self.min_clients,
            });
        }
        Ok(())
    }

    /// Takes a client's keys.
    pub fn advertise(&mut self, from: u32, message: SecAggAdvertise) -> Result<(), SecAggError> {
        self.expect(
            Stage::Advertising,
            "advertise",
            (message.run_id, message.round),
        )?;
        if from >= self.params.participants {
            return Err(SecAggError::NotParticipant(from));
        }
        if self.advertised.contains_key(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        // A low-order key would make every neighbour's agreement with it fail: refused here,
        // before it reaches a roster.
        for key in [&message.encryption_key, &message.masking_key] {
            crypto::agree(&[0x5a; 32], key, from, Purpose::Sealing, 0, 0)?;
        }
        self.advertised.insert(from, message);
        Ok(())
    }

    /// Closes key collection: each client that advertised gets its advertised neighbours'
    /// keys.
    pub fn rosters(&mut self) -> Result<Vec<(u32, SecAggRoster)>, SecAggError> {
        self.expect(
            Stage::Advertising,
            "roster",
            (self.params.run_id, self.params.round),
        )?;
        self.enough("the keys", self.advertised.len())?;
        self.stage = Stage::Sharing;
        Ok(self
            .advertised
            .keys()
            .map(|&client| {
                let peers = self
                    .graph
                    .neighbours(client)
                    .into_iter()
                    .filter_map(|n| {
                        self.advertised.get(&n).map(|a| SecAggPeer {
                            index: n,
                            encryption_key: a.encryption_key,
                            masking_key: a.masking_key,
                        })
                    })
                    .collect();
                (client, self.roster(peers))
            })
            .collect())
    }

    fn roster(&self, peers: Vec<SecAggPeer>) -> SecAggRoster {
        SecAggRoster {
            run_id: self.params.run_id,
            round: self.params.round,
            peers,
        }
    }

    /// Takes a client's sealed shares: exactly one pair for each advertised neighbour.
    pub fn shares(&mut self, from: u32, message: SecAggShares) -> Result<(), SecAggError> {
        self.expect(Stage::Sharing, "shares", (message.run_id, message.round))?;
        if !self.advertised.contains_key(&from) {
            return Err(SecAggError::NotParticipant(from));
        }
        if self.sharers.contains(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let expected: BTreeSet<u32> = self
            .graph
            .neighbours(from)
            .into_iter()
            .filter(|n| self.advertised.contains_key(n))
            .collect();
        let mut seen = BTreeSet::new();
        for sealed in &message.sealed {
            if !expected.contains(&sealed.peer) || !seen.insert(sealed.peer) {
                return Err(SecAggError::UnexpectedPeer(sealed.peer));
            }
            if sealed.ciphertext.len() != SEALED_LEN {
                return Err(SecAggError::Malformed {
                    what: "sealed shares",
                    why: format!("{} bytes, not {SEALED_LEN}", sealed.ciphertext.len()),
                });
            }
        }
        if seen.len() != expected.len() {
            return Err(SecAggError::Malformed {
                what: "shares",
                why: format!(
                    "{} sealed pairs for {} neighbours",
                    seen.len(),
                    expected.len()
                ),
            });
        }
        for sealed in message.sealed {
            self.mailbox
                .entry(sealed.peer)
                .or_default()
                .insert(from, sealed.ciphertext);
        }
        self.sharers.insert(from);
        Ok(())
    }

    /// Closes share collection: each client that shared gets the pairs its sharing neighbours
    /// sealed to it.
    pub fn inboxes(&mut self) -> Result<Vec<(u32, SecAggInbox)>, SecAggError> {
        self.expect(
            Stage::Sharing,
            "inbox",
            (self.params.run_id, self.params.round),
        )?;
        self.enough("the shares", self.sharers.len())?;
        self.stage = Stage::Masking;
        let mut mailbox = std::mem::take(&mut self.mailbox);
        Ok(self
            .sharers
            .iter()
            .map(|&client| {
                let sealed = mailbox
                    .remove(&client)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(sender, _)| self.sharers.contains(sender))
                    .map(|(peer, ciphertext)| SealedShares { peer, ciphertext })
                    .collect();
                let inbox = SecAggInbox {
                    run_id: self.params.run_id,
                    round: self.params.round,
                    sealed,
                };
                (client, inbox)
            })
            .collect())
    }

    /// Adds a client's masked input to the running sum.
    pub fn masked(&mut self, from: u32, message: &SecAggMasked) -> Result<(), SecAggError> {
        self.expect(Stage::Masking, "masked", (message.run_id, message.round))?;
        if !self.sharers.contains(&from) {
            return Err(SecAggError::NotParticipant(from));
        }
        if self.maskers.contains(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        if message.masked.len() != 4 * self.sum.len() {
            return Err(SecAggError::Malformed {
                what: "masked input",
                why: format!(
                    "{} bytes for {} ring elements",
                    message.masked.len(),
                    self.sum.len()
                ),
            });
        }
        for (s, w) in self.sum.iter_mut().zip(message.masked.chunks_exact(4)) {
            *s = s.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        self.maskers.insert(from);
        Ok(())
    }

    /// Closes input collection: each survivor is asked, for each of its sharing neighbours,
    /// for one kind of share.
    pub fn unmask_requests(&mut self) -> Result<Vec<(u32, SecAggUnmask)>, SecAggError> {
        self.expect(
            Stage::Masking,
            "unmask",
            (self.params.run_id, self.params.round),
        )?;
        self.enough("the masked inputs", self.maskers.len())?;
        self.stage = Stage::Unmasking;
        for &client in &self.maskers {
            let (mut survivors, mut dropped) = (Vec::new(), Vec::new());
            for n in self.graph.neighbours(client) {
                if self.maskers.contains(&n) {
                    survivors.push(n);
                } else if self.sharers.contains(&n) {
                    dropped.push(n);
                }
            }
            self.asked.insert(
                client,
                SecAggUnmask {
                    run_id: self.params.run_id,
                    round: self.params.round,
                    survivors,
                    dropped,
                },
            );
        }
        Ok(self.asked.iter().map(|(&c, u)| (c, u.clone())).collect())
    }

    /// Takes a survivor's revealed shares: exactly what it was asked for, each at the x its
    /// place among the owner's neighbours gives.
    pub fn reveal(&mut self, from: u32, message: SecAggReveal) -> Result<(), SecAggError> {
        self.expect(Stage::Unmasking, "reveal", (message.run_id, message.round))?;
        let Some(asked) = self.asked.get(&from) else {
            return Err(SecAggError::NotParticipant(from));
        };
        if self.revealers.contains(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let check = |given: &[protocol::RevealedShare], wanted: &[u32]| {
            let owners: Vec<u32> = given.iter().map(|s| s.owner).collect();
            if owners != wanted {
                return Err(SecAggError::Malformed {
                    what: "revealed shares",
                    why: format!("shares of {owners:?}, asked for {wanted:?}"),
                });
            }
            for s in given {
                let x = self.graph.share_x(s.owner, from);
                if s.share.len() != SHARE_LEN || x != Some(s.share[0]) {
                    return Err(SecAggError::Malformed {
                        what: "revealed share",
                        why: format!("share of {} is not the one client {from} holds", s.owner),
                    });
                }
            }
            Ok(())
        };
        check(&message.self_mask_shares, &asked.survivors)?;
        check(&message.key_shares, &asked.dropped)?;
        for s in message.self_mask_shares {
            self.self_mask_shares
                .entry(s.owner)
                .or_default()
                .insert(from, s.share);
        }
        for s in message.key_shares {
            self.key_shares
                .entry(s.owner)
                .or_default()
                .insert(from, s.share);
        }
        self.revealers.insert(from);
        Ok(())
    }

    /// Removes the masks: rebuilds each dropped client's masking key (checked against its
    /// public key) and cancels its pairwise masks in the survivors' inputs, and rebuilds each
    /// survivor's self-mask seed (checked against its commitment) and removes it.
    pub fn finish(mut self) -> Result<Aggregate, SecAggError> {
        self.expect(
            Stage::Unmasking,
            "finish",
            (self.params.run_id, self.params.round),
        )?;
        let (run_id, round, t) = (self.params.run_id, self.params.round, self.params.threshold);
        let dropped: Vec<u32> = self.sharers.difference(&self.maskers).copied().collect();
        for &owner in &dropped {
            let secret = rebuild(&self.key_shares, owner, "masking key", t)?;
            let advert = &self.advertised[&owner];
            if crypto::public_key(&secret) != advert.masking_key {
                return Err(SecAggError::Rebuild {
                    owner,
                    secret: "masking key",
                });
            }
            for survivor in self.graph.neighbours(owner) {
                if !self.maskers.contains(&survivor) {
                    continue;
                }
                let seed = crypto::agree(
                    &secret,
                    &self.advertised[&survivor].masking_key,
                    survivor,
                    Purpose::PairMask,
                    run_id,
                    round,
                )?;
                // The survivor added this stream if its index is the lower one.
                crypto::apply_mask(&seed, survivor < owner, &mut self.sum);
            }
        }
        for &owner in &self.maskers {
            let seed = rebuild(&self.self_mask_shares, owner, "self-mask seed", t)?;
            if crypto::commitment(run_id, round, owner, &seed)
                != self.advertised[&owner].self_mask_commitment
            {
                return Err(SecAggError::Rebuild {
                    owner,
                    secret: "self-mask seed",
                });
            }
            crypto::apply_mask(&seed, true, &mut self.sum);
        }
        Ok(Aggregate {
            sum: self.sum,
            survivors: self.maskers.into_iter().collect(),
            dropped,
        })
    }
}

fn rebuild(
    revealed: &Revealed,
    owner: u32,
    secret: &'static str,
    threshold: u32,
) -> Result<crypto::Secret, SecAggError> {
    let shares: Vec<&[u8]> = revealed
        .get(&owner)
        .map(|by_holder| by_holder.values().map(Vec::as_slice).collect())
        .unwrap_or_default();
    let too_few = || SecAggError::TooFewShares {
        owner,
        secret,
        have: shares.len(),
        need: threshold as usize,
    };
    if shares.len() < threshold as usize {
        return Err(too_few());
    }
    crypto::rebuild(&shares, threshold).ok_or(SecAggError::Rebuild { owner, secret })
}
