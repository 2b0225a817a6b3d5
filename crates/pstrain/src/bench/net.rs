//! `pstrain bench-net`: what the TCP transport costs. Push and pull throughput and round trip
//! for a layout over 1 and S shards on loopback, next to a plain memcpy of the same bytes;
//! each wire codec's CPU cost on the cnn's size; training samples/s over TCP as a fraction
//! of the in-process run; all from one run.

use super::codecs::{codec_points, CodecPoint};
use super::net_config::NetBenchConfig;
use crate::launch::cluster::{train_tcp, ClusterConfig};
use crate::report::usage::ProcessUsage;
use crate::report::Quiet;
use crate::run::{train, TrainConfig, TrainError};
use pstrain_compute::mnist::Mnist;
use pstrain_compute::ModelKind;
use pstrain_core::{
    Layout, Mode, OptimizerConfig, ParameterClient, PushMeta, RunPlan, ScheduleKind,
};
use pstrain_net::{
    ClientConfig, NetError, Role, RunToken, ShardConfig, ShardHandle, TcpClient, TlsClient,
    TlsServer,
};
use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct TransferPoint {
    pub layout: String,
    /// With a run token (the handshake proves it; the frames after it are the same).
    pub token: bool,
    /// Over TLS (and with a token).
    pub tls: bool,
    pub values: usize,
    pub shards: usize,
    pub reps: usize,
    /// Median seconds of one pull of every shard.
    pub pull_s: f64,
    /// Median seconds of one push to every shard, including the server's SGD apply.
    pub push_s: f64,
    /// Median pull + push round trip.
    pub round_trip_s: f64,
    pub pull_gb_per_s: f64,
    pub push_gb_per_s: f64,
    /// Bytes of one pull plus one push over the median round trip.
    pub push_pull_gb_per_s: f64,
    /// A plain copy of the same bytes (one pull's worth plus one push's worth), same run.
    pub memcpy_gb_per_s: f64,
    /// Median round trip of a stats request (no tensor): the protocol's floor.
    pub small_message_rtt_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TcpTrainingPoint {
    pub model: &'static str,
    pub mode: &'static str,
    pub workers: usize,
    pub shards: usize,
    pub inproc_samples_per_s: f64,
    pub tcp_samples_per_s: f64,
    pub tcp_fraction_of_inproc: f64,
    /// The TCP run's training time and each of its processes' peak memory and CPU seconds:
    /// where the cores went (a worker's system time is mostly its socket copies).
    pub tcp_wall_s: f64,
    pub tcp_processes: Vec<ProcessUsage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetBenchReport {
    pub transfer: Vec<TransferPoint>,
    /// CPU per codec on the cnn's size (what a slow link's savings cost).
    pub codecs: Vec<CodecPoint>,
    pub training: Vec<TcpTrainingPoint>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The run the benchmark's shards serve: async, one worker, a tiny SGD step.
fn bench_plan() -> RunPlan {
    RunPlan {
        model: "bench".into(),
        mode: Mode::Async {
            max_staleness: None,
        },
        workers: 1,
        optimizer: OptimizerConfig::sgd(1e-6),
        schedule: ScheduleKind::Constant,
        ..RunPlan::default()
    }
}

/// Starts `shards` shards for `layout` on 127.0.0.1, one thread each (`pstrain server`'s
/// default).
fn start_servers(
    layout: &Layout,
    shards: usize,
    link: &Link,
) -> Result<Vec<ShardHandle>, NetError> {
    let initial = vec![0.0f32; layout.len()];
    (0..shards)
        .map(|shard| {
            let mut cfg = ShardConfig::new(shard, shards, layout.clone(), bench_plan());
            cfg.io_timeout = Duration::from_secs(120);
            cfg.exit_when_finished = false;
            cfg.token = link.token.clone();
            cfg.tls = link.tls.as_ref().map(|(server, _)| server.clone());
            ShardHandle::start("127.0.0.1:0", cfg, &initial, 1)
        })
        .collect()
}

/// How the benchmark's client reaches the shards.
#[derive(Clone)]
pub struct Link {
    pub token: Option<RunToken>,
    pub tls: Option<(TlsServer, TlsClient)>,
}

impl Link {
    pub fn plain() -> Self {
        Link {
            token: None,
            tls: None,
        }
    }

    /// A token, and TLS with a certificate made on the spot for 127.0.0.1.
    pub fn tls() -> Result<Self, NetError> {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .map_err(|e| NetError::Config(format!("cannot make a certificate: {e}")))?;
        let (cert, key) = (certified.cert.pem(), certified.key_pair.serialize_pem());
        Ok(Link {
            token: Some(RunToken::generate()?),
            tls: Some((
                TlsServer::from_pem(cert.as_bytes(), key.as_bytes())?,
                TlsClient::from_ca_pem(cert.as_bytes())?,
            )),
        })
    }

    fn describe(&self) -> &'static str {
        match (&self.token, &self.tls) {
            (_, Some(_)) => ", token + TLS",
            (Some(_), None) => ", run token",
            (None, None) => "",
        }
    }
}

pub fn transfer_point(
    name: &str,
    layout: &Layout,
    shards: usize,
    reps: usize,
    link: &Link,
) -> Result<TransferPoint, NetError> {
    let servers = start_servers(layout, shards, link)?;
    let addrs = servers.iter().map(|s| s.address().to_string()).collect();
    let mut cfg = ClientConfig::new(addrs, Role::Worker, 0, bench_plan(), layout.clone());
    cfg.token = link.token.clone();
    cfg.tls = link.tls.as_ref().map(|(_, client)| client.clone());
    let mut client = TcpClient::connect(&cfg)?;
    let n = layout.len();
    let mut params = vec![0.0f32; n];
    let grad = vec![1e-3f32; n];
    let (mut pulls, mut pushes, mut trips, mut smalls) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps + 1 {
        let t0 = Instant::now();
        let reply = client.pull_all(&mut params, None, false)?;
        let t1 = Instant::now();
        let meta = PushMeta {
            rank: 0,
            base_version: reply.version,
            samples: 1,
            loss: 0.0,
            accumulated: false,
        };
        client.push_all(meta, &grad)?;
        let t2 = Instant::now();
        client.stats()?;
        let t3 = Instant::now();
        if rep > 0 {
            // The first round trip pays for allocations on both sides; it is not kept.
            pulls.push((t1 - t0).as_secs_f64());
            pushes.push((t2 - t1).as_secs_f64());
            trips.push((t2 - t0).as_secs_f64());
            smalls.push((t3 - t2).as_secs_f64());
        }
    }
    client
        .leave()
        .map_err(|e| NetError::Io(std::io::Error::other(e.to_string())))?;
    for server in servers {
        server.finish()?;
    }

    // The same bytes copied in memory: a pull's worth and a push's worth per repetition.
    let src = vec![0.5f32; n];
    let mut dst = vec![0.0f32; n];
    let mut copies = Vec::new();
    for _ in 0..reps.max(3) {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        dst.copy_from_slice(&grad);
        std::hint::black_box(&dst);
        copies.push(t.elapsed().as_secs_f64());
    }
    let bytes = 4.0 * n as f64;
    let (pull_s, push_s, round_trip_s) = (median(pulls), median(pushes), median(trips));
    Ok(TransferPoint {
        layout: name.into(),
        token: link.token.is_some(),
        tls: link.tls.is_some(),
        values: n,
        shards,
        reps,
        pull_s,
        push_s,
        round_trip_s,
        pull_gb_per_s: bytes / pull_s / 1e9,
        push_gb_per_s: bytes / push_s / 1e9,
        push_pull_gb_per_s: 2.0 * bytes / round_trip_s / 1e9,
        memcpy_gb_per_s: 2.0 * bytes / median(copies) / 1e9,
        small_message_rtt_us: median(smalls) * 1e6,
    })
}

/// Transfers and codecs, and with `training` (the cluster to launch and the data, needed only
/// when `cfg.train_updates` > 0) the training comparisons.
pub fn run_net_bench(
    cfg: &NetBenchConfig,
    training: Option<&(ClusterConfig, Mnist)>,
    progress: &mut dyn FnMut(&str),
) -> Result<NetBenchReport, TrainError> {
    let transfer = transfer_points(cfg, progress)?;
    let cnn_values = ModelKind::Cnn.build(Default::default()).layout().len();
    let codecs = codec_points(cnn_values, 21)
        .map_err(|e| TrainError::Launch(format!("codec bench: {e}")))?;
    for p in &codecs {
        progress(&format!(
            "{} {} of the cnn: {} bytes, encode {:.2} ms, decode {:.2} ms",
            p.direction, p.codec, p.bytes, p.encode_ms, p.decode_ms
        ));
    }
    let mut points = Vec::new();
    let modes = [
        Mode::Sync { backup_workers: 0 },
        Mode::Async {
            max_staleness: None,
        },
    ];
    if let Some((cluster, data)) = training.filter(|_| cfg.train_updates > 0) {
        for mode in modes {
            points.extend(training_points(cfg, mode, cluster, data, progress)?);
        }
    }
    Ok(NetBenchReport {
        transfer,
        codecs,
        training: points,
    })
}

/// Push and pull of the cnn's and a large synthetic layout over each shard count, plain,
/// with a token and over TLS.
fn transfer_points(
    cfg: &NetBenchConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TransferPoint>, TrainError> {
    let cnn = ModelKind::Cnn.build(Default::default()).layout().clone();
    let synthetic = Layout::new([("synthetic", &[cfg.synthetic_values][..])])
        .map_err(|e| TrainError::Launch(e.to_string()))?;
    let mut transfer = Vec::new();
    let token = Link {
        token: Some(RunToken::generate().map_err(NetError::from)?),
        tls: None,
    };
    let points = [
        ("cnn", &cnn, 50, Link::plain()),
        ("cnn", &cnn, 50, token),
        ("cnn", &cnn, 50, Link::tls()?),
        ("synthetic", &synthetic, 5, Link::plain()),
        ("synthetic", &synthetic, 5, Link::tls()?),
    ];
    for (name, layout, reps, link) in points {
        for &shards in &cfg.shard_counts {
            let with = link.describe();
            let p = transfer_point(name, layout, shards, reps, &link)?;
            progress(&format!(
                "{name} ({:.1} MB{with}) over {shards} shard(s): push+pull {:.2} GB/s, round trip {:.2} ms; \
                 memcpy {:.2} GB/s; small message {:.0} us",
                4.0 * layout.len() as f64 / 1e6,
                p.push_pull_gb_per_s,
                p.round_trip_s * 1e3,
                p.memcpy_gb_per_s,
                p.small_message_rtt_us
            ));
            transfer.push(p);
        }
    }
    Ok(transfer)
}

/// The cnn with 2 workers under `mode`, in one process and over TCP with each shard count.
fn training_points(
    cfg: &NetBenchConfig,
    mode: Mode,
    cluster: &ClusterConfig,
    data: &Mnist,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TcpTrainingPoint>, TrainError> {
    let updates = if mode.lockstep() {
        cfg.train_updates
    } else {
        2 * cfg.train_updates
    };
    let tc = TrainConfig {
        plan: RunPlan {
            mode,
            workers: 2,
            iterations: Some(updates),
            train_samples: data.train.len(),
            ..RunPlan::default()
        },
        eval_every: Some(0),
        ..TrainConfig::default()
    };
    let inproc = train(&tc, data, &mut Quiet, &AtomicBool::new(false))?.summary;
    let mut training = Vec::new();
    for &shards in &cfg.train_shard_counts {
        let cluster = ClusterConfig {
            shards,
            ..cluster.clone()
        };
        let tcp = train_tcp(&tc, &cluster, data, &mut Quiet, &AtomicBool::new(false))?.summary;
        let cpu: Vec<String> = tcp
            .processes
            .iter()
            .filter(|p| p.process != "launcher")
            .filter_map(|p| p.cpu_text())
            .collect();
        progress(&format!(
            "train cnn {} 2 workers, {shards} shard(s): in-process {:.0} samples/s, tcp {:.0} samples/s ({:.2}); \
             cpu s (user + system) over {:.1} s: {}",
            mode.name(),
            inproc.samples_per_s,
            tcp.samples_per_s,
            tcp.samples_per_s / inproc.samples_per_s,
            tcp.wall_time_s,
            cpu.join(", ")
        ));
        training.push(TcpTrainingPoint {
            model: "cnn",
            mode: mode.name(),
            workers: 2,
            shards,
            inproc_samples_per_s: inproc.samples_per_s,
            tcp_samples_per_s: tcp.samples_per_s,
            tcp_fraction_of_inproc: tcp.samples_per_s / inproc.samples_per_s,
            tcp_wall_s: tcp.wall_time_s,
            tcp_processes: tcp.processes,
        });
    }
    Ok(training)
}
