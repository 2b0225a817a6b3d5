//! The `pstrain` command line (defined in the library's `cli` module).

use clap::Parser;
use pstrain::cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            pstrain_observe::log_line!("Error: {}", with_causes(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and what caused it, as anyhow prints them, but never with a backtrace: a bad
/// flag or file is the user's to fix, not a stack to read, even where `RUST_BACKTRACE` is set
/// (panics keep theirs).
fn with_causes(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    let causes: Vec<String> = error.chain().skip(1).map(|c| c.to_string()).collect();
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
