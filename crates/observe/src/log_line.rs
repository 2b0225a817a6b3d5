//! Lines to stderr and stdout in one write each, so that the lines of processes sharing a
//! terminal or a pipe (a run's shards and worker processes) do not interleave mid-line; and
//! stdout closed by its reader (`pstrain train | head`) ends the process as it ends a Unix
//! tool, not in a panic.

use std::io::Write;

/// Writes `line` and a newline to stderr in one `write` (a pipe takes up to 4 KiB at once
/// without mixing in another process's bytes; `eprintln!` writes each piece of its format
/// separately).
pub fn stderr_line(line: &str) {
    // Nowhere to report a failed log write to.
    let _ = write_line(&mut std::io::stderr().lock(), line);
}

/// Writes `line` and a newline to stdout in one write. If nobody reads stdout any more (a
/// closed pipe, or a launcher that died), the process ends with status 141, as a shell shows
/// a tool ended by SIGPIPE: Rust ignores that signal, and `println!` would panic instead.
pub fn stdout_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let written = write_line(&mut out, line).and_then(|()| out.flush());
    if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
        std::process::exit(141);
    }
}

fn write_line(out: &mut impl Write, line: &str) -> std::io::Result<()> {
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// `eprintln!` whose line reaches stderr whole (see `stderr_line`).
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {
        $crate::stderr_line(&::std::format!($($arg)*))
    };
}

/// `println!` that reaches stdout whole and ends the process quietly if stdout is closed
/// (see `stdout_line`).
#[macro_export]
macro_rules! out_line {
    ($($arg:tt)*) => {
        $crate::stdout_line(&::std::format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each `write` call it is given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_and_its_newline_go_out_in_one_write() {
        let mut out = Writes::default();
        write_line(&mut out, &format!("[shard {}] {}", 1, "done: version 7")).unwrap();
        assert_eq!(out.0, vec![b"[shard 1] done: version 7\n".to_vec()]);
    }
}
