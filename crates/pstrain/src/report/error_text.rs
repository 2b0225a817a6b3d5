//! An error and its causes as a person reads them: a cause whose text the error just above
//! it already says (a wrapper whose message quotes its source, `invalid run plan: {0}`) is
//! said once, by the command line and the Python package alike.

/// The causes under `error`, outermost first, without those the one above already says.
pub fn causes_not_said_above(error: &anyhow::Error) -> Vec<String> {
    let mut above = error.to_string();
    let mut causes = Vec::new();
    for cause in error.chain().skip(1).map(|c| c.to_string()) {
        if !above.contains(&cause) {
            causes.push(cause.clone());
        }
        above = cause;
    }
    causes
}

/// The error and its causes on one line, joined by `: ` as anyhow's `{:#}` joins them.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in causes_not_said_above(error) {
        text.push_str(": ");
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_the_error_above_already_says_is_said_once() {
        // "cannot serve on X" over a wrapper that repeats the io error it wraps.
        let repeated = anyhow::anyhow!("invalid socket address")
            .context("invalid socket address")
            .context("cannot serve on nowhere");
        assert_eq!(causes_not_said_above(&repeated), ["invalid socket address"]);
        assert_eq!(
            one_line(&repeated),
            "cannot serve on nowhere: invalid socket address"
        );
        let distinct = anyhow::anyhow!("no such file").context("cannot read a.idx");
        assert_eq!(one_line(&distinct), "cannot read a.idx: no such file");
    }
}
