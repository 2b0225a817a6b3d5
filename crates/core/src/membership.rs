//! Which worker ranks are held, by which connection, and who is alive: joining with a fixed
//! rank or any free one, leaving, heartbeat deadlines and eviction. Pure: time comes in as
//! `now` (a `Duration` since some start the caller chose), so a fake clock drives the tests.

use std::time::Duration;
use thiserror::Error;

/// The rank a worker asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankRequest {
    Exact(usize),
    /// Any free rank: a replacement for a worker that died.
    Any,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JoinError {
    #[error("rank {rank} is out of range for {workers} workers")]
    OutOfRange { rank: usize, workers: usize },
    /// The rank's previous connection is not known to be gone yet: retry shortly.
    #[error("worker rank {0} is already connected")]
    Busy(usize),
    /// Every rank is held (one may free up soon: the caller retries as for `Busy`).
    #[error("all {0} worker ranks are taken")]
    NoneFree(usize),
}

/// A worker's seat: its rank and the generation that identifies this holder of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    pub rank: usize,
    pub generation: u64,
    /// The rank had joined before (the quorum takes it back rather than counting it new).
    pub rejoined: bool,
}

/// How a holder let go of its rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// It said goodbye: its work is done.
    Goodbye,
    /// Its connection broke without a goodbye.
    Vanished,
    /// Its heartbeats stopped.
    Evicted,
}

#[derive(Debug, Clone, Default)]
struct RankState {
    held: bool,
    joined_ever: bool,
    /// The worker died or froze and nobody has taken the rank since: the first choice for a
    /// replacement asking for any rank.
    vanished: bool,
    /// Bumped whenever the rank changes hands, so a stale connection cannot speak for it.
    generation: u64,
    /// The current holder's last heartbeat (its join counts as one: heartbeats are
    /// required, and a holder that never sends one is evicted like one that stopped).
    last_beat: Option<Duration>,
    /// How the last holder let go, while nobody holds the rank.
    departed: Option<Departure>,
}

/// Where a rank stands, for people watching the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Nobody has taken the rank yet.
    NotJoined,
    /// Held; `since_beat` is the time since its last heartbeat (or its join).
    Held { since_beat: Option<Duration> },
    /// Its last holder left this way and nobody has taken it since.
    Left(Departure),
}

#[derive(Debug, Clone)]
pub struct Membership {
    ranks: Vec<RankState>,
}

impl Membership {
    pub fn new(workers: usize) -> Self {
        Membership {
            ranks: vec![RankState::default(); workers],
        }
    }

    pub fn workers(&self) -> usize {
        self.ranks.len()
    }

    /// Takes a rank at `now`: the one asked for if free, or for `Any` the rank of a worker
    /// that died, else one never taken, else one whose worker finished.
    pub fn join(&mut self, request: RankRequest, now: Duration) -> Result<Seat, JoinError> {
        let workers = self.ranks.len();
        let rank = match request {
            RankRequest::Exact(rank) if rank >= workers => {
                return Err(JoinError::OutOfRange { rank, workers })
            }
            RankRequest::Exact(rank) if self.ranks[rank].held => return Err(JoinError::Busy(rank)),
            RankRequest::Exact(rank) => rank,
            RankRequest::Any => {
                let free = || self.ranks.iter().enumerate().filter(|(_, r)| !r.held);
                free()
                    .find(|(_, r)| r.vanished)
                    .or_else(|| free().find(|(_, r)| !r.joined_ever))
                    .or_else(|| free().next())
                    .map(|(rank, _)| rank)
                    .ok_or(JoinError::NoneFree(workers))?
            }
        };
        let r = &mut self.ranks[rank];
        let rejoined = r.joined_ever;
        r.held = true;
        r.joined_ever = true;
        r.vanished = false;
        r.departed = None;
        r.generation += 1;
        // A new holder's deadline starts now: the old holder's silence is not its.
        r.last_beat = Some(now);
        Ok(Seat {
            rank,
            generation: r.generation,
            rejoined,
        })
    }

    /// Whether `seat` still holds its rank (it was not replaced or evicted).
    pub fn holds(&self, seat: Seat) -> bool {
        self.ranks
            .get(seat.rank)
            .is_some_and(|r| r.held && r.generation == seat.generation)
    }

    /// `seat` lets go of its rank. Returns false if it no longer held it (then the quorum
    /// must not be touched on its behalf).
    pub fn leave(&mut self, seat: Seat, how: Departure) -> bool {
        if !self.holds(seat) {
            return false;
        }
        let r = &mut self.ranks[seat.rank];
        r.held = false;
        r.last_beat = None;
        r.vanished = how != Departure::Goodbye;
        r.departed = Some(how);
        r.generation += 1;
        true
    }

    /// Where `rank` stands at `now`.
    pub fn presence(&self, rank: usize, now: Duration) -> Presence {
        match self.ranks.get(rank) {
            Some(r) if r.held => Presence::Held {
                since_beat: r.last_beat.map(|t| now.saturating_sub(t)),
            },
            Some(RankState {
                departed: Some(how),
                ..
            }) => Presence::Left(*how),
            _ => Presence::NotJoined,
        }
    }

    /// A heartbeat for `rank` at `now`.
    pub fn beat(&mut self, rank: usize, now: Duration) {
        if let Some(r) = self.ranks.get_mut(rank).filter(|r| r.held) {
            r.last_beat = Some(now);
        }
    }

    /// Evicts every holder whose heartbeats stopped for longer than `timeout`; returns the
    /// ranks (their quorum membership ends with this).
    pub fn evict_silent(&mut self, now: Duration, timeout: Duration) -> Vec<usize> {
        let silent: Vec<Seat> = self
            .ranks
            .iter()
            .enumerate()
            .filter(|(_, r)| r.held && r.last_beat.is_some_and(|t| now.saturating_sub(t) > timeout))
            .map(|(rank, r)| Seat {
                rank,
                generation: r.generation,
                rejoined: true,
            })
            .collect();
        for seat in &silent {
            self.leave(*seat, Departure::Evicted);
        }
        silent.iter().map(|s| s.rank).collect()
    }

    /// Ranks held now.
    pub fn held(&self) -> usize {
        self.ranks.iter().filter(|r| r.held).count()
    }

    /// Every rank has joined at least once and none is held: the run's workers are all gone.
    pub fn all_departed(&self) -> bool {
        self.ranks.iter().all(|r| r.joined_ever && !r.held)
    }

    /// Every rank has joined and left with a goodbye: the workers all finished their part (a
    /// worker that vanished may still come back).
    pub fn all_said_goodbye(&self) -> bool {
        self.ranks
            .iter()
            .all(|r| r.joined_ever && !r.held && r.departed == Some(Departure::Goodbye))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn any_rank_prefers_a_dead_workers_then_an_untaken_then_a_finished_one() {
        let mut m = Membership::new(3);
        let s0 = m.join(RankRequest::Exact(0), S).unwrap();
        let s1 = m.join(RankRequest::Exact(1), S).unwrap();
        assert!(m.leave(s0, Departure::Goodbye));
        // Rank 0 finished, rank 2 never joined: the untaken one comes first.
        assert_eq!(m.join(RankRequest::Any, S).unwrap().rank, 2);
        assert!(m.leave(s1, Departure::Vanished));
        // Rank 1 died: it comes before the finished rank 0.
        let r = m.join(RankRequest::Any, S).unwrap();
        assert_eq!((r.rank, r.rejoined), (1, true));
        assert_eq!(m.presence(0, S), Presence::Left(Departure::Goodbye));
        assert_eq!(m.join(RankRequest::Any, S).unwrap().rank, 0);
        assert_eq!(
            m.presence(0, 3 * S),
            Presence::Held {
                since_beat: Some(2 * S)
            }
        );
        assert_eq!(Membership::new(1).presence(0, S), Presence::NotJoined);
        assert_eq!(m.join(RankRequest::Any, S), Err(JoinError::NoneFree(3)));
        assert_eq!(m.join(RankRequest::Exact(1), S), Err(JoinError::Busy(1)));
        assert_eq!(
            m.join(RankRequest::Exact(7), S),
            Err(JoinError::OutOfRange {
                rank: 7,
                workers: 3
            })
        );
    }

    #[test]
    fn a_replaced_seat_no_longer_speaks_for_the_rank() {
        let mut m = Membership::new(1);
        let old = m.join(RankRequest::Exact(0), Duration::ZERO).unwrap();
        m.beat(0, S);
        assert_eq!(
            m.evict_silent(2 * S, S),
            Vec::<usize>::new(),
            "within the deadline"
        );
        assert_eq!(m.evict_silent(3 * S, S), vec![0]);
        assert!(!m.holds(old));
        let new = m.join(RankRequest::Exact(0), 3 * S).unwrap();
        assert!(!m.leave(old, Departure::Vanished), "the old holder is gone");
        assert!(m.holds(new));
    }

    #[test]
    fn a_new_holder_is_not_evicted_for_the_old_holders_silence() {
        let mut m = Membership::new(1);
        let old = m.join(RankRequest::Exact(0), Duration::ZERO).unwrap();
        m.beat(0, S);
        assert!(m.leave(old, Departure::Vanished));
        // The replacement joins long after the old holder's last beat: its own deadline
        // starts at its join.
        let new = m.join(RankRequest::Any, 60 * S).unwrap();
        assert_eq!(m.evict_silent(60 * S + S / 2, S), Vec::<usize>::new());
        assert!(m.holds(new));
        m.beat(0, 61 * S);
        assert_eq!(m.evict_silent(61 * S + S / 2, S), Vec::<usize>::new());
    }

    #[test]
    fn a_worker_that_never_beats_is_evicted_after_the_deadline() {
        let mut m = Membership::new(2);
        let silent = m.join(RankRequest::Exact(0), S).unwrap();
        m.join(RankRequest::Exact(1), S).unwrap();
        m.beat(1, 2 * S);
        assert_eq!(m.evict_silent(2 * S, S), Vec::<usize>::new());
        assert_eq!(m.evict_silent(2 * S + S / 2, S), vec![0]);
        assert!(!m.holds(silent));
    }

    #[test]
    fn all_departed_needs_every_rank_to_have_joined_and_left() {
        let mut m = Membership::new(2);
        let a = m.join(RankRequest::Exact(0), S).unwrap();
        m.leave(a, Departure::Goodbye);
        assert!(!m.all_departed());
        let b = m.join(RankRequest::Exact(1), S).unwrap();
        assert!(!m.all_departed());
        m.leave(b, Departure::Goodbye);
        assert!(m.all_departed());
        assert!(m.all_said_goodbye());
        let c = m.join(RankRequest::Exact(1), S).unwrap();
        m.leave(c, Departure::Vanished);
        assert!(m.all_departed());
        assert!(!m.all_said_goodbye(), "a vanished worker may come back");
    }
}
