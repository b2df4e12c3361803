//! Why a step was refused or a round failed.

/// A refused step (the message is dropped; its sender may be treated as dropped) or a round
/// that cannot finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    /// Round parameters under which the protocol is unsafe or cannot run.
    #[error("bad secure-aggregation parameters: {0}")]
    BadParams(String),
    /// A message for another run or round.
    #[error("message for run {run_id} round {round}, not this round")]
    WrongRound {
        /// Its run.
        run_id: u64,
        /// Its round.
        round: u64,
    },
    /// A step out of order, or a second answer to a one-time request.
    #[error("unexpected {got} while {stage}")]
    OutOfOrder {
        /// The step received.
        got: &'static str,
        /// Where the round is.
        stage: &'static str,
    },
    /// A client that is not a participant, or not one at this step.
    #[error("client {0} is not a participant of this step")]
    NotParticipant(u32),
    /// A second message of one kind from one client.
    #[error("client {0} already sent this step")]
    Duplicate(u32),
    /// A peer that is not a neighbour, or listed twice.
    #[error("peer {0} is not an expected neighbour here")]
    UnexpectedPeer(u32),
    /// A message whose contents do not have the expected form.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which part.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A public key of low order: its agreements would be predictable.
    #[error("client {0} advertised a weak key")]
    WeakKey(u32),
    /// A sealed share that does not open (tampered, or sealed for someone else).
    #[error("sealed shares from {0} do not open")]
    Unsealing(u32),
    /// An unmask request that names a neighbour as both survivor and dropped.
    #[error("refused: the aggregator asked for both kinds of share of client {0}")]
    BothShares(u32),
    /// Too few neighbours at a step for the client to go on safely.
    #[error("{have} neighbours at {stage}, {need} needed")]
    TooFewNeighbours {
        /// The step.
        stage: &'static str,
        /// Neighbours present.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// Too few clients left at a step for the round to finish.
    #[error("{have} clients left at {stage}, {need} needed")]
    TooFewClients {
        /// The step.
        stage: &'static str,
        /// Clients present.
        have: usize,
        /// The round's minimum.
        need: usize,
    },
    /// Too few shares revealed to rebuild a secret the sum needs.
    #[error("{have} shares of client {owner}'s {secret}, {need} needed")]
    TooFewShares {
        /// Whose secret.
        owner: u32,
        /// Which one.
        secret: &'static str,
        /// Shares revealed.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// A rebuilt secret that does not match its public key or commitment: a neighbour
    /// revealed a bad share.
    #[error("client {owner}'s {secret} did not rebuild to what it advertised")]
    Rebuild {
        /// Whose secret.
        owner: u32,
        /// Which one.
        secret: &'static str,
    },
}
