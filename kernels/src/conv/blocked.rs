//! Depthwise convolution (one input and one output channel per group) in a channel-blocked
//! layout, vectorised over channels rather than pixels.
//!
//! The polyphase kernels of `direct.rs` vectorise along a plane's rows, which wastes most of
//! each vector on the small planes of a face network's later layers (7x7, 14x14) and, at
//! stride 2, needs four sub-planes per channel. Here `L` channels are interleaved instead
//! (`xb[(row·wp + col)·L + lane]`, zero-padded, the layout oneDNN calls nChw8c), so every
//! multiply-add is a full `L`-lane vector whatever the plane size or stride, and the kernel's
//! taps are plain index arithmetic. The cost is the transposition into and out of that layout,
//! which is linear in the data and small against the taps' work.
//!
//! The input gradient at stride 1 is not here: `direct::backward_data` turns it into a forward
//! convolution with the rotated kernel, which lands in [`forward`].

use rayon::prelude::*;

use super::simd::{self, level, multiversion, Level};
use super::Geom;
use crate::elem::Elem;
use std::mem::MaybeUninit;

use crate::uninit::{assume_init, output_vec};

/// Channels per block: one AVX2 register of f32.
const L: usize = 8;
/// Output pixels per register block of the forward kernel.
const PB: usize = 8;

/// Whether `g` is a depthwise convolution these kernels handle.
pub fn applies(g: &Geom) -> bool {
    g.groups == g.c && g.o == g.c && g.c > 1 && g.stride > 1
}

/// Padded plane geometry of one channel block.
struct Plane {
    hp: usize,
    wp: usize,
}

impl Plane {
    fn new(g: &Geom) -> Self {
        Plane {
            hp: g.h + 2 * g.pad,
            wp: g.w + 2 * g.pad,
        }
    }
    fn size(&self) -> usize {
        self.hp * self.wp * L
    }
}

/// The (image, channel block, planes) pieces of an NCHW buffer, in parallel.
fn per_block<T: Send>(
    buf: &mut [T],
    image: usize,
    block: usize,
) -> impl ParallelIterator<Item = (usize, usize, &mut [T])> {
    buf.par_chunks_mut(image)
        .enumerate()
        .flat_map(move |(n, img)| {
            img.par_chunks_mut(block)
                .enumerate()
                .map(move |(b, blk)| (n, b, blk))
        })
}

/// Channel blocks of `g`.
fn blocks(g: &Geom) -> usize {
    g.c.div_ceil(L)
}

/// Copies the (up to `L`) planes of `planes` (`h·w` each) into the blocked, zero-padded
/// `dst` (pitch `wp`).
fn pack<T: Elem>(planes: &[T], hw: (usize, usize), pad: usize, wp: usize, dst: &mut [T]) {
    let (h, w) = hw;
    if planes.len() == L * h * w && fast_transpose() {
        // Only the border needs zeros: the interior is overwritten.
        let hp = h + 2 * pad;
        dst[..pad * wp * L].fill(T::ZERO);
        dst[(h + pad) * wp * L..hp * wp * L].fill(T::ZERO);
        for r in pad..h + pad {
            dst[r * wp * L..(r * wp + pad) * L].fill(T::ZERO);
            dst[(r * wp + pad + w) * L..(r + 1) * wp * L].fill(T::ZERO);
        }
        if let (Some(src), Some(d)) = (simd::as_f32(planes), simd::as_f32_mut(dst)) {
            // SAFETY: `fast_transpose` checked AVX2; the slices are sized as asserted inside.
            unsafe { x86::pack8(src, h, w, pad, wp, d) };
            return;
        }
    }
    dst.fill(T::ZERO);
    for (l, plane) in planes.chunks_exact(h * w).enumerate() {
        for (hi, row) in plane.chunks_exact(w).enumerate() {
            let base = ((hi + pad) * wp + pad) * L + l;
            for (k, &v) in row.iter().enumerate() {
                dst[base + k * L] = v;
            }
        }
    }
}

/// The inverse of [`pack`] for the (up to `L`) planes of `planes`, reading from `src` rows
/// `pad..pad + h`, columns `pad..pad + w` of pitch `wp`.
fn unpack<T: Elem>(
    src: &[T],
    hw: (usize, usize),
    pad: usize,
    wp: usize,
    planes: &mut [MaybeUninit<T>],
) {
    let (h, w) = hw;
    if planes.len() == L * h * w && fast_transpose() {
        // SAFETY: `unpack8` writes only values of `src`.
        let d32 = unsafe { simd::as_f32_slots::<T, _>(&mut *planes) };
        if let (Some(s), Some(d)) = (simd::as_f32(src), d32) {
            // SAFETY: as in `pack`.
            unsafe { x86::unpack8(s, h, w, pad, wp, d) };
            return;
        }
    }
    for (l, plane) in planes.chunks_exact_mut(h * w).enumerate() {
        for (hi, row) in plane.chunks_exact_mut(w).enumerate() {
            let base = ((hi + pad) * wp + pad) * L + l;
            for (k, v) in row.iter_mut().enumerate() {
                v.write(src[base + k * L]);
            }
        }
    }
}

/// Whether [`x86::pack8`] / [`x86::unpack8`] can run (f32 callers only).
fn fast_transpose() -> bool {
    // The same test as the other AVX2 kernels' (`level()` is `Base` off x86_64).
    level() != Level::Base
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub unsafe fn pack8(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("fast_transpose() is false off x86_64")
    }
    pub unsafe fn unpack8(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [std::mem::MaybeUninit<f32>],
    ) {
        unreachable!("fast_transpose() is false off x86_64")
    }
}

/// 8x8 f32 transposes with AVX2 for the layout change, 8 columns of 8 planes at a time.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::simd::avx2::transpose8 as transpose;

    /// `dst[((hi + pad)·wp + pad + k)·8 + l] = src[l·h·w + hi·w + k]` for 8 planes.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pack8(src: &[f32], h: usize, w: usize, pad: usize, wp: usize, dst: &mut [f32]) {
        let hw = h * w;
        assert!(src.len() >= 8 * hw && dst.len() >= (h + 2 * pad) * wp * 8 && w + 2 * pad <= wp);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for hi in 0..h {
            let out = ((hi + pad) * wp + pad) * 8;
            let mut k = 0;
            while k + 8 <= w {
                let r: [__m256; 8] =
                    std::array::from_fn(|l| _mm256_loadu_ps(s.add(l * hw + hi * w + k)));
                for (j, v) in transpose(r).into_iter().enumerate() {
                    _mm256_storeu_ps(d.add(out + (k + j) * 8), v);
                }
                k += 8;
            }
            // The last partial run of columns as one more transposed block: for rows of 8
            // or more, an overlapping block ending at the row's end (rewriting equal values);
            // for shorter rows (7x7 planes), one reading past the row's end into the next
            // row, of which only the first `w - k` columns are stored, except on the
            // plane's last row. A scalar tail per lane took 29 % of a 14x14 stride-2
            // depthwise layer's time (perf).
            let kk = if k < w && w >= 8 { w - 8 } else { k };
            if k < w && (w >= 8 || hi * w + k + 8 <= hw) {
                let r: [__m256; 8] =
                    std::array::from_fn(|l| _mm256_loadu_ps(s.add(l * hw + hi * w + kk)));
                for (j, v) in transpose(r).into_iter().enumerate().take(w - kk) {
                    _mm256_storeu_ps(d.add(out + (kk + j) * 8), v);
                }
                k = w;
            }
            for k in k..w {
                for l in 0..8 {
                    *d.add(out + k * 8 + l) = *s.add(l * hw + hi * w + k);
                }
            }
        }
    }

    /// The inverse of [`pack8`].
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn unpack8(
        src: &[f32],
        h: usize,
        w: usize,
        pad: usize,
        wp: usize,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let hw = h * w;
        assert!(dst.len() >= 8 * hw && src.len() >= (h + 2 * pad) * wp * 8 && w + 2 * pad <= wp);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr().cast::<f32>());
        for hi in 0..h {
            let inp = ((hi + pad) * wp + pad) * 8;
            let mut k = 0;
            while k + 8 <= w {
                let r: [__m256; 8] =
                    std::array::from_fn(|j| _mm256_loadu_ps(s.add(inp + (k + j) * 8)));
                for (l, v) in transpose(r).into_iter().enumerate() {
                    _mm256_storeu_ps(d.add(l * hw + hi * w + k), v);
                }
                k += 8;
            }
            // As in `pack8`: an overlapping last block for rows of 8 or more; for shorter
            // rows a block whose extra columns spill into the next row of each plane, which
            // is written after this one (not on the last row, where it would reach the next
            // plane, and only where the block's reads stay inside `src`).
            if k < w && w >= 8 {
                let kk = w - 8;
                let r: [__m256; 8] =
                    std::array::from_fn(|j| _mm256_loadu_ps(s.add(inp + (kk + j) * 8)));
                for (l, v) in transpose(r).into_iter().enumerate() {
                    _mm256_storeu_ps(d.add(l * hw + hi * w + kk), v);
                }
                k = w;
            } else if k < w && hi + 1 < h && inp + (k + 8) * 8 <= src.len() {
                let r: [__m256; 8] =
                    std::array::from_fn(|j| _mm256_loadu_ps(s.add(inp + (k + j) * 8)));
                for (l, v) in transpose(r).into_iter().enumerate() {
                    _mm256_storeu_ps(d.add(l * hw + hi * w + k), v);
                }
                k = w;
            }
            for k in k..w {
                for l in 0..8 {
                    *d.add(l * hw + hi * w + k) = *s.add(inp + k * 8 + l);
                }
            }
        }
    }
}

/// Each channel block's weights, tap-major: `wbs[b][t·L + lane]` (lanes past the last
/// channel are zero).
fn block_weights<T: Elem>(g: &Geom, w: &[T]) -> Vec<Vec<T>> {
    let taps = g.kh * g.kw;
    (0..blocks(g))
        .map(|b| {
            let mut wb = vec![T::ZERO; taps * L];
            for l in 0..(g.c - b * L).min(L) {
                for t in 0..taps {
                    wb[t * L + l] = w[(b * L + l) * taps + t];
                }
            }
            wb
        })
        .collect()
}

/// Geometry of one kernel call, copied into the vector bodies.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    wp: usize,
    pad: usize,
    s: usize,
    kh: usize,
    kw: usize,
}

impl Shape {
    fn new(g: &Geom, p: &Plane) -> Self {
        Shape {
            h: g.h,
            w: g.w,
            ho: g.ho,
            wo: g.wo,
            wp: p.wp,
            pad: g.pad,
            s: g.stride,
            kh: g.kh,
            kw: g.kw,
        }
    }

    /// Zero margin around the output-gradient plane for [`bwd_data_gather_block`]: enough
    /// that every tap of every input position reads inside it, so no position needs a
    /// bounds test.
    fn gather_margin(&self) -> usize {
        let top = (self.kh.max(self.kw) - 1).div_ceil(self.s);
        let bottom = ((self.h + self.pad - 1) / self.s + 1).saturating_sub(self.ho);
        let right = ((self.w + self.pad - 1) / self.s + 1).saturating_sub(self.wo);
        top.max(bottom).max(right)
    }
}

multiversion! {
    /// `yb[o] = Σ_t wb[t] ⊙ xb[o·s + tap t]` over one channel block.
    fn fwd_block(sh: Shape, xb: &[T], wb: &[T], yb: &mut [T]) => fwd_body
}

multiversion! {
    /// `dxb[i] = Σ wb[t] ⊙ gp[o]` over the taps `t` and outputs `o` that read input `i`, over
    /// one channel block: the gather form of the input gradient, for stride > 1. `gp` is the
    /// output gradient with a zero margin of [`Shape::gather_margin`]; `dxb` is unpadded.
    fn bwd_data_gather_block(sh: Shape, gp: &[T], wb: &[T], dxb: &mut [T]) => bwd_data_gather_body
}

multiversion! {
    /// `acc[t] += Σ_o gb[o] ⊙ xb[o·s + tap t]` over one channel block.
    fn bwd_filter_block(sh: Shape, xb: &[T], gb: &[T], acc: &mut [T]) => bwd_filter_body
}

#[inline(always)]
fn lanes<T: Elem>(v: &[T], at: usize) -> [T; L] {
    let mut r = [T::ZERO; L];
    r.copy_from_slice(&v[at..at + L]);
    r
}

#[inline(always)]
fn fwd_body<T: Elem>(sh: Shape, xb: &[T], wb: &[T], yb: &mut [T]) {
    for oy in 0..sh.ho {
        let mut ox = 0;
        // PB outputs at a time, so that each weight vector loaded feeds PB multiply-adds.
        while ox < sh.wo {
            let pb = (sh.wo - ox).min(PB);
            let mut acc = [[T::ZERO; L]; PB];
            for i in 0..sh.kh {
                let row = (oy * sh.s + i) * sh.wp;
                for j in 0..sh.kw {
                    let wv = lanes(wb, (i * sh.kw + j) * L);
                    for (q, a) in acc.iter_mut().enumerate().take(pb) {
                        let xv = lanes(xb, (row + (ox + q) * sh.s + j) * L);
                        for l in 0..L {
                            a[l] = wv[l].mul_add(xv[l], a[l]);
                        }
                    }
                }
            }
            for (q, a) in acc.iter().enumerate().take(pb) {
                yb[(oy * sh.wo + ox + q) * L..][..L].copy_from_slice(a);
            }
            ox += pb;
        }
    }
}

#[inline(always)]
fn bwd_data_gather_body<T: Elem>(sh: Shape, gp: &[T], wb: &[T], dxb: &mut [T]) {
    let (s, mg) = (sh.s, sh.gather_margin());
    let wg = sh.wo + 2 * mg;
    // Input positions of one phase (row ≡ a, column ≡ b mod s) are read by the same taps
    // (rows i ≡ a + pad, columns j ≡ b + pad mod s); stepping the position by s steps each
    // tap's output by one. So each phase is a small dense correlation over the output
    // gradient, register-blocked over PB positions of a row, one store per input position.
    for a in 0..s.min(sh.h) {
        let ia = (a + sh.pad) % s;
        let nk = sh.kh.saturating_sub(ia).div_ceil(s);
        // Padded output row of tap ia for input row a.
        let qa = (a + sh.pad) / s + mg;
        for b in 0..s.min(sh.w) {
            let jb = (b + sh.pad) % s;
            let nm = sh.kw.saturating_sub(jb).div_ceil(s);
            let qb = (b + sh.pad) / s + mg;
            let cols = (sh.w - b).div_ceil(s);
            for (u, y) in (a..sh.h).step_by(s).enumerate() {
                let mut t = 0;
                while t < cols {
                    let pb = (cols - t).min(PB);
                    let mut acc = [[T::ZERO; L]; PB];
                    for k in 0..nk {
                        let row = (qa + u - k) * wg;
                        for m in 0..nm {
                            let wv = lanes(wb, ((ia + k * s) * sh.kw + jb + m * s) * L);
                            let col = qb + t - m;
                            for (q, acc) in acc.iter_mut().enumerate().take(pb) {
                                let gv = lanes(gp, (row + col + q) * L);
                                for l in 0..L {
                                    acc[l] = wv[l].mul_add(gv[l], acc[l]);
                                }
                            }
                        }
                    }
                    for (q, acc) in acc.iter().enumerate().take(pb) {
                        dxb[(y * sh.w + b + (t + q) * s) * L..][..L].copy_from_slice(acc);
                    }
                    t += pb;
                }
            }
        }
    }
}

#[inline(always)]
fn bwd_filter_body<T: Elem>(sh: Shape, xb: &[T], gb: &[T], acc: &mut [T]) {
    // Up to TB taps' accumulators (a 3x3 kernel's nine) stay in registers across the plane.
    const TB: usize = 9;
    let taps = sh.kh * sh.kw;
    let mut t0 = 0;
    while t0 < taps {
        let k = (taps - t0).min(TB);
        let mut a = [[T::ZERO; L]; TB];
        // Offset of each tap of this pass from the output's top-left input (unused past `k`).
        let off: [usize; TB] = std::array::from_fn(|t| {
            let tap = (t0 + t).min(taps - 1);
            (tap / sh.kw) * sh.wp + tap % sh.kw
        });
        for oy in 0..sh.ho {
            for ox in 0..sh.wo {
                let gv = lanes(gb, (oy * sh.wo + ox) * L);
                let base = oy * sh.s * sh.wp + ox * sh.s;
                for (t, at) in a.iter_mut().enumerate().take(k) {
                    let xv = lanes(xb, (base + off[t]) * L);
                    for l in 0..L {
                        at[l] = gv[l].mul_add(xv[l], at[l]);
                    }
                }
            }
        }
        for (t, at) in a.iter().enumerate().take(k) {
            for l in 0..L {
                acc[(t0 + t) * L + l] += at[l];
            }
        }
        t0 += k;
    }
}

/// Forward pass of a depthwise convolution.
pub fn forward<T: Elem>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let p = Plane::new(g);
    let sh = Shape::new(g, &p);
    let (ihw, ohw) = (g.in_hw(), g.out_hw());
    let wbs = block_weights(g, w);
    let mut y = output_vec::<T>(g.n * g.c * ohw);
    // One task per (image, channel block): the block's output planes are contiguous.
    per_block(&mut y, g.c * ohw, L * ohw).for_each(|(n, b, yblk)| {
        let lanes = yblk.len() / ohw;
        let c0 = b * L;
        T::with_scratch(p.size() + ohw * L, |scr| {
            let (xb, yb) = scr.split_at_mut(p.size());
            let xs = &x[(n * g.c + c0) * ihw..][..lanes * ihw];
            pack(xs, (g.h, g.w), g.pad, p.wp, xb);
            fwd_block(sh, xb, &wbs[b], &mut yb[..ohw * L]);
            unpack(yb, (g.ho, g.wo), 0, g.wo, yblk);
        })
    });
    // SAFETY: `per_block` covers `y`; `unpack` writes every element of each block.
    unsafe { assume_init(y) }
}

/// Input gradient of a depthwise convolution at any stride (gathered per input position).
pub fn backward_data<T: Elem>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
    let p = Plane::new(g);
    let sh = Shape::new(g, &p);
    let (ihw, ohw) = (g.in_hw(), g.out_hw());
    let mg = sh.gather_margin();
    let gp_len = (g.ho + 2 * mg) * (g.wo + 2 * mg) * L;
    let wbs = block_weights(g, w);
    let mut dx = output_vec::<T>(g.n * g.c * ihw);
    per_block(&mut dx, g.c * ihw, L * ihw).for_each(|(n, b, dblk)| {
        let lanes = dblk.len() / ihw;
        let c0 = b * L;
        T::with_scratch(gp_len + ihw * L, |scr| {
            let (gp, dxb) = scr.split_at_mut(gp_len);
            let gs = &dy[(n * g.c + c0) * ohw..][..lanes * ohw];
            pack(gs, (g.ho, g.wo), mg, g.wo + 2 * mg, gp);
            bwd_data_gather_block(sh, gp, &wbs[b], dxb);
            unpack(dxb, (g.h, g.w), 0, g.w, dblk);
        })
    });
    // SAFETY: `per_block` covers `dx`; `unpack` writes every element of each block.
    unsafe { assume_init(dx) }
}

/// Weight gradient of a depthwise convolution: one task per channel block, summing images.
pub fn backward_filter<T: Elem>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    let (p, taps) = (Plane::new(g), g.kh * g.kw);
    let sh = Shape::new(g, &p);
    let (ihw, ohw) = (g.in_hw(), g.out_hw());
    let mut dw = vec![T::ZERO; g.c * taps];
    dw.par_chunks_mut(L * taps)
        .enumerate()
        .with_max_len(1)
        .for_each(|(b, dwb)| {
            let lanes = dwb.len() / taps;
            let c0 = b * L;
            T::with_scratch(p.size() + ohw * L + taps * L, |scr| {
                let (xb, rest) = scr.split_at_mut(p.size());
                let (gb, acc) = rest.split_at_mut(ohw * L);
                let acc = &mut acc[..taps * L];
                acc.fill(T::ZERO);
                for n in 0..g.n {
                    pack(
                        &x[(n * g.c + c0) * ihw..][..lanes * ihw],
                        (g.h, g.w),
                        g.pad,
                        p.wp,
                        xb,
                    );
                    pack(
                        &dy[(n * g.c + c0) * ohw..][..lanes * ohw],
                        (g.ho, g.wo),
                        0,
                        g.wo,
                        gb,
                    );
                    bwd_filter_block(sh, xb, gb, acc);
                }
                for l in 0..lanes {
                    for t in 0..taps {
                        dwb[l * taps + t] = acc[t * L + l];
                    }
                }
            })
        });
    dw
}
