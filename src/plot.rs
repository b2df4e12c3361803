//! Line plots of accuracy against rounds, as PNG.
//!
//! plotters draws text only with fonts registered at run time (its `ab_glyph` backend has no
//! system font lookup), so the first plot reads DejaVu Sans from the Debian package
//! `fonts-dejavu-core` and registers it as `sans-serif`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Where DejaVu Sans lives: Debian and Ubuntu first (what `scripts/setup.sh` installs), then
/// Fedora and Arch.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Plot size in pixels.
const SIZE: (u32, u32) = (1000, 600);

/// The tab10 palette: distinct hues that survive most kinds of colour blindness.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(round, accuracy in [0, 1])`, in drawing order. Points with a non-finite coordinate are
    /// left out.
    pub points: Vec<(f64, f64)>,
}

/// Draws one line per series, with a legend, axis labels and a title, to a 1000 × 600 PNG at
/// `path` (written to a temporary sibling, then renamed over `path`).
///
/// The y axis runs from a little below the lowest point (0.9 × it, rounded down to 0.05) to
/// 1.0 when every value lies in [0, 1], as accuracies do; otherwise it fits the data with a 5 %
/// margin. With no finite points at all, the axes are drawn over [0, 1] × [0, 1].
///
/// # Errors
///
/// When DejaVu Sans is not installed (package `fonts-dejavu-core`), or the file cannot be
/// written.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    ensure_font()?;
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let (x_range, y_range) = ranges(finite.iter().flatten().copied());

    // The bitmap backend writes the file itself and picks its encoder from the extension,
    // which the temporary keeps.
    let file = support::fs::AtomicFile::reserve(path)
        .with_context(|| format!("writing plot {}", path.display()))?;
    let drawn = draw(
        file.temporary(),
        title,
        x_label,
        y_label,
        series,
        &finite,
        x_range,
        y_range,
    )
    .and_then(|()| file.commit().map_err(Into::into));
    drawn.with_context(|| format!("writing plot {}", path.display()))
}

type Range = std::ops::Range<f64>;

#[allow(clippy::too_many_arguments)] // private; one call site
fn draw(
    to: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    finite: &[Vec<(f64, f64)>],
    x_range: Range,
    y_range: Range,
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(to, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, (s, points)) in series.iter().zip(finite).enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Axis ranges for the points; see [`line_plot`].
fn ranges(points: impl Iterator<Item = (f64, f64)>) -> (Range, Range) {
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in points {
        x_lo = x_lo.min(x);
        x_hi = x_hi.max(x);
        y_lo = y_lo.min(y);
        y_hi = y_hi.max(y);
    }
    if x_lo > x_hi {
        return (0.0..1.0, 0.0..1.0);
    }
    let x = if x_lo < x_hi {
        x_lo..x_hi
    } else {
        x_lo - 0.5..x_hi + 0.5
    };
    let y = if y_lo >= 0.0 && y_hi <= 1.0 {
        // Accuracies: 1.0 on top keeps plots of different runs comparable.
        ((0.9 * y_lo / 0.05).floor() * 0.05).min(0.95)..1.0
    } else {
        let margin = if y_hi > y_lo {
            0.05 * (y_hi - y_lo)
        } else {
            0.5
        };
        y_lo - margin..y_hi + margin
    };
    (x, y)
}

/// Registers DejaVu Sans as `sans-serif` the first time it succeeds.
fn ensure_font() -> anyhow::Result<()> {
    // A Mutex rather than a Once: a failed attempt (font not installed yet) is retried on the
    // next plot, and the font bytes are leaked at most once.
    static REGISTERED: Mutex<bool> = Mutex::new(false);
    let mut registered = REGISTERED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !*registered {
        let candidates: Vec<PathBuf> = FONT_PATHS.iter().map(PathBuf::from).collect();
        let bytes = load_font(&candidates)?;
        register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
            anyhow!("DejaVu Sans is not a valid font file; reinstall fonts-dejavu-core")
        })?;
        *registered = true;
    }
    Ok(())
}

/// Reads the first of `candidates` that exists, leaked: plotters keeps fonts for the life of
/// the process.
fn load_font(candidates: &[PathBuf]) -> anyhow::Result<&'static [u8]> {
    for path in candidates {
        match std::fs::read(path) {
            Ok(bytes) => return Ok(Box::leak(bytes.into_boxed_slice())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading font {}", path.display())),
        }
    }
    Err(anyhow!(
        "plots need DejaVu Sans, not found at {}: install the package fonts-dejavu-core \
         (apt-get install fonts-dejavu-core)",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    ))
}

/// One image of a prediction grid and what to write under it.
pub struct GridCell {
    /// The image (grey or RGB).
    pub image: datasets::Image,
    /// The predicted class and its probability.
    pub predicted: String,
    /// The true class.
    pub truth: String,
    /// Whether the prediction is right (drawn green, else red).
    pub correct: bool,
}

/// Draws `cells` in rows of `columns`, each image scaled to a 112-pixel square (nearest
/// neighbour, so small images stay legible) over its predicted and true labels.
pub fn prediction_grid(cells: &[GridCell], columns: usize, to: &Path) -> anyhow::Result<()> {
    const SIDE: u32 = 112;
    const CELL: (u32, u32) = (200, 170);
    ensure_font()?;
    let columns = columns.max(1);
    let rows = cells.len().div_ceil(columns) as u32;
    let size = (CELL.0 * columns as u32, CELL.1 * rows.max(1));
    let root = BitMapBackend::new(to, size).into_drawing_area();
    root.fill(&WHITE)?;
    for (k, cell) in cells.iter().enumerate() {
        let x0 = (k % columns) as u32 * CELL.0 + (CELL.0 - SIDE) / 2;
        let y0 = (k / columns) as u32 * CELL.1 + 8;
        let image = &cell.image;
        let (w, h, c) = (image.width, image.height, u32::from(image.channels));
        for py in 0..SIDE {
            for px in 0..SIDE {
                let (sx, sy) = (px * w / SIDE, py * h / SIDE);
                let at = ((sy * w + sx) * c) as usize;
                let color = if c == 1 {
                    let v = image.pixels[at];
                    RGBColor(v, v, v)
                } else {
                    RGBColor(image.pixels[at], image.pixels[at + 1], image.pixels[at + 2])
                };
                root.draw_pixel(((x0 + px) as i32, (y0 + py) as i32), &color)?;
            }
        }
        let color = if cell.correct {
            RGBColor(0, 130, 0)
        } else {
            RGBColor(200, 0, 0)
        };
        let text_x = (k % columns) as i32 * CELL.0 as i32 + 8;
        let text_y = (y0 + SIDE + 6) as i32;
        root.draw(&Text::new(
            cell.predicted.clone(),
            (text_x, text_y),
            ("sans-serif", 15).into_font().color(&color),
        ))?;
        root.draw(&Text::new(
            format!("true: {}", cell.truth),
            (text_x, text_y + 19),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))?;
    }
    root.present()
        .with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accuracy_curves() -> Vec<Series> {
        ["fedavg", "fedprox", "wsa"]
            .iter()
            .enumerate()
            .map(|(i, name)| Series {
                name: (*name).to_owned(),
                points: (1..=30)
                    .map(|r| {
                        let r = f64::from(r);
                        (r, 0.5 + 0.4 * (1.0 - (-r / (5.0 + i as f64)).exp()))
                    })
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn line_plot_writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accuracy.png");
        line_plot(
            &path,
            "20 clients, Dirichlet α = 0.1",
            "round",
            "test accuracy",
            &accuracy_curves(),
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 10_000, "only {} bytes", bytes.len());
        // The temporary was renamed, not left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn line_plot_survives_empty_and_degenerate_input() {
        let dir = tempfile::tempdir().unwrap();
        let degenerate = [
            Series {
                name: "empty".into(),
                points: vec![],
            },
            Series {
                name: "one point".into(),
                points: vec![(1.0, 0.5), (f64::NAN, 0.7), (2.0, f64::INFINITY)],
            },
        ];
        for (i, series) in [&[][..], &degenerate[..]].into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.png"));
            line_plot(&path, "t", "round", "test accuracy", series).unwrap();
            assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
        }
    }

    #[test]
    fn line_plot_into_a_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/folder/accuracy.png");
        let err = line_plot(&path, "t", "round", "test accuracy", &accuracy_curves()).unwrap_err();
        assert!(format!("{err:#}").contains("accuracy.png"), "{err:#}");
    }

    #[test]
    fn missing_font_names_the_package() {
        let err = load_font(&[PathBuf::from("/nonexistent/DejaVuSans.ttf")]).unwrap_err();
        assert!(err.to_string().contains("fonts-dejavu-core"), "{err}");
    }

    #[test]
    fn accuracy_axis_tops_out_at_one_and_starts_below_the_lowest_point() {
        let (x, y) = ranges([(1.0, 0.62), (10.0, 0.91)].into_iter());
        assert_eq!(x, 1.0..10.0);
        assert_eq!(y.end, 1.0);
        assert!(
            y.start <= 0.9 * 0.62 && y.start > 0.9 * 0.62 - 0.05,
            "{y:?}"
        );
        let (_, y) = ranges([(1.0, 1.0)].into_iter());
        assert!(y.start < y.end);
        let (_, y) = ranges([(1.0, -2.0), (2.0, 3.0)].into_iter());
        assert!(y.start < -2.0 && y.end > 3.0);
    }
}
