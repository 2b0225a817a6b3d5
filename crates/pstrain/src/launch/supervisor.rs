//! The supervisor of a multi-process run, whoever placed the processes (`train --transport
//! tcp`'s local launcher or the Ray driver): it joins the shards as an observer, samples
//! progress, evaluates the weights on the test set when due, and makes the summary.

use crate::flags::parse_flags;
use crate::flags::train::{announce, prepare_train, TrainArgs, TransportArg};
use crate::report::records::Summary;
use crate::report::reporter::Reporter;
use crate::report::Observer;
use crate::run::monitor::{Monitor, ServerView};
pub use crate::run::worker::{parse_report, parse_reports};
use crate::run::{TrainConfig, TrainError, TrainOutcome};
use anyhow::{bail, Context, Result};
use pstrain_compute::mnist::{Mnist, Split};
use pstrain_core::{ShardCounters, WorkerStats};
use pstrain_net::{ClientConfig, Role, RunToken, TcpClient};
use std::path::PathBuf;
use std::time::Instant;

/// The supervisor's window on the shards: an observer connection to each.
pub struct RemoteView {
    client: TcpClient,
    buf: Vec<f32>,
    /// The workers as the shards last reported them.
    workers: Vec<WorkerStats>,
}

impl RemoteView {
    /// Joins every shard of `cfg`'s run as an observer.
    pub fn connect(
        cfg: &TrainConfig,
        servers: Vec<String>,
        token: Option<RunToken>,
    ) -> Result<Self, TrainError> {
        let layout = cfg.model()?.build(Default::default()).layout().clone();
        let mut observer = ClientConfig::new(servers, Role::Observer, 0, cfg.plan.clone(), layout);
        observer.token = token;
        Ok(RemoteView {
            client: TcpClient::connect(&observer)?,
            buf: vec![0.0; observer.layout.len()],
            workers: Vec::new(),
        })
    }
}

impl ServerView for RemoteView {
    fn stats(&mut self) -> Result<ShardCounters, TrainError> {
        let shards = self.client.stats()?;
        // Every gradient goes to every shard: shard 0 counts updates and samples for all;
        // refusals can differ by shard (a NaN may sit in one slice), so take the largest.
        let mut stats = shards.first().map(|s| s.stats).unwrap_or_default();
        self.workers = shards
            .first()
            .map(|s| s.workers.clone())
            .unwrap_or_default();
        for s in shards.iter().skip(1) {
            for (mine, theirs) in self.workers.iter_mut().zip(&s.workers) {
                mine.merge(theirs);
            }
            stats.version = stats.version.min(s.stats.version);
            stats.dropped_stale = stats.dropped_stale.max(s.stats.dropped_stale);
            stats.rejected_nonfinite = stats.rejected_nonfinite.max(s.stats.rejected_nonfinite);
            stats.rejected_other = stats.rejected_other.max(s.stats.rejected_other);
        }
        Ok(stats)
    }

    fn snapshot(&mut self) -> Result<(ShardCounters, Vec<f32>), TrainError> {
        self.client.pull_all(&mut self.buf, None, false)?;
        let stats = self.stats()?;
        Ok((stats, self.buf.clone()))
    }

    fn workers(&mut self) -> Result<Vec<WorkerStats>, TrainError> {
        self.stats()?;
        Ok(self.workers.clone())
    }
}

pub struct Supervisor {
    monitor: Monitor,
    view: RemoteView,
}

impl Supervisor {
    /// Joins the shards (in shard order); the run's clock starts here.
    pub fn connect(
        cfg: &TrainConfig,
        servers: Vec<String>,
        token: Option<RunToken>,
    ) -> Result<Self, TrainError> {
        let view = RemoteView::connect(cfg, servers, token)?;
        Ok(Supervisor {
            monitor: Monitor::new(cfg, cfg.model()?, Instant::now()),
            view,
        })
    }

    /// The shards' version now.
    pub fn version(&mut self) -> Result<u64, TrainError> {
        Ok(self.view.stats()?.version)
    }

    /// One progress sample, and an evaluation when one is due.
    pub fn tick(&mut self, observer: &mut dyn Observer, test: &Split) -> Result<(), TrainError> {
        self.monitor.tick(&mut self.view, observer, test)
    }

    /// The final evaluation and the run's summary; `not_applied` sums the workers' reports.
    pub fn finish(
        mut self,
        cfg: &TrainConfig,
        observer: &mut dyn Observer,
        test: &Split,
        not_applied: u64,
        stopped: bool,
    ) -> Result<TrainOutcome, TrainError> {
        let wall = self.monitor.start().elapsed();
        let end = self.monitor.finish(&mut self.view, observer, test)?;
        Ok(end.into_outcome(cfg, wall, stopped, not_applied))
    }
}

/// A `pstrain train` run whose shards and workers another launcher places (the Ray driver):
/// it gives the flags for them and supervises the run exactly as `--transport tcp` does.
pub struct RemoteRun {
    cfg: TrainConfig,
    shards: usize,
    /// `--data-dir` as given (each worker loads its own copy; without it, each downloads).
    data_dir: Option<PathBuf>,
    data: Mnist,
    reporter: Reporter,
    supervisor: Option<Supervisor>,
    /// The run's token (given, or fresh for this run), for the processes the launcher starts.
    token: RunToken,
}

impl RemoteRun {
    /// Checks the `pstrain train` flags in `argv` and loads the data set (the test set is
    /// evaluated here, the training set's size plans the run).
    pub fn new(argv: &[String]) -> Result<Self> {
        let args = parse_flags::<TrainArgs>("train", argv)?;
        if args.transport != TransportArg::Inproc {
            bail!("--transport does not apply here: the launcher places the processes");
        }
        if args.shards == 0 {
            bail!("--shards must be at least 1");
        }
        let (cfg, data, reporter) = prepare_train(&args)?;
        announce(&cfg)?;
        let token = match args.token.token()? {
            Some(t) => t,
            None => RunToken::generate()?,
        };
        Ok(RemoteRun {
            token,
            cfg,
            shards: args.shards,
            data_dir: args.data.data_dir.clone(),
            data,
            reporter,
            supervisor: None,
        })
    }

    pub fn workers(&self) -> usize {
        self.cfg.plan.workers
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Compute threads per worker.
    pub fn threads(&self) -> usize {
        self.cfg.threads
    }

    /// Whether the shards write checkpoints (so a restarted shard can resume).
    pub fn checkpointing(&self) -> bool {
        self.cfg.checkpoint.is_some()
    }

    /// Flags for every shard's `pstrain server`; the launcher adds `--listen` and `--shard`.
    pub fn server_args(&self) -> Vec<String> {
        let mut args = crate::flags::server::server_argv(&self.cfg, self.shards);
        // On a cluster every shard serves its own page (port 0 in it picks a free port).
        if let Some(addr) = &self.cfg.metrics_addr {
            args.extend(["--metrics-addr".to_string(), addr.clone()]);
        }
        args
    }

    /// Flags for every `pstrain worker`; the launcher adds `--servers` and `--rank`. The
    /// workers take the run plan from the shards.
    pub fn worker_args(&self) -> Vec<String> {
        crate::flags::worker::worker_argv(&self.cfg, self.data_dir.as_deref())
    }

    /// The run's token in hex, for the shards and workers the launcher starts (hand it over
    /// in memory or the environment, never on a command line or in a log).
    pub fn token_hex(&self) -> String {
        self.token.to_hex()
    }

    /// Joins the shards (in shard order) as an observer; the clock starts here.
    pub fn connect(&mut self, servers: Vec<String>) -> Result<()> {
        if servers.len() != self.shards {
            bail!(
                "{} shard addresses given for --shards {}",
                servers.len(),
                self.shards
            );
        }
        let token = Some(self.token.clone());
        self.supervisor = Some(Supervisor::connect(&self.cfg, servers, token)?);
        Ok(())
    }

    /// One progress sample, and an evaluation when one is due.
    pub fn tick(&mut self) -> Result<()> {
        let sup = self
            .supervisor
            .as_mut()
            .context("not connected to the shards")?;
        sup.tick(&mut self.reporter, &self.data.test)?;
        Ok(())
    }

    /// The final evaluation and summary, printed and returned; `reports` are the workers'
    /// JSON reports, `stopped` says the run was cut short.
    pub fn finish(&mut self, reports: &[String], stopped: bool) -> Result<Summary> {
        let sup = self
            .supervisor
            .take()
            .context("not connected to the shards")?;
        let not_applied = reports
            .iter()
            .map(|text| parse_report(text).map(|r| r.not_applied))
            .sum::<Option<u64>>()
            .context("a worker report is unreadable")?;
        let out = sup.finish(
            &self.cfg,
            &mut self.reporter,
            &self.data.test,
            not_applied,
            stopped,
        )?;
        self.reporter.record(&out.summary);
        pstrain_observe::out_line!("{}", out.summary.render());
        self.reporter.close()?;
        Ok(out.summary)
    }
}
