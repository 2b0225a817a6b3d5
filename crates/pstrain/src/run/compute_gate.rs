//! A first-come, first-served limit on how many of a process's workers compute at once:
//! light workers (many in one process) share a device's cores instead of time-slicing them
//! by the hundred, and none waits longer than those that asked before it.

use crate::run::device_speed::{DeviceSpeed, SpeedClock};
use pstrain_compute::{ComputeError, EvalStats, Model, StepStats};
use pstrain_core::{Layout, Rng};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

/// The cores this process may use (a board's worker computes on all of them by default).
pub fn device_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// At most `slots` holders at a time, admitted in the order they asked.
#[derive(Debug)]
pub struct ComputeGate {
    slots: u64,
    /// (tickets handed out, holders that left): ticket t may enter once t < left + slots.
    queue: Mutex<(u64, u64)>,
    moved: Condvar,
}

/// A place in the gate, given back when dropped.
pub struct Slot<'a>(&'a ComputeGate);

impl ComputeGate {
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(ComputeGate {
            slots: slots.max(1) as u64,
            queue: Mutex::new((0, 0)),
            moved: Condvar::new(),
        })
    }

    /// Waits for this caller's turn.
    pub fn enter(&self) -> Slot<'_> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let ticket = queue.0;
        queue.0 += 1;
        while ticket >= queue.1 + self.slots {
            queue = self
                .moved
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.1 += 1;
        // Every waiter checks its own ticket; only the next in line goes on.
        self.0.moved.notify_all();
    }
}

/// A model that computes only while it holds a slot of its process's gate; a slow device's
/// extra time is spent after giving the slot back, so it costs the others none.
pub struct GatedModel {
    inner: Box<dyn Model>,
    gate: Arc<ComputeGate>,
    device: SpeedClock,
}

impl GatedModel {
    /// `speed` as `WorkerConfig::speed`, but timed on the compute alone (not on the wait for
    /// a slot), on a clock started now.
    pub fn new(inner: Box<dyn Model>, gate: Arc<ComputeGate>, speed: DeviceSpeed) -> Self {
        GatedModel {
            inner,
            gate,
            device: SpeedClock::start(speed),
        }
    }
}

impl Model for GatedModel {
    fn layout(&self) -> &Layout {
        self.inner.layout()
    }

    fn input_len(&self) -> usize {
        self.inner.input_len()
    }

    fn classes(&self) -> usize {
        self.inner.classes()
    }

    fn values_per_sample(&self) -> usize {
        self.inner.values_per_sample()
    }

    fn init_params(&self, params: &mut [f32], rng: &mut Rng) {
        self.inner.init_params(params, rng)
    }

    fn train_step(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
        grads: &mut [f32],
        rng: &mut Rng,
    ) -> Result<StepStats, ComputeError> {
        let slot = self.gate.enter();
        let started = Instant::now();
        let stats = self.inner.train_step(params, images, labels, grads, rng);
        let took = started.elapsed();
        drop(slot);
        self.device.pace(took);
        stats
    }

    fn evaluate(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u8],
    ) -> Result<EvalStats, ComputeError> {
        let _slot = self.gate.enter();
        self.inner.evaluate(params, images, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn never_more_than_its_slots_and_everyone_gets_through() {
        let gate = ComputeGate::new(2);
        let (inside, most, done) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let _slot = gate.enter();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                        inside.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(done.load(Ordering::SeqCst), 160);
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn callers_enter_in_the_order_they_asked() {
        let gate = ComputeGate::new(1);
        let order = Mutex::new(Vec::new());
        let held = gate.enter();
        std::thread::scope(|s| {
            for i in 0..4 {
                let (gate, order) = (&gate, &order);
                s.spawn(move || {
                    let _slot = gate.enter();
                    order.lock().unwrap().push(i);
                });
                // Each asks after the one before (its ticket is taken before it waits).
                while gate.queue.lock().unwrap().0 < i + 2 {
                    std::thread::yield_now();
                }
            }
            drop(held);
        });
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    }
}
