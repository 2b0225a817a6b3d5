//! Logging what a shard refuses without letting peers write its log: peer-supplied text is
//! escaped (no newlines or terminal escapes) and cut, and refusal lines are rate-limited (a
//! burst, then one line a second at most, with a count of what was left out).

use std::time::Instant;

/// Lines allowed at once, and how fast the allowance comes back.
const BURST: f64 = 20.0;
const PER_SECOND: f64 = 1.0;
/// The most characters of one refusal's text that are logged.
const MAX_CHARS: usize = 300;

/// A token bucket for refusal lines.
#[derive(Debug)]
pub(super) struct RefusalLog {
    allowance: f64,
    last: Instant,
    /// Lines left out since the last one logged.
    suppressed: u64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            allowance: BURST,
            last: Instant::now(),
            suppressed: 0,
        }
    }
}

impl RefusalLog {
    /// The line to log for `text` now (escaped, cut, with a count of lines left out before
    /// it), or `None` when over the rate.
    pub fn line(&mut self, text: &str, now: Instant) -> Option<String> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.allowance = (self.allowance + elapsed.as_secs_f64() * PER_SECOND).min(BURST);
        if self.allowance < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.allowance -= 1.0;
        let mut line = escape(text);
        if self.suppressed > 0 {
            line.push_str(&format!(
                " ({} refusals before this one not logged)",
                self.suppressed
            ));
            self.suppressed = 0;
        }
        Some(line)
    }
}

/// `text` with control characters (newlines, escapes) written as Rust escapes, cut to
/// `MAX_CHARS` characters.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == MAX_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// How long a full burst takes to come back (for tests).
#[cfg(test)]
fn refill() -> std::time::Duration {
    std::time::Duration::from_secs_f64(BURST / PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_cannot_forge_lines_or_flood() {
        assert_eq!(
            escape("bad\n[shard 0] forged\u{1b}[2J"),
            "bad\\n[shard 0] forged\\u{1b}[2J"
        );
        assert_eq!(escape(&"x".repeat(1000)).len(), MAX_CHARS + 3);
        let mut log = RefusalLog::default();
        let start = Instant::now();
        let logged = (0..1000)
            .filter(|_| log.line("refused", start).is_some())
            .count();
        assert_eq!(logged, BURST as usize);
        // After a while the allowance is back, and the first line says what was left out.
        let later = start + refill();
        let line = log.line("refused", later).unwrap();
        assert!(
            line.contains("980 refusals before this one not logged"),
            "{line}"
        );
    }
}
