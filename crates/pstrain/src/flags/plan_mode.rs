//! The mode flags over a plan's mode: `--mode` and the one parameter each mode takes
//! (`--backup-workers`, `--max-staleness`, `--max-lead`, `--buffer`), refusing a parameter
//! given to a mode that has none of it.

use super::choices::ModeArg;
use super::plan::{FlagError, RunArgs};
use pstrain_core::Mode;

const DEFAULT_MAX_STALENESS: u64 = 32;
const DEFAULT_MAX_LEAD: u64 = 3;
/// FedBuff's buffer in its paper.
const DEFAULT_BUFFER: usize = 10;

impl RunArgs {
    pub(super) fn mode_over(&self, base: Mode) -> Result<Mode, FlagError> {
        let kind = self.mode.unwrap_or(match base {
            Mode::Sync { .. } => ModeArg::Sync,
            Mode::Async { .. } => ModeArg::Async,
            Mode::Ssp { .. } => ModeArg::Ssp,
            Mode::Buffered { .. } => ModeArg::Buffered,
        });
        if kind != ModeArg::Buffered && self.buffer.is_some() {
            return Err(FlagError::OnlyFor {
                flag: "--buffer",
                mode: "buffered",
            });
        }
        if kind != ModeArg::Sync && self.backup_workers.is_some_and(|b| b > 0) {
            return Err(FlagError::BackupsInAsync);
        }
        if kind == ModeArg::Sync && self.max_staleness.is_some() {
            // A sync step uses only gradients of its own weights: there is no staleness.
            return Err(FlagError::OnlyFor {
                flag: "--max-staleness",
                mode: "async or buffered",
            });
        }
        if kind != ModeArg::Ssp && self.max_lead.is_some() {
            return Err(FlagError::OnlyFor {
                flag: "--max-lead",
                mode: "ssp",
            });
        }
        Ok(match kind {
            ModeArg::Sync => Mode::Sync {
                backup_workers: self.backup_workers.unwrap_or(base.backup_workers()),
            },
            ModeArg::Async => Mode::Async {
                max_staleness: self.staleness_over(base),
            },
            ModeArg::Buffered => Mode::Buffered {
                k: self.buffer.unwrap_or(match base {
                    Mode::Buffered { k, .. } => k,
                    _ => DEFAULT_BUFFER,
                }),
                max_staleness: self.staleness_over(base),
            },
            ModeArg::Ssp => {
                if self.max_staleness.is_some() {
                    // The two bounds are different ideas; say which one SSP has.
                    return Err(FlagError::OnlyFor {
                        flag: "--max-staleness (SSP's bound is --max-lead)",
                        mode: "async",
                    });
                }
                let base_lead = match base {
                    Mode::Ssp { max_lead } => max_lead,
                    _ => DEFAULT_MAX_LEAD,
                };
                Mode::Ssp {
                    max_lead: self.max_lead.unwrap_or(base_lead),
                }
            }
        })
    }

    /// `--max-staleness` over `base`'s bound (0: none), for async and buffered.
    fn staleness_over(&self, base: Mode) -> Option<u64> {
        let base_bound = match base {
            Mode::Async { max_staleness } | Mode::Buffered { max_staleness, .. } => max_staleness,
            Mode::Sync { .. } | Mode::Ssp { .. } => Some(DEFAULT_MAX_STALENESS),
        };
        self.max_staleness
            .map_or(base_bound, |s| (s > 0).then_some(s))
    }
}
