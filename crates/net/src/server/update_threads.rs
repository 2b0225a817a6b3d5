//! The threads a shard lends its optimizer's update (`pstrain_core::Splitter`): the core
//! starts none, and in sync mode every worker waits while a step is applied, so the host's
//! other cores would sit idle through the step's longest loop.

use pstrain_core::{Job, Splitter};

/// Below this many values a loop runs whole: a thread costs more than it saves.
const MIN_PIECE: usize = 1 << 18;
/// At most this many pieces (the update is bound by memory bandwidth well before).
const MAX_THREADS: usize = 4;

/// Runs a loop's pieces on scoped threads, the last on the caller's.
#[derive(Debug)]
pub(super) struct UpdateThreads {
    threads: usize,
}

impl UpdateThreads {
    /// As many threads as the host has cores, up to `MAX_THREADS`; `None` on one core.
    pub fn for_host() -> Option<Self> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = cores.min(MAX_THREADS);
        (threads > 1).then_some(UpdateThreads { threads })
    }
}

impl Splitter for UpdateThreads {
    fn pieces(&self, len: usize) -> usize {
        (len / MIN_PIECE).clamp(1, self.threads)
    }

    fn run<'a>(&self, mut jobs: Vec<Job<'a>>) {
        let Some(here) = jobs.pop() else { return };
        std::thread::scope(|s| {
            for job in jobs {
                s.spawn(job);
            }
            here();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_loops_run_whole_and_large_ones_in_pieces_up_to_the_threads() {
        let t = UpdateThreads { threads: 2 };
        assert_eq!(t.pieces(1000), 1);
        assert_eq!(t.pieces(MIN_PIECE * 2 - 1), 1);
        assert_eq!(t.pieces(1_199_882), 2);
        assert_eq!(UpdateThreads { threads: 4 }.pieces(1_199_882), 4);
        let mut done = [false; 3];
        let jobs: Vec<Job<'_>> = done
            .iter_mut()
            .map(|d| Box::new(move || *d = true) as Job<'_>)
            .collect();
        t.run(jobs);
        assert_eq!(done, [true; 3]);
    }
}
