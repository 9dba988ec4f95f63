//! `synthetic-faces`: procedurally rendered faces with identities, the embedded default data
//! set (nothing to download).
//!
//! Each identity is a fixed latent (head shape, eye spacing/size/colour, brows, nose, mouth,
//! skin tone, hair colour/style/hairline, moles, beard, glasses). Each image draws a pose
//! (roll, yaw-like foreshortening, scale, shift), illumination (light direction, ambient, colour
//! cast), expression (smile, open mouth, blink, brow raise), background clutter, clothing, blur
//! and sensor noise. Shapes are signed-distance primitives painted back to front with
//! anti-aliased edges; the 5 landmarks come from the same layout, so they are exact.
//!
//! Corruptions, with ground truth kept per image: `label_noise` (image of another training
//! identity under this label), `low_quality` (heavy blur, dark, noise, occlusion or pixelation),
//! `out_of_domain` (clutter and objects, no face; landmarks are where a detector would have
//! hallucinated them). Every image has its own random stream derived from (seed, split,
//! identity, image), so output is byte-identical for the same parameters on a given platform
//! and independent of thread count.

use super::packed::{DataError, ImageTruth, PackedWriter};
use crate::util::rng::SplitMix;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::Path;

/// Parameters of the synthetic data set.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthParams {
    /// Training identities (labels `0..identities`).
    pub identities: usize,
    /// Images per training identity.
    pub images_per_identity: usize,
    /// Square image side in pixels.
    pub image_size: usize,
    /// Random seed: the whole data set is a function of it and the other parameters.
    pub seed: u64,
    /// Fraction of training images carrying another identity's label.
    pub label_noise: f64,
    /// Fraction of training images heavily degraded.
    pub low_quality: f64,
    /// Fraction of training images that are not faces.
    pub out_of_domain: f64,
    /// Held-out identities of the verification split (disjoint from training identities).
    pub test_identities: usize,
    /// Images per held-out identity.
    pub test_images_per_identity: usize,
    /// Verification pairs (half same identity, half different).
    pub pairs: usize,
}

impl Default for SynthParams {
    fn default() -> Self {
        SynthParams {
            identities: 200,
            images_per_identity: 20,
            image_size: 64,
            seed: 0,
            label_noise: 0.0,
            low_quality: 0.0,
            out_of_domain: 0.0,
            test_identities: 100,
            test_images_per_identity: 10,
            pairs: 2000,
        }
    }
}

impl SynthParams {
    /// Checks ranges; the message names the parameter.
    pub fn check(&self) -> Result<(), String> {
        if self.identities < 1 || self.images_per_identity < 1 {
            return Err("`identities` and `images_per_identity` must be at least 1".into());
        }
        if !(8..=1024).contains(&self.image_size) {
            return Err(format!(
                "`image_size` {} must be in 8..=1024",
                self.image_size
            ));
        }
        for (n, f) in [
            ("label_noise", self.label_noise),
            ("low_quality", self.low_quality),
            ("out_of_domain", self.out_of_domain),
        ] {
            if !(0.0..=1.0).contains(&f) {
                return Err(format!("`{n}` {f} must be a fraction in 0..1"));
            }
        }
        if self.label_noise + self.low_quality + self.out_of_domain > 1.0 {
            return Err("`label_noise + low_quality + out_of_domain` must not exceed 1".into());
        }
        if self.label_noise > 0.0 && self.identities < 2 {
            return Err("`label_noise` needs at least 2 identities".into());
        }
        if self.pairs > 0 && (self.test_identities < 2 || self.test_images_per_identity < 2) {
            return Err(
                "pairs need `test_identities` >= 2 and `test_images_per_identity` >= 2".into(),
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic randomness: the crate's one SplitMix64, with the f32 helpers drawing faces needs.

/// `Rng::new(&[seed, split, identity, image])`: one stream per key tuple.
#[derive(Clone)]
struct Rng(SplitMix);

impl Rng {
    fn new(keys: &[u64]) -> Rng {
        Rng(SplitMix::from_keys(keys))
    }
    /// Uniform in [0, 1).
    fn f(&mut self) -> f32 {
        self.0.uniform_f32()
    }
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f()
    }
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }
    fn chance(&mut self, p: f32) -> bool {
        self.f() < p
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = self.f().max(1e-7);
        let u2 = self.f();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
    fn normal_clip(&mut self, sd: f32, lim: f32) -> f32 {
        (self.normal() * sd).clamp(-lim, lim)
    }
    fn color(&mut self) -> [f32; 3] {
        [self.f(), self.f(), self.f()]
    }
}

const SPLIT_TRAIN: u64 = 1;
const SPLIT_TEST: u64 = 2;
const STREAM_LATENT: u64 = 11;
const STREAM_IMAGE: u64 = 12;
const STREAM_ASSIGN: u64 = 13;
const STREAM_PAIRS: u64 = 14;

// ---------------------------------------------------------------------------------------
// Identity latent.

#[derive(Clone, Debug)]
struct Identity {
    face_a: f32,
    chin: f32,
    skin: [f32; 3],
    eye_y: f32,
    eye_dx: f32,
    eye_w: f32,
    eye_h: f32,
    eye_tilt: f32,
    iris: [f32; 3],
    brow_gap: f32,
    brow_thick: f32,
    brow_tilt: f32,
    brow_len: f32,
    nose_y: f32,
    nose_w: f32,
    nose_dark: f32,
    mouth_y: f32,
    mouth_w: f32,
    lip_t: f32,
    lip: [f32; 3],
    hair: [f32; 3],
    hairline: f32,
    hair_wave: (f32, f32, f32),
    hair_style: u8,
    hair_vol: f32,
    moles: Vec<(f32, f32, f32)>,
    beard: Option<f32>,
    mustache: bool,
    glasses: Option<[f32; 3]>,
}

fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn scale3(a: [f32; 3], s: f32) -> [f32; 3] {
    [a[0] * s, a[1] * s, a[2] * s]
}

impl Identity {
    fn sample(r: &mut Rng) -> Identity {
        let tone = r.f();
        let skin = lerp3([0.96, 0.80, 0.69], [0.36, 0.22, 0.14], tone);
        let skin = [
            (skin[0] + r.normal_clip(0.03, 0.08)).clamp(0.0, 1.0),
            (skin[1] + r.normal_clip(0.03, 0.08)).clamp(0.0, 1.0),
            (skin[2] + r.normal_clip(0.03, 0.08)).clamp(0.0, 1.0),
        ];
        let hair_palette = [
            [0.08, 0.06, 0.05],
            [0.30, 0.18, 0.10],
            [0.55, 0.38, 0.20],
            [0.85, 0.70, 0.45],
            [0.60, 0.25, 0.10],
            [0.62, 0.62, 0.62],
        ];
        let hp = hair_palette[r.below(hair_palette.len())];
        let hair = [
            (hp[0] + r.normal_clip(0.04, 0.1)).clamp(0.0, 1.0),
            (hp[1] + r.normal_clip(0.04, 0.1)).clamp(0.0, 1.0),
            (hp[2] + r.normal_clip(0.04, 0.1)).clamp(0.0, 1.0),
        ];
        let iris_palette = [
            [0.30, 0.18, 0.08],
            [0.20, 0.35, 0.60],
            [0.25, 0.45, 0.25],
            [0.45, 0.45, 0.45],
            [0.12, 0.08, 0.05],
        ];
        let iris = iris_palette[r.below(iris_palette.len())];
        let nmoles = r.below(4);
        let moles = (0..nmoles)
            .map(|_| {
                (
                    r.range(-0.55, 0.55),
                    r.range(-0.3, 0.75),
                    r.range(0.018, 0.045),
                )
            })
            .collect();
        let lip = lerp3(scale3(skin, 0.8), [0.65, 0.25, 0.25], r.range(0.2, 0.6));
        Identity {
            face_a: r.range(0.66, 0.86),
            chin: r.range(0.0, 0.35),
            skin,
            eye_y: r.range(-0.2, 0.0),
            eye_dx: r.range(0.26, 0.40),
            eye_w: r.range(0.09, 0.15),
            eye_h: r.range(0.35, 0.6),
            eye_tilt: r.normal_clip(0.08, 0.2),
            iris,
            brow_gap: r.range(0.12, 0.22),
            brow_thick: r.range(0.025, 0.06),
            brow_tilt: r.normal_clip(0.12, 0.3),
            brow_len: r.range(1.1, 1.8),
            nose_y: r.range(0.18, 0.34),
            nose_w: r.range(0.08, 0.17),
            nose_dark: r.range(0.55, 0.85),
            mouth_y: r.range(0.48, 0.64),
            mouth_w: r.range(0.16, 0.30),
            lip_t: r.range(0.02, 0.055),
            lip,
            hair,
            hairline: r.range(-0.62, -0.28),
            hair_wave: (
                r.range(0.0, 0.08),
                r.range(2.0, 9.0),
                r.range(0.0, std::f32::consts::TAU),
            ),
            hair_style: r.below(4) as u8,
            hair_vol: r.range(0.04, 0.22),
            moles,
            beard: r.chance(0.2).then(|| r.range(0.35, 0.8)),
            mustache: r.chance(0.2),
            glasses: r.chance(0.15).then(|| scale3(r.color(), 0.5)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shapes: signed distance in view units (negative inside).

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Centre, half axes, rotation.
    Ellipse([f32; 2], f32, f32, f32),
    /// Segment with radius.
    Capsule([f32; 2], [f32; 2], f32),
    /// Axis-aligned box: centre, half sizes.
    Rect([f32; 2], f32, f32),
    /// Mouth-like curve: centre, half width, half thickness, corner lift.
    Curve([f32; 2], f32, f32, f32),
    /// Hair above a wavy line, clipped to an ellipse: ellipse (centre, a, b), line y, wave.
    Fringe([f32; 2], f32, f32, f32, (f32, f32, f32)),
    /// Ring around an ellipse (glasses): centre, a, b, half thickness.
    Ring([f32; 2], f32, f32, f32),
}

fn ellipse_sd(p: [f32; 2], c: [f32; 2], a: f32, b: f32, ang: f32) -> f32 {
    let (s, co) = ang.sin_cos();
    let dx = p[0] - c[0];
    let dy = p[1] - c[1];
    let x = co * dx + s * dy;
    let y = -s * dx + co * dy;
    let q = ((x / a).powi(2) + (y / b).powi(2)).sqrt();
    (q - 1.0) * a.min(b)
}

impl Shape {
    fn sd(&self, p: [f32; 2]) -> f32 {
        match *self {
            Shape::Ellipse(c, a, b, ang) => ellipse_sd(p, c, a, b, ang),
            Shape::Capsule(a, b, r) => {
                let pa = [p[0] - a[0], p[1] - a[1]];
                let ba = [b[0] - a[0], b[1] - a[1]];
                let h = ((pa[0] * ba[0] + pa[1] * ba[1])
                    / (ba[0] * ba[0] + ba[1] * ba[1]).max(1e-9))
                .clamp(0.0, 1.0);
                let dx = pa[0] - ba[0] * h;
                let dy = pa[1] - ba[1] * h;
                (dx * dx + dy * dy).sqrt() - r
            }
            Shape::Rect(c, hw, hh) => {
                let dx = (p[0] - c[0]).abs() - hw;
                let dy = (p[1] - c[1]).abs() - hh;
                let o = (dx.max(0.0).powi(2) + dy.max(0.0).powi(2)).sqrt();
                o + dx.max(dy).min(0.0)
            }
            Shape::Curve(c, w, t, lift) => {
                let du = p[0] - c[0];
                let y = c[1] - lift * (du / w).powi(2);
                ((p[1] - y).abs() - t).max(du.abs() - w)
            }
            Shape::Fringe(c, a, b, line, (amp, freq, ph)) => {
                let e = ellipse_sd(p, c, a, b, 0.0);
                let l = p[1] - (line + amp * (freq * p[0] + ph).sin());
                e.max(l)
            }
            Shape::Ring(c, a, b, t) => ellipse_sd(p, c, a, b, 0.0).abs() - t,
        }
    }
}

impl Shape {
    /// Axis-aligned box `[x0, y0, x1, y1]` outside which `sd >= h` for certain, so a pixel
    /// whose coverage is positive (`sd < px / 2 = h`) lies inside. Used to skip shapes.
    fn bounds(&self, h: f32) -> [f32; 4] {
        let e = 1e-3;
        let around = |c: [f32; 2], rx: f32, ry: f32| {
            [c[0] - rx - e, c[1] - ry - e, c[0] + rx + e, c[1] + ry + e]
        };
        match *self {
            Shape::Ellipse(c, a, b, _) => {
                let r = a.max(b) * (1.0 + h / a.min(b));
                around(c, r, r)
            }
            Shape::Capsule(a, b, r) => [
                a[0].min(b[0]) - r - h - e,
                a[1].min(b[1]) - r - h - e,
                a[0].max(b[0]) + r + h + e,
                a[1].max(b[1]) + r + h + e,
            ],
            Shape::Rect(c, hw, hh) => around(c, hw + h, hh + h),
            Shape::Curve(c, w, t, lift) => {
                let l = lift.abs() * ((w + h) / w).powi(2);
                around(c, w + h, l + t + h)
            }
            Shape::Fringe(c, a, b, _, _) => {
                around(c, a * (1.0 + h / a.min(b)), b * (1.0 + h / a.min(b)))
            }
            Shape::Ring(c, a, b, t) => {
                let r = a.max(b) * (1.0 + (t + h) / a.min(b));
                around(c, r, r)
            }
        }
    }
}

fn inside(b: &[f32; 4], p: [f32; 2]) -> bool {
    p[0] >= b[0] && p[0] <= b[2] && p[1] >= b[1] && p[1] <= b[3]
}

/// A shape painted with a colour; `lit` applies the face shading.
#[derive(Clone, Copy)]
struct Paint {
    shape: Shape,
    color: [f32; 3],
    alpha: f32,
    lit: bool,
}

/// Everything needed to render one image, in view units (face half-height 1, y down).
struct Layout {
    paints: Vec<Paint>,
    /// View -> pixel similarity: pixel = centre + s * R(roll) * p.
    center: [f32; 2],
    scale: f32,
    roll: f32,
    /// Face ellipse for shading.
    face_c: [f32; 2],
    face_a: f32,
    light: [f32; 3],
    ambient: f32,
    landmarks: [[f32; 2]; 5],
}

#[derive(Clone, Copy)]
struct Pose {
    roll: f32,
    yaw: f32,
    scale: f32,
    shift: [f32; 2],
}

fn face_layout(id: &Identity, r: &mut Rng, size: f32) -> Layout {
    let pose = Pose {
        roll: r.normal_clip(0.17, 0.45),
        yaw: r.normal_clip(0.3, 0.7),
        scale: r.range(0.82, 1.12),
        shift: [r.normal_clip(0.035, 0.09), r.normal_clip(0.035, 0.09)],
    };
    let (sy, cy) = pose.yaw.sin_cos();
    // Expression.
    let smile = r.range(-0.3, 1.0);
    let open = if r.chance(0.3) {
        r.range(0.2, 1.0)
    } else {
        0.0
    };
    let blink = if r.chance(0.08) {
        r.range(0.1, 0.4)
    } else {
        r.range(0.8, 1.1)
    };
    let brow_raise = r.normal_clip(0.02, 0.05);
    // Yaw: features move by depth * sin(yaw); widths shrink, more on the far side.
    let xv = |u: f32, depth: f32| u * cy + depth * 0.38 * sy;
    let wf = |u: f32| (cy * (1.0 - 0.35 * u * sy)).max(0.2);
    let fa = id.face_a * (0.88 + 0.12 * cy);
    let fc = [0.06 * sy, 0.0];
    let mut paints = Vec::with_capacity(40);
    let mut add = |shape: Shape, color: [f32; 3], alpha: f32, lit: bool| {
        paints.push(Paint {
            shape,
            color,
            alpha,
            lit,
        })
    };
    // Clothing and neck.
    let shirt = r.color();
    add(
        Shape::Ellipse([0.0, 2.05], 1.7, 0.75, 0.0),
        shirt,
        1.0,
        false,
    );
    add(
        Shape::Capsule([fc[0], 0.7], [fc[0], 1.5], fa * 0.5),
        scale3(id.skin, 0.8),
        1.0,
        false,
    );
    // Hair behind the head.
    let hv = id.hair_vol;
    match id.hair_style {
        0 => {}
        1 => add(
            Shape::Ellipse([fc[0], -0.08], fa + hv, 1.0 + hv, 0.0),
            id.hair,
            1.0,
            true,
        ),
        _ => {
            add(
                Shape::Ellipse([fc[0], -0.08], fa + hv, 1.0 + hv, 0.0),
                id.hair,
                1.0,
                true,
            );
            if id.hair_style == 3 {
                add(
                    Shape::Rect([fc[0], 0.35], fa + hv * 0.8, 0.6),
                    id.hair,
                    1.0,
                    true,
                );
            }
        }
    }
    // Ears.
    for side in [-1.0f32, 1.0] {
        let ex = fc[0] + side * fa * 0.98;
        let vis = if side * sy > 0.2 { 0.0 } else { 1.0 };
        if vis > 0.0 {
            add(
                Shape::Ellipse([ex, 0.05], 0.09 * wf(side), 0.18, 0.0),
                scale3(id.skin, 0.9),
                1.0,
                true,
            );
        }
    }
    // Face with a tapered chin: two ellipses (cranium and jaw).
    add(Shape::Ellipse(fc, fa, 1.0, 0.0), id.skin, 1.0, true);
    add(
        Shape::Ellipse([fc[0], 0.25], fa * (1.0 - id.chin * 0.5), 0.8, 0.0),
        id.skin,
        1.0,
        true,
    );
    // Beard.
    if let Some(b) = id.beard {
        add(
            Shape::Ellipse([xv(0.0, 0.5), 0.62], fa * 0.82, 0.42, 0.0),
            id.hair,
            b,
            true,
        );
    }
    // Fringe.
    if id.hair_style != 0 {
        add(
            Shape::Fringe(fc, fa * 1.01, 1.01, id.hairline, id.hair_wave),
            id.hair,
            1.0,
            true,
        );
    }
    // Moles.
    for &(u, v, rad) in &id.moles {
        add(
            Shape::Ellipse([xv(u, 0.7), v], rad * wf(u), rad, 0.0),
            scale3(id.skin, 0.35),
            0.85,
            false,
        );
    }
    // Eyes, brows, glasses.
    let mut eye_centres = [[0.0f32; 2]; 2];
    for (k, side) in [-1.0f32, 1.0].into_iter().enumerate() {
        let u = side * id.eye_dx;
        let c = [xv(u, 0.85), id.eye_y];
        eye_centres[k] = c;
        let w = id.eye_w * wf(u);
        let h = id.eye_w * id.eye_h * blink;
        let tilt = side * id.eye_tilt;
        add(Shape::Ellipse(c, w, h, tilt), [0.95, 0.95, 0.93], 1.0, true);
        let ir = id.eye_w * 0.5;
        let ic = [c[0] + 0.25 * sy * id.eye_w, c[1]];
        let iris = Shape::Ellipse(ic, ir * wf(u), ir.min(h * 1.05), 0.0);
        add(iris, id.iris, 1.0, true);
        add(
            Shape::Ellipse(ic, ir * 0.45 * wf(u), (ir * 0.45).min(h), 0.0),
            [0.02, 0.02, 0.02],
            1.0,
            false,
        );
        let by = id.eye_y - id.brow_gap - brow_raise;
        let bl = id.eye_w * id.brow_len * wf(u);
        let b0 = [xv(u - side * bl * 0.6, 0.8), by];
        let b1 = [xv(u + side * bl * 0.8, 0.8), by + id.brow_tilt * bl * 0.5];
        add(
            Shape::Capsule(b0, b1, id.brow_thick),
            scale3(id.hair, 0.8),
            0.95,
            true,
        );
        if let Some(gc) = id.glasses {
            add(
                Shape::Ring(c, id.eye_w * 1.7 * wf(u), id.eye_w * 1.25, 0.018),
                gc,
                1.0,
                false,
            );
        }
    }
    if let Some(gc) = id.glasses {
        add(
            Shape::Capsule(
                [
                    eye_centres[0][0] + id.eye_w * 1.7 * wf(-id.eye_dx),
                    id.eye_y,
                ],
                [eye_centres[1][0] - id.eye_w * 1.7 * wf(id.eye_dx), id.eye_y],
                0.015,
            ),
            gc,
            1.0,
            false,
        );
    }
    // Nose: bridge shading and nostrils.
    let tip = [xv(0.0, 1.25), id.nose_y];
    add(
        Shape::Capsule([xv(0.0, 1.0), id.eye_y + 0.05], tip, id.nose_w * 0.28),
        scale3(id.skin, 0.9),
        0.6,
        true,
    );
    for side in [-1.0f32, 1.0] {
        let u = side * id.nose_w * 0.55;
        add(
            Shape::Ellipse(
                [tip[0] + u * cy, id.nose_y + 0.03],
                id.nose_w * 0.28 * wf(u),
                id.nose_w * 0.16,
                0.0,
            ),
            scale3(id.skin, id.nose_dark * 0.6),
            0.9,
            false,
        );
    }
    // Mustache and mouth.
    let mc = [xv(0.0, 0.95), id.mouth_y];
    let mw = (id.mouth_w + 0.03 * smile) * wf(0.0);
    if id.mustache {
        add(
            Shape::Curve([mc[0], mc[1] - 0.08], mw * 0.9, 0.035, -0.04),
            scale3(id.hair, 0.9),
            0.95,
            true,
        );
    }
    let lift = 0.07 * smile;
    if open > 0.0 {
        add(
            Shape::Ellipse(mc, mw * 0.8, 0.02 + 0.08 * open, 0.0),
            [0.15, 0.05, 0.05],
            1.0,
            false,
        );
    }
    add(
        Shape::Curve([mc[0], mc[1] - 0.01 - 0.04 * open], mw, id.lip_t, lift),
        id.lip,
        1.0,
        true,
    );
    add(
        Shape::Curve(
            [mc[0], mc[1] + 0.01 + 0.05 * open],
            mw * 0.9,
            id.lip_t * 1.2,
            lift * 0.8,
        ),
        id.lip,
        1.0,
        true,
    );
    // Landmarks in view units: eye centres, nose tip, mouth corners.
    let corner_y = mc[1] - lift;
    let lm_view = [
        eye_centres[0],
        eye_centres[1],
        [tip[0], id.nose_y + 0.02],
        [mc[0] - mw, corner_y],
        [mc[0] + mw, corner_y],
    ];
    // Lighting.
    let lx = r.normal_clip(0.5, 0.9);
    let ly = r.normal_clip(0.4, 0.8) - 0.2;
    let n = (lx * lx + ly * ly + 1.0).sqrt();
    let light = [lx / n, ly / n, 1.0 / n];
    let ambient = r.range(0.25, 0.6);
    let s = size * 0.34 * pose.scale;
    let center = [
        size * (0.5 + pose.shift[0]) - 0.5,
        size * (0.47 + pose.shift[1]) - 0.5,
    ];
    let (sr, cr) = pose.roll.sin_cos();
    let to_px = |p: [f32; 2]| {
        [
            center[0] + s * (cr * p[0] - sr * p[1]),
            center[1] + s * (sr * p[0] + cr * p[1]),
        ]
    };
    let landmarks = lm_view.map(to_px);
    Layout {
        paints,
        center,
        scale: s,
        roll: pose.roll,
        face_c: fc,
        face_a: fa,
        light,
        ambient,
        landmarks,
    }
}

/// Background: base colour, gradient and random primitives in pixel units [0,1]^2.
struct Background {
    base: [f32; 3],
    grad: [f32; 3],
    gdir: [f32; 2],
    items: Vec<(Shape, [f32; 3], f32)>,
}

fn background(r: &mut Rng, items: usize) -> Background {
    let base = r.color();
    let grad = [r.normal() * 0.2, r.normal() * 0.2, r.normal() * 0.2];
    let a = r.range(0.0, std::f32::consts::TAU);
    let items = (0..items)
        .map(|_| {
            let c = [r.f(), r.f()];
            let shape = match r.below(3) {
                0 => Shape::Ellipse(
                    c,
                    r.range(0.03, 0.3),
                    r.range(0.03, 0.3),
                    r.range(0.0, std::f32::consts::PI),
                ),
                1 => Shape::Rect(c, r.range(0.02, 0.3), r.range(0.02, 0.3)),
                _ => Shape::Capsule(c, [r.f(), r.f()], r.range(0.005, 0.04)),
            };
            (shape, r.color(), r.range(0.4, 1.0))
        })
        .collect();
    Background {
        base,
        grad,
        gdir: [a.cos(), a.sin()],
        items,
    }
}

fn coverage(sd: f32, px: f32) -> f32 {
    (0.5 - sd / px).clamp(0.0, 1.0)
}

fn blend(c: &mut [f32; 3], color: [f32; 3], a: f32) {
    for k in 0..3 {
        c[k] += (color[k] - c[k]) * a;
    }
}

/// Renders a float RGB image (row-major HWC, values nominally 0..1).
fn render(size: usize, bg: &Background, face: Option<&Layout>) -> Vec<f32> {
    let mut img = vec![0f32; size * size * 3];
    let inv = 1.0 / size as f32;
    let bg_bounds: Vec<[f32; 4]> = bg
        .items
        .iter()
        .map(|(s, _, _)| s.bounds(0.5 * inv))
        .collect();
    let face_bounds: Vec<[f32; 4]> = face
        .map(|l| {
            l.paints
                .iter()
                .map(|p| p.shape.bounds(0.5 / l.scale))
                .collect()
        })
        .unwrap_or_default();
    for y in 0..size {
        for x in 0..size {
            let q = [(x as f32 + 0.5) * inv, (y as f32 + 0.5) * inv];
            let t = (q[0] - 0.5) * bg.gdir[0] + (q[1] - 0.5) * bg.gdir[1];
            let mut c = [
                bg.base[0] + bg.grad[0] * t,
                bg.base[1] + bg.grad[1] * t,
                bg.base[2] + bg.grad[2] * t,
            ];
            for ((shape, color, a), b) in bg.items.iter().zip(&bg_bounds) {
                if !inside(b, q) {
                    continue;
                }
                let cov = coverage(shape.sd(q), inv);
                if cov > 0.0 {
                    blend(&mut c, *color, cov * a);
                }
            }
            if let Some(l) = face {
                let dx = x as f32 - l.center[0];
                let dy = y as f32 - l.center[1];
                let (sr, cr) = l.roll.sin_cos();
                let p = [
                    (cr * dx + sr * dy) / l.scale,
                    (-sr * dx + cr * dy) / l.scale,
                ];
                let px = 1.0 / l.scale;
                // Shading from an ellipsoid normal, extended smoothly outside the face.
                let nu = (p[0] - l.face_c[0]) / l.face_a;
                let nv = (p[1] - l.face_c[1]) / 1.05;
                let nz = (1.0 - nu * nu - nv * nv).max(0.05).sqrt();
                let nn = (nu * nu + nv * nv + nz * nz).sqrt();
                let lam = ((nu * l.light[0] + nv * l.light[1] + nz * l.light[2]) / nn).max(0.0);
                let shade = l.ambient + (1.0 - l.ambient) * lam * 1.1;
                for (pt, b) in l.paints.iter().zip(&face_bounds) {
                    if !inside(b, p) {
                        continue;
                    }
                    let cov = coverage(pt.shape.sd(p), px);
                    if cov > 0.0 {
                        let col = if pt.lit {
                            scale3(pt.color, shade)
                        } else {
                            scale3(pt.color, 0.5 + 0.5 * shade)
                        };
                        blend(&mut c, col, cov * pt.alpha);
                    }
                }
            }
            let o = (y * size + x) * 3;
            img[o..o + 3].copy_from_slice(&c);
        }
    }
    img
}

fn box_blur(img: &mut [f32], size: usize, radius: usize) {
    if radius == 0 {
        return;
    }
    let mut tmp = img.to_vec();
    // Horizontal then vertical, clamped borders.
    for pass in 0..2 {
        let src = img.to_vec();
        for y in 0..size {
            for x in 0..size {
                let mut acc = [0f32; 3];
                let mut n = 0f32;
                for d in -(radius as isize)..=(radius as isize) {
                    let (xx, yy) = if pass == 0 {
                        ((x as isize + d).clamp(0, size as isize - 1) as usize, y)
                    } else {
                        (x, (y as isize + d).clamp(0, size as isize - 1) as usize)
                    };
                    let o = (yy * size + xx) * 3;
                    for k in 0..3 {
                        acc[k] += src[o + k];
                    }
                    n += 1.0;
                }
                let o = (y * size + x) * 3;
                for k in 0..3 {
                    tmp[o + k] = acc[k] / n;
                }
            }
        }
        img.copy_from_slice(&tmp);
    }
}

/// Camera: colour cast, contrast/gamma, optional blur, sensor noise; then to u8.
fn camera(mut img: Vec<f32>, size: usize, r: &mut Rng, low_quality: bool) -> Vec<u8> {
    let cast = [
        1.0 + r.normal_clip(0.07, 0.2),
        1.0 + r.normal_clip(0.04, 0.15),
        1.0 + r.normal_clip(0.07, 0.2),
    ];
    let gain = r.range(0.75, 1.25);
    let gamma = r.range(0.8, 1.25);
    let mut sigma = r.range(0.005, 0.035);
    if r.chance(0.3) {
        box_blur(&mut img, size, 1.max(size / 64));
    }
    if low_quality {
        match r.below(5) {
            0 => {
                let rad = (size / 10).max(2);
                box_blur(&mut img, size, rad);
                box_blur(&mut img, size, rad);
            }
            1 => {
                for v in img.iter_mut() {
                    *v *= 0.12;
                }
                sigma = 0.04;
            }
            2 => sigma = r.range(0.12, 0.2),
            3 => {
                // Occluder over a large part of the face.
                let w = r.range(0.35, 0.6) * size as f32;
                let h = r.range(0.35, 0.6) * size as f32;
                let x0 = r.range(0.15, 0.85) * size as f32 - w / 2.0;
                let y0 = r.range(0.15, 0.85) * size as f32 - h / 2.0;
                let col = r.color();
                for y in 0..size {
                    for x in 0..size {
                        let (fx, fy) = (x as f32, y as f32);
                        if fx >= x0 && fx < x0 + w && fy >= y0 && fy < y0 + h {
                            let o = (y * size + x) * 3;
                            img[o..o + 3].copy_from_slice(&col);
                        }
                    }
                }
            }
            _ => {
                // Pixelate by 6.
                let b = (size / 10).max(2);
                for by in (0..size).step_by(b) {
                    for bx in (0..size).step_by(b) {
                        let o = (by * size + bx) * 3;
                        let col = [img[o], img[o + 1], img[o + 2]];
                        for y in by..(by + b).min(size) {
                            for x in bx..(bx + b).min(size) {
                                let o = (y * size + x) * 3;
                                img[o..o + 3].copy_from_slice(&col);
                            }
                        }
                    }
                }
            }
        }
    }
    let mut out = vec![0u8; img.len()];
    for (i, v) in img.iter().enumerate() {
        let c = (v * cast[i % 3] * gain).max(0.0).powf(gamma) + sigma * r.normal();
        out[i] = (c * 255.0 + 0.5).clamp(0.0, 255.0) as u8;
    }
    out
}

/// What one image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Clean,
    LabelNoise,
    LowQuality,
    OutOfDomain,
}

/// One rendered image with its metadata.
struct Rendered {
    pixels: Vec<u8>,
    landmarks: [[f32; 2]; 5],
}

/// Nominal landmark positions (fraction of the image side) used for out-of-domain images.
const NOMINAL: [[f32; 2]; 5] = [
    [0.36, 0.42],
    [0.64, 0.42],
    [0.50, 0.57],
    [0.39, 0.70],
    [0.61, 0.70],
];

fn render_image(
    seed: u64,
    split: u64,
    shown: &Identity,
    ident: u64,
    img: u64,
    size: usize,
    kind: Kind,
) -> Rendered {
    let mut r = Rng::new(&[seed, STREAM_IMAGE, split, ident, img]);
    let nitems = 2 + r.below(7);
    let bg = background(&mut r, nitems);
    if kind == Kind::OutOfDomain {
        // A scene of clutter with a large object, no face.
        let extra = 8 + r.below(10);
        let bg2 = background(&mut r, extra);
        let mut bgm = bg;
        bgm.items.extend(bg2.items);
        let pix = render(size, &bgm, None);
        let lm = NOMINAL.map(|p| {
            [
                (p[0] + r.normal_clip(0.03, 0.08)) * size as f32,
                (p[1] + r.normal_clip(0.03, 0.08)) * size as f32,
            ]
        });
        return Rendered {
            pixels: camera(pix, size, &mut r, false),
            landmarks: lm,
        };
    }
    let layout = face_layout(shown, &mut r, size as f32);
    let pix = render(size, &bg, Some(&layout));
    Rendered {
        pixels: camera(pix, size, &mut r, kind == Kind::LowQuality),
        landmarks: layout.landmarks,
    }
}

fn identities(seed: u64, split: u64, n: usize) -> Vec<Identity> {
    (0..n)
        .map(|i| Identity::sample(&mut Rng::new(&[seed, STREAM_LATENT, split, i as u64])))
        .collect()
}

/// Progress/cancel hooks so the generator runs inside or outside the engine.
pub trait Monitor: Sync {
    /// `done` of `total` images rendered.
    fn progress(&self, done: u64, total: u64);
    /// True once the run should stop.
    fn cancelled(&self) -> bool {
        false
    }
}

impl Monitor for () {
    fn progress(&self, _: u64, _: u64) {}
}

/// Error of [`generate`]: a data error or a cancelled run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Writing the data set failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The monitor asked to stop.
    #[error("interrupted")]
    Interrupted,
}

/// Counts of what was generated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SynthCounts {
    /// Images in the training set.
    pub train_images: usize,
    /// Training images labelled with another identity.
    pub label_noise: usize,
    /// Training images degraded.
    pub low_quality: usize,
    /// Training images that are not faces.
    pub out_of_domain: usize,
    /// Images in the verification set.
    pub test_images: usize,
    /// Verification pairs.
    pub pairs: usize,
}

const CHUNK: usize = 256;

/// Writes the training set into `train_dir` and the verification set (held-out identities,
/// pairs) into `pairs_dir` (skipped when `None`).
pub fn generate(
    p: &SynthParams,
    train_dir: &Path,
    pairs_dir: Option<&Path>,
    monitor: &dyn Monitor,
) -> Result<SynthCounts, GenerateError> {
    p.check().map_err(DataError::Invalid)?;
    let n = p.identities * p.images_per_identity;
    let test_n = if pairs_dir.is_some() {
        p.test_identities * p.test_images_per_identity
    } else {
        0
    };
    let total = (n + test_n) as u64;
    // Assign corruptions to exact counts of images by a seeded shuffle.
    let mut order: Vec<usize> = (0..n).collect();
    let mut ar = Rng::new(&[p.seed, STREAM_ASSIGN]);
    for i in (1..n).rev() {
        order.swap(i, ar.below(i + 1));
    }
    let k_noise = (p.label_noise * n as f64).round() as usize;
    let k_low = (p.low_quality * n as f64).round() as usize;
    let k_ood = ((p.out_of_domain * n as f64).round() as usize).min(n - k_noise - k_low);
    let mut kinds = vec![Kind::Clean; n];
    let mut shown = (0..n)
        .map(|i| i / p.images_per_identity)
        .collect::<Vec<_>>();
    for (rank, &i) in order.iter().enumerate() {
        kinds[i] = if rank < k_noise {
            Kind::LabelNoise
        } else if rank < k_noise + k_low {
            Kind::LowQuality
        } else if rank < k_noise + k_low + k_ood {
            Kind::OutOfDomain
        } else {
            Kind::Clean
        };
        if kinds[i] == Kind::LabelNoise {
            let own = i / p.images_per_identity;
            let other = ar.below(p.identities - 1);
            shown[i] = if other >= own { other + 1 } else { other };
        }
    }
    let train_ids = identities(p.seed, SPLIT_TRAIN, p.identities);
    let size = p.image_size;
    let mut w = PackedWriter::create(train_dir, size, size)?;
    let mut done = 0u64;
    for start in (0..n).step_by(CHUNK) {
        if monitor.cancelled() {
            return Err(GenerateError::Interrupted);
        }
        let end = (start + CHUNK).min(n);
        let batch: Vec<Rendered> = (start..end)
            .into_par_iter()
            .map(|i| {
                let label = i / p.images_per_identity;
                let j = (i % p.images_per_identity) as u64;
                render_image(
                    p.seed,
                    SPLIT_TRAIN,
                    &train_ids[shown[i]],
                    label as u64,
                    j,
                    size,
                    kinds[i],
                )
            })
            .collect();
        for (k, img) in batch.into_iter().enumerate() {
            let i = start + k;
            let label = (i / p.images_per_identity) as i64;
            let truth = ImageTruth {
                true_label: (kinds[i] != Kind::OutOfDomain).then_some(shown[i] as i64),
                label_noise: kinds[i] == Kind::LabelNoise,
                low_quality: kinds[i] == Kind::LowQuality,
                out_of_domain: kinds[i] == Kind::OutOfDomain,
            };
            w.push(&img.pixels, label, Some(img.landmarks), truth)?;
        }
        done += (end - start) as u64;
        monitor.progress(done, total);
    }
    let counts = SynthCounts {
        train_images: n,
        label_noise: k_noise,
        low_quality: k_low,
        out_of_domain: k_ood,
        test_images: test_n,
        pairs: if pairs_dir.is_some() { p.pairs } else { 0 },
    };
    let prov = provenance(p, "train");
    w.set_meta(
        "corruptions",
        json!({"label_noise": k_noise, "low_quality": k_low, "out_of_domain": k_ood}),
    );
    w.finish(prov)?;

    if let Some(dir) = pairs_dir {
        let test_ids = identities(p.seed, SPLIT_TEST, p.test_identities);
        let per = p.test_images_per_identity;
        let mut w = PackedWriter::create(dir, size, size)?;
        for start in (0..test_n).step_by(CHUNK) {
            if monitor.cancelled() {
                return Err(GenerateError::Interrupted);
            }
            let end = (start + CHUNK).min(test_n);
            let batch: Vec<Rendered> = (start..end)
                .into_par_iter()
                .map(|i| {
                    let id = i / per;
                    render_image(
                        p.seed,
                        SPLIT_TEST,
                        &test_ids[id],
                        id as u64,
                        (i % per) as u64,
                        size,
                        Kind::Clean,
                    )
                })
                .collect();
            for (k, img) in batch.into_iter().enumerate() {
                let id = ((start + k) / per) as i64;
                let truth = ImageTruth {
                    true_label: Some(id),
                    ..ImageTruth::default()
                };
                w.push(&img.pixels, id, Some(img.landmarks), truth)?;
            }
            done += (end - start) as u64;
            monitor.progress(done, total);
        }
        w.set_pairs(make_pairs(p));
        w.finish(provenance(p, "pairs"))?;
    }
    Ok(counts)
}

/// Pairs over the held-out images: the first half same identity, the second half different,
/// interleaved (same, different, same, ...), so any contiguous fold is balanced.
fn make_pairs(p: &SynthParams) -> Vec<(u32, u32, bool)> {
    let per = p.test_images_per_identity;
    let ids = p.test_identities;
    let mut r = Rng::new(&[p.seed, STREAM_PAIRS]);
    let mut out = Vec::with_capacity(p.pairs);
    for k in 0..p.pairs {
        if k % 2 == 0 {
            let id = r.below(ids);
            let a = r.below(per);
            let mut b = r.below(per - 1);
            if b >= a {
                b += 1;
            }
            out.push(((id * per + a) as u32, (id * per + b) as u32, true));
        } else {
            let i1 = r.below(ids);
            let mut i2 = r.below(ids - 1);
            if i2 >= i1 {
                i2 += 1;
            }
            let a = i1 * per + r.below(per);
            let b = i2 * per + r.below(per);
            out.push((a as u32, b as u32, false));
        }
    }
    out
}

fn provenance(p: &SynthParams, split: &str) -> Value {
    json!({
        "kind": "synthetic-faces",
        "version": VERSION,
        "split": split,
        "params": {
            "identities": p.identities,
            "images_per_identity": p.images_per_identity,
            "image_size": p.image_size,
            "seed": p.seed,
            "label_noise": p.label_noise,
            "low_quality": p.low_quality,
            "out_of_domain": p.out_of_domain,
            "test_identities": p.test_identities,
            "test_images_per_identity": p.test_images_per_identity,
            "pairs": p.pairs,
        }
    })
}

/// Implementation version of the renderer (the stage's `version()`).
pub const VERSION: u32 = 1;
