//! Face alignment as insightface's `face_align.norm_crop` (methods.md §8): a similarity
//! transform from the 5 landmarks to the arcface template (Umeyama, as skimage's
//! `SimilarityTransform.estimate`), then OpenCV's `warpAffine` (bilinear, border 0).
//!
//! The warp reproduces OpenCV's u8 fixed-point path: the inverse map is evaluated in
//! 1/1024 px, quantised to 1/32 px, and the four bilinear weights are 15-bit integers, so
//! results agree with OpenCV's to the level (tested within ±1 against golden files).

use super::packed::{DataError, PackedDataset, PackedWriter};
use super::synth::Monitor;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::Path;

/// The arcface template for 112×112 (left eye, right eye, nose, left and right mouth corner).
pub const ARCFACE_112: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// A 2×3 affine matrix `[[a, b, tx], [c, d, ty]]` mapping source to destination pixels.
pub type Affine = [[f64; 3]; 2];

/// The template for an output of `size` pixels, by `estimate_norm`'s code: a multiple of
/// 112 scales by `size/112`; anything else (multiples of 128, and beyond insightface, which
/// asserts, any other size) scales by `size/128` and shifts x by `8·size/128`. Computed in
/// `f32` like insightface's `float32` template array, so the values are the ones it uses.
pub fn arcface_template(size: usize) -> [[f64; 2]; 5] {
    let (ratio, dx) = if !size.is_multiple_of(112) {
        let r = size as f64 / 128.0;
        (r, 8.0 * r)
    } else {
        (size as f64 / 112.0, 0.0)
    };
    let (r32, dx32) = (ratio as f32, dx as f32);
    ARCFACE_112.map(|p| {
        let x = (p[0] as f32) * r32;
        let x = if dx != 0.0 { x + dx32 } else { x };
        [x as f64, ((p[1] as f32) * r32) as f64]
    })
}

/// Least-squares similarity transform (rotation, uniform scale, translation; no reflection)
/// taking `src` onto `dst`: Umeyama's solution, which in 2-D has this closed form.
/// Degenerate input (all source points equal) gives `None`.
pub fn umeyama(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Option<Affine> {
    let n = src.len().min(dst.len());
    if n == 0 {
        return None;
    }
    let mean = |p: &[[f64; 2]]| {
        let (mut x, mut y) = (0.0, 0.0);
        for q in &p[..n] {
            x += q[0];
            y += q[1];
        }
        [x / n as f64, y / n as f64]
    };
    let (ms, md) = (mean(src), mean(dst));
    let (mut num_a, mut num_b, mut den) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (sx, sy) = (src[i][0] - ms[0], src[i][1] - ms[1]);
        let (dx, dy) = (dst[i][0] - md[0], dst[i][1] - md[1]);
        num_a += sx * dx + sy * dy;
        num_b += sx * dy - sy * dx;
        den += sx * sx + sy * sy;
    }
    if den <= 0.0 || !den.is_finite() {
        return None;
    }
    let (a, b) = (num_a / den, num_b / den);
    Some([
        [a, -b, md[0] - (a * ms[0] - b * ms[1])],
        [b, a, md[1] - (b * ms[0] + a * ms[1])],
    ])
}

/// insightface's `estimate_norm`: the transform of 5 landmarks to the template for `size`.
pub fn estimate_norm(landmarks: &[[f32; 2]; 5], size: usize) -> Option<Affine> {
    let src = landmarks.map(|p| [p[0] as f64, p[1] as f64]);
    umeyama(&src, &arcface_template(size))
}

/// Applies `m` to a point.
pub fn transform_point(m: &Affine, p: [f32; 2]) -> [f32; 2] {
    let (x, y) = (p[0] as f64, p[1] as f64);
    [
        (m[0][0] * x + m[0][1] * y + m[0][2]) as f32,
        (m[1][0] * x + m[1][1] * y + m[1][2]) as f32,
    ]
}

/// OpenCV's `saturate_cast<int>(double)`: round half to even, saturating.
fn cv_round(v: f64) -> i32 {
    let r = v.round_ties_even();
    if r >= i32::MAX as f64 {
        i32::MAX
    } else if r <= i32::MIN as f64 {
        i32::MIN
    } else {
        r as i32
    }
}

const INTER_BITS: i32 = 5;
const INTER_TAB: i32 = 1 << INTER_BITS;
const AB_BITS: i32 = 10;
const AB_SCALE: f64 = (1 << AB_BITS) as f64;
const COEF_BITS: i32 = 15;

/// Bilinear resize of HWC RGB `u8` `src` (`sh`x`sw`) into `out` (`oh`x`ow`), half-pixel
/// centres and edge pixels repeated, like `cv2.resize(..., INTER_LINEAR)` (in floating point,
/// so values may differ from OpenCV's fixed point by one).
pub fn resize_bilinear(src: &[u8], sh: usize, sw: usize, out: &mut [u8], oh: usize, ow: usize) {
    // Source coordinate and weight of the upper neighbour, per output row or column.
    let taps = |o: usize, s: usize| -> Vec<(usize, usize, f32)> {
        let scale = s as f64 / o as f64;
        (0..o)
            .map(|d| {
                let x = ((d as f64 + 0.5) * scale - 0.5).clamp(0.0, (s - 1) as f64);
                let x0 = x.floor() as usize;
                (x0, (x0 + 1).min(s - 1), (x - x0 as f64) as f32)
            })
            .collect()
    };
    let (rows, cols) = (taps(oh, sh), taps(ow, sw));
    for (y, &(y0, y1, fy)) in rows.iter().enumerate() {
        for (x, &(x0, x1, fx)) in cols.iter().enumerate() {
            for c in 0..3 {
                let p = |yy: usize, xx: usize| src[(yy * sw + xx) * 3 + c] as f32;
                let top = p(y0, x0) + (p(y0, x1) - p(y0, x0)) * fx;
                let bottom = p(y1, x0) + (p(y1, x1) - p(y1, x0)) * fx;
                out[(y * ow + x) * 3 + c] =
                    (top + (bottom - top) * fy).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// `cv2.warpAffine(src, m, (ow, oh), flags=INTER_LINEAR, borderValue=0)` for HWC RGB `u8`.
/// `out` must hold `oh*ow*3` bytes.
pub fn warp_affine(
    src: &[u8],
    sh: usize,
    sw: usize,
    m: &Affine,
    out: &mut [u8],
    oh: usize,
    ow: usize,
) {
    // Inverse map, exactly as OpenCV computes it.
    let mut im = [m[0][0], m[0][1], m[0][2], m[1][0], m[1][1], m[1][2]];
    let d = im[0] * im[4] - im[1] * im[3];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (a11, a22) = (im[4] * d, im[0] * d);
    im[0] = a11;
    im[1] *= -d;
    im[3] *= -d;
    im[4] = a22;
    let b1 = -im[0] * im[2] - im[1] * im[5];
    let b2 = -im[3] * im[2] - im[4] * im[5];
    im[2] = b1;
    im[5] = b2;
    let round_delta = (AB_SCALE as i32) / INTER_TAB / 2;
    let adelta: Vec<i32> = (0..ow)
        .map(|x| cv_round(im[0] * x as f64 * AB_SCALE))
        .collect();
    let bdelta: Vec<i32> = (0..ow)
        .map(|x| cv_round(im[3] * x as f64 * AB_SCALE))
        .collect();
    let (sw_i, sh_i) = (sw as i32, sh as i32);
    for y in 0..oh {
        let x0 = cv_round((im[1] * y as f64 + im[2]) * AB_SCALE).wrapping_add(round_delta);
        let y0 = cv_round((im[4] * y as f64 + im[5]) * AB_SCALE).wrapping_add(round_delta);
        for x in 0..ow {
            let xx = x0.wrapping_add(adelta[x]) >> (AB_BITS - INTER_BITS);
            let yy = y0.wrapping_add(bdelta[x]) >> (AB_BITS - INTER_BITS);
            let (sx, sy) = (xx >> INTER_BITS, yy >> INTER_BITS);
            let fx = xx & (INTER_TAB - 1);
            let fy = yy & (INTER_TAB - 1);
            // Weights: (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy in units of 1/32768.
            let w = [
                (INTER_TAB - fx) * (INTER_TAB - fy),
                fx * (INTER_TAB - fy),
                (INTER_TAB - fx) * fy,
                fx * fy,
            ];
            let o = (y * ow + x) * 3;
            // Fast path: all four taps inside the image.
            if sx >= 0 && sy >= 0 && sx + 1 < sw_i && sy + 1 < sh_i {
                let i0 = (sy as usize * sw + sx as usize) * 3;
                let i1 = i0 + sw * 3;
                let (r0, r1) = (&src[i0..i0 + 6], &src[i1..i1 + 6]);
                let px = &mut out[o..o + 3];
                for c in 0..3 {
                    let v = r0[c] as i32 * w[0]
                        + r0[c + 3] as i32 * w[1]
                        + r1[c] as i32 * w[2]
                        + r1[c + 3] as i32 * w[3];
                    // (v * 32 + 2^14) >> 15 with OpenCV's 15-bit weights, exactly.
                    px[c] = ((v + 512) >> 10) as u8;
                }
                continue;
            }
            if sx >= sw_i || sx + 1 < 0 || sy >= sh_i || sy + 1 < 0 {
                out[o..o + 3].fill(0);
                continue;
            }
            let tap = |dx: i32, dy: i32, c: usize| -> i32 {
                let (px, py) = (sx + dx, sy + dy);
                if px >= 0 && py >= 0 && px < sw_i && py < sh_i {
                    src[(py as usize * sw + px as usize) * 3 + c] as i32
                } else {
                    0
                }
            };
            for c in 0..3 {
                let v = tap(0, 0, c) * w[0]
                    + tap(1, 0, c) * w[1]
                    + tap(0, 1, c) * w[2]
                    + tap(1, 1, c) * w[3];
                // Weights sum to 1024 = 2^10; OpenCV's 15-bit weights are these times 32.
                let v32 = v * 32;
                out[o + c] = ((v32 + (1 << (COEF_BITS - 1))) >> COEF_BITS).clamp(0, 255) as u8;
            }
        }
    }
}

/// insightface's `norm_crop`: aligns one HWC RGB image to `size`×`size` with its landmarks.
/// Returns the transform used, or `None` when the landmarks are degenerate.
pub fn norm_crop(
    src: &[u8],
    sh: usize,
    sw: usize,
    landmarks: &[[f32; 2]; 5],
    size: usize,
    out: &mut [u8],
) -> Option<Affine> {
    let m = estimate_norm(landmarks, size)?;
    warp_affine(src, sh, sw, &m, out, size, size);
    Some(m)
}

/// One aligned image and its transformed landmarks, or why it was not aligned.
type Aligned = Result<(Vec<u8>, [[f32; 2]; 5]), &'static str>;

/// What to do with an image that has no (usable) landmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMissing {
    /// Leave it out and count it.
    Skip,
    /// Stop with an error naming the image.
    Fail,
}

/// Counts of an alignment run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlignCounts {
    /// Images aligned and written.
    pub aligned: usize,
    /// Images left out because they carry no (finite) landmarks.
    pub skipped_no_landmarks: usize,
    /// Images left out because their landmarks admit no transform (all points equal).
    pub skipped_degenerate: usize,
    /// Verification pairs dropped because one of their images was left out.
    pub pairs_dropped: usize,
}

/// Aligns every image of the packed data set `input` into a new packed data set `output` of
/// `size`×`size` images, in parallel; landmarks are carried through the transform, labels,
/// ground truth and pairs kept (pairs that lose an image are dropped and counted).
pub fn align_dataset(
    input: &Path,
    output: &Path,
    size: usize,
    on_missing: OnMissing,
    monitor: &dyn Monitor,
) -> Result<AlignCounts, DataError> {
    if size < 8 {
        return Err(DataError::Invalid(format!(
            "align: image_size {size} is below 8"
        )));
    }
    let d = PackedDataset::open(input)?;
    let (h, w, _) = d.image_shape();
    let mut wr = PackedWriter::create(output, size, size)?;
    let mut counts = AlignCounts::default();
    let mut new_index = vec![u32::MAX; d.len()];
    const CHUNK: usize = 512;
    for start in (0..d.len()).step_by(CHUNK) {
        if monitor.cancelled() {
            return Err(DataError::Invalid("interrupted".into()));
        }
        let end = (start + CHUNK).min(d.len());
        let batch: Vec<Aligned> = (start..end)
            .into_par_iter()
            .map(|i| {
                let lm = d.landmarks(i).ok_or("no landmarks")?;
                if lm.iter().flatten().any(|v| !v.is_finite()) {
                    return Err("landmarks not finite");
                }
                let mut out = vec![0u8; size * size * 3];
                let m = norm_crop(d.image(i), h, w, &lm, size, &mut out)
                    .ok_or("degenerate landmarks (all points equal)")?;
                Ok((out, lm.map(|p| transform_point(&m, p))))
            })
            .collect();
        for (k, r) in batch.into_iter().enumerate() {
            let i = start + k;
            match r {
                Ok((img, lm)) => {
                    new_index[i] = wr.len() as u32;
                    wr.push(&img, d.label(i), Some(lm), d.truth(i))?;
                    counts.aligned += 1;
                }
                Err(reason) => {
                    if on_missing == OnMissing::Fail {
                        return Err(DataError::format(
                            &input.join("records.bin"),
                            format!("image {i}"),
                            format!("{reason}; use `on_missing: skip` to leave such images out"),
                        ));
                    }
                    if reason == "no landmarks" {
                        counts.skipped_no_landmarks += 1;
                    } else {
                        counts.skipped_degenerate += 1;
                    }
                    wr.add_skipped(&format!("align: {reason}"), 1);
                }
            }
        }
        monitor.progress(end as u64, d.len() as u64);
    }
    if let Some(pairs) = d.pairs() {
        let kept: Vec<(u32, u32, bool)> = pairs
            .iter()
            .filter_map(|&(a, b, s)| {
                let (na, nb) = (new_index[a as usize], new_index[b as usize]);
                (na != u32::MAX && nb != u32::MAX).then_some((na, nb, s))
            })
            .collect();
        counts.pairs_dropped = pairs.len() - kept.len();
        if counts.pairs_dropped > 0 {
            wr.add_skipped(
                "align: pairs with a skipped image",
                counts.pairs_dropped as u64,
            );
        }
        wr.set_pairs(kept);
    }
    // Carry over the input's skipped counts and class names.
    let meta = d.metadata();
    if let Some(m) = meta.get("skipped").and_then(Value::as_object) {
        for (k, v) in m {
            wr.add_skipped(k, v.as_u64().unwrap_or(0));
        }
    }
    if let Some(names) = meta.get("class_names").and_then(Value::as_array) {
        wr.set_class_names(
            names
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_string())
                .collect(),
        );
    }
    wr.finish(json!({
        "kind": "align",
        "image_size": size,
        "template": "arcface",
        "source": meta.get("provenance").cloned().unwrap_or(Value::Null),
    }))?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_bilinear_matches_opencv_on_a_ramp() {
        // One row 0, 100 (grey) up to four columns: cv2.resize gives 0, 25, 75, 100.
        let src: Vec<u8> = [0u8, 100].iter().flat_map(|&v| [v; 3]).collect();
        let mut out = vec![0u8; 4 * 3];
        resize_bilinear(&src, 1, 2, &mut out, 1, 4);
        let grey: Vec<u8> = out.chunks(3).map(|p| p[0]).collect();
        assert_eq!(grey, [0, 25, 75, 100]);
        // Down to one column: the mean of the two; rows the same way.
        let mut one = vec![0u8; 3];
        resize_bilinear(&src, 1, 2, &mut one, 1, 1);
        assert_eq!(one, [50, 50, 50]);
        let mut tall = vec![0u8; 3 * 2 * 3];
        resize_bilinear(&src, 1, 2, &mut tall, 3, 2);
        assert_eq!(&tall[..6], &src[..]);
        assert_eq!(&tall[12..], &src[..]);
        // Same size: a copy.
        let mut same = vec![0u8; 6];
        resize_bilinear(&src, 1, 2, &mut same, 1, 2);
        assert_eq!(same, src);
    }

    #[test]
    fn template_rules() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-5;
        assert!(close(arcface_template(112)[4][1], 92.2041));
        let t = arcface_template(224);
        assert!(close(t[0][0], 2.0 * 38.2946));
        let t = arcface_template(128);
        assert!(close(t[0][0], 38.2946 + 8.0));
        assert!(close(t[0][1], 51.6963));
        assert!(close(
            arcface_template(96)[0][0],
            (38.2946 + 8.0) * 96.0 / 128.0
        ));
    }

    #[test]
    fn umeyama_recovers_a_similarity() {
        let (s, th, tx, ty) = (1.7, 0.3f64, 5.0, -3.0);
        let src = ARCFACE_112;
        let dst = src.map(|p| {
            [
                s * (th.cos() * p[0] - th.sin() * p[1]) + tx,
                s * (th.sin() * p[0] + th.cos() * p[1]) + ty,
            ]
        });
        let m = umeyama(&src, &dst).unwrap();
        assert!((m[0][0] - s * th.cos()).abs() < 1e-12);
        assert!((m[1][0] - s * th.sin()).abs() < 1e-12);
        assert!((m[0][2] - tx).abs() < 1e-9 && (m[1][2] - ty).abs() < 1e-9);
        assert!(umeyama(&[[1.0, 1.0]; 5], &ARCFACE_112).is_none());
    }

    #[test]
    fn identity_warp_copies_and_border_is_zero() {
        let src: Vec<u8> = (0..4 * 4 * 3).map(|v| v as u8 * 3).collect();
        let mut out = vec![1u8; 4 * 4 * 3];
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        warp_affine(&src, 4, 4, &id, &mut out, 4, 4);
        assert_eq!(out, src);
        let shift = [[1.0, 0.0, 10.0], [0.0, 1.0, 0.0]];
        warp_affine(&src, 4, 4, &shift, &mut out, 4, 4);
        assert!(out.iter().all(|&v| v == 0));
        // Half-pixel shift: average of neighbours.
        let half = [[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]];
        warp_affine(&src, 4, 4, &half, &mut out, 4, 4);
        assert_eq!(out[0], (src[0] as u32 + src[3] as u32).div_ceil(2) as u8);
    }
}
