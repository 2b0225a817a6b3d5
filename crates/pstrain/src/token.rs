//! Where a process gets the run's token: `--token-file FILE`, else the `PSTRAIN_TOKEN`
//! environment variable (how launchers hand it to their children: never on a command line).

use anyhow::{Context, Result};
use clap::Args;
use pstrain_net::RunToken;
use std::path::PathBuf;

/// The environment variable a token may come in.
pub const TOKEN_ENV: &str = "PSTRAIN_TOKEN";

#[derive(Args, Debug, Clone, Default)]
pub struct TokenArgs {
    /// File holding the run's token (`pstrain token` makes one) [default: $PSTRAIN_TOKEN]
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token from the file, else from the environment, else none.
    pub fn token(&self) -> Result<Option<RunToken>> {
        if let Some(path) = &self.token_file {
            return Ok(Some(RunToken::from_file(path)?));
        }
        token_from_env()
    }
}

/// `PSTRAIN_TOKEN`, if set.
pub fn token_from_env() -> Result<Option<RunToken>> {
    match std::env::var(TOKEN_ENV) {
        Ok(text) => Ok(Some(
            RunToken::parse(&text).with_context(|| format!("${TOKEN_ENV}"))?,
        )),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("${TOKEN_ENV}")),
    }
}
