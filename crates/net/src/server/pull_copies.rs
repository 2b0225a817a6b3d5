//! The copies of a shard's weights that pulls are sent from (outside the engine's lock):
//! pulls of one version share one, and in modes whose pulls do not wait, no more than a
//! budget's worth are alive at once, however many slow links are still being sent theirs.

use std::sync::Arc;

pub(super) struct PullCopies {
    /// The copies the shard holds with their versions, the newest last. One another holder
    /// shares (`Arc::strong_count` above 1) is being sent; the others are free to refill.
    copies: Vec<(u64, Arc<Vec<f32>>)>,
    /// Copies alive at once, at least 2.
    max_alive: usize,
    /// A pull may be answered with weights older than the shard's (its mode's pulls do not
    /// wait at a gate, so any version newer than the worker's will do).
    may_lag: bool,
}

impl PullCopies {
    pub fn new(max_alive: usize, may_lag: bool) -> Self {
        PullCopies {
            copies: Vec::new(),
            max_alive: max_alive.max(2),
            may_lag,
        }
    }

    /// The weights to send a pull from a worker holding `newer_than`, and their version: the
    /// shard's `params` at `version` (the newest copy if the version has not moved; else a
    /// free copy refilled in place, else a new one). When `max_alive` copies are still being
    /// sent and the mode allows it, the newest of them instead; `None` if that is not newer
    /// than what the worker holds.
    pub fn for_pull(
        &mut self,
        version: u64,
        params: &[f32],
        newer_than: Option<u64>,
    ) -> Option<(u64, Arc<Vec<f32>>)> {
        if let Some((v, copy)) = self.copies.last() {
            if *v == version {
                return Some((version, copy.clone()));
            }
        }
        // Copies no pull is sending any more: one is refilled, the rest let go.
        let sending = |copy: &Arc<Vec<f32>>| Arc::strong_count(copy) > 1;
        let free = (self.copies.iter())
            .position(|(_, copy)| !sending(copy))
            .map(|i| self.copies.remove(i).1);
        self.copies.retain(|(_, copy)| sending(copy));
        let copy = match free {
            Some(mut copy) => {
                if let Some(buf) = Arc::get_mut(&mut copy) {
                    buf.clear();
                    buf.extend_from_slice(params);
                }
                copy
            }
            None if self.may_lag && self.copies.len() >= self.max_alive => {
                let (v, copy) = self.copies.last()?;
                return newer_than
                    .is_none_or(|n| *v > n)
                    .then(|| (*v, copy.clone()));
            }
            None => Arc::new(params.to_vec()),
        };
        self.copies.push((version, copy.clone()));
        Some((version, copy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_of_one_version_share_a_copy_and_a_free_copy_is_refilled() {
        let mut copies = PullCopies::new(2, true);
        let (v, a) = copies.for_pull(1, &[1.0; 4], None).unwrap();
        let (_, b) = copies.for_pull(1, &[9.0; 4], None).unwrap();
        assert_eq!(v, 1);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let (v, c) = copies.for_pull(2, &[2.0; 4], None).unwrap();
        assert_eq!((v, c[0]), (2, 2.0));
        assert_eq!(copies.copies.len(), 1, "refilled, not copied again");
    }

    #[test]
    fn past_the_budget_a_pull_that_may_lag_gets_the_newest_copy_still_sent() {
        let mut copies = PullCopies::new(2, true);
        let (_, sending_v1) = copies.for_pull(1, &[1.0; 4], None).unwrap();
        let (_, sending_v2) = copies.for_pull(2, &[2.0; 4], None).unwrap();
        // Two copies are being sent: version 3 is not copied.
        let (v, w) = copies.for_pull(3, &[3.0; 4], Some(1)).unwrap();
        assert_eq!((v, w[0]), (2, 2.0));
        assert!(Arc::ptr_eq(&w, &sending_v2));
        // A worker that holds version 2 already is told nothing newer.
        assert!(copies.for_pull(3, &[3.0; 4], Some(2)).is_none());
        // Once a copy is sent, the shard's own weights are copied again.
        drop((sending_v1, w));
        let (v, w) = copies.for_pull(3, &[3.0; 4], Some(2)).unwrap();
        assert_eq!((v, w[0]), (3, 3.0));
        drop(sending_v2);
    }

    #[test]
    fn where_pulls_wait_at_a_gate_they_always_get_the_shards_version() {
        let mut copies = PullCopies::new(2, false);
        let held: Vec<_> = (1..=4)
            .map(|v| copies.for_pull(v, &[v as f32; 4], None).unwrap())
            .collect();
        assert!(held
            .iter()
            .enumerate()
            .all(|(i, (v, _))| *v == i as u64 + 1));
    }
}
