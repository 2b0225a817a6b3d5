//! The codec flags over a plan: `--push-codec` and `--pull-codec`, each a codec or `auto`
//! (each worker picks both from its own link, so `auto` on one side means both).

use super::choices::CodecArg;
use super::plan::{FlagError, RunArgs};
use pstrain_core::{PullCodec, PushCodec, RunPlan};

impl RunArgs {
    /// The codec flags over `plan`'s codecs: `auto` on either side makes both auto; a fixed
    /// codec on either side makes both fixed (the other side as `plan` has it, fp32 if that
    /// was auto).
    pub(super) fn codecs_over(&self, mut plan: RunPlan) -> Result<RunPlan, FlagError> {
        use CodecArg::{Auto, Fixed};
        match (self.push_codec, self.pull_codec) {
            (None, None) => {}
            (Some(Auto), None) | (None, Some(Auto)) | (Some(Auto), Some(Auto)) => {
                plan.auto_codecs = true;
                plan.push_codec = PushCodec::Fp32;
                plan.pull_codec = PullCodec::Fp32;
            }
            (Some(Auto), Some(Fixed(_))) | (Some(Fixed(_)), Some(Auto)) => {
                return Err(FlagError::HalfAuto)
            }
            (push, pull) => {
                if plan.auto_codecs {
                    plan.auto_codecs = false;
                    plan.push_codec = PushCodec::Fp32;
                    plan.pull_codec = PullCodec::Fp32;
                }
                if let Some(Fixed(c)) = push {
                    plan.push_codec = c;
                }
                if let Some(Fixed(c)) = pull {
                    plan.pull_codec = c;
                }
            }
        }
        Ok(plan)
    }
}
