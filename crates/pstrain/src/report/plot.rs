//! `pstrain plot RUN.jsonl [RUN2.jsonl ...] -o curves.png|.svg`: test accuracy and test loss
//! against wall time and against samples seen, one line per run (labelled by mode and
//! workers), from the `--metrics` files of `pstrain train`. Drawn with plotters; text needs a
//! TrueType font, found on the system (or `PSTRAIN_FONT`).

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The plot's size in pixels.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 800;
/// A metrics file longer than this is not plotted (a day of records is tens of MB).
const MAX_METRICS_FILE_BYTES: u64 = 1 << 30;
/// A font file longer than this is not loaded (the largest families are tens of MB).
const MAX_FONT_BYTES: u64 = 256 << 20;

/// Fonts tried in order when `PSTRAIN_FONT` is not set.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// `--metrics` files of runs (JSON lines)
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The picture: .png or .svg
    #[arg(short, long, default_value = "curves.png")]
    pub out: PathBuf,
}

/// One evaluation: (seconds, samples seen, test accuracy %, test loss).
pub type Point = (f64, f64, f64, f64);

/// One run's curve: a `Point` per evaluation.
#[derive(Debug, Clone)]
pub struct Curve {
    pub label: String,
    pub points: Vec<Point>,
}

/// The evaluations of one `--metrics` file, labelled from its summary (or its file name).
pub fn read_curve(path: &Path) -> Result<Curve> {
    let text = pstrain_store::read_text_at_most(path, MAX_METRICS_FILE_BYTES)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut points = Vec::new();
    let mut label = path
        .file_stem()
        .map_or_else(|| "run".into(), |s| s.to_string_lossy().to_string());
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || {
            format!(
                "{} line {}: not a pstrain metrics record",
                path.display(),
                n + 1
            )
        };
        let rec: serde_json::Value = serde_json::from_str(line).with_context(bad)?;
        let event = rec
            .get("event")
            .and_then(|e| e.as_str())
            .with_context(bad)?;
        let num = |k: &str| rec.get(k).and_then(serde_json::Value::as_f64);
        let word = |k: &str| {
            rec.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        match event {
            "eval" => {
                let (Some(t), Some(seen), Some(acc), Some(loss)) = (
                    num("time_s"),
                    num("samples"),
                    num("test_accuracy"),
                    num("test_loss"),
                ) else {
                    bail!("{}: an evaluation without its numbers", bad());
                };
                points.push((t, seen, acc * 100.0, loss));
            }
            "summary" => {
                if let Some(workers) = num("workers") {
                    let (model, mode) = (word("model"), word("mode"));
                    label = format!("{label}: {model} {mode}, {workers} workers");
                }
            }
            _ => {}
        }
    }
    if points.is_empty() {
        bail!(
            "{} has no evaluations (was it written by `pstrain train --metrics`?)",
            path.display()
        );
    }
    Ok(Curve { label, points })
}

/// Registers a system font for text, once.
fn load_font() -> Result<()> {
    static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("PSTRAIN_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = pstrain_store::read_at_most(path, MAX_FONT_BYTES) {
                // Fonts live as long as the process: plotters keeps a reference.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(
            "no TrueType font found for the plot's text: install one (e.g. `apt install \
             fonts-dejavu-core`) or point PSTRAIN_FONT at a .ttf file"
                .to_string(),
        )
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Draws `curves` into `out` (.png or .svg).
pub fn plot(curves: &[Curve], out: &Path) -> Result<()> {
    load_font()?;
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => {
            let root = BitMapBackend::new(out, (WIDTH, HEIGHT)).into_drawing_area();
            draw(&root, curves)?;
            root.present()
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        "svg" => {
            let root = SVGBackend::new(out, (WIDTH, HEIGHT)).into_drawing_area();
            draw(&root, curves)?;
            root.present()
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        _ => bail!("{}: the picture must be .png or .svg", out.display()),
    }
    Ok(())
}

/// One of the four panels: its title, x axis and range, y range, and which numbers it draws.
struct Panel {
    title: &'static str,
    xlabel: &'static str,
    x_hi: f64,
    y: (f64, f64),
    pick: fn(&Point) -> (f64, f64),
}

impl Panel {
    fn new(
        title: &'static str,
        xlabel: &'static str,
        x_hi: f64,
        y: (f64, f64),
        pick: fn(&Point) -> (f64, f64),
    ) -> Self {
        Panel {
            title,
            xlabel,
            x_hi,
            y,
            pick,
        }
    }
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, curves: &[Curve]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((2, 2));
    for (area, panel) in panels.iter().zip(panels_for(curves)) {
        draw_panel(area, &panel, curves)?;
    }
    Ok(())
}

/// The four panels, with axes that hold every curve.
fn panels_for(curves: &[Curve]) -> [Panel; 4] {
    let max = |f: fn(&Point) -> f64| {
        curves
            .iter()
            .flat_map(|c| c.points.iter().map(f))
            .fold(f64::MIN, f64::max)
    };
    let min = |f: fn(&Point) -> f64| {
        curves
            .iter()
            .flat_map(|c| c.points.iter().map(f))
            .fold(f64::MAX, f64::min)
    };
    let (acc_lo, acc_hi) = (
        min(|p| p.2).min(99.0).floor(),
        max(|p| p.2).max(90.0).ceil().min(100.0),
    );
    let acc_lo = acc_lo.max(acc_hi - 15.0).min(acc_hi - 1.0);
    let (loss_lo, loss_hi) = (0.0, max(|p| p.3).max(1e-3) * 1.05);
    let time_hi = max(|p| p.0).max(1.0) * 1.02;
    let samples_hi = max(|p| p.1).max(1.0) * 1.02;
    let acc = (acc_lo, acc_hi);
    let loss = (loss_lo, loss_hi);
    [
        Panel::new("test accuracy vs wall time", "seconds", time_hi, acc, |p| {
            (p.0, p.2)
        }),
        Panel::new(
            "test accuracy vs samples seen",
            "samples",
            samples_hi,
            acc,
            |p| (p.1, p.2),
        ),
        Panel::new("test loss vs wall time", "seconds", time_hi, loss, |p| {
            (p.0, p.3)
        }),
        Panel::new(
            "test loss vs samples seen",
            "samples",
            samples_hi,
            loss,
            |p| (p.1, p.3),
        ),
    ]
}

/// One panel: its axes, every curve as a line with points, and the legend.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    curves: &[Curve],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (y_lo, y_hi) = panel.y;
    let ylabel = if panel.title.starts_with("test loss") {
        "loss"
    } else {
        "accuracy (%)"
    };
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..panel.x_hi, y_lo..y_hi)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(panel.xlabel)
        .y_desc(ylabel)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, curve) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = curve.points.iter().map(panel.pick).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(curve.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .position(if ylabel == "loss" {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// `pstrain plot`.
pub fn run(args: &PlotArgs) -> Result<()> {
    let curves = args
        .runs
        .iter()
        .map(|p| read_curve(p))
        .collect::<Result<Vec<_>>>()?;
    plot(&curves, &args.out)?;
    pstrain_observe::out_line!(
        "wrote {} ({} run{})",
        args.out.display(),
        curves.len(),
        if curves.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
