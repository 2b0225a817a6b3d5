//! The `pstrain` command line (defined in the library's `cli` module).

use clap::FromArgMatches;
use pstrain::cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    let flags = cli::command().get_matches();
    let parsed = cli::Cli::from_arg_matches(&flags).unwrap_or_else(|e| e.exit());
    match cli::run(parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            pstrain_observe::log_line!("Error: {}", with_causes(&error));
            ExitCode::from(pstrain::run::error::exit_status(&error))
        }
    }
}

/// The error and what caused it, as anyhow prints them, but never with a backtrace: a bad
/// flag or file is the user's to fix, not a stack to read, even where `RUST_BACKTRACE` is set
/// (panics keep theirs). A cause whose text the error above it already says (a wrapper whose
/// message quotes its source, `invalid run plan: {0}`) is not said twice.
fn with_causes(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    let causes = pstrain::report::error_text::causes_not_said_above(error);
    if !causes.is_empty() {
        text.push_str("\n\nCaused by:");
        for (i, cause) in causes.iter().enumerate() {
            match causes.len() {
                1 => text.push_str(&format!("\n    {cause}")),
                _ => text.push_str(&format!("\n    {i}: {cause}")),
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("lr must be finite and > 0, got NaN")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("invalid run plan: {0}")]
    struct Quoting(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("bad file")]
    struct Plain(#[source] Inner);

    #[test]
    fn a_cause_the_error_above_already_says_is_said_once() {
        let error = anyhow::Error::new(Quoting(Inner)).context("invalid training flags");
        assert_eq!(
            with_causes(&error),
            "invalid training flags\n\nCaused by:\n    invalid run plan: lr must be finite and > 0, got NaN"
        );
        let error = anyhow::Error::new(Plain(Inner)).context("cannot start");
        assert_eq!(
            with_causes(&error),
            "cannot start\n\nCaused by:\n    0: bad file\n    1: lr must be finite and > 0, got NaN"
        );
    }
}
