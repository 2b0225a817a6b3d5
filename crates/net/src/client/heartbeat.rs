//! Heartbeats for one worker rank, sent to every shard from a thread of its own, so that a
//! shard tells a frozen or stopped worker process apart from one that is busy computing.

use super::dial::try_connect_shard;
use super::link::ShardLink;
use super::ClientConfig;
use crate::error::NetError;
use crate::message::{Request, Role};
use pstrain_core::shard_ranges;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// Sends heartbeats every `every` until dropped. Dropping it wakes the thread at once: a
/// worker process exits when its work is done, not up to one heartbeat interval later.
pub struct Heartbeat {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(cfg: &ClientConfig, every: Duration) -> Result<Self, NetError> {
        let (stop, stopped) = watch::channel(false);
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
                    let (cfg, mut stopped) = (&cfg, stopped.clone());
                    let beats = async move {
                        let mut link: Option<ShardLink> = None;
                        loop {
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
                    };
                    // Whatever the loop is waiting on (the interval, a connection attempt, a
                    // write), a stop ends it.
                    async move {
                        tokio::select! {
                            _ = beats => {}
                            _ = stopped.wait_for(|&s| s) => {}
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
        // `send_replace` stores the value even if every receiver is gone already.
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
