//! `Observer`: what hears a run's records as it goes (progress bar, metrics file, live page,
//! tests), and the observers every front end shares.

use crate::report::records::{EvalRecord, ProgressRecord, WorkersRecord};
use pstrain_observe::EvalPoint;
use std::sync::Mutex;

/// Receives what the run reports as it goes (progress bar, metrics file, tests).
pub trait Observer {
    fn progress(&mut self, _record: &ProgressRecord) {}
    fn eval(&mut self, _record: &EvalRecord) {}
    /// Every worker's numbers (at each evaluation and at the end).
    fn workers(&mut self, _record: &WorkersRecord) {}
    /// Something worth a line in the log (checkpoints written, files skipped).
    fn note(&mut self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// Passes everything on, keeping the evaluations for the live page.
pub struct WatchedObserver<'a> {
    pub inner: &'a mut dyn Observer,
    pub evals: &'a Mutex<Vec<EvalPoint>>,
}

impl Observer for WatchedObserver<'_> {
    fn progress(&mut self, r: &ProgressRecord) {
        self.inner.progress(r)
    }
    fn eval(&mut self, r: &EvalRecord) {
        if let Ok(mut e) = self.evals.lock() {
            e.push(EvalPoint {
                time_s: r.time_s,
                samples: r.samples,
                accuracy: r.test_accuracy,
                loss: r.test_loss,
            });
        }
        self.inner.eval(r)
    }
    fn workers(&mut self, r: &WorkersRecord) {
        self.inner.workers(r)
    }
    fn note(&mut self, message: &str) {
        self.inner.note(message)
    }
}
