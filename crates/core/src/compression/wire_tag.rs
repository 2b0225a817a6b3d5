//! Each codec as the wire names it: a tag and a parameter (top-k's per mille), shared by the
//! run plan, every push (its codec) and every pull request (the codec asked for), and the
//! per-worker record of what a worker chose (`CodecPair`, packed in one `u64`).

use super::{PullCodec, PushCodec};

impl PushCodec {
    /// Its tag (1..=4) and parameter on the wire.
    pub fn to_tag(self) -> (u8, u16) {
        match self {
            PushCodec::Fp32 => (1, 0),
            PushCodec::Bf16 => (2, 0),
            PushCodec::Int8 => (3, 0),
            PushCodec::TopK { per_mille } => (4, per_mille),
        }
    }

    /// The codec a tag names, if it names one (a top-k per mille out of range does not).
    pub fn from_tag(tag: u8, param: u16) -> Option<PushCodec> {
        match tag {
            1 => Some(PushCodec::Fp32),
            2 => Some(PushCodec::Bf16),
            3 => Some(PushCodec::Int8),
            4 => PushCodec::top_k(param),
            _ => None,
        }
    }
}

impl PullCodec {
    /// Its tag (1..=6) and parameter on the wire.
    pub fn to_tag(self) -> (u8, u16) {
        match self {
            PullCodec::Fp32 => (1, 0),
            PullCodec::Bf16 => (2, 0),
            PullCodec::DeltaInt8 => (3, 0),
            PullCodec::DeltaTopK { per_mille } => (4, per_mille),
            PullCodec::DeltaTernary => (5, 0),
            PullCodec::Replay => (6, 0),
        }
    }

    /// The codec a tag names, if it names one.
    pub fn from_tag(tag: u8, param: u16) -> Option<PullCodec> {
        match tag {
            1 => Some(PullCodec::Fp32),
            2 => Some(PullCodec::Bf16),
            3 => Some(PullCodec::DeltaInt8),
            4 => PullCodec::delta_top_k(param),
            5 => Some(PullCodec::DeltaTernary),
            6 => Some(PullCodec::Replay),
            _ => None,
        }
    }
}

/// The codecs a worker's link used last: its latest push's and the latest pull it asked for
/// (`None` before either was seen, or when it has no link).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodecPair {
    pub push: Option<PushCodec>,
    pub pull: Option<PullCodec>,
}

impl CodecPair {
    /// Packed as it travels in a stats reply: push tag, push parameter, pull tag, pull
    /// parameter, 16 bits each (tag 0: not seen).
    pub fn to_raw(self) -> u64 {
        let push = self.push.map_or((0, 0), PushCodec::to_tag);
        let pull = self.pull.map_or((0, 0), PullCodec::to_tag);
        (u64::from(push.0) << 48)
            | (u64::from(push.1) << 32)
            | (u64::from(pull.0) << 16)
            | u64::from(pull.1)
    }

    /// From the packed form; whatever names no codec reads as not seen.
    pub fn from_raw(raw: u64) -> CodecPair {
        let field = |shift: u32| (raw >> shift) as u16;
        CodecPair {
            push: u8::try_from(field(48))
                .ok()
                .and_then(|t| PushCodec::from_tag(t, field(32))),
            pull: u8::try_from(field(16))
                .ok()
                .and_then(|t| PullCodec::from_tag(t, field(0))),
        }
    }
}

impl std::fmt::Display for CodecPair {
    /// `push / pull`, `-` for a side not seen.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.push {
            Some(c) => write!(f, "{c}")?,
            None => f.write_str("-")?,
        }
        f.write_str(" / ")?;
        match self.pull {
            Some(c) => write!(f, "{c}"),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_through_its_tag_and_the_packed_pair() {
        let pushes = [
            PushCodec::Fp32,
            PushCodec::Bf16,
            PushCodec::Int8,
            PushCodec::TopK { per_mille: 500 },
        ];
        let pulls = [
            PullCodec::Fp32,
            PullCodec::Bf16,
            PullCodec::DeltaInt8,
            PullCodec::DeltaTopK { per_mille: 1 },
            PullCodec::DeltaTernary,
            PullCodec::Replay,
        ];
        for push in pushes {
            let (t, p) = push.to_tag();
            assert_eq!(PushCodec::from_tag(t, p), Some(push));
            for pull in pulls {
                let (t, p) = pull.to_tag();
                assert_eq!(PullCodec::from_tag(t, p), Some(pull));
                let pair = CodecPair {
                    push: Some(push),
                    pull: Some(pull),
                };
                assert_eq!(CodecPair::from_raw(pair.to_raw()), pair);
            }
        }
        assert_eq!(CodecPair::from_raw(0), CodecPair::default());
        assert_eq!(CodecPair::default().to_string(), "- / -");
    }

    #[test]
    fn tags_that_name_no_codec_are_refused() {
        assert_eq!(PushCodec::from_tag(0, 0), None);
        assert_eq!(PushCodec::from_tag(5, 0), None);
        assert_eq!(PushCodec::from_tag(4, 0), None, "top-k of nothing");
        assert_eq!(PushCodec::from_tag(4, 501), None);
        assert_eq!(PullCodec::from_tag(4, 9999), None);
        assert_eq!(PullCodec::from_tag(7, 0), None);
        let garbage = CodecPair::from_raw(u64::MAX);
        assert_eq!(garbage, CodecPair::default());
    }
}
