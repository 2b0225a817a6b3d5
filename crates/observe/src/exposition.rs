//! A snapshot in the Prometheus text format (OpenMetrics), with prometheus-client doing the
//! encoding. Names follow Prometheus's rules: a `pstrain_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` on counters (added by the encoder). Counters come from the
//! shard's own monotonic counters, read at scrape time; the latency histograms are observed by
//! the shard as requests are served (`Latencies`).

use crate::snapshot::{RunSnapshot, ShardView};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use pstrain_core::STALENESS_BOUNDS;

type Labels = Vec<(&'static str, String)>;

/// Request latencies and bytes of a TCP shard, observed as it serves (a few atomic adds per
/// request).
#[derive(Debug, Clone)]
pub struct Latencies {
    shard: String,
    push: Family<Labels, Histogram>,
    pull: Family<Labels, Histogram>,
    received: Family<Labels, Counter>,
    sent: Family<Labels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 50 us .. ~26 s.
    Histogram::new(exponential_buckets(5e-5, 2.0, 20))
}

impl Latencies {
    pub fn new(shard: usize) -> Self {
        Latencies {
            shard: shard.to_string(),
            push: Family::new_with_constructor(latency_histogram),
            pull: Family::new_with_constructor(latency_histogram),
            received: Family::default(),
            sent: Family::default(),
        }
    }

    fn labels(&self) -> Labels {
        vec![("shard", self.shard.clone())]
    }

    /// A push took `seconds` from its header to the reply, and carried `bytes`.
    pub fn push(&self, seconds: f64, bytes: u64) {
        let l = self.labels();
        self.push.get_or_create(&l).observe(seconds);
        self.received.get_or_create(&l).inc_by(bytes);
    }

    /// A pull took `seconds` (waiting at the gate included) and sent `bytes`.
    pub fn pull(&self, seconds: f64, bytes: u64) {
        let l = self.labels();
        self.pull.get_or_create(&l).observe(seconds);
        self.sent.get_or_create(&l).inc_by(bytes);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "pstrain_push_duration_seconds",
            "Time to receive a push and answer it (a coordinated step's wait included)",
            self.push.clone(),
        );
        registry.register(
            "pstrain_pull_duration_seconds",
            "Time to answer a pull, waiting at the consistency gate included",
            self.pull.clone(),
        );
        registry.register(
            "pstrain_received_bytes",
            "Gradient bytes received in pushes",
            self.received.clone(),
        );
        registry.register(
            "pstrain_sent_bytes",
            "Weight bytes sent in pulls",
            self.sent.clone(),
        );
    }
}

/// The whole exposition for `snapshot` (and a shard's `latencies`), ending in `# EOF`.
pub fn render_metrics(snapshot: &RunSnapshot, latencies: Option<&Latencies>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    if let Some(l) = latencies {
        l.register(&mut registry);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct SnapshotCollector(RunSnapshot);

/// One metric family: its descriptor, then one sample per label set.
fn family<'a>(
    encoder: &mut DescriptorEncoder<'a>,
    name: &'static str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            // `name{} v` is not valid everywhere: no braces without labels.
            write_value(&mut metric, kind, value)?;
        } else {
            let mut m = metric.encode_family(&labels)?;
            write_value(&mut m, kind, value)?;
        }
    }
    Ok(())
}

fn write_value(m: &mut MetricEncoder<'_>, kind: MetricType, value: f64) -> std::fmt::Result {
    match kind {
        MetricType::Counter => m.encode_counter::<NoLabelSet, _, u64>(&value, None),
        _ => m.encode_gauge(&value),
    }
}

fn shard_label(s: &ShardView) -> Labels {
    vec![("shard", s.shard.to_string())]
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter as C, Gauge as G};
        let snap = &self.0;
        let shards = &snap.shards;
        let per_shard = |f: fn(&ShardView) -> f64| -> Vec<(Labels, f64)> {
            shards.iter().map(|s| (shard_label(s), f(s))).collect()
        };
        family(
            &mut e,
            "pstrain_uptime_seconds",
            "Seconds since the run (or this shard) started",
            G,
            [(vec![], snap.uptime_s)],
        )?;
        family(
            &mut e,
            "pstrain_model_version",
            "Updates applied to the model",
            G,
            per_shard(|s| s.version as f64),
        )?;
        family(
            &mut e,
            "pstrain_gradients_applied",
            "Gradients that went into an update",
            C,
            per_shard(|s| s.gradients_applied as f64),
        )?;
        family(
            &mut e,
            "pstrain_samples_applied",
            "Training samples behind the applied gradients",
            C,
            per_shard(|s| s.samples_applied as f64),
        )?;
        type Count = fn(&ShardView) -> u64;
        let reasons: [(&str, Count); 4] = [
            ("stale", |s| s.dropped_stale),
            ("nonfinite", |s| s.rejected_nonfinite),
            ("refused", |s| s.rejected_other),
            ("rolled_back", |s| s.rolled_back),
        ];
        family(
            &mut e,
            "pstrain_gradients_not_applied",
            "Gradients not applied, by reason (stale or late, non-finite, refused, update rolled back)",
            C,
            shards.iter().flat_map(|s| {
                reasons.iter().map(move |(reason, f)| {
                    let mut l = shard_label(s);
                    l.push(("reason", reason.to_string()));
                    (l, f(s) as f64)
                })
            }),
        )?;
        family(
            &mut e,
            "pstrain_gradients_clipped",
            "Gradients scaled down to --max-grad-norm",
            C,
            per_shard(|s| s.clipped as f64),
        )?;
        let losses: Vec<_> = shards
            .iter()
            .filter_map(|s| s.loss.map(|l| (shard_label(s), f64::from(l))))
            .collect();
        family(
            &mut e,
            "pstrain_training_loss",
            "Moving average of the workers' training loss",
            G,
            losses,
        )?;
        let connections: Vec<_> = shards
            .iter()
            .filter_map(|s| s.connections.map(|c| (shard_label(s), c as f64)))
            .collect();
        family(
            &mut e,
            "pstrain_connections",
            "Open connections to the shard",
            G,
            connections,
        )?;
        let ages: Vec<_> = shards
            .iter()
            .filter_map(|s| s.checkpoint_age_s.map(|a| (shard_label(s), a)))
            .collect();
        family(
            &mut e,
            "pstrain_checkpoint_age_seconds",
            "Seconds since the shard's last checkpoint was written",
            G,
            ages,
        )?;
        let writes: Vec<_> = shards
            .iter()
            .filter_map(|s| s.checkpoint_write_s.map(|a| (shard_label(s), a)))
            .collect();
        family(
            &mut e,
            "pstrain_checkpoint_write_seconds",
            "How long writing the last checkpoint took",
            G,
            writes,
        )?;
        family(
            &mut e,
            "pstrain_checkpoint_failures",
            "Checkpoints the shard could not write (it backs off and says why in its log)",
            C,
            per_shard(|s| s.checkpoint_failures as f64),
        )?;
        if let Some(last) = snap.evals.last() {
            family(
                &mut e,
                "pstrain_test_accuracy_ratio",
                "Accuracy on the test set at the last evaluation",
                G,
                [(vec![], last.accuracy)],
            )?;
            family(
                &mut e,
                "pstrain_test_loss",
                "Loss on the test set at the last evaluation",
                G,
                [(vec![], last.loss)],
            )?;
        }
        self.encode_workers(&mut e)
    }
}

impl SnapshotCollector {
    fn encode_workers(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter as C, Gauge as G};
        let workers: Vec<(Labels, &crate::snapshot::WorkerView)> = self
            .0
            .shards
            .iter()
            .flat_map(|s| {
                s.workers.iter().map(move |w| {
                    let mut l = shard_label(s);
                    l.push(("rank", w.rank.to_string()));
                    (l, w)
                })
            })
            .collect();
        let each = |f: &dyn Fn(&crate::snapshot::WorkerView) -> f64| -> Vec<(Labels, f64)> {
            workers.iter().map(|(l, w)| (l.clone(), f(w))).collect()
        };
        family(
            e,
            "pstrain_worker_gradients_applied",
            "A worker's gradients that went into an update",
            C,
            each(&|w| w.gradients_applied as f64),
        )?;
        family(
            e,
            "pstrain_worker_gradients_not_applied",
            "A worker's gradients not used (stale, late, refused)",
            C,
            each(&|w| w.not_applied as f64),
        )?;
        family(
            e,
            "pstrain_worker_steps_per_second",
            "A worker's gradients per second over the run",
            G,
            each(&|w| w.steps_per_s),
        )?;
        family(
            e,
            "pstrain_worker_wait_seconds",
            "Time a worker's pulls waited at a barrier or the staleness bound",
            C,
            each(&|w| w.wait_s),
        )?;
        family(
            e,
            "pstrain_worker_compute_seconds",
            "Time from serving a worker weights to its gradient arriving",
            C,
            each(&|w| w.compute_s),
        )?;
        family(
            e,
            "pstrain_worker_batch_samples",
            "Samples in the worker's latest gradient",
            G,
            each(&|w| f64::from(w.batch)),
        )?;
        family(
            e,
            "pstrain_worker_lead_max_steps",
            "SSP: the most steps the worker ran ahead of the shard",
            G,
            each(&|w| w.max_lead as f64),
        )?;
        let seen: Vec<_> = workers
            .iter()
            .filter_map(|(l, w)| w.last_seen_s.map(|s| (l.clone(), s)))
            .collect();
        family(
            e,
            "pstrain_worker_last_seen_age_seconds",
            "Seconds since the worker's last heartbeat",
            G,
            seen,
        )?;
        family(
            e,
            "pstrain_worker_state",
            "1 for the worker's state (training, waiting, evicted, gone, finished, not joined)",
            G,
            workers.iter().map(|(l, w)| {
                let mut l = l.clone();
                l.push(("state", w.state.to_string()));
                (l, 1.0)
            }),
        )?;
        let mut metric = e.encode_descriptor(
            "pstrain_worker_staleness_updates",
            "Staleness of a worker's applied gradients, in updates",
            None,
            MetricType::Histogram,
        )?;
        for (labels, w) in &workers {
            let buckets: Vec<(f64, u64)> = STALENESS_BOUNDS
                .iter()
                .zip(&w.staleness_hist)
                .map(|(&bound, &n)| {
                    let le = if bound == u64::MAX {
                        f64::MAX
                    } else {
                        bound as f64
                    };
                    (le, n)
                })
                .collect();
            let mut m = metric.encode_family(labels)?;
            m.encode_histogram::<NoLabelSet>(
                w.staleness_sum as f64,
                w.gradients_applied,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}
