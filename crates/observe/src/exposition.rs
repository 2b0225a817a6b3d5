//! A snapshot in the Prometheus text format (OpenMetrics), with prometheus-client doing the
//! encoding. Names follow Prometheus's rules: a `pstrain_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` on counters (added by the encoder). Counters come from the
//! shard's own monotonic counters, read at scrape time; the latency histograms are observed by
//! the shard as requests are served (`Latencies`).

use crate::families::{
    ShardFamily, NOT_APPLIED_REASONS, SHARD_FAMILIES, SHARD_FAMILIES_LATE, WORKER_FAMILIES,
};
use crate::snapshot::{RunSnapshot, ShardView, WorkerView};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use pstrain_core::{STALENESS_BOUNDS, WORKER_FIELDS};

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
        let snap = &self.0;
        family(
            &mut e,
            "pstrain_uptime_seconds",
            "Seconds since the run (or this shard) started",
            MetricType::Gauge,
            [(vec![], snap.uptime_s)],
        )?;
        self.encode_shard_families(&mut e, SHARD_FAMILIES)?;
        family(
            &mut e,
            "pstrain_gradients_not_applied",
            "Gradients not applied, by reason (stale or late, non-finite, refused, update rolled back)",
            MetricType::Counter,
            snap.shards.iter().flat_map(|s| {
                NOT_APPLIED_REASONS.iter().map(move |(reason, f)| {
                    let mut l = shard_label(s);
                    l.push(("reason", reason.to_string()));
                    (l, f(s) as f64)
                })
            }),
        )?;
        self.encode_shard_families(&mut e, SHARD_FAMILIES_LATE)?;
        if let Some(last) = snap.evals.last() {
            let test = [
                (
                    "pstrain_test_accuracy_ratio",
                    "Accuracy on the test set at the last evaluation",
                    last.accuracy,
                ),
                (
                    "pstrain_test_loss",
                    "Loss on the test set at the last evaluation",
                    last.loss,
                ),
            ];
            for (name, help, value) in test {
                family(&mut e, name, help, MetricType::Gauge, [(vec![], value)])?;
            }
        }
        self.encode_workers(&mut e)
    }
}

impl SnapshotCollector {
    fn encode_shard_families(
        &self,
        e: &mut DescriptorEncoder,
        families: &[ShardFamily],
    ) -> Result<(), std::fmt::Error> {
        for f in families {
            let samples = self
                .0
                .shards
                .iter()
                .filter_map(|s| (f.value)(s).map(|v| (shard_label(s), v)));
            family(e, f.name, f.help, f.kind, samples)?;
        }
        Ok(())
    }

    fn encode_workers(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let workers: Vec<(Labels, &WorkerView)> = self
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
        for field in WORKER_FIELDS {
            let Some(exported) = field.prometheus else {
                continue;
            };
            let kind = if exported.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let samples = workers
                .iter()
                .map(|(l, w)| (l.clone(), (field.get)(&w.numbers).as_f64()));
            family(e, exported.name, exported.help, kind, samples)?;
        }
        for f in WORKER_FAMILIES {
            let samples = workers
                .iter()
                .filter_map(|(l, w)| (f.value)(w).map(|v| (l.clone(), v)));
            family(e, f.name, f.help, f.kind, samples)?;
        }
        family(
            e,
            "pstrain_worker_state",
            "1 for the worker's state (training, waiting, evicted, gone, finished, not joined)",
            MetricType::Gauge,
            workers.iter().map(|(l, w)| {
                let mut l = l.clone();
                l.push(("state", w.state.to_string()));
                (l, 1.0)
            }),
        )?;
        encode_staleness(e, &workers)
    }
}

/// Each worker's staleness histogram.
fn encode_staleness(
    e: &mut DescriptorEncoder,
    workers: &[(Labels, &WorkerView)],
) -> Result<(), std::fmt::Error> {
    let mut metric = e.encode_descriptor(
        "pstrain_worker_staleness_updates",
        "Staleness of a worker's applied gradients, in updates",
        None,
        MetricType::Histogram,
    )?;
    for (labels, w) in workers {
        let buckets: Vec<(f64, u64)> = STALENESS_BOUNDS
            .iter()
            .zip(&w.numbers.staleness_hist)
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
            w.numbers.staleness_sum as f64,
            w.numbers.applied,
            &buckets,
            None,
        )?;
    }
    Ok(())
}
