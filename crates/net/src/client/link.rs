//! One shard as the client sees it: its connection, its key range and codecs, and the calls
//! made to it (pull, push, stats, goodbye); what to ask of it is `pstrain_core::FanOut`'s.

use crate::connection::Connection;
use crate::error::NetError;
use crate::frame::Header;
use crate::lane::Lane;
use crate::message::Pulled;
use crate::message::{
    kind, PushHead, PushReply, Reply, Request, StatsReply, StepMembers, PULLED_LEN, REPLY_LIMIT,
    WORKER_STATS_LEN,
};
use pstrain_core::{
    AutoCodec, PullCodec, PullReply, PushEncoder, PushMeta, ReplayError, Replayer, RunPlan,
};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

pub(super) struct ShardLink {
    pub conn: Connection,
    /// Shared memory with a shard on this host, which fp32 tensors cross instead of `conn`
    /// (shared: a worker computing in it keeps it mapped past this link, `TcpClient::lane`).
    pub lane: Option<Arc<Lane>>,
    pub range: Range<usize>,
    /// The version of the shard's weights when this link was made (its slice is pulled
    /// first; from then on `pstrain_core::FanOut` keeps the version of each slice held).
    pub joined_version: u64,
    /// How this shard's slice of the weights arrives (the run plan's pull codec).
    pub pull_codec: PullCodec,
    /// How this client's gradient slice leaves, with its error feedback (the plan's push
    /// codec).
    pub encoder: PushEncoder,
    /// Encoded bytes, reused between calls.
    pub wire: Vec<u8>,
    /// A decoded pull difference, reused between calls.
    pub delta: Vec<f32>,
    /// Seconds spent receiving this shard's slice since the last push (first byte of the
    /// reply to last), which the next push reports.
    pub pull_s: f32,
    /// Under `auto`: this link as measured, and the codecs it picks before each push.
    pub auto: Option<AutoCodec>,
    /// Under replay pulls: the shard's optimizer for this slice, which makes its updates.
    pub replayer: Option<Replayer>,
}

impl ShardLink {
    /// Pulls this shard's slice into `slice` (when the shard sends it: newer than `newer`).
    pub async fn pull(
        &mut self,
        slice: &mut [f32],
        newer: Option<u64>,
        wait: bool,
        wait_timeout: Duration,
    ) -> Result<PullReply, NetError> {
        let asked_lane = self.lane.is_some() && self.pull_codec == PullCodec::Fp32;
        let request = Request::Pull {
            newer_than: newer,
            wait,
            codec: self.pull_codec,
            lane: asked_lane,
        };
        self.conn.send_request(&request, 0, &[]).await?;
        let idle = if wait {
            wait_timeout
        } else {
            self.conn.io_timeout()
        };
        let n = slice.len();
        let header = self.read_pull_header(idle, n).await?;
        let first_byte = std::time::Instant::now();
        let head = self.conn.read_bytes(PULLED_LEN).await?;
        let Reply::Pulled(pulled) = Reply::decode(header.kind, &head, 0)? else {
            return Err(NetError::Closed("with a garbled pull reply"));
        };
        let updated = pulled.updated;
        if let Some(auto) = &mut self.auto {
            auto.peers_replay(pulled.peers_push);
        }
        let body = header.len - PULLED_LEN as u64;
        // A difference only when asked relative to what this link holds, and at most the
        // codec's largest; its exact shape is the decoder's to check.
        if self.pull_codec == PullCodec::Replay && updated {
            return self.take_replay(pulled, body, slice, first_byte).await;
        }
        let delta = pulled.delta && updated && newer.is_some() && self.pull_codec.is_delta();
        // Through the lane: only a whole slice the worker asked for that way, nothing after.
        let in_lane = pulled.in_lane;
        let fits = match (updated, delta) {
            (false, _) => body == 0 && !pulled.delta && !in_lane,
            (true, true) => body <= self.pull_codec.delta_len(n) as u64 && !in_lane,
            (true, false) if in_lane => !pulled.delta && asked_lane && body == 0,
            (true, false) => !pulled.delta && body == self.pull_codec.encoded_len(n) as u64,
        };
        if !fits {
            return Err(NetError::Malformed {
                what: "pull reply",
                why: format!(
                    "{body} tensor bytes (updated {updated}, delta {})",
                    pulled.delta
                ),
            });
        }
        if delta {
            self.wire.resize(body as usize, 0);
            self.conn.read_into(&mut self.wire).await?;
            self.pull_codec
                .apply_delta(&self.wire, slice, &mut self.delta)
                .map_err(|e| NetError::Malformed {
                    what: "pull reply",
                    why: e.to_string(),
                })?;
        } else if let (true, Some(lane)) = (in_lane, &self.lane) {
            lane.read(true, slice);
        } else if updated {
            self.read_slice(slice, body as usize).await?;
        }
        let took = first_byte.elapsed();
        self.pull_s += took.as_secs_f32();
        let bytes = if in_lane { 4 * n as u64 } else { body };
        if let Some(auto) = &mut self.auto {
            auto.received(bytes, took.as_secs_f64());
            if delta {
                auto.pulled(self.pull_codec, body, n);
            }
        }
        Ok(PullReply::from(pulled))
    }

    /// Reads a replay pull's body of `body` bytes and makes its updates (or takes its whole
    /// slice and optimizer state) into `slice`.
    async fn take_replay(
        &mut self,
        pulled: Pulled,
        body: u64,
        slice: &mut [f32],
        first_byte: std::time::Instant,
    ) -> Result<PullReply, NetError> {
        let n = slice.len();
        let replayer = self.replayer.as_mut().ok_or(NetError::Malformed {
            what: "pull reply",
            why: "replay asked for without the run's optimizer".into(),
        })?;
        if !pulled.delta || pulled.in_lane || body > replay_max_body(n) as u64 {
            return Err(NetError::Malformed {
                what: "pull reply",
                why: format!("a replay of {body} bytes (delta {})", pulled.delta),
            });
        }
        self.wire.resize(body as usize, 0);
        self.conn.read_into(&mut self.wire).await?;
        replayer
            .apply(&self.wire, pulled.version, slice)
            .map_err(replay_error)?;
        let took = first_byte.elapsed();
        self.pull_s += took.as_secs_f32();
        if let Some(auto) = &mut self.auto {
            auto.received(body, took.as_secs_f64());
            if self.wire.first() == Some(&pstrain_core::replay::FORM_UPDATES) {
                auto.replayed(body);
            }
        }
        Ok(PullReply::from(pulled))
    }

    /// The header of a pull's answer, of at most the pull codec's largest size for `n`
    /// values; an error answer (or anything else) becomes the error.
    async fn read_pull_header(&mut self, idle: Duration, n: usize) -> Result<Header, NetError> {
        let largest = self
            .pull_codec
            .encoded_len(n)
            .max(self.pull_codec.delta_len(n))
            .max(if self.pull_codec == PullCodec::Replay {
                replay_max_body(n)
            } else {
                0
            });
        let limit = (PULLED_LEN + largest) as u64;
        let header = self
            .conn
            .read_header(idle, limit.max(REPLY_LIMIT))
            .await?
            .ok_or(NetError::Closed("before replying to a pull"))?;
        if header.kind != kind::PULL_REPLY {
            // An error (or something unexpected): small, read whole.
            if header.len > REPLY_LIMIT {
                return Err(NetError::Malformed {
                    what: "pull reply",
                    why: format!("{}-byte reply of kind {:#x}", header.len, header.kind),
                });
            }
            let bytes = self.conn.read_bytes(header.len as usize).await?;
            return Err(match Reply::decode(header.kind, &bytes, 0)? {
                Reply::Error(f) => NetError::Remote(f),
                _ => NetError::Unexpected {
                    got: header.kind,
                    expected: "pull reply",
                },
            });
        }
        if header.len < PULLED_LEN as u64 {
            return Err(NetError::Malformed {
                what: "pull reply",
                why: format!("{} bytes", header.len),
            });
        }
        Ok(header)
    }

    /// Reads a pulled slice of `body` bytes into `slice`, decoding it per the pull codec.
    async fn read_slice(&mut self, slice: &mut [f32], body: usize) -> Result<(), NetError> {
        if self.pull_codec != PullCodec::Bf16 {
            return self.conn.read_f32s(slice).await;
        }
        self.wire.resize(body, 0);
        self.conn.read_into(&mut self.wire).await?;
        self.pull_codec
            .decode(&self.wire, slice)
            .map_err(|e| NetError::Malformed {
                what: "pull reply",
                why: e.to_string(),
            })
    }

    /// Under `auto`: the step before this push computed for `seconds`.
    pub fn computed(&mut self, seconds: f64) {
        if let Some(auto) = &mut self.auto {
            auto.computed(seconds);
        }
    }

    /// Under `auto`: the worker's last step computed for `seconds` while this link pushed
    /// and pulled.
    pub fn computed_beside(&mut self, seconds: f64) {
        if let Some(auto) = &mut self.auto {
            auto.computed_beside(seconds);
        }
    }

    /// Pushes this shard's slice, computed from weights of `base_version` (tagged with a
    /// coordinated step if any), and reads the verdict, waiting up to `reply_timeout`. Under
    /// `auto` the link's codecs are picked first (the push's, and the next pulls').
    pub async fn push(
        &mut self,
        meta: PushMeta,
        base_version: u64,
        slice: &[f32],
        step: Option<StepMembers>,
        workers: usize,
        reply_timeout: Duration,
    ) -> Result<PushReply, NetError> {
        if let Some(auto) = &mut self.auto {
            let rung = auto.choose(slice.len());
            self.encoder.set_codec(rung.push);
            self.pull_codec = rung.pull;
            if rung.pull != PullCodec::Replay {
                // `auto` left replay for good: the optimizer's copy is no longer needed.
                self.replayer = None;
            }
        }
        let head = PushHead {
            base_version,
            samples: meta.samples,
            loss: meta.loss,
            pull_s: std::mem::take(&mut self.pull_s),
            codec: self.encoder.codec(),
            lane: false,
            own: self.auto.as_ref().and_then(AutoCodec::own_push),
            step,
        };
        let lane = self.lane.as_ref().filter(|_| self.encoder.passes_through());
        if let Some(replayer) = &mut self.replayer {
            // What the shard will leave out of the next pull's updates.
            if lane.is_some() {
                replayer.forget_push();
            } else if self.encoder.passes_through() {
                replayer.pushed_values(slice);
            }
        }
        let sent = if let Some(lane) = lane {
            lane.write(false, slice);
            let request = Request::Push(PushHead { lane: true, ..head });
            self.conn.send_request(&request, workers, &[]).await?;
            4 * slice.len()
        } else if self.encoder.passes_through() {
            let request = Request::Push(head);
            self.conn.send_request(&request, workers, slice).await?;
            4 * slice.len()
        } else {
            let request = Request::Push(head);
            self.encoder.encode(slice, &mut self.wire);
            if let Some(replayer) = &mut self.replayer {
                replayer.pushed(self.encoder.codec(), &self.wire);
            }
            self.conn
                .write_frame_bytes(request.kind(), &request.encode(workers), &self.wire)
                .await?;
            self.wire.len()
        };
        match self
            .conn
            .read_reply(reply_timeout, REPLY_LIMIT, workers)
            .await?
        {
            Reply::Pushed(reply) => {
                if let Some(auto) = &mut self.auto {
                    auto.sent(sent as u64, f64::from(reply.arrive_s));
                    auto.pushed(self.encoder.codec(), sent as u64, slice.len());
                }
                Ok(reply)
            }
            other => Err(NetError::Unexpected {
                got: other.kind(),
                expected: "push reply",
            }),
        }
    }

    pub async fn stats(&mut self, workers: usize) -> Result<StatsReply, NetError> {
        self.conn.send_request(&Request::Stats, 0, &[]).await?;
        let io = self.conn.io_timeout();
        let limit = REPLY_LIMIT + (workers * WORKER_STATS_LEN) as u64;
        match self.conn.read_reply(io, limit, 0).await? {
            Reply::Stats(s) => Ok(s),
            other => Err(NetError::Unexpected {
                got: other.kind(),
                expected: "stats reply",
            }),
        }
    }

    pub async fn goodbye(&mut self) -> Result<(), NetError> {
        self.conn.send_request(&Request::Goodbye, 0, &[]).await?;
        let io = self.conn.io_timeout();
        match self.conn.read_reply(io, REPLY_LIMIT, 0).await? {
            Reply::GoodbyeOk => {
                self.conn.shutdown().await;
                Ok(())
            }
            other => Err(NetError::Unexpected {
                got: other.kind(),
                expected: "goodbye reply",
            }),
        }
    }
}

/// The largest replay pull's body for a slice of `n` values under the shards' log budget.
fn replay_max_body(n: usize) -> usize {
    pstrain_core::replay::max_body(n, RunPlan::update_log_budget(n))
}

/// A replay pull's failure as the client acts on it: a body that is not one is malformed
/// (the run stops, as for any garbled reply); updates that did not lead to the shard's
/// weights, or started elsewhere, leave the copy unknown and a new connection mends it.
fn replay_error(e: ReplayError) -> NetError {
    match e {
        ReplayError::Diverged { .. } | ReplayError::NotHeld { .. } => {
            NetError::Resync(e.to_string())
        }
        _ => NetError::Malformed {
            what: "pull reply",
            why: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay that diverged, or began at another version, makes the worker connect again
    /// (and be sent the whole); a garbled body stops it.
    #[test]
    fn a_diverged_replay_rejoins_and_a_garbled_one_does_not() {
        assert!(replay_error(ReplayError::Diverged { from: 3 }).rejoins());
        let elsewhere = ReplayError::NotHeld {
            from: 3,
            held: Some(2),
        };
        assert!(replay_error(elsewhere).rejoins());
        assert!(!replay_error(ReplayError::Malformed("cut short".into())).rejoins());
    }
}
