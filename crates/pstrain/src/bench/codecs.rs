//! What each wire codec costs in CPU on a cnn-sized slice: a worker's encoding and a shard's
//! decoding of a push, a shard's encoding of a delta pull and a worker's applying it, with
//! the bytes each makes. Part of `pstrain bench-net`: the link is what codecs save, this is
//! what they spend (and what `auto`'s per-rung codec cost stands for).

use pstrain_core::rng::Rng;
use pstrain_core::{
    CodecError, EngineConfig, Mode, PullCodec, PullReplica, PushCodec, PushEncoder, PushMeta,
    Replayer, RunPlan, ServerConfig, ShardEngine, WireRef,
};
use serde::Serialize;
use std::time::Duration;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct CodecPoint {
    /// `push` or `pull`.
    pub direction: &'static str,
    pub codec: String,
    pub values: usize,
    /// Median bytes on the wire.
    pub bytes: usize,
    /// Median ms to encode (the worker for a push, the shard for a delta pull).
    pub encode_ms: f64,
    /// Median ms to decode (the shard for a push, the worker applying a delta).
    pub decode_ms: f64,
}

/// Gradient-like values: signs random, magnitudes spread over four decades (as a real
/// gradient's are; top-k's selection depends on the spread).
fn gradient_like(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| rng.uniform(-1.0, 1.0) * 10f32.powf(rng.uniform(-6.0, -2.0)))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Each repetition's (bytes, seconds encoding, seconds decoding), as a point of medians.
fn point(direction: &'static str, codec: String, values: usize, reps: &[[f64; 3]]) -> CodecPoint {
    let column = |c: usize| median(reps.iter().map(|r| r[c]).collect());
    CodecPoint {
        direction,
        codec,
        values,
        bytes: column(0) as usize,
        encode_ms: 1e3 * column(1),
        decode_ms: 1e3 * column(2),
    }
}

/// Every push codec and delta pull codec `auto` may use, on a slice of `values`, `reps`
/// times each (a fresh gradient each time, so error feedback works as in training). An
/// error is a codec refusing what it made itself.
pub fn codec_points(values: usize, reps: usize) -> Result<Vec<CodecPoint>, CodecError> {
    let mut rng = Rng::new(7);
    let gradients: Vec<Vec<f32>> = (0..reps).map(|_| gradient_like(values, &mut rng)).collect();
    let mut points = Vec::new();
    let top_k = |per_mille| PushCodec::TopK { per_mille };
    let pushes = [PushCodec::Fp32, PushCodec::Bf16, PushCodec::Int8];
    for codec in pushes.into_iter().chain([200, 100, 50, 20, 10].map(top_k)) {
        let mut encoder = PushEncoder::new(codec, 1);
        let (mut wire, mut out) = (Vec::new(), vec![0.0; values]);
        let mut timed = Vec::new();
        for g in &gradients {
            let t = Instant::now();
            encoder.encode(g, &mut wire);
            let encoded = t.elapsed().as_secs_f64();
            let t = Instant::now();
            codec.decode(&wire, &mut out)?;
            timed.push([wire.len() as f64, encoded, t.elapsed().as_secs_f64()]);
        }
        points.push(point("push", codec.to_string(), values, &timed));
    }
    let delta_top_k = |per_mille| PullCodec::DeltaTopK { per_mille };
    for codec in [PullCodec::DeltaInt8, PullCodec::DeltaTernary]
        .into_iter()
        .chain([50, 20, 5].map(delta_top_k))
    {
        let mut weights = gradient_like(values, &mut rng);
        let mut held = weights.clone();
        let mut replica = PullReplica::new(true, 1);
        replica.sent_whole(0, &weights);
        let (mut wire, mut scratch) = (Vec::new(), Vec::new());
        let mut timed = Vec::new();
        for (version, g) in (1..).zip(&gradients) {
            for (w, d) in weights.iter_mut().zip(g) {
                *w -= d;
            }
            let t = Instant::now();
            replica.encode_delta(codec, version, &weights, &mut wire);
            let encoded = t.elapsed().as_secs_f64();
            let t = Instant::now();
            codec.apply_delta(&wire, &mut held, &mut scratch)?;
            timed.push([wire.len() as f64, encoded, t.elapsed().as_secs_f64()]);
        }
        points.push(point("pull", codec.to_string(), values, &timed));
    }
    for per_mille in [100, 20] {
        points.push(replay_point(PushCodec::TopK { per_mille }, &gradients)?);
    }
    Ok(points)
}

/// Replay pulls of a two-worker sync step of `push` (each gradient pushed by both workers,
/// the second's negated and halved): the shard's encoding of the step from its log, and a
/// worker's replaying it (two decodes, the step's sum, Adam, the checksum, the copy out).
fn replay_point(push: PushCodec, gradients: &[Vec<f32>]) -> Result<CodecPoint, CodecError> {
    let values = gradients.first().map_or(0, Vec::len);
    let server = ServerConfig {
        mode: Mode::Sync { backup_workers: 0 },
        ..ServerConfig::default()
    };
    let mut engine = ShardEngine::new(
        EngineConfig::single(server.clone()),
        vec![0.0; values],
        Duration::ZERO,
    )
    .map_err(|e| CodecError::Unknown(e.to_string()))?;
    engine.keep_update_log(RunPlan::update_log_budget(values));
    let mut replayer = Replayer::new(&server, values);
    let (mut wire, mut held) = (Vec::new(), vec![0.0; values]);
    engine.core().write_whole(&mut wire);
    let replayed = |r: &mut Replayer, wire: &[u8], version, held: &mut [f32]| {
        r.apply(wire, version, held)
            .map_err(|e| CodecError::Unknown(e.to_string()))
    };
    replayed(&mut replayer, &wire, 0, &mut held)?;
    let mut encoders = [PushEncoder::new(push, 1), PushEncoder::new(push, 2)];
    let (mut pushed, mut decoded) = (Vec::new(), vec![0.0; values]);
    let mut timed = Vec::new();
    for g in gradients {
        let version = engine.version();
        for (rank, encoder) in encoders.iter_mut().enumerate() {
            let g: Vec<f32> = g.iter().map(|v| v * (1.0 - 1.5 * rank as f32)).collect();
            encoder.encode(&g, &mut pushed);
            push.decode(&pushed, &mut decoded)?;
            let meta = PushMeta {
                rank,
                base_version: version,
                samples: 64,
                loss: 0.0,
                accumulated: true,
            };
            let wire = WireRef::new(push, &pushed);
            let _ = engine.push_decoded(meta, &decoded, Some(wire), None, Duration::ZERO);
        }
        let t = Instant::now();
        if !engine.core().updates_since(version, None, &mut wire) {
            return Err(CodecError::Unknown("the log lost a step".into()));
        }
        let encoded = t.elapsed().as_secs_f64();
        let t = Instant::now();
        replayed(&mut replayer, &wire, engine.version(), &mut held)?;
        timed.push([wire.len() as f64, encoded, t.elapsed().as_secs_f64()]);
    }
    Ok(point(
        "pull",
        format!("replay of 2 x {push}"),
        values,
        &timed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_is_measured_and_compression_shrinks_the_bytes() {
        let points = codec_points(10_000, 3).unwrap();
        assert_eq!(points.len(), 15);
        let bytes = |c: &str| points.iter().find(|p| p.codec == c).unwrap().bytes;
        // A step's replay: both workers' pushes and their heads.
        assert!(bytes("replay of 2 x topk:20") < bytes("replay of 2 x topk:100"));
        assert!(bytes("replay of 2 x topk:100") < 2 * bytes("topk:100") + 200);
        assert_eq!(bytes("fp32"), 40_000);
        assert_eq!(bytes("int8"), 10_000 + 4 * 40);
        assert!(bytes("topk:50") < bytes("topk:100") && bytes("topk:100") < bytes("bf16"));
        assert!(bytes("topk:10") < bytes("topk:20") && bytes("topk:20") < bytes("topk:50"));
        assert!(bytes("delta-topk:5") < bytes("delta-topk:20"));
        // 10,000 values: 40 scales (39 blocks of 256 and one of 16), then 39 * 52 + 4 digit
        // bytes as a section: at most stored (a length of 2 bytes, the mode, the bytes).
        assert!(bytes("delta-ternary") <= 40 * 4 + 3 + 39 * 52 + 4);
        assert!(bytes("delta-ternary") > 40 * 4);
        assert!(points
            .iter()
            .all(|p| p.encode_ms >= 0.0 && p.decode_ms >= 0.0));
    }
}
