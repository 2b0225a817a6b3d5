//! How a run shows itself: a progress bar on a terminal, plain log lines elsewhere, and every
//! record mirrored into the `--metrics` JSON-lines file.

use crate::report::metrics_file::MetricsFile;
use crate::report::records::{EvalRecord, ProgressRecord, WorkersRecord};
use crate::report::Observer;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

/// Shows progress as a bar on a terminal and as plain log lines elsewhere, and mirrors every
/// record into the metrics file.
pub struct Reporter {
    pub bar: Option<ProgressBar>,
    metrics: Option<MetricsFile>,
    pub metrics_error: Option<std::io::Error>,
    last_line: Instant,
    last_accuracy: Option<f64>,
    total_samples: u64,
}

impl Reporter {
    /// A reporter of a run of `total_samples`; a resumed run (`resume`) continues its
    /// metrics file instead of starting it over.
    pub fn new(total_samples: u64, metrics: Option<&Path>, resume: bool) -> Result<Self> {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(total_samples);
            if let Ok(style) = ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30.cyan/blue} {percent:>3}% {msg}",
            ) {
                bar.set_style(style.progress_chars("##-"));
            }
            bar
        });
        let metrics = metrics.map(|p| MetricsFile::open(p, resume)).transpose()?;
        Ok(Reporter {
            bar,
            metrics,
            metrics_error: None,
            last_line: Instant::now(),
            last_accuracy: None,
            total_samples,
        })
    }

    pub fn record<T: serde::Serialize>(&mut self, record: &T) {
        let Some(Err(e)) = self.metrics.as_mut().map(|m| m.write(record)) else {
            return;
        };
        // Keep training, say so now (a long run should not hide it until its end), and end
        // the run with the error.
        self.note(&format!(
            "writing the metrics file failed ({e}): training goes on without it, and the \
             run will end with this error"
        ));
        self.metrics_error.get_or_insert(e);
        self.metrics = None;
    }

    fn line(&self, r: &ProgressRecord) -> String {
        let secs = r.time_s.max(1e-9);
        format!(
            "epoch {:.2} | {} updates ({:.1}/s) | {:.0} samples/s | loss {} | test acc {}",
            r.epoch,
            r.updates,
            r.updates as f64 / secs,
            r.samples as f64 / secs,
            r.loss.map_or("-".into(), |l| format!("{l:.4}")),
            self.last_accuracy
                .map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
        )
    }
}

impl Observer for Reporter {
    fn progress(&mut self, r: &ProgressRecord) {
        let line = self.line(r);
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.samples.min(self.total_samples));
                bar.set_message(line);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                pstrain_observe::out_line!("{line}");
                self.last_line = Instant::now();
            }
            None => {}
        }
        self.record(r);
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => pstrain_observe::log_line!("{message}"),
        }
    }

    fn eval(&mut self, r: &EvalRecord) {
        self.last_accuracy = Some(r.test_accuracy);
        let line = format!(
            "eval: {} updates, epoch {:.2}: test accuracy {:.2}%, test loss {:.4}",
            r.updates,
            r.epoch,
            r.test_accuracy * 100.0,
            r.test_loss
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => pstrain_observe::out_line!("{line}"),
        }
        self.record(r);
    }

    fn workers(&mut self, r: &WorkersRecord) {
        self.record(r);
    }
}

impl Reporter {
    /// Clears the bar and fails if the metrics file could not be written.
    pub fn close(&mut self) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some(e) = self.metrics_error.take() {
            anyhow::bail!("training finished but writing the metrics file failed: {e}");
        }
        Ok(())
    }
}
