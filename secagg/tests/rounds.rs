//! Whole rounds of secure aggregation, every client and the aggregator in one process: the
//! sum against the plain sum, dropouts at each step, failures below the threshold, and an
//! aggregator or client that lies.

use std::collections::{BTreeMap, BTreeSet};

use protocol::{SecAggReveal, SecAggUnmask};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use secagg::{Aggregate, ClientRound, RoundParams, SecAggError, ServerRound};

/// The step after which a client stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Never sends its keys.
    Setup,
    Advertise,
    Share,
    Mask,
    Reveal,
}

struct Round {
    inputs: BTreeMap<u32, Vec<u32>>,
    server: ServerRound,
    clients: BTreeMap<u32, ClientRound>,
}

fn inputs(n: u32, len: u32, seed: u64) -> BTreeMap<u32, Vec<u32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|c| (c, (0..len).map(|_| rng.random()).collect()))
        .collect()
}

fn plain_sum(inputs: &BTreeMap<u32, Vec<u32>>, who: &BTreeSet<u32>, len: usize) -> Vec<u32> {
    let mut sum = vec![0u32; len];
    for c in who {
        for (s, x) in sum.iter_mut().zip(&inputs[c]) {
            *s = s.wrapping_add(*x);
        }
    }
    sum
}

fn open(n: u32, len: u32) -> Round {
    open_for(n, len, 0.3, &BTreeSet::new())
}

/// Opens a round in which every client but the `silent` ones advertised.
fn open_for(n: u32, len: u32, dropout: f64, silent: &BTreeSet<u32>) -> Round {
    let params = RoundParams::for_round(7, 3, n, [n as u8; 32], len, dropout, 1.0).unwrap();
    let min = params.threshold as usize + 1;
    let server = ServerRound::new(params.clone(), min).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(n));
    let mut round = Round {
        inputs: inputs(n, len, 11),
        server,
        clients: BTreeMap::new(),
    };
    for c in 0..n {
        let (client, advert) = ClientRound::join_with(&params.setup_for(c), &mut rng).unwrap();
        if !silent.contains(&c) {
            round.server.advertise(c, advert).unwrap();
        }
        round.clients.insert(c, client);
    }
    round
}

/// Runs the round with `gone` clients leaving after `step`; returns the aggregate. A client
/// that refuses a step for lack of live neighbours leaves there, as a real one would.
fn run(n: u32, len: u32, gone: &BTreeSet<u32>, step: Step) -> Result<Aggregate, SecAggError> {
    run_for(n, len, 0.3, gone, step)
}

/// A client's answer, or `None` where it left for lack of live neighbours.
fn stays<T>(answer: Result<T, SecAggError>) -> Result<Option<T>, SecAggError> {
    match answer {
        Err(SecAggError::TooFewNeighbours { .. }) => Ok(None),
        other => other.map(Some),
    }
}

fn run_for(
    n: u32,
    len: u32,
    dropout: f64,
    gone: &BTreeSet<u32>,
    step: Step,
) -> Result<Aggregate, SecAggError> {
    let silent = if step == Step::Setup {
        gone.clone()
    } else {
        BTreeSet::new()
    };
    let mut r = open_for(n, len, dropout, &silent);
    let leaves = |s: Step, c: &u32| s == step && gone.contains(c);
    for (c, roster) in r.server.rosters()? {
        if leaves(Step::Advertise, &c) {
            continue;
        }
        if let Some(shares) = stays(r.clients.get_mut(&c).unwrap().share(&roster))? {
            r.server.shares(c, shares)?;
        }
    }
    for (c, inbox) in r.server.inboxes()? {
        if leaves(Step::Share, &c) {
            continue;
        }
        let client = r.clients.get_mut(&c).unwrap();
        if let Some(masked) = stays(client.mask(&inbox, &r.inputs[&c]))? {
            r.server.masked(c, &masked)?;
        }
    }
    for (c, request) in r.server.unmask_requests()? {
        if leaves(Step::Mask, &c) {
            continue;
        }
        if let Some(reveal) = stays(r.clients.get_mut(&c).unwrap().reveal(&request))? {
            r.server.reveal(c, reveal)?;
        }
    }
    r.server.finish()
}

fn dropping(n: u32, fraction: f64, seed: u64) -> BTreeSet<u32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut all: Vec<u32> = (0..n).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.random_range(0..=i));
    }
    all.truncate((f64::from(n) * fraction).round() as usize);
    all.into_iter().collect()
}

#[test]
fn the_unmasked_sum_is_the_plain_sum_of_every_input() {
    for n in [3, 4, 10, 40, 100] {
        let agg = run(n, 257, &BTreeSet::new(), Step::Reveal).unwrap();
        let everyone: BTreeSet<u32> = (0..n).collect();
        assert_eq!(agg.survivors, everyone.iter().copied().collect::<Vec<_>>());
        assert_eq!(
            agg.sum,
            plain_sum(&inputs(n, 257, 11), &everyone, 257),
            "n={n}"
        );
    }
}

#[test]
fn thirty_percent_dropping_at_each_step_leaves_the_sum_of_those_who_sent_input() {
    let (n, len) = (60, 100);
    for (seed, step) in [Step::Setup, Step::Advertise, Step::Share, Step::Mask]
        .into_iter()
        .enumerate()
    {
        let gone = dropping(n, 0.3, seed as u64);
        let agg = run(n, len, &gone, step).unwrap_or_else(|e| panic!("{step:?}: {e}"));
        // A client that leaves after sending its input is still in the sum.
        let counted: BTreeSet<u32> = if step == Step::Mask {
            (0..n).collect()
        } else {
            (0..n).filter(|c| !gone.contains(c)).collect()
        };
        assert_eq!(agg.survivors, counted.iter().copied().collect::<Vec<_>>());
        assert_eq!(
            agg.sum,
            plain_sum(&inputs(n, len, 11), &counted, len as usize),
            "{step:?}"
        );
        if step == Step::Share {
            assert_eq!(agg.dropped, gone.iter().copied().collect::<Vec<_>>());
        }
    }
}

#[test]
fn the_sparse_graph_survives_its_design_dropout_at_each_step() {
    let (n, len) = (200, 16);
    let k = open_for(n, len, 0.1, &BTreeSet::new())
        .server
        .params()
        .neighbours;
    assert!(k < n - 1, "a sparse graph: {k} neighbours of {n}");
    for (seed, step) in [Step::Setup, Step::Advertise, Step::Share, Step::Mask]
        .into_iter()
        .enumerate()
    {
        let gone = dropping(n, 0.1, 10 + seed as u64);
        let agg = run_for(n, len, 0.1, &gone, step).unwrap_or_else(|e| panic!("{step:?}: {e}"));
        let counted: BTreeSet<u32> = agg.survivors.iter().copied().collect();
        let expected = if step == Step::Mask {
            n
        } else {
            n - gone.len() as u32
        };
        assert_eq!(counted.len() as u32, expected, "{step:?}");
        assert_eq!(
            agg.sum,
            plain_sum(&inputs(n, len, 11), &counted, len as usize)
        );
    }
}

#[test]
fn too_few_clients_or_shares_fail_the_round_cleanly() {
    let n = 10;
    // Nine neighbours each (complete graph), threshold 5: six clients gone leave four.
    let gone = dropping(n, 0.6, 1);
    for step in [Step::Setup, Step::Advertise, Step::Share] {
        match run(n, 8, &gone, step) {
            Err(SecAggError::TooFewClients {
                have: 4, need: 6, ..
            }) => {}
            other => panic!("{step:?}: {other:?}"),
        }
    }
    // Every input arrived, but most clients leave before revealing: the shares are too few.
    assert!(matches!(
        run(n, 8, &gone, Step::Mask),
        Err(SecAggError::TooFewShares {
            have: 4,
            need: 5,
            ..
        })
    ));
}

/// Drives a round to its unmask step with everyone present.
fn to_unmask(n: u32, len: u32) -> (Round, BTreeMap<u32, SecAggUnmask>) {
    let mut r = open(n, len);
    for (c, roster) in r.server.rosters().unwrap() {
        let shares = r.clients.get_mut(&c).unwrap().share(&roster).unwrap();
        r.server.shares(c, shares).unwrap();
    }
    for (c, inbox) in r.server.inboxes().unwrap() {
        let masked = r
            .clients
            .get_mut(&c)
            .unwrap()
            .mask(&inbox, &r.inputs[&c])
            .unwrap();
        r.server.masked(c, &masked).unwrap();
    }
    let requests = r.server.unmask_requests().unwrap().into_iter().collect();
    (r, requests)
}

#[test]
fn an_aggregator_asking_for_both_shares_of_a_client_is_refused() {
    let (mut r, requests) = to_unmask(20, 4);
    let target = 5;
    let holder = *requests[&0].survivors.first().unwrap();
    // In one request: the target both as survivor and as dropped.
    let mut both = requests[&holder].clone();
    if !both.survivors.contains(&target) {
        both.survivors.push(target);
    }
    both.dropped.push(target);
    let client = r.clients.get_mut(&holder).unwrap();
    let refused = client.reveal(&both);
    assert!(
        matches!(
            refused,
            Err(SecAggError::BothShares(5)) | Err(SecAggError::UnexpectedPeer(_))
        ),
        "{refused:?}"
    );
    // Asking again, now the other way, is refused too: one answer per round.
    assert!(matches!(
        client.reveal(&requests[&holder]),
        Err(SecAggError::OutOfOrder { .. })
    ));
}

#[test]
fn split_requests_never_give_the_aggregator_a_threshold_of_both_shares() {
    let (n, len, target) = (40, 4, 13);
    let k = open(n, len).server.params().neighbours as usize;
    // Split the target's neighbours into "it survived" and "it dropped" at a few cuts (each
    // cut needs fresh clients: a client answers one request per round).
    for cut in [0, k / 2 - 1, k / 2, k / 2 + 1, k] {
        let (mut r, requests) = to_unmask(n, len);
        let t = r.server.params().threshold as usize;
        let holders: Vec<u32> = (0..n)
            .filter(|&c| requests[&c].survivors.contains(&target))
            .collect();
        assert_eq!(holders.len(), k);
        let (mut self_mask, mut key) = (0, 0);
        for (i, &h) in holders.iter().enumerate() {
            let mut request = requests[&h].clone();
            if i < cut {
                request.survivors.retain(|&c| c != target);
                request.dropped.push(target);
                request.dropped.sort_unstable();
            }
            let reveal: SecAggReveal = r.clients.get_mut(&h).unwrap().reveal(&request).unwrap();
            self_mask += reveal
                .self_mask_shares
                .iter()
                .filter(|s| s.owner == target)
                .count();
            key += reveal
                .key_shares
                .iter()
                .filter(|s| s.owner == target)
                .count();
        }
        assert_eq!(self_mask + key, k);
        assert!(
            self_mask < t || key < t,
            "cut {cut}: {self_mask} and {key} shares"
        );
    }
}

#[test]
fn a_bad_share_fails_the_round_instead_of_corrupting_the_sum() {
    let (mut r, requests) = to_unmask(12, 16);
    let mut liar = true;
    for (c, request) in requests {
        let mut reveal = r.clients.get_mut(&c).unwrap().reveal(&request).unwrap();
        if liar {
            // Keep the share's x (the aggregator checks it), change its value.
            reveal.self_mask_shares[0].share[5] ^= 0x40;
            liar = false;
        }
        r.server.reveal(c, reveal).unwrap();
    }
    assert!(matches!(
        r.server.finish(),
        Err(SecAggError::Rebuild {
            secret: "self-mask seed",
            ..
        })
    ));
}

#[test]
fn tampered_or_misrouted_messages_are_refused() {
    let mut r = open(10, 4);
    let rosters: BTreeMap<u32, _> = r.server.rosters().unwrap().into_iter().collect();
    for (&c, roster) in &rosters {
        let shares = r.clients.get_mut(&c).unwrap().share(roster).unwrap();
        // A second answer to one step is refused by the aggregator.
        r.server.shares(c, shares.clone()).unwrap();
        assert_eq!(r.server.shares(c, shares), Err(SecAggError::Duplicate(c)));
    }
    let mut inboxes: BTreeMap<u32, _> = r.server.inboxes().unwrap().into_iter().collect();
    // A flipped bit in a sealed pair: the recipient refuses the inbox.
    inboxes.get_mut(&0).unwrap().sealed[0].ciphertext[20] ^= 1;
    assert!(matches!(
        r.clients
            .get_mut(&0)
            .unwrap()
            .mask(&inboxes[&0], &r.inputs[&0]),
        Err(SecAggError::Unsealing(_))
    ));
    // A pair re-addressed to another recipient does not open either.
    let mut stolen = inboxes[&2].clone();
    stolen.sealed[0] = inboxes[&1].sealed[0].clone();
    assert!(
        r.clients
            .get_mut(&2)
            .unwrap()
            .mask(&stolen, &r.inputs[&2])
            .is_err()
    );
    // A message of another round is refused before anything is done.
    let mut other = inboxes[&3].clone();
    other.round += 1;
    assert!(matches!(
        r.clients.get_mut(&3).unwrap().mask(&other, &r.inputs[&3]),
        Err(SecAggError::WrongRound { .. })
    ));
    // A masked input of the wrong length is refused by the aggregator.
    let masked = r
        .clients
        .get_mut(&4)
        .unwrap()
        .mask(&inboxes[&4], &r.inputs[&4])
        .unwrap();
    let mut short = masked.clone();
    short.masked.pop();
    assert!(matches!(
        r.server.masked(4, &short),
        Err(SecAggError::Malformed { .. })
    ));
    r.server.masked(4, &masked).unwrap();
}

#[test]
fn a_low_order_key_is_refused_before_it_reaches_any_roster() {
    let params = RoundParams::for_round(7, 3, 5, [1; 32], 4, 0.1, 1.0).unwrap();
    let mut server = ServerRound::new(params.clone(), 4).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let (_, mut advert) = ClientRound::join_with(&params.setup_for(0), &mut rng).unwrap();
    advert.masking_key = [0; 32];
    assert_eq!(server.advertise(0, advert), Err(SecAggError::WeakKey(0)));
}
