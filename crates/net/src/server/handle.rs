//! A shard on a tokio runtime of its own: bind, serve in the background, stop, wait for its
//! report. The one way the CLI, the Python module, the benchmark and the tests run a shard.

use super::{ShardConfig, ShardReport, ShardServer};
use crate::error::NetError;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct ShardHandle {
    address: SocketAddr,
    metrics_address: Option<SocketAddr>,
    shard: usize,
    rt: tokio::runtime::Runtime,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<ShardReport>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ShardHandle {
    /// Binds `listen` and starts serving on `threads` runtime threads.
    pub fn start(
        listen: &str,
        cfg: ShardConfig,
        initial: &[f32],
        threads: usize,
    ) -> Result<Self, NetError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(format!("pstrain-shard-{}", cfg.shard))
            .enable_all()
            .build()?;
        let shard = cfg.shard;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (address, metrics_address, task) = rt.block_on(async {
            let server = ShardServer::bind(listen, cfg, initial).await?;
            let address = server.local_addr()?;
            let metrics = server.metrics_addr();
            let task = tokio::spawn(server.run(async {
                let _ = stop_rx.await;
            }));
            Ok::<_, NetError>((address, metrics, task))
        })?;
        Ok(ShardHandle {
            address,
            metrics_address,
            shard,
            rt,
            stop: Mutex::new(Some(stop_tx)),
            task: Mutex::new(Some(task)),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Where `/metrics` and the live page are served (with `ShardConfig::metrics_addr`).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Asks the shard to stop (it writes its final checkpoint); `wait` then returns.
    pub fn stop(&self) {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }

    /// Waits until the shard has stopped (the run is over, or `stop` was called), at most
    /// `timeout` (`None`: no limit). `Ok(None)` on timeout; the handle can be waited on again.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<ShardReport>, NetError> {
        let Some(mut task) = lock(&self.task).take() else {
            return Err(NetError::Config(format!(
                "shard {} was already waited for",
                self.shard
            )));
        };
        let outcome = self.rt.block_on(async {
            match timeout {
                Some(d) => tokio::time::timeout(d, &mut task).await.ok(),
                None => Some((&mut task).await),
            }
        });
        match outcome {
            None => {
                *lock(&self.task) = Some(task);
                Ok(None)
            }
            Some(Ok(report)) => Ok(Some(report)),
            Some(Err(e)) => Err(NetError::Io(std::io::Error::other(format!(
                "shard {} failed: {e}",
                self.shard
            )))),
        }
    }

    /// Stops the shard and returns its report.
    pub fn finish(self) -> Result<ShardReport, NetError> {
        self.stop();
        self.wait(None)?.ok_or(NetError::Closed("before reporting"))
    }
}
