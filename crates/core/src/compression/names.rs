//! Each codec as a user names it (`fp32`, `topk:20`, `delta-ternary`, ...): its `Display`
//! and `FromStr`, which refuses an unknown name or a per mille out of range by name.

use super::{CodecError, PullCodec, PushCodec};
use std::fmt;
use std::str::FromStr;

impl fmt::Display for PushCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushCodec::Fp32 => f.write_str("fp32"),
            PushCodec::Bf16 => f.write_str("bf16"),
            PushCodec::Int8 => f.write_str("int8"),
            PushCodec::TopK { per_mille } => write!(f, "topk:{per_mille}"),
        }
    }
}

impl fmt::Display for PullCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullCodec::Fp32 => f.write_str("fp32"),
            PullCodec::Bf16 => f.write_str("bf16"),
            PullCodec::DeltaInt8 => f.write_str("delta-int8"),
            PullCodec::DeltaTopK { per_mille } => write!(f, "delta-topk:{per_mille}"),
            PullCodec::DeltaTernary => f.write_str("delta-ternary"),
            PullCodec::Replay => f.write_str("replay"),
        }
    }
}

impl FromStr for PushCodec {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        match s {
            "fp32" => Ok(PushCodec::Fp32),
            "bf16" => Ok(PushCodec::Bf16),
            "int8" => Ok(PushCodec::Int8),
            _ => with_per_mille(s, "topk:", PushCodec::top_k),
        }
    }
}

impl FromStr for PullCodec {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        match s {
            "fp32" => Ok(PullCodec::Fp32),
            "bf16" => Ok(PullCodec::Bf16),
            "delta-int8" => Ok(PullCodec::DeltaInt8),
            "delta-ternary" => Ok(PullCodec::DeltaTernary),
            "replay" => Ok(PullCodec::Replay),
            _ => with_per_mille(s, "delta-topk:", PullCodec::delta_top_k),
        }
    }
}

/// A codec named `PREFIX` + a per mille, made by `make` (which refuses one out of range).
fn with_per_mille<T>(s: &str, prefix: &str, make: fn(u16) -> Option<T>) -> Result<T, CodecError> {
    let Some(p) = s.strip_prefix(prefix) else {
        return Err(CodecError::Unknown(s.into()));
    };
    let per_mille: u16 = p.parse().map_err(|_| CodecError::PerMille(p.into()))?;
    make(per_mille).ok_or_else(|| CodecError::PerMille(p.into()))
}
