//! The `--metrics` file: made anew for a new run; a resumed run goes on after the records
//! the file holds (a partial last line, from a process killed mid-write, is dropped), its
//! times carrying on from the last record's, so one file holds the whole run's history.

use crate::report::records::MetricsWriter;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::Path;

/// How much of a continued file's end is read: many records' worth.
const RESUME_TAIL_BYTES: u64 = 1 << 20;

pub struct MetricsFile {
    out: MetricsWriter<BufWriter<File>>,
    /// Seconds the file's earlier records cover, added to this process's records' times.
    time_offset: f64,
}

impl MetricsFile {
    /// The file at `path`: continued when `resume` and it is a regular file holding
    /// records, else made anew. Anything else, a device or a pipe (`/dev/stdout`) included,
    /// is only written, never read: a continued file's end is all that is read.
    pub fn open(path: &Path, resume: bool) -> Result<Self> {
        let what = || format!("cannot write metrics file {}", path.display());
        let held = std::fs::metadata(path)
            .ok()
            .filter(|meta| resume && meta.is_file())
            .map(|meta| meta.len())
            .filter(|&len| len > 0);
        let Some(len) = held else {
            let file = File::create(path).with_context(what)?;
            return Ok(Self::over(file, 0.0));
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .with_context(what)?;
        // The latest records are at the end: where a partial last line starts, and the
        // time they reached.
        let tail_start = len.saturating_sub(RESUME_TAIL_BYTES);
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(tail_start)).with_context(what)?;
        (&mut file)
            .take(len - tail_start)
            .read_to_end(&mut tail)
            .with_context(what)?;
        let whole_lines = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole_lines == 0 && tail_start > 0 {
            anyhow::bail!(
                "{}: its last {RESUME_TAIL_BYTES} bytes hold no whole line, so it is no \
                 metrics file to continue: give --metrics another path",
                path.display()
            );
        }
        file.set_len(tail_start + whole_lines as u64)
            .with_context(what)?;
        let time_offset = last_time(&tail[..whole_lines]);
        let mut metrics = Self::over(file, time_offset);
        metrics
            .out
            .write(&Resumed {
                event: "resumed",
                time_s: time_offset,
            })
            .with_context(what)?;
        Ok(metrics)
    }

    fn over(file: File, time_offset: f64) -> Self {
        MetricsFile {
            out: MetricsWriter::new(BufWriter::new(file)),
            time_offset,
        }
    }

    /// Writes `record` as one line, its `time_s` moved past the file's earlier records (in
    /// the text, so that the fields keep their order).
    pub fn write<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        if self.time_offset == 0.0 {
            return self.out.write(record);
        }
        let text = serde_json::to_string(record)?;
        self.out.write_raw(&shift_time(&text, self.time_offset))
    }
}

/// `text` with its first `"time_s":` number (the record's own: it comes before any nested
/// record) moved by `offset`; unchanged when it has none.
fn shift_time(text: &str, offset: f64) -> String {
    const KEY: &str = "\"time_s\":";
    let Some(at) = text.find(KEY).map(|i| i + KEY.len()) else {
        return text.to_string();
    };
    let len = text[at..].find([',', '}']).unwrap_or(text.len() - at);
    match text[at..at + len].parse::<f64>() {
        Ok(secs) => format!("{}{}{}", &text[..at], secs + offset, &text[at + len..]),
        Err(_) => text.to_string(),
    }
}

/// Where a resumed run's records start in a continued file.
#[derive(Serialize)]
struct Resumed {
    event: &'static str,
    time_s: f64,
}

/// The latest time the records name: their `time_s`, or a summary's `wall_time_s` (0 if
/// none does).
fn last_time(lines: &[u8]) -> f64 {
    String::from_utf8_lossy(lines)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .flat_map(|rec| {
            let time = |key: &str| rec.get(key).and_then(serde_json::Value::as_f64);
            [time("time_s"), time("wall_time_s")]
        })
        .flatten()
        .filter(|t| t.is_finite() && *t >= 0.0)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_file_keeps_its_records_and_carries_the_time_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        // Two records and a partial third, as a killed process leaves them.
        std::fs::write(
            &path,
            "{\"event\":\"eval\",\"time_s\":1.5}\n{\"event\":\"summary\",\"time_s\":4.0}\n{\"ev",
        )
        .unwrap();
        let mut m = MetricsFile::open(&path, true).unwrap();
        m.write(&serde_json::json!({"event": "eval", "time_s": 0.5}))
            .unwrap();
        drop(m);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "{\"event\":\"eval\",\"time_s\":1.5}",
                "{\"event\":\"summary\",\"time_s\":4.0}",
                "{\"event\":\"resumed\",\"time_s\":4.0}",
                "{\"event\":\"eval\",\"time_s\":4.5}",
            ]
        );
        // Fields keep their order; a record without a time is left as it is.
        assert_eq!(
            shift_time(
                "{\"event\":\"x\",\"time_s\":1.25,\"n\":[{\"time_s\":9}]}",
                2.0
            ),
            "{\"event\":\"x\",\"time_s\":3.25,\"n\":[{\"time_s\":9}]}"
        );
        assert_eq!(
            shift_time("{\"wall_time_s\":1.0}", 2.0),
            "{\"wall_time_s\":1.0}"
        );
        // A new run's file starts over.
        let mut m = MetricsFile::open(&path, false).unwrap();
        m.write(&serde_json::json!({"event": "eval", "time_s": 0.5}))
            .unwrap();
        drop(m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"event\":\"eval\",\"time_s\":0.5}\n");
    }

    #[test]
    fn a_long_file_is_continued_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        // More records than the tail read on resuming, each later than the one before.
        let mut text = String::new();
        for i in 0..40_000 {
            text.push_str(&format!("{{\"event\":\"progress\",\"time_s\":{i}.5}}\n"));
        }
        assert!(text.len() as u64 > RESUME_TAIL_BYTES);
        std::fs::write(&path, format!("{text}{{\"event\":\"pro")).unwrap();
        let mut m = MetricsFile::open(&path, true).unwrap();
        m.write(&serde_json::json!({"event": "eval", "time_s": 1.0}))
            .unwrap();
        drop(m);
        let after = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            after,
            format!(
                "{text}{{\"event\":\"resumed\",\"time_s\":39999.5}}\n\
                 {{\"event\":\"eval\",\"time_s\":40000.5}}\n"
            )
        );
        // Its last MiB without a line break: no metrics file; refused, left as it was.
        let odd = dir.path().join("odd.jsonl");
        let one_line = "x".repeat(RESUME_TAIL_BYTES as usize + 10);
        std::fs::write(&odd, &one_line).unwrap();
        let err = MetricsFile::open(&odd, true).err().unwrap().to_string();
        assert!(err.contains("hold no whole line"), "{err}");
        assert_eq!(std::fs::read_to_string(&odd).unwrap(), one_line);
    }

    #[test]
    fn a_device_is_written_never_read() {
        // `/dev/zero` reads without end: reading it to resume would fill memory. It (like
        // `/dev/stdout` or a pipe) is only written.
        for resume in [true, false] {
            let mut m = MetricsFile::open(Path::new("/dev/zero"), resume).unwrap();
            assert_eq!(m.time_offset, 0.0);
            m.write(&serde_json::json!({"event": "eval", "time_s": 0.5}))
                .unwrap();
        }
    }
}
