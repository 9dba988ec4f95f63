//! Line charts written into artifacts as PNG (loss and learning-rate curves, ROC, CMC,
//! error-versus-reject, BN fine-tune snapshots): drawn with `plotters` on an RGB buffer
//! (labelled axes with tick values, a title, a legend) and deflate-compressed with `png`.
//!
//! Text uses an embedded subset of DejaVu Sans (`stages/assets/`, licence beside it), so a
//! chart looks the same on every machine and needs no system font.

use plotters::prelude::*;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans cut down to printable ASCII and a few symbols (see `assets/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// Colours of the lines of one panel, in order (a colour-blind safe palette).
pub const PALETTE: [[u8; 3]; 6] = [
    [0, 114, 178],
    [213, 94, 0],
    [0, 158, 115],
    [204, 121, 167],
    [230, 159, 0],
    [86, 180, 233],
];

/// One line of a panel: points in data coordinates, the name its legend shows, a colour.
pub struct Line<'a> {
    pub name: String,
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
}

/// One chart: a title, axis names, lines; several panels of one file stack vertically.
pub struct Panel<'a> {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis (ROC's false positive rate); points with x <= 0 are left out.
    pub log_x: bool,
    /// The y range; `None` covers the points.
    pub y_range: Option<(f64, f64)>,
    pub lines: Vec<Line<'a>>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("drawing a chart: {e}"))
}

fn register_font() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| io_err("the embedded font does not parse"));
    });
    res
}

/// The range `pts` cover (padded when flat), x through log10 when `log_x`.
fn ranges(p: &Panel) -> ((f64, f64), (f64, f64)) {
    let mut xr = (f64::INFINITY, f64::NEG_INFINITY);
    let mut yr = (f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in p.lines.iter().flat_map(|l| l.points.iter().copied()) {
        if x.is_finite() && y.is_finite() && (!p.log_x || x > 0.0) {
            xr = (xr.0.min(x), xr.1.max(x));
            yr = (yr.0.min(y), yr.1.max(y));
        }
    }
    if !xr.0.is_finite() {
        xr = if p.log_x { (1e-6, 1.0) } else { (0.0, 1.0) };
        yr = (0.0, 1.0);
    }
    if xr.1 <= xr.0 {
        xr.1 = if p.log_x { xr.0 * 10.0 } else { xr.0 + 1.0 };
    }
    if let Some(r) = p.y_range {
        yr = r;
    } else if yr.1 - yr.0 < 1e-12 {
        yr = (yr.0 - 0.5, yr.1 + 0.5);
    } else {
        let pad = (yr.1 - yr.0) * 0.04;
        yr = (yr.0 - pad, yr.1 + pad);
    }
    (xr, yr)
}

fn tick(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

macro_rules! draw_panel {
    ($area:expr, $p:expr, $xspec:expr, $yr:expr) => {{
        let p = $p;
        let mut chart = ChartBuilder::on($area)
            .caption(&p.title, (FAMILY, 15))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d($xspec, $yr.0..$yr.1)
            .map_err(io_err)?;
        chart
            .configure_mesh()
            .x_desc(p.x_label.as_str())
            .y_desc(p.y_label.as_str())
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .label_style((FAMILY, 11))
            .axis_desc_style((FAMILY, 12))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(io_err)?;
        for l in &p.lines {
            let c = RGBColor(l.color[0], l.color[1], l.color[2]);
            let pts: Vec<(f64, f64)> = l
                .points
                .iter()
                .copied()
                .filter(|q| q.0.is_finite() && q.1.is_finite() && (!p.log_x || q.0 > 0.0))
                .collect();
            let style = c.stroke_width(2);
            if pts.len() == 1 {
                chart
                    .draw_series(std::iter::once(Circle::new(pts[0], 3, c.filled())))
                    .map_err(io_err)?
                    .label(l.name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 3, c.filled()));
            } else {
                chart
                    .draw_series(LineSeries::new(pts, style))
                    .map_err(io_err)?
                    .label(l.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
        }
        if p.lines.iter().any(|l| !l.name.is_empty()) {
            chart
                .configure_series_labels()
                .label_font((FAMILY, 11))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(io_err)?;
        }
    }};
}

/// Draws `panels` (stacked vertically, equal heights) into a `w` x `h` PNG at `path`.
pub fn save_chart(path: &Path, (w, h): (u32, u32), panels: &[Panel]) -> std::io::Result<()> {
    register_font()?;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(io_err)?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (area, p) in areas.iter().zip(panels) {
            let (xr, yr) = ranges(p);
            if p.log_x {
                draw_panel!(area, p, (xr.0..xr.1).log_scale(), yr);
            } else {
                draw_panel!(area, p, xr.0..xr.1, yr);
            }
        }
        root.present().map_err(io_err)?;
    }
    save_rgb_png(path, w, h, &buf)
}

/// Writes `rgb` (`w*h*3` bytes, rows top to bottom) as a compressed 8-bit RGB PNG.
pub fn save_rgb_png(path: &Path, w: u32, h: u32, rgb: &[u8]) -> std::io::Result<()> {
    if rgb.len() != w as usize * h as usize * 3 {
        return Err(std::io::Error::other(format!(
            "{}: {} bytes of pixels for a {w}x{h} RGB image",
            path.display(),
            rgb.len()
        )));
    }
    let f = BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(f, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    let mut wr = enc.write_header().map_err(std::io::Error::other)?;
    wr.write_image_data(rgb).map_err(std::io::Error::other)?;
    wr.finish().map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn a_roc_chart_is_small_and_draws_its_line_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let roc: Vec<(f64, f64)> = (0..2000)
            .map(|i| {
                let f = 10f64.powf(-6.0 + 6.0 * i as f64 / 1999.0);
                (f, f.powf(0.1))
            })
            .collect();
        let path = dir.path().join("roc.png");
        save_chart(
            &path,
            (560, 480),
            &[Panel {
                title: "ROC: model on lfw".into(),
                x_label: "false positive rate".into(),
                y_label: "true positive rate".into(),
                log_x: true,
                y_range: Some((0.0, 1.0)),
                lines: vec![Line {
                    name: "model".into(),
                    points: &roc,
                    color: PALETTE[0],
                }],
            }],
        )
        .unwrap();
        let bytes = std::fs::metadata(&path).unwrap().len();
        assert!(bytes < 60_000, "roc.png is {bytes} bytes");
        let (w, h, px) = decode(&path);
        assert_eq!((w, h), (560, 480));
        let line = px.chunks(3).filter(|c| c == &PALETTE[0].as_slice()).count();
        assert!(line > 500, "{line} pixels of the line colour");
        // Dark text (title, tick values, axis names) is drawn.
        let dark = px.chunks(3).filter(|c| c.iter().all(|&v| v < 80)).count();
        assert!(dark > 500, "{dark} dark pixels");
    }

    #[test]
    fn wrong_pixel_count_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = save_rgb_png(&dir.path().join("x.png"), 4, 4, &[0; 5]).unwrap_err();
        assert!(e.to_string().contains("x.png"), "{e}");
    }

    #[test]
    fn stacked_panels_and_empty_lines_draw() {
        let dir = tempfile::tempdir().unwrap();
        let a = [(1.0, 2.0), (2.0, 1.5), (3.0, 1.0)];
        let path = dir.path().join("curve.png");
        let panel = |t: &str, pts| Panel {
            title: t.into(),
            x_label: "step".into(),
            y_label: "v".into(),
            log_x: false,
            y_range: None,
            lines: vec![Line {
                name: "loss".into(),
                points: pts,
                color: PALETTE[1],
            }],
        };
        save_chart(&path, (640, 480), &[panel("a", &a), panel("b", &[])]).unwrap();
        assert_eq!(decode(&path).0, 640);
    }
}
