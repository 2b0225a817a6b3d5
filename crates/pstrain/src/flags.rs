//! Parsing one command's flags from an argument list, for front ends that take the very same
//! flags as the `pstrain` binary (the Python package, the Ray driver).

use anyhow::Result;
use clap::{Args, FromArgMatches};

/// Parses `argv` as the flags of `pstrain NAME`; the error carries clap's message (with usage).
pub fn parse_flags<T: Args + FromArgMatches>(name: &'static str, argv: &[String]) -> Result<T> {
    let cmd = T::augment_args(clap::Command::new(name).no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(argv)
        .map_err(|e| anyhow::anyhow!("{}", e.render()))?;
    T::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{}", e.render()))
}
