//! A round's public parameters and its masking graph.

use protocol::{MAX_SECAGG_NEIGHBOURS, SecAggSetup};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::SecAggError;
use crate::ring::FixedPoint;

/// What every party of a round agrees on before it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundParams {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// Clients asked to take part, indexed `0..participants`.
    pub participants: u32,
    /// Each client's neighbours (k): even, or `participants − 1` for the complete graph.
    pub neighbours: u32,
    /// Shares that rebuild a secret (t): more than k/2, at most k.
    pub threshold: u32,
    /// Seed of the graph's layout.
    pub graph_seed: [u8; 32],
    /// Ring elements per input.
    pub vector_len: u32,
    /// The clipping bound of the inputs' fixed-point code ([`RoundParams::code`]).
    pub clip: f64,
}

impl RoundParams {
    /// Parameters for a round of `participants` that must survive a fraction `dropout` of
    /// them leaving at any point: the smallest degree k for which no client is left with fewer
    /// than t = ⌊k/2⌋ + 1 live neighbours, except with probability [`FAILURE_TARGET`] over the
    /// round (binomial tail, a bound on the exact hypergeometric one). That is SecAgg+'s
    /// O(log n) degree; the complete graph when it is smaller, and at most
    /// [`MAX_SECAGG_NEIGHBOURS`], where the bound may no longer hold. Inputs are real vectors
    /// clipped to `±clip` ([`RoundParams::code`]).
    pub fn for_round(
        run_id: u64,
        round: u64,
        participants: u32,
        graph_seed: [u8; 32],
        vector_len: u32,
        dropout: f64,
        clip: f64,
    ) -> Result<Self, SecAggError> {
        if !(0.0..0.5).contains(&dropout) {
            return Err(SecAggError::BadParams(format!(
                "a dropout of {dropout}: a majority threshold tolerates less than half"
            )));
        }
        let neighbours = degree_for(participants, dropout);
        let params = Self {
            run_id,
            round,
            participants,
            neighbours,
            threshold: neighbours / 2 + 1,
            graph_seed,
            vector_len,
            clip,
        };
        params.validate()?;
        Ok(params)
    }

    /// The fixed-point code of the round's inputs: `±clip`, summed over every participant.
    pub fn code(&self) -> Result<FixedPoint, SecAggError> {
        FixedPoint::for_sum(self.clip, self.participants)
    }

    /// Refuses parameters under which the protocol is unsafe or cannot run.
    pub fn validate(&self) -> Result<(), SecAggError> {
        let bad = |why: String| Err(SecAggError::BadParams(why));
        let (n, k, t) = (self.participants, self.neighbours, self.threshold);
        if !(3..=MAX_PARTICIPANTS).contains(&n) {
            return bad(format!(
                "{n} participants: secure aggregation takes 3 to {MAX_PARTICIPANTS}"
            ));
        }
        if !(2..=MAX_SECAGG_NEIGHBOURS).contains(&k) || k >= n {
            return bad(format!(
                "{k} neighbours: need 2 ≤ k < participants ({n}) and k ≤ {MAX_SECAGG_NEIGHBOURS}"
            ));
        }
        if k % 2 == 1 && k != n - 1 {
            return bad(format!(
                "{k} neighbours: k must be even unless the graph is complete"
            ));
        }
        if 2 * t <= k || t > k {
            return bad(format!(
                "threshold {t} with {k} neighbours: need k/2 < t ≤ k, or the aggregator could \
                 rebuild both secrets of one client from two halves of its neighbours"
            ));
        }
        if self.vector_len == 0 {
            return bad("an empty input".into());
        }
        self.code().map(|_| ())
    }

    /// Refuses a step of another run or round, or one out of turn (`in_turn` false) while
    /// the round is at `stage`.
    pub(crate) fn check_turn(
        &self,
        run_round: (u64, u64),
        in_turn: bool,
        got: &'static str,
        stage: &'static str,
    ) -> Result<(), SecAggError> {
        if run_round != (self.run_id, self.round) {
            return Err(SecAggError::WrongRound {
                run_id: run_round.0,
                round: run_round.1,
            });
        }
        if !in_turn {
            return Err(SecAggError::OutOfOrder { got, stage });
        }
        Ok(())
    }

    /// The setup message for client `index`.
    pub fn setup_for(&self, index: u32) -> SecAggSetup {
        SecAggSetup {
            run_id: self.run_id,
            round: self.round,
            index,
            participants: self.participants,
            neighbours: self.neighbours,
            threshold: self.threshold,
            graph_seed: self.graph_seed,
            vector_len: self.vector_len,
            clip: self.clip,
            local_noise: None,
        }
    }

    /// The parameters a setup message states (validated).
    pub fn from_setup(setup: &SecAggSetup) -> Result<Self, SecAggError> {
        let params = Self {
            run_id: setup.run_id,
            round: setup.round,
            participants: setup.participants,
            neighbours: setup.neighbours,
            threshold: setup.threshold,
            graph_seed: setup.graph_seed,
            vector_len: setup.vector_len,
            clip: setup.clip,
        };
        params.validate()?;
        if setup.index >= setup.participants {
            return Err(SecAggError::BadParams(format!(
                "index {} of {} participants",
                setup.index, setup.participants
            )));
        }
        Ok(params)
    }
}

/// The most clients a round may have: the graph's layout is 8 bytes a client, and a setup
/// from the network must not make a client allocate without bound.
pub const MAX_PARTICIPANTS: u32 = 1 << 24;

/// The chance a round may fail for lack of live neighbours at its design dropout.
pub const FAILURE_TARGET: f64 = 1e-6;

/// The degree [`RoundParams::for_round`] picks.
fn degree_for(participants: u32, dropout: f64) -> u32 {
    let cap = participants.saturating_sub(1).min(MAX_SECAGG_NEIGHBOURS);
    let mut k = 2;
    while k < cap {
        let t = k / 2 + 1;
        // P[more than k − t of k neighbours gone], each gone with probability `dropout`.
        let fail: f64 = (k - t + 1..=k)
            .map(|gone| {
                binomial(k, gone)
                    * dropout.powi(gone as i32)
                    * (1.0 - dropout).powi((k - gone) as i32)
            })
            .sum();
        if fail * f64::from(participants) <= FAILURE_TARGET {
            return k;
        }
        k += 2;
    }
    cap
}

fn binomial(n: u32, k: u32) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * f64::from(n - i) / f64::from(i + 1))
}

/// The masking graph: the Harary graph H(k, n) over a seeded permutation of the clients, so
/// each client has exactly k neighbours and the aggregator cannot place them by index.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Client at each place on the cycle.
    order: Vec<u32>,
    /// Place of each client on the cycle.
    place: Vec<u32>,
    neighbours: u32,
}

impl Graph {
    /// The graph of a round (parameters already validated).
    pub fn new(params: &RoundParams) -> Self {
        let n = params.participants;
        let mut order: Vec<u32> = (0..n).collect();
        // Fisher–Yates with rejection sampling, spelled out so every build of either side
        // draws the same layout from the seed.
        let mut rng = ChaCha20Rng::from_seed(params.graph_seed);
        for i in (1..order.len()).rev() {
            let bound = i as u64 + 1;
            let zone = u64::MAX - u64::MAX % bound;
            let j = loop {
                let draw = rng.next_u64();
                if draw < zone {
                    break (draw % bound) as usize;
                }
            };
            order.swap(i, j);
        }
        let mut place = vec![0; order.len()];
        for (at, &client) in order.iter().enumerate() {
            place[client as usize] = at as u32;
        }
        Self {
            order,
            place,
            neighbours: params.neighbours,
        }
    }

    /// The neighbours of `client`, ascending; the i-th of them holds the share at x = i + 1.
    pub fn neighbours(&self, client: u32) -> Vec<u32> {
        let n = self.order.len() as u32;
        let mut out: Vec<u32> = if self.neighbours == n - 1 {
            (0..n).filter(|&c| c != client).collect()
        } else {
            let at = self.place[client as usize];
            (1..=self.neighbours / 2)
                .flat_map(|d| [(at + d) % n, (at + n - d) % n])
                .map(|p| self.order[p as usize])
                .collect()
        };
        out.sort_unstable();
        out
    }

    /// Whether `a` and `b` are neighbours.
    pub fn adjacent(&self, a: u32, b: u32) -> bool {
        if a == b {
            return false;
        }
        let n = self.order.len() as u32;
        if self.neighbours == n - 1 {
            return true;
        }
        let (pa, pb) = (self.place[a as usize], self.place[b as usize]);
        let d = pa.abs_diff(pb);
        d.min(n - d) <= self.neighbours / 2
    }

    /// The x coordinate of the share `holder` keeps of `owner`'s secrets, if they are
    /// neighbours.
    pub fn share_x(&self, owner: u32, holder: u32) -> Option<u8> {
        let list = self.neighbours(owner);
        list.binary_search(&holder).ok().map(|i| (i + 1) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n: u32) -> RoundParams {
        RoundParams::for_round(1, 2, n, [7; 32], 10, 0.1, 1.0).unwrap()
    }

    #[test]
    fn every_client_has_k_distinct_neighbours_and_the_relation_is_symmetric() {
        for n in [3, 4, 5, 8, 10, 33, 100, 1000] {
            let p = params(n);
            let g = Graph::new(&p);
            for u in 0..n {
                let list = g.neighbours(u);
                assert_eq!(list.len() as u32, p.neighbours, "n={n} u={u}");
                assert!(!list.contains(&u));
                assert!(list.windows(2).all(|w| w[0] < w[1]));
                for &v in &list {
                    assert!(g.neighbours(v).contains(&u));
                    assert!(g.adjacent(u, v) && g.adjacent(v, u));
                }
                let others = (0..n).filter(|v| !list.contains(v) && *v != u);
                assert!(others.into_iter().all(|v| !g.adjacent(u, v)));
            }
        }
    }

    #[test]
    fn degrees_grow_with_log_n_and_the_dropout_and_keep_a_majority_threshold() {
        let k = |n, dropout| {
            RoundParams::for_round(1, 2, n, [7; 32], 10, dropout, 1.0)
                .unwrap()
                .neighbours
        };
        let table: Vec<_> = [10, 100, 1000, 10_000, 1_000_000]
            .into_iter()
            .map(|n| (n, k(n, 0.05), k(n, 0.1), k(n, 0.3)))
            .collect();
        eprintln!("(n, k at 5%, 10%, 30% dropout): {table:?}");
        assert_eq!(k(3, 0.1), 2);
        assert_eq!(k(10, 0.3), 9);
        assert!(k(1000, 0.1) < k(1000, 0.3) && k(1000, 0.3) < 254);
        assert!(k(1_000_000, 0.1) < 2 * k(1000, 0.1));
        assert!(RoundParams::for_round(1, 2, 10, [0; 32], 1, 0.5, 1.0).is_err());
        for n in [3, 10, 100, 1000] {
            let p = params(n);
            assert!(2 * p.threshold > p.neighbours && p.threshold <= p.neighbours);
        }
    }

    #[test]
    fn unsafe_parameters_are_refused() {
        let mut p = params(100);
        p.threshold = p.neighbours / 2;
        assert!(matches!(p.validate(), Err(SecAggError::BadParams(_))));
        let mut p = params(100);
        p.neighbours = 15;
        assert!(p.validate().is_err());
        assert!(RoundParams::for_round(1, 2, 2, [0; 32], 10, 0.1, 1.0).is_err());
        let mut setup = params(10).setup_for(10);
        assert!(RoundParams::from_setup(&setup).is_err());
        setup.index = 9;
        assert!(RoundParams::from_setup(&setup).is_ok());
    }
}
