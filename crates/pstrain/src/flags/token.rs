//! Where a process gets the run's token: `--token-file FILE`, else the `PSTRAIN_TOKEN`
//! environment variable (how launchers hand it to their children: never on a command line).

use anyhow::{Context, Result};
use clap::Args;
use pstrain_net::RunToken;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The environment variable a token may come in.
pub const TOKEN_ENV: &str = "PSTRAIN_TOKEN";

#[derive(Args, Debug, Clone, Default)]
pub struct TokenArgs {
    /// File holding the run's token (`pstrain token` makes one) [default: $PSTRAIN_TOKEN]
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token from the file, else from the environment, else none. A token file that
    /// others than its owner may read is used, with a warning.
    pub fn token(&self) -> Result<Option<RunToken>> {
        if let Some(path) = &self.token_file {
            let token = RunToken::from_file(path)?;
            if let Some(mode) = shared_mode(path) {
                pstrain_observe::log_line!(
                    "warning: token file {} is readable by others than its owner (mode {mode:03o}): \
                     anyone who can read it can join this run; `chmod 600 {}`",
                    path.display(),
                    path.display()
                );
            }
            return Ok(Some(token));
        }
        token_from_env()
    }
}

/// The permission bits of `path` if group or others may read or write it.
fn shared_mode(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o066 != 0).then_some(mode)
}

#[derive(Args, Debug, Clone, Default)]
pub struct TokenOutArgs {
    /// Write the token to this new file, readable and writable by its owner only (an
    /// existing file or link there is refused) [default: print it]
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
}

/// `pstrain token`: a fresh token, to a new owner-only file or to standard output (with a
/// warning when that is a file others may read, as `> run.token` makes under the usual
/// umask).
pub fn make_token(args: &TokenOutArgs) -> Result<()> {
    let hex = RunToken::generate()?.to_hex();
    let Some(path) = &args.out else {
        pstrain_observe::out_line!("{hex}");
        if let Some(mode) = stdout_shared_mode() {
            pstrain_observe::log_line!(
                "warning: the token went to a file others than its owner may read (mode \
                 {mode:03o}); `chmod 600` it, or use `pstrain token -o FILE`"
            );
        }
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    writeln!(file, "{hex}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Standard output's permission bits if it is a regular file group or others may access.
fn stdout_shared_mode() -> Option<u32> {
    let fd = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    let mode = meta.permissions().mode() & 0o777;
    (meta.is_file() && mode & 0o066 != 0).then_some(mode)
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
