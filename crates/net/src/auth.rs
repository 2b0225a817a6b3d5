//! The run token and the mutual challenge-response that proves both ends hold it before any
//! state leaves a shard. The secret never crosses the wire: each side sends a fresh random
//! nonce, and each proves itself with an HMAC-SHA256 keyed by the token over both nonces (the
//! peer's proof also covers every byte of its hello: role, rank, shard, plan and layout, so
//! a shard checks it before it decodes any of them).
//!
//! ```text
//! peer  -> shard   AUTH      nonce_p
//! shard -> peer    CHALLENGE nonce_s, HMAC(token, "pstrain/5 shard" | nonce_p | nonce_s)
//! peer  -> shard   HELLO     ..., HMAC(token, "pstrain/5 hello" | nonce_p | nonce_s | hello body)
//!                  (or DESCRIBE with HMAC(token, "pstrain/5 describe" | nonce_p | nonce_s))
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use thiserror::Error;

pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
pub type Nonce = [u8; NONCE_LEN];
pub type Proof = [u8; PROOF_LEN];

/// The proof a peer without a token sends (a shard without a token ignores it).
pub const NO_PROOF: Proof = [0; PROOF_LEN];

pub(crate) const SHARD_LABEL: &[u8] = b"pstrain/5 shard";
pub(crate) const HELLO_LABEL: &[u8] = b"pstrain/5 hello";
pub(crate) const DESCRIBE_LABEL: &[u8] = b"pstrain/5 describe";

/// Random bytes a token has (hex-encoded, twice as many characters).
const TOKEN_BYTES: usize = 32;
/// The shortest secret accepted.
const MIN_TOKEN_BYTES: usize = 16;
/// A token file longer than this is refused unread (a token is 64 hex digits and a newline).
const MAX_TOKEN_FILE_BYTES: u64 = 64 << 10;

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("the run token must be hex digits (as `pstrain token` prints), at least {} of them", 2 * MIN_TOKEN_BYTES)]
    Format,
    #[error("cannot read the token file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
}

/// The secret every process of one run shares.
#[derive(Clone, PartialEq, Eq)]
pub struct RunToken {
    secret: Vec<u8>,
}

impl std::fmt::Debug for RunToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself: configurations get printed.
        f.write_str("RunToken(..)")
    }
}

/// Fresh random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], TokenError> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(out)
}

impl RunToken {
    /// A new random token.
    pub fn generate() -> Result<Self, TokenError> {
        Ok(RunToken {
            secret: random_bytes::<TOKEN_BYTES>()?.to_vec(),
        })
    }

    /// A token from its hex form (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() < 2 * MIN_TOKEN_BYTES || !text.len().is_multiple_of(2) || text.len() > 1024 {
            return Err(TokenError::Format);
        }
        let secret = (0..text.len())
            .step_by(2)
            .map(|i| {
                let pair = text.get(i..i + 2).ok_or(TokenError::Format)?;
                u8::from_str_radix(pair, 16).map_err(|_| TokenError::Format)
            })
            .collect::<Result<Vec<u8>, _>>()?;
        Ok(RunToken { secret })
    }

    /// A token from a file holding its hex form.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text =
            pstrain_store::read_text_at_most(path, MAX_TOKEN_FILE_BYTES).map_err(|source| {
                TokenError::File {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        Self::parse(&text)
    }

    pub fn to_hex(&self) -> String {
        self.secret.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self, label: &[u8], peer: &Nonce, shard: &Nonce, claims: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        for part in [label, peer, shard, claims] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac
    }

    /// A public name for what `context` describes within this token's run (e.g. the run id
    /// of its checkpoints): 16 hex digits of an HMAC, so it says nothing about the secret.
    pub fn derive_id(&self, context: &[u8]) -> String {
        let tag = self
            .mac(b"pstrain id", &[0; NONCE_LEN], &[0; NONCE_LEN], context)
            .finalize()
            .into_bytes();
        tag[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key this run's checkpoint files and manifests are sealed with: derived, so the
    /// files say nothing about the token itself.
    pub fn file_key(&self) -> pstrain_store::FileKey {
        let tag = self
            .mac(b"pstrain file key", &[0; NONCE_LEN], &[0; NONCE_LEN], &[])
            .finalize()
            .into_bytes();
        pstrain_store::FileKey::new(tag.into())
    }

    /// The proof for `label` over both nonces and `claims`.
    pub fn prove(&self, label: &[u8], peer: &Nonce, shard: &Nonce, claims: &[u8]) -> Proof {
        self.mac(label, peer, shard, claims)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a proof in constant time.
    pub fn verify(
        &self,
        label: &[u8],
        peer: &Nonce,
        shard: &Nonce,
        claims: &[u8],
        proof: &Proof,
    ) -> bool {
        self.mac(label, peer, shard, claims)
            .verify_slice(proof)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_need_the_same_token_label_nonces_and_claims() {
        let t = RunToken::generate().unwrap();
        let (a, b) = (random_bytes::<32>().unwrap(), random_bytes::<32>().unwrap());
        let p = t.prove(HELLO_LABEL, &a, &b, b"worker 1");
        assert!(t.verify(HELLO_LABEL, &a, &b, b"worker 1", &p));
        assert!(
            !t.verify(SHARD_LABEL, &a, &b, b"worker 1", &p),
            "no reflection"
        );
        assert!(!t.verify(HELLO_LABEL, &b, &a, b"worker 1", &p));
        assert!(!t.verify(HELLO_LABEL, &a, &b, b"worker 2", &p));
        let other = RunToken::generate().unwrap();
        assert!(!other.verify(HELLO_LABEL, &a, &b, b"worker 1", &p));
    }

    #[test]
    fn tokens_round_trip_as_hex_and_bad_text_is_refused() {
        let t = RunToken::generate().unwrap();
        let hex = t.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(RunToken::parse(&format!(" {hex}\n")).unwrap(), t);
        assert!(RunToken::parse("abc").is_err());
        assert!(RunToken::parse(&"zz".repeat(20)).is_err());
        assert!(RunToken::parse(&"a".repeat(33)).is_err());
        assert!(
            !format!("{t:?}").contains(&hex[..8]),
            "Debug hides the secret"
        );
    }
}
