//! The `pstrain` command line (defined in the library's `cli` module).

use anyhow::Result;
use clap::Parser;
use pstrain::cli;

fn main() -> Result<()> {
    cli::run(cli::Cli::parse())
}
