//! Every command's flags, and beside each the argv builder that reproduces them for a launched
//! process (round-trip tested in `argv_tests.rs`); `parse_flags` for front ends that take the
//! very same flags as the `pstrain` binary (the Python package, the Ray driver).

pub mod checkpoint;
pub mod choices;
pub mod device;
pub mod plan;
mod plan_codecs;
mod plan_mode;
pub mod run_id;
pub mod server;
pub mod token;
pub mod train;
pub mod worker;

#[cfg(test)]
mod argv_tests;

use anyhow::{bail, Result};
use clap::{Args, FromArgMatches};
use std::time::Duration;

/// Parses `argv` as the flags of `pstrain NAME`; the error carries clap's message (with usage).
pub fn parse_flags<T: Args + FromArgMatches>(name: &'static str, argv: &[String]) -> Result<T> {
    let cmd = negative_values(T::augment_args(
        clap::Command::new(name).no_binary_name(true),
    ));
    let matches = cmd
        .try_get_matches_from(argv)
        .map_err(|e| anyhow::anyhow!("{}", e.render()))?;
    T::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{}", e.render()))
}

/// `cmd` with every flag that takes a value taking a negative number too: `--lr -0.1`
/// reaches the check that says why it is refused, where clap alone reads `-0.1` as an
/// unknown flag (`unexpected argument '-0' found`).
pub fn negative_values(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|arg| {
        if arg.get_action().takes_values() {
            arg.allow_negative_numbers(true)
        } else {
            arg
        }
    })
}

/// Seconds from a flag, refusing what `Duration` cannot hold.
pub fn seconds(flag: &str, s: f64) -> Result<Duration> {
    if s.is_finite() && s > 0.0 && s < 1e9 {
        Ok(Duration::from_secs_f64(s))
    } else {
        bail!("{flag} must be a positive number of seconds below 1e9, not {s}")
    }
}
