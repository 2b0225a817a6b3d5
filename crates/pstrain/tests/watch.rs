//! Watching a real run: `/metrics` scraped during `pstrain train` on MNIST (the counters move,
//! the histograms are well formed), the live page loaded in headless Chromium (the worker
//! table filled in, the curve drawn, a screenshot saved), and `pstrain plot` rendering a
//! recorded run to PNG and SVG.

mod common;
#[path = "../../../test-support/scrape.rs"]
mod scrape;

use pstrain::{train, Observer, RunPlan, ScheduleKind, TrainConfig};
use pstrain_compute::ModelKind;
use pstrain_core::{Mode, OptimizerConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Passes the watcher's URL on as soon as the run announces it.
struct UrlCatcher(mpsc::Sender<String>);

impl Observer for UrlCatcher {
    fn note(&mut self, message: &str) {
        if let Some(url) = message.strip_prefix("metrics and live page at ") {
            let _ = self.0.send(url.to_string());
        }
    }
}

/// A cnn run long enough to be watched (about half a minute), evaluating often.
fn watched_run() -> TrainConfig {
    TrainConfig {
        plan: RunPlan {
            mode: Mode::Ssp { max_lead: 2 },
            workers: 2,
            model: ModelKind::Cnn.name().into(),
            iterations: Some(500),
            batch_size: 32,
            optimizer: OptimizerConfig::adam(1e-3),
            schedule: ScheduleKind::Constant,
            ..RunPlan::default()
        },
        eval_every: Some(100),
        slowdown: vec![(1, 2.0)],
        metrics_addr: Some("127.0.0.1:0".into()),
        ..TrainConfig::default()
    }
}

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let r = scrape::get(addr, "/metrics", "");
    assert_eq!(r.status, 200, "{}", r.body);
    scrape::parse(&r.body)
}

fn value(s: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape::value(s, name, &[]).unwrap_or_else(|| panic!("{name} missing"))
}

/// Chromium from the distribution, if installed (CI installs it).
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

fn headless(chrome: &Path, args: &[&str]) -> String {
    let out = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--window-size=1000,900",
        ])
        .args(args)
        .output()
        .expect("chromium runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_live_run_is_scraped_and_its_page_drawn() {
    let _guard = common::one_at_a_time();
    let (tx, rx) = mpsc::channel();
    let run = std::thread::spawn(move || {
        train(
            &watched_run(),
            common::mnist(),
            &mut UrlCatcher(tx),
            &AtomicBool::new(false),
        )
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the run announces its URL");
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();

    // Two scrapes a few seconds apart: the counters move, the histograms are well formed.
    std::thread::sleep(Duration::from_secs(3));
    let first = scrape(addr);
    std::thread::sleep(Duration::from_secs(4));
    let second = scrape(addr);
    for name in [
        "pstrain_model_version",
        "pstrain_gradients_applied_total",
        "pstrain_samples_applied_total",
    ] {
        assert!(
            value(&second, name) > value(&first, name),
            "{name} did not move"
        );
    }
    let histograms: Vec<_> = second
        .samples
        .iter()
        .filter(|s| s.metric == "pstrain_worker_staleness_updates")
        .collect();
    assert_eq!(histograms.len(), 2, "one per worker");
    for h in histograms {
        let prometheus_parse::Value::Histogram(buckets) = &h.value else {
            panic!("{:?}", h.value)
        };
        let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(buckets.last().map(|b| b.less_than), Some(f64::INFINITY));
        assert!(counts.last().copied().unwrap_or(0.0) > 0.0);
    }

    // The live page in a real browser, while the run goes on.
    match chromium() {
        Some(chrome) => {
            let started = Instant::now();
            let dom = headless(&chrome, &["--dump-dom", &url]);
            assert!(
                dom.contains("data-rank=\"0\"") && dom.contains("data-rank=\"1\""),
                "{dom}"
            );
            let points: usize = dom
                .split("data-points=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(points > 0, "the curve was not drawn: {dom}");
            assert!(dom.contains("training") || dom.contains("waiting"), "{dom}");
            let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-page.png");
            headless(
                &chrome,
                &[&format!("--screenshot={}", shot.display()), &url],
            );
            let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
            assert!(
                size > 10_000,
                "screenshot {} is {size} bytes",
                shot.display()
            );
            println!(
                "live page screenshot: {} ({:.1} s)",
                shot.display(),
                started.elapsed().as_secs_f64()
            );
        }
        None if std::env::var_os("CI").is_some() => panic!("CI must install chromium"),
        None => eprintln!("chromium not installed: the browser half of this test was skipped"),
    }
    let outcome = run.join().unwrap().unwrap();
    assert!(
        outcome.summary.test_accuracy >= 0.85,
        "{}",
        outcome.summary.test_accuracy
    );
}

#[test]
fn plot_draws_a_recorded_run_to_png_and_svg() {
    let _guard = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for mode in ["sync", "async"] {
        let metrics = dir.path().join(format!("{mode}.jsonl"));
        let status = Command::new(common::pstrain_bin())
            .args([
                "train",
                "--model",
                "convnet",
                "--optimizer",
                "sgd",
                "--lr",
                "0.05",
            ])
            .args(["--iterations", "300", "--eval-every", "50", "--mode", mode])
            .arg("--data-dir")
            .arg(common::mnist_dir())
            .arg("--metrics")
            .arg(&metrics)
            .status()
            .unwrap();
        assert!(status.success());
        files.push(metrics);
    }
    for ext in ["png", "svg"] {
        let out = dir.path().join(format!("curves.{ext}"));
        let status = Command::new(common::pstrain_bin())
            .arg("plot")
            .args(&files)
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "plot {ext}");
        if ext == "png" {
            let img = image::open(&out).unwrap().to_rgb8();
            assert_eq!(
                img.dimensions(),
                (pstrain::report::plot::WIDTH, pstrain::report::plot::HEIGHT)
            );
            let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            let share = inked as f64 / (img.width() * img.height()) as f64;
            assert!(
                share > 0.01,
                "only {:.3}% of the picture is drawn",
                share * 100.0
            );
            let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
            colours.sort_unstable();
            colours.dedup();
            assert!(colours.len() > 10, "{} colours: no curves?", colours.len());
        } else {
            let svg = std::fs::read_to_string(&out).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("width=\"1200\""),
                "{}",
                &svg[..200.min(svg.len())]
            );
            assert!(
                svg.matches("<polyline").count() >= 8,
                "two runs in four panels"
            );
            assert!(
                svg.contains("sync") && svg.contains("async"),
                "the runs are labelled"
            );
        }
    }
    // A file that is not a metrics file is a clear error.
    let junk = dir.path().join("junk.jsonl");
    std::fs::write(&junk, "not json\n").unwrap();
    let out = Command::new(common::pstrain_bin())
        .args(["plot"])
        .arg(&junk)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a pstrain metrics record"));
}
