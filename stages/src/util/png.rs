//! Minimal line charts written as PNG (loss/lr curves, ROC), with no plotting dependency:
//! an RGB canvas, polylines, axes with tick marks, and a stored-deflate PNG encoder.

use std::io::Write;
use std::path::Path;

/// An RGB canvas.
pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

/// One series of a chart: points in data coordinates and a colour.
pub struct Series<'a> {
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
}

impl Canvas {
    /// White canvas.
    pub fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    /// A canvas holding `px` (HWC RGB, `w*h*3` bytes), e.g. to write an image as PNG;
    /// `None` when the size does not match.
    pub fn from_rgb(w: usize, h: usize, px: Vec<u8>) -> Option<Self> {
        (px.len() == w * h * 3).then_some(Canvas { w, h, px })
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Line from (x0, y0) to (x1, y1) in pixels (Bresenham, 2 px wide).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Plots `series` into a frame with a 40 px margin; `log_x` uses log10 of x (> 0 only).
    /// Axis ranges cover all points; ticks at 10 % steps.
    pub fn chart(&mut self, series: &[Series], log_x: bool) {
        let m = 40i64;
        let (w, h) = (self.w as i64, self.h as i64);
        let tx = |x: f64| if log_x { x.max(1e-12).log10() } else { x };
        let mut xr = (f64::INFINITY, f64::NEG_INFINITY);
        let mut yr = (f64::INFINITY, f64::NEG_INFINITY);
        for s in series {
            for &(x, y) in s.points {
                if x.is_finite() && y.is_finite() {
                    xr = (xr.0.min(tx(x)), xr.1.max(tx(x)));
                    yr = (yr.0.min(y), yr.1.max(y));
                }
            }
        }
        if !xr.0.is_finite() {
            xr = (0.0, 1.0);
            yr = (0.0, 1.0);
        }
        if xr.1 - xr.0 < 1e-12 {
            xr.1 = xr.0 + 1.0;
        }
        if yr.1 - yr.0 < 1e-12 {
            yr.1 = yr.0 + 1.0;
        }
        let grey = [120, 120, 120];
        self.line((m, h - m), (w - m, h - m), grey);
        self.line((m, m), (m, h - m), grey);
        for i in 0..=10 {
            let px = m + (w - 2 * m) * i / 10;
            let py = h - m - (h - 2 * m) * i / 10;
            self.line((px, h - m), (px, h - m + 5), grey);
            self.line((m - 5, py), (m, py), grey);
        }
        let map = |x: f64, y: f64| -> (i64, i64) {
            let fx = (tx(x) - xr.0) / (xr.1 - xr.0);
            let fy = (y - yr.0) / (yr.1 - yr.0);
            (
                m + (fx * (w - 2 * m) as f64) as i64,
                h - m - (fy * (h - 2 * m) as f64) as i64,
            )
        };
        for s in series {
            let pts: Vec<_> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_x || p.0 > 0.0))
                .map(|&(x, y)| map(x, y))
                .collect();
            for p in pts.windows(2) {
                self.line(p[0], p[1], s.color);
            }
        }
    }

    /// Writes the canvas as an 8-bit RGB PNG.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut raw = Vec::with_capacity((self.w * 3 + 1) * self.h);
        for row in self.px.chunks(self.w * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        f.write_all(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A])?;
        chunk(&mut f, b"IHDR", &ihdr)?;
        chunk(&mut f, b"IDAT", &zlib_stored(&raw))?;
        chunk(&mut f, b"IEND", &[])?;
        f.flush()
    }
}

fn chunk(f: &mut impl Write, ty: &[u8; 4], data: &[u8]) -> std::io::Result<()> {
    f.write_all(&(data.len() as u32).to_be_bytes())?;
    f.write_all(ty)?;
    f.write_all(data)?;
    let mut c = crc32(0xFFFF_FFFF, ty);
    c = crc32(c, data);
    f.write_all(&(c ^ 0xFFFF_FFFF).to_be_bytes())
}

fn crc32(mut c: u32, data: &[u8]) -> u32 {
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    c
}

/// zlib stream of stored (uncompressed) deflate blocks: charts are small, so size is moot.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(if i + 1 == chunks.len() { 1 } else { 0 });
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    if chunks.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}
