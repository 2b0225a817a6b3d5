//! Heartbeats for one worker rank, sent to every shard from a thread of its own, so that a
//! shard tells a frozen or stopped worker process apart from one that is busy computing.

use super::dial::try_connect_shard;
use super::link::ShardLink;
use super::ClientConfig;
use crate::error::NetError;
use crate::message::{Request, Role};
use pstrain_core::shard_ranges;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Sends heartbeats every `every` until dropped.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(cfg: &ClientConfig, every: Duration) -> Result<Self, NetError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let cfg = ClientConfig {
            role: Role::Heartbeat,
            ..cfg.clone()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            let ranges = shard_ranges(cfg.layout.len(), cfg.servers.len());
            // One loop per shard, so a shard that is down does not silence the others.
            let loops = cfg
                .servers
                .iter()
                .zip(ranges)
                .enumerate()
                .map(|(i, (addr, range))| {
                    let (cfg, flag) = (&cfg, &flag);
                    async move {
                        let mut link: Option<ShardLink> = None;
                        while !flag.load(Ordering::Relaxed) {
                            if link.is_none() {
                                link = try_connect_shard(cfg, i, addr, range.clone())
                                    .await
                                    .ok()
                                    .map(|(shard, _)| shard);
                            }
                            if let Some(l) = link.as_mut() {
                                if l.conn
                                    .send_request(&Request::Heartbeat, 0, &[])
                                    .await
                                    .is_err()
                                {
                                    link = None;
                                }
                            }
                            tokio::time::sleep(every).await;
                        }
                    }
                });
            rt.block_on(futures_util::future::join_all(loops));
        });
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
