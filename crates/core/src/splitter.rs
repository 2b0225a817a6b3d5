//! Where an element-wise loop over a shard's slice may run in pieces at once. The core starts
//! no threads: a caller with cores to spare (the network layer's shard, whose workers wait
//! while a sync step is applied) injects a `Splitter`; without one every loop runs whole on
//! the caller's thread. A loop cut into pieces gives the same bits as the whole loop: each
//! value's arithmetic is its own (`update_kernels`), and pieces are whole vectors at every
//! width.

/// One piece of a loop, run once.
pub type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

/// Runs the pieces of a loop.
pub trait Splitter: Send + Sync + std::fmt::Debug {
    /// How many pieces a loop over `len` values is worth cutting into (1: run it whole).
    fn pieces(&self, len: usize) -> usize;
    /// Runs every job once, perhaps at the same time; returns when all are done.
    fn run<'a>(&self, jobs: Vec<Job<'a>>);
}

/// Values per piece are a multiple of this (whole 64-byte lines, whole vectors at any width).
const PIECE_ALIGN: usize = 64;

/// The length of each piece (the last may be shorter) of a loop over `len` values cut by
/// `splitter`: `len` itself (at least 1) when there is none or it asks for one piece.
pub fn piece_len(splitter: Option<&dyn Splitter>, len: usize) -> usize {
    let pieces = splitter.map_or(1, |s| s.pieces(len)).max(1);
    if pieces == 1 {
        return len.max(1);
    }
    len.div_ceil(pieces).next_multiple_of(PIECE_ALIGN)
}

/// Runs `jobs`: through `splitter` when there are several, else here, in order.
pub fn run(splitter: Option<&dyn Splitter>, jobs: Vec<Job<'_>>) {
    match splitter {
        Some(s) if jobs.len() > 1 => s.run(jobs),
        _ => jobs.into_iter().for_each(|job| job()),
    }
}

/// `f` over each piece of `values`, the results in the pieces' order.
pub fn map_pieces<T: Sync, R: Send>(
    splitter: Option<&dyn Splitter>,
    values: &[T],
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let piece = piece_len(splitter, values.len());
    let mut results: Vec<Option<R>> = values.chunks(piece).map(|_| None).collect();
    let f = &f;
    let jobs = values
        .chunks(piece)
        .zip(results.iter_mut())
        .map(|(chunk, result)| Box::new(move || *result = Some(f(chunk))) as Job<'_>)
        .collect();
    run(splitter, jobs);
    results.into_iter().flatten().collect()
}

/// `f` over matching pieces of `out` and `values` (of one length).
pub fn zip_pieces<T: Send, U: Sync>(
    splitter: Option<&dyn Splitter>,
    out: &mut [T],
    values: &[U],
    f: impl Fn(&mut [T], &[U]) + Sync,
) {
    let piece = piece_len(splitter, out.len());
    let f = &f;
    let jobs = out
        .chunks_mut(piece)
        .zip(values.chunks(piece))
        .map(|(o, v)| Box::new(move || f(o, v)) as Job<'_>)
        .collect();
    run(splitter, jobs);
}

/// `values` in pieces of `piece`; endless empty pieces when there are no values (a state
/// an optimizer lacks), so that zipping it with the others' pieces cuts nothing short.
pub fn pieces<T>(values: &[T], piece: usize) -> Box<dyn Iterator<Item = &[T]> + '_> {
    if values.is_empty() {
        Box::new(std::iter::repeat(&[][..]))
    } else {
        Box::new(values.chunks(piece))
    }
}

/// `pieces` of a buffer to write.
pub fn pieces_mut<T>(values: &mut [T], piece: usize) -> Box<dyn Iterator<Item = &mut [T]> + '_> {
    if values.is_empty() {
        Box::new(std::iter::repeat_with(|| &mut [][..]))
    } else {
        Box::new(values.chunks_mut(piece))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cuts every loop into a fixed number of pieces, run here backwards (the pieces must
    /// not depend on their order) or each on a thread of its own (as the network layer's
    /// shard does).
    #[derive(Debug)]
    struct Fixed(usize, bool);

    impl Splitter for Fixed {
        fn pieces(&self, _len: usize) -> usize {
            self.0
        }
        fn run<'a>(&self, jobs: Vec<Job<'a>>) {
            if self.1 {
                std::thread::scope(|s| jobs.into_iter().for_each(|job| drop(s.spawn(job))));
            } else {
                jobs.into_iter().rev().for_each(|job| job());
            }
        }
    }

    #[test]
    fn pieces_are_aligned_and_cover_the_loop() {
        assert_eq!(piece_len(None, 1000), 1000);
        assert_eq!(piece_len(None, 0), 1);
        assert_eq!(piece_len(Some(&Fixed(1, false)), 1000), 1000);
        assert_eq!(piece_len(Some(&Fixed(2, false)), 1000), 512);
        assert_eq!(piece_len(Some(&Fixed(3, false)), 1_199_882), 400_000);
        for (len, pieces) in [(1000, 2), (1_199_882, 3), (10, 4), (129, 2)] {
            let piece = piece_len(Some(&Fixed(pieces, false)), len);
            assert_eq!(piece % PIECE_ALIGN, 0);
            assert!(len.div_ceil(piece) <= pieces, "{len} in {pieces}");
        }
    }

    #[test]
    fn every_job_runs_once_through_the_splitter_or_here() {
        for splitter in [None, Some(&Fixed(3, false) as &dyn Splitter)] {
            let mut seen = [0u32; 5];
            let jobs: Vec<Job<'_>> = seen
                .iter_mut()
                .map(|s| Box::new(move || *s += 1) as Job<'_>)
                .collect();
            run(splitter, jobs);
            assert_eq!(seen, [1; 5]);
        }
    }

    #[test]
    fn mapped_and_zipped_pieces_cover_every_value_in_order() {
        let values: Vec<u32> = (0..1000).collect();
        for splitter in [None, Some(&Fixed(3, false) as &dyn Splitter)] {
            let sums = map_pieces(splitter, &values, |c| c.iter().sum::<u32>());
            assert_eq!(sums.iter().sum::<u32>(), 499_500);
            let firsts = map_pieces(splitter, &values, |c| c[0]);
            assert!(
                firsts.windows(2).all(|w| w[0] < w[1]),
                "in order: {firsts:?}"
            );
            let mut out = vec![0u32; 1000];
            zip_pieces(splitter, &mut out, &values, |o, v| {
                o.iter_mut().zip(v).for_each(|(o, &v)| *o = 2 * v)
            });
            assert!(out.iter().enumerate().all(|(i, &o)| o == 2 * i as u32));
        }
    }

    #[test]
    fn an_update_in_pieces_gives_the_bits_of_the_whole_and_rolls_back_whole() {
        use crate::optimizer::{Optimizer, OptimizerConfig, ScaledGrad};
        use std::sync::Arc;
        let len = 5_003;
        let params: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
        let grad = |k: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * k) as f32 * 0.11).cos() * 2.0)
                .collect()
        };
        let configs = [
            OptimizerConfig::sgd(0.1).with_weight_decay(0.01),
            OptimizerConfig::momentum(0.1, 0.9),
            OptimizerConfig::adam(0.01).with_weight_decay(0.01),
        ];
        for config in configs {
            let mut whole = Optimizer::new(config, len);
            let mut cut = Optimizer::new(config, len);
            cut.set_splitter(Some(Arc::new(Fixed(3, true))));
            let (mut a, mut b) = (params.clone(), params.clone());
            for k in 1..5 {
                // Even updates are pushes of sparse sums (Adam counts their gaps).
                let accumulated = k % 2 == 0;
                let mut g = grad(k);
                if accumulated {
                    g.iter_mut().step_by(3).for_each(|v| *v = 0.0);
                }
                let update = ScaledGrad {
                    values: &g,
                    scale: 0.25,
                    accumulated,
                    source: Default::default(),
                };
                assert!(whole.apply_scaled(&mut a, update, 1.0));
                assert!(cut.apply_scaled(&mut b, update, 1.0));
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{config:?}");
            for ((_, x), (_, y)) in whole.state().iter().zip(cut.state().iter()) {
                assert_eq!(bits(x), bits(y), "{config:?}");
            }
            // An update that would make one weight infinite, in the last piece only, changes
            // nothing in any piece.
            let mut bad = grad(5);
            bad[len - 1] = f32::MAX;
            let before = (b.clone(), cut.step());
            let update = ScaledGrad {
                values: &bad,
                scale: 1e30,
                accumulated: false,
                source: Default::default(),
            };
            assert!(!cut.apply_scaled(&mut b, update, 1.0));
            assert_eq!(
                (bits(&b), cut.step()),
                (bits(&before.0), before.1),
                "{config:?}"
            );
        }
    }
}
