//! Direct kernels for depthwise and narrow-group convolutions (forward and both gradients).
//!
//! A thin GEMM (8-16 rows for VarGFaceNet's groups of 8, one row for depthwise) cannot use a
//! GEMM microkernel well, so these convolve plane by plane. To make every kernel tap one
//! contiguous, vectorisable multiply-add, each input plane is first copied into a zero-padded
//! *polyphase* layout: for stride `s` the padded plane is split into `s·s` sub-planes by row
//! and column parity (row `r`, column `q` of sub-plane `(pr, pc)` holds padded pixel
//! `(r·s + pr, q·s + pc)`), all with row pitch `wq = ceil(padded width / s)`. Tap `(i, j)` of
//! output pixel `(ho, wo)` then reads sub-plane `(i % s, j % s)` at `(ho + i/s)·wq + wo + j/s`,
//! so, counting outputs in the same pitch (`f = ho·wq + wo`), every tap is a constant offset
//! from `f`. Outputs are computed over `f` in `0..(ho-1)·wq + wo`, including `wq - wo`
//! throw-away columns per row, and the real columns copied out afterwards.
//!
//! Groups with a multiple of 16 outputs (VarGFaceNet's expanding layers), f32 on AVX2, take
//! channel-vectorised kernels instead ([`simd::fwd_pixels`], [`simd::wgrad_pixels`]): plain
//! zero-padded planes ([`Padded`]) and a list of the real output pixels, so neither the
//! throw-away columns nor the polyphase split are needed. The input gradient runs on a
//! forward kernel at every stride: at stride 1 as the forward convolution with the rotated,
//! transposed kernel ([`transposed`]), at stride `s > 1` as `s·s` such correlations, one per
//! output phase ([`backward_data_phases`]).
//!
//! Two shapes bypass the polyphase layout: 3x3 stride-1 depthwise convolutions (and so their
//! input gradients) run on `dw3.rs` straight from the unpadded planes, and stride-2 depthwise
//! ones on the channel-blocked kernels of `blocked.rs`. On CPUs with AVX-512F the f32
//! kernels of `simd/` that vectorise over pixels or over 16-channel blocks hand over to
//! their 16-lane versions in `simd/avx512.rs`.

use rayon::prelude::*;

use super::split::min_tasks;
use super::{blocked, dw3, simd, Geom};
use crate::elem::Elem;
use std::mem::MaybeUninit;

use crate::uninit::{assume_init, output_vec, Slot};

/// Polyphase layout of one padded input plane (see the module comment).
struct Poly {
    s: usize,
    wq: usize,
    /// Size of one sub-plane.
    sub: usize,
    /// Offset of each tap `(i, j)`, in row-major tap order.
    off: Vec<usize>,
    /// Number of flat output positions computed, `(ho - 1)·wq + wo`.
    len: usize,
}

impl Poly {
    fn new(g: &Geom) -> Self {
        let s = g.stride;
        let hq = (g.h + 2 * g.pad).div_ceil(s);
        let wq = (g.w + 2 * g.pad).div_ceil(s);
        let sub = hq * wq;
        let off = (0..g.kh)
            .flat_map(|i| {
                (0..g.kw).map(move |j| ((i % s) * s + j % s) * sub + (i / s) * wq + j / s)
            })
            .collect();
        Self {
            s,
            wq,
            sub,
            off,
            len: (g.ho - 1) * wq + g.wo,
        }
    }

    /// Elements of one plane in polyphase layout.
    fn size(&self) -> usize {
        self.s * self.s * self.sub
    }

    /// Writes input plane `x` (`h·w`) into `dst` (`self.size()`), zero padding included.
    fn pack<T: Elem>(&self, g: &Geom, x: &[T], dst: &mut [T]) {
        dst.fill(T::ZERO);
        for (hi, row) in x.chunks_exact(g.w).enumerate() {
            if self.s == 2 && g.w >= 2 {
                // Both column phases at once: even input columns to one sub-plane row, odd
                // ones to the other.
                let mut runs = self
                    .row_runs(g, hi)
                    .map(|(base, first, q0)| (first, base + q0));
                let (Some(a), Some(b)) = (runs.next(), runs.next()) else {
                    unreachable!("two column phases for a row of {} >= 2", g.w)
                };
                let (ev, od) = if a.0 == 0 { (a.1, b.1) } else { (b.1, a.1) };
                let (e, o) = two_mut(dst, ev, g.w.div_ceil(2), od, g.w / 2);
                simd::deinterleave2(row, e, o);
                continue;
            }
            for (base, first, q0) in self.row_runs(g, hi) {
                if self.s == 1 {
                    copy_row(&mut dst[base + q0..base + q0 + g.w], row);
                    continue;
                }
                let d = &mut dst[base + q0..];
                for (dv, &v) in d.iter_mut().zip(row[first..].iter().step_by(self.s)) {
                    *dv = v;
                }
            }
        }
    }

    /// Reads the real (unpadded) pixels of a polyphase plane `src` back into `x` (`h·w`).
    fn unpack<T: Elem>(&self, g: &Geom, src: &[T], x: &mut [MaybeUninit<T>]) {
        for (hi, row) in x.chunks_exact_mut(g.w).enumerate() {
            for (base, first, q0) in self.row_runs(g, hi) {
                if self.s == 1 {
                    copy_row(row, &src[base + q0..base + q0 + g.w]);
                    continue;
                }
                let sv = &src[base + q0..];
                for (v, &s) in row[first..].iter_mut().step_by(self.s).zip(sv) {
                    v.write(s);
                }
            }
        }
    }

    /// For input row `hi`, one run per column phase `pc`: (start of that sub-plane row, first
    /// input column `wi` of the phase, its column in the sub-plane). Input columns
    /// `first, first + s, …` go to consecutive sub-plane columns from there, so packing is a
    /// strided copy with no division per pixel.
    fn row_runs(&self, g: &Geom, hi: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (s, rp) = (self.s, hi + g.pad);
        let row_base = (rp % s) * s * self.sub + (rp / s) * self.wq;
        let (w, pad) = (g.w, g.pad);
        (0..s).filter_map(move |pc| {
            // First wi >= 0 with (wi + pad) % s == pc.
            let first = (pc + s - pad % s) % s;
            (first < w).then(|| (row_base + pc * self.sub, first, (first + pad) / s))
        })
    }
}

/// Two disjoint runs `v[a..a + la]` and `v[b..b + lb]` of one buffer, mutably.
fn two_mut<T>(v: &mut [T], a: usize, la: usize, b: usize, lb: usize) -> (&mut [T], &mut [T]) {
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a..a + la], &mut hi[..lb])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[..la], &mut lo[b..b + lb])
    }
}

/// `dst.copy_from_slice(src)` for the short rows of small planes (7 to 56 elements), inline:
/// `copy_from_slice` becomes a call to `memmove`, which cost more than the copy itself and
/// took 22 % of a 14x14 depthwise layer's time (perf). Overlapping fixed-size blocks cover
/// the tail, so only rows under 4 elements copy element by element.
#[inline(always)]
fn copy_row<T: Copy, S: Slot<T>>(dst: &mut [S], src: &[T]) {
    let n = dst.len();
    assert_eq!(n, src.len(), "copy_row: lengths differ");
    fn block<T: Copy, S: Slot<T>, const K: usize>(dst: &mut [S], src: &[T], at: usize) {
        let mut b = [src[at]; K];
        b.copy_from_slice(&src[at..at + K]);
        let d = &mut dst[at..at + K];
        // SAFETY: `d` holds K slots of `T`'s layout (`Slot`'s contract) and does not overlap
        // `b`; a copy of constant size, unlike a loop of `set`, is sure to stay inline.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), d.as_mut_ptr().cast::<T>(), K) };
    }
    match n {
        0..4 => dst.iter_mut().zip(src).for_each(|(d, &v)| d.set(v)),
        4..8 => {
            block::<T, S, 4>(dst, src, 0);
            block::<T, S, 4>(dst, src, n - 4);
        }
        _ => {
            let mut i = 0;
            while i + 8 <= n {
                block::<T, S, 8>(dst, src, i);
                i += 8;
            }
            if i < n {
                block::<T, S, 8>(dst, src, n - 8);
            }
        }
    }
}

/// Copies output plane `y` (`ho·wo`) into the flat pitch-`wq` layout; the throw-away columns
/// of `ext` are left as they are (callers zero them once).
fn spread<T: Elem>(g: &Geom, wq: usize, y: &[T], ext: &mut [T]) {
    for (ho, row) in y.chunks_exact(g.wo).enumerate() {
        copy_row(&mut ext[ho * wq..ho * wq + g.wo], row);
    }
}

/// Runs `body(n, group, out_block, scratch)` in parallel over the unwritten output `out`
/// split into one block per (image, group) (`out.len() / (n·groups)` elements each), with
/// `scratch` elements of per-thread scratch: the task split of the forward and
/// input-gradient kernels.
fn per_image_group<T: Elem>(
    g: &Geom,
    out: &mut [MaybeUninit<T>],
    scratch: usize,
    body: impl Fn(usize, usize, &mut [MaybeUninit<T>], &mut [T]) + Send + Sync,
) {
    let macs = g.og() * g.cg() * g.kh * g.kw * g.out_hw();
    let block = out.len() / (g.n * g.groups);
    out.par_chunks_mut(block)
        .enumerate()
        .with_min_len(min_tasks(macs))
        .for_each(|(task, ob)| {
            T::with_scratch(scratch, |scr| {
                body(task / g.groups, task % g.groups, ob, scr)
            })
        });
}

/// The kernel covers the whole unpadded input, so the output is 1x1 (MobileFaceNet's GDC,
/// VarGFaceNet's 7x7 embedding conv). A group's input block `x[n, group]` then has the same
/// layout as a weight row `w[o]`, and each output is one dot product of the two.
fn full_kernel(g: &Geom) -> bool {
    g.pad == 0 && g.kh == g.h && g.kw == g.w
}

/// Forward pass: `y[n, o] = Σ_{ci in group(o)} x[n, ci] ⋆ w[o, ci]`.
pub fn forward<T: Elem>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    if full_kernel(g) {
        return full_forward(g, x, w);
    }
    if dw3::applies::<T>(g) {
        return dw3::forward(g, x, w);
    }
    if blocked::applies(g) {
        return blocked::forward(g, x, w);
    }
    if simd::pixels_fast::<T>(g.og(), g.out_hw()) {
        return forward_pixels(g, x, w);
    }
    let poly = Poly::new(g);
    let (cg, og, taps, psize) = (g.cg(), g.og(), g.kh * g.kw, poly.size());
    let mut y = output_vec::<T>(g.n * g.o * g.out_hw());
    per_image_group(g, &mut y, cg * psize + og * poly.len, |n, grp, yg, scr| {
        let (xs, acc) = scr.split_at_mut(cg * psize);
        let x0 = (n * g.c + grp * cg) * g.in_hw();
        for (ci, plane) in xs.chunks_exact_mut(psize).enumerate() {
            poly.pack(g, &x[x0 + ci * g.in_hw()..][..g.in_hw()], plane);
        }
        // All output channels of the group at once (register-blocked by
        // `fwd_multi`), in the pitch-`wq` layout, then copied out row by row.
        let w0 = grp * og * cg * taps;
        simd::fwd_multi(
            acc,
            poly.len,
            xs,
            psize,
            &poly.off,
            &w[w0..w0 + og * cg * taps],
        );
        for (yp, a) in yg
            .chunks_exact_mut(g.out_hw())
            .zip(acc.chunks_exact(poly.len))
        {
            for (ho, row) in yp.chunks_exact_mut(g.wo).enumerate() {
                copy_row(row, &a[ho * poly.wq..][..g.wo]);
            }
        }
    });
    // SAFETY: the tasks of `per_image_group` cover it and each writes its whole block.
    unsafe { assume_init(y) }
}

/// Zero-padded input planes (no polyphase split) with the output pixels and kernel taps as
/// offsets into a plane: the layout of [`simd::fwd_pixels`] and [`simd::wgrad_pixels`].
struct Padded {
    wp: usize,
    /// Elements of one padded plane.
    psize: usize,
    /// Offset of each output pixel's top-left tap, in output order.
    pix: Vec<usize>,
    /// Offset of each tap `(i, j)` from it, in row-major tap order.
    off: Vec<usize>,
}

impl Padded {
    fn new(g: &Geom) -> Self {
        let wp = g.w + 2 * g.pad;
        Self {
            wp,
            psize: (g.h + 2 * g.pad) * wp,
            pix: (0..g.ho)
                .flat_map(|ho| (0..g.wo).map(move |wo| (ho * wp + wo) * g.stride))
                .collect(),
            off: (0..g.kh)
                .flat_map(|i| (0..g.kw).map(move |j| i * wp + j))
                .collect(),
        }
    }

    /// Writes the `planes.len() / psize` input planes starting at `x` into `planes`.
    fn pack<T: Elem>(&self, g: &Geom, x: &[T], planes: &mut [T]) {
        planes.fill(T::ZERO);
        for (plane, src) in planes
            .chunks_exact_mut(self.psize)
            .zip(x.chunks_exact(g.in_hw()))
        {
            for (hi, row) in src.chunks_exact(g.w).enumerate() {
                let at = (hi + g.pad) * self.wp + g.pad;
                copy_row(&mut plane[at..at + g.w], row);
            }
        }
    }
}

/// [`forward`] on [`simd::fwd_pixels`] (f32 on AVX2, 16-channel blocks of outputs per
/// group), output written in place.
fn forward_pixels<T: Elem>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let pd = Padded::new(g);
    let (cg, og, taps) = (g.cg(), g.og(), g.kh * g.kw);
    let wt = simd::pixel_weights(w, g.groups, og, cg, taps);
    let mut y = output_vec::<T>(g.n * g.o * g.out_hw());
    per_image_group(g, &mut y, cg * pd.psize, |n, grp, yg, xs| {
        let x0 = (n * g.c + grp * cg) * g.in_hw();
        pd.pack(g, &x[x0..x0 + cg * g.in_hw()], xs);
        let w0 = grp * og * cg * taps;
        let wg = &wt[w0..w0 + og * cg * taps];
        simd::fwd_pixels(yg, &pd.pix, xs, pd.psize, &pd.off, wg);
    });
    // SAFETY: the tasks of `per_image_group` cover it and each writes its whole block.
    unsafe { assume_init(y) }
}

/// [`backward_filter`] on [`simd::wgrad_pixels`] (f32 on AVX2, 16-channel blocks of outputs
/// per group): per group and image, the input planes zero-padded and the output gradients
/// transposed to pixel-major, then summed into `[ci][t][o]` weights transposed back at the
/// end.
fn backward_filter_pixels<T: Elem>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    let pd = Padded::new(g);
    let (cg, og, taps, hw) = (g.cg(), g.og(), g.kh * g.kw, g.out_hw());
    let mut dw = vec![T::ZERO; g.o * cg * taps];
    let macs = g.n * og * cg * taps * hw;
    dw.par_chunks_mut(og * cg * taps)
        .enumerate()
        .with_min_len(min_tasks(macs))
        .for_each(|(grp, dwg)| {
            T::with_scratch(cg * pd.psize + hw * og + cg * taps * og, |scr| {
                let (xs, rest) = scr.split_at_mut(cg * pd.psize);
                let (gt, dwt) = rest.split_at_mut(hw * og);
                dwt.fill(T::ZERO);
                for n in 0..g.n {
                    let x0 = (n * g.c + grp * cg) * g.in_hw();
                    pd.pack(g, &x[x0..x0 + cg * g.in_hw()], xs);
                    let d0 = (n * g.o + grp * og) * hw;
                    simd::transpose(&dy[d0..d0 + og * hw], og, hw, gt);
                    simd::wgrad_pixels(dwt, gt, &pd.pix, xs, pd.psize, &pd.off);
                }
                for (k, row) in dwt.chunks_exact(og).enumerate() {
                    for (o, &v) in row.iter().enumerate() {
                        dwg[o * cg * taps + k] = v;
                    }
                }
            })
        });
    dw
}

/// Input gradient: `dx[n, ci] = Σ_{o in group(ci)} dy[n, o] ⋆ᵀ w[o, ci]`.
pub fn backward_data<T: Elem>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
    if full_kernel(g) {
        return full_backward_data(g, dy, w);
    }
    if let Some((gt, wt)) = transposed(g, w) {
        return forward(&gt, dy, &wt);
    }
    if blocked::applies(g) {
        return blocked::backward_data(g, dy, w);
    }
    if g.stride > 1 {
        return backward_data_phases(g, dy, w);
    }
    let poly = Poly::new(g);
    let (cg, og, taps, psize) = (g.cg(), g.og(), g.kh * g.kw, poly.size());
    let mut dx = output_vec::<T>(g.n * g.c * g.in_hw());
    per_image_group(g, &mut dx, cg * psize + poly.len, |n, grp, dxg, scr| {
        let (xs, ext) = scr.split_at_mut(cg * psize);
        xs.fill(T::ZERO);
        ext.fill(T::ZERO);
        for oc in 0..og {
            let o = grp * og + oc;
            spread(
                g,
                poly.wq,
                &dy[(n * g.o + o) * g.out_hw()..][..g.out_hw()],
                ext,
            );
            for (ci, plane) in xs.chunks_exact_mut(psize).enumerate() {
                let wk = &w[(o * cg + ci) * taps..][..taps];
                simd::taps_bwd_data(plane, ext, &poly.off, wk);
            }
        }
        for (plane, dxp) in xs.chunks_exact(psize).zip(dxg.chunks_exact_mut(g.in_hw())) {
            poly.unpack(g, plane, dxp);
        }
    });
    // SAFETY: the tasks of `per_image_group` cover it and each writes its whole block.
    unsafe { assume_init(dx) }
}

/// Input gradient for stride `s > 1` as a gather on the forward kernel, phase by phase.
///
/// With `xp` the padded input, `y[ho, wo] = Σ_{i,j} w[i, j]·xp[ho·s + i, wo·s + j]`, so the
/// padded input gradient at `(r·s + pr, q·s + pc)` is
/// `Σ_{ii,jj} w[pr + s·ii, pc + s·jj]·dy[r − ii, q − jj]`: for each of the `s·s` phases a
/// stride-1 correlation of `dy` with that phase's taps of the kernel (a sub-kernel of up to
/// `ceil(k / s)` taps a side). Each phase runs on [`simd::fwd_multi`], which keeps its
/// output block in registers across all taps and output-gradient channels, instead of the
/// scatter kernel's read-modify-write of the input gradient per tap (2.5x slower than the
/// forward pass on VarGFaceNet's stride-2 80→160 g10 layer).
///
/// The output-gradient planes are zero-padded by `kq − 1` above and left, with a row pitch
/// of at least `wq` (the polyphase sub-plane width) and `wo + kq − 1`, so that every tap is a
/// constant offset from the output position `r·pitch + q` and reads past a row's end land
/// in the next row's left padding.
fn backward_data_phases<T: Elem>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
    let s = g.stride;
    let (hq, wq) = ((g.h + 2 * g.pad).div_ceil(s), (g.w + 2 * g.pad).div_ceil(s));
    let kq = g.kh.max(g.kw).div_ceil(s);
    let pitch = wq.max(g.wo + kq - 1);
    let psize = (hq + kq + 1) * pitch;
    let len = (hq - 1) * pitch + wq;
    let (cg, og, taps) = (g.cg(), g.og(), g.kh * g.kw);
    // Where the channel-vectorised kernel runs, it computes just the `hq·wq` sub-plane
    // pixels, written compactly (row pitch `wq`); else `fwd_multi` fills `len` positions of
    // row pitch `pitch`.
    let fast = simd::pixels_fast::<T>(cg, hq * wq);
    // Per phase (pr, pc): tap offsets, and weights as `fwd_multi` takes them, per group
    // `[cg][og][phase taps]` (input channels are this gather's outputs), or as
    // `fwd_pixels` does.
    let phases: Vec<(Vec<usize>, Vec<T>)> = (0..s * s)
        .map(|ph| {
            let (pr, pc) = (ph / s, ph % s);
            let ij: Vec<(usize, usize)> = (pr..g.kh)
                .step_by(s)
                .flat_map(|i| (pc..g.kw).step_by(s).map(move |j| (i, j)))
                .collect();
            let off = ij
                .iter()
                .map(|&(i, j)| (kq - 1 - i / s) * pitch + (kq - 1 - j / s))
                .collect();
            let mut wp = Vec::with_capacity(g.groups * cg * og * ij.len());
            for grp in 0..g.groups {
                for ci in 0..cg {
                    for oc in 0..og {
                        let wk = &w[((grp * og + oc) * cg + ci) * taps..][..taps];
                        wp.extend(ij.iter().map(|&(i, j)| wk[i * g.kw + j]));
                    }
                }
            }
            if fast {
                wp = simd::pixel_weights(&wp, g.groups, cg, og, ij.len());
            }
            (off, wp)
        })
        .collect();
    let pix: Vec<usize> = (0..hq)
        .flat_map(|r| (0..wq).map(move |q| r * pitch + q))
        .collect();
    let (len, opitch) = if fast { (hq * wq, wq) } else { (len, pitch) };
    let mut dx = output_vec::<T>(g.n * g.c * g.in_hw());
    per_image_group(
        g,
        &mut dx,
        og * psize + s * s * cg * len,
        |n, grp, dxg, scr| {
            let (planes, outs) = scr.split_at_mut(og * psize);
            planes.fill(T::ZERO);
            for (oc, plane) in planes.chunks_exact_mut(psize).enumerate() {
                let src = &dy[(n * g.o + grp * og + oc) * g.out_hw()..][..g.out_hw()];
                for (ho, row) in src.chunks_exact(g.wo).enumerate() {
                    let at = (ho + kq - 1) * pitch + kq - 1;
                    copy_row(&mut plane[at..at + g.wo], row);
                }
            }
            for ((off, wp), out) in phases.iter().zip(outs.chunks_exact_mut(cg * len)) {
                if off.is_empty() {
                    // A kernel smaller than the stride: no tap reaches this phase.
                    out.fill(T::ZERO);
                    continue;
                }
                let wpg = &wp[grp * cg * og * off.len()..][..cg * og * off.len()];
                if fast {
                    simd::fwd_pixels(out, &pix, planes, psize, off, wpg);
                } else {
                    simd::fwd_multi(out, len, planes, psize, off, wpg);
                }
            }
            // Padded position (hi + pad, wi + pad) lies in phase ((hi + pad) % s,
            // (wi + pad) % s) at ((hi + pad) / s, (wi + pad) / s).
            for (ci, dxp) in dxg.chunks_exact_mut(g.in_hw()).enumerate() {
                for (hi, row) in dxp.chunks_exact_mut(g.w).enumerate() {
                    let (pr, r) = ((hi + g.pad) % s, (hi + g.pad) / s);
                    let run = |wi: usize| {
                        let (pc, q) = ((wi + g.pad) % s, (wi + g.pad) / s);
                        let ph = &outs[(pr * s + pc) * cg * len + ci * len..][..len];
                        &ph[r * opitch + q..]
                    };
                    if s == 2 && g.w >= 2 {
                        simd::interleave2(run(0), run(1), row);
                        continue;
                    }
                    for first in 0..s.min(g.w) {
                        for (d, &v) in row[first..].iter_mut().step_by(s).zip(run(first)) {
                            d.write(v);
                        }
                    }
                }
            }
        },
    );
    // SAFETY: the tasks of `per_image_group` cover it and each writes its whole block.
    unsafe { assume_init(dx) }
}

/// For stride 1 (and padding below the kernel size), the input gradient is itself a forward
/// convolution: `dx = conv(dy, w̃)` with padding `k − 1 − pad`, where `w̃[ci, o] = w[o, ci]`
/// rotated by 180° (per group, input and output channels swapped). That runs on the forward
/// kernel, which keeps each output block in registers across all taps, instead of the
/// scatter kernel's read-modify-write of the input gradient per tap (measured about 2x
/// faster on VarGFaceNet's 80→160 g10 layer, docs/benchmarks.md). Returns the geometry and
/// weights of that convolution, or `None` where it does not apply.
fn transposed<T: Elem>(g: &Geom, w: &[T]) -> Option<(Geom, Vec<T>)> {
    if g.stride != 1 || g.kh != g.kw || g.pad >= g.kh {
        return None;
    }
    let (cg, og, kh, kw) = (g.cg(), g.og(), g.kh, g.kw);
    let gt = Geom::new(
        &[g.n, g.o, g.ho, g.wo],
        &[g.c, og, kh, kw],
        1,
        kh - 1 - g.pad,
        g.groups,
    )
    .ok()?;
    if (gt.ho, gt.wo) != (g.h, g.w) {
        return None;
    }
    let taps = kh * kw;
    let mut wt = vec![T::ZERO; w.len()];
    for grp in 0..g.groups {
        for oc in 0..og {
            for ci in 0..cg {
                let src = &w[((grp * og + oc) * cg + ci) * taps..][..taps];
                let dst = &mut wt[((grp * cg + ci) * og + oc) * taps..][..taps];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        }
    }
    Some((gt, wt))
}

/// Weight gradient: `dw[o, ci] = Σ_n dy[n, o] ⋆ x[n, ci]`, one rayon task per group so that
/// no two tasks write the same weights. Per image, all of the group's output gradients are
/// laid out first, so that [`simd::wgrad_multi`] can reuse each loaded input run across
/// several output channels.
pub fn backward_filter<T: Elem>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    if full_kernel(g) {
        return full_backward_filter(g, x, dy);
    }
    if blocked::applies(g) {
        return blocked::backward_filter(g, x, dy);
    }
    if simd::pixels_fast::<T>(g.og(), g.out_hw()) {
        return backward_filter_pixels(g, x, dy);
    }
    let poly = Poly::new(g);
    let (cg, og, taps, psize) = (g.cg(), g.og(), g.kh * g.kw, poly.size());
    let mut dw = vec![T::ZERO; g.o * cg * taps];
    let macs = g.n * og * cg * taps * g.out_hw();
    let wv = og * cg * taps * simd::WLANES;
    dw.par_chunks_mut(og * cg * taps)
        .enumerate()
        .with_min_len(min_tasks(macs))
        .for_each(|(grp, dwg)| {
            T::with_scratch(cg * psize + og * poly.len + wv, |scr| {
                let (xs, rest) = scr.split_at_mut(cg * psize);
                let (ext, dwv) = rest.split_at_mut(og * poly.len);
                // `spread` writes only the real columns: zero the throw-away ones once.
                ext.fill(T::ZERO);
                dwv.fill(T::ZERO);
                for n in 0..g.n {
                    let x0 = (n * g.c + grp * cg) * g.in_hw();
                    for (ci, plane) in xs.chunks_exact_mut(psize).enumerate() {
                        poly.pack(g, &x[x0 + ci * g.in_hw()..][..g.in_hw()], plane);
                    }
                    for (oc, e) in ext.chunks_exact_mut(poly.len).enumerate() {
                        let o = grp * og + oc;
                        spread(
                            g,
                            poly.wq,
                            &dy[(n * g.o + o) * g.out_hw()..][..g.out_hw()],
                            e,
                        );
                    }
                    for (ci, plane) in xs.chunks_exact(psize).enumerate() {
                        let d = &mut dwv[ci * taps * simd::WLANES..];
                        simd::wgrad_multi(d, cg * taps, ext, poly.len, plane, &poly.off);
                    }
                }
                simd::fold_lanes(dwv, dwg);
            })
        });
    dw
}

/// Images per task of the [`full_kernel`] forward and input gradient: each group's weights
/// (8 outputs of 392 taps for VarGFaceNet's embedding: 12.5 KB) are loaded into L1 once per
/// this many images rather than streamed from L3 for every image (1.6 MB in all there).
const FULL_IMAGES_PER_TASK: usize = 8;

/// `[0, kk, 2·kk, ...]`: the offsets of a group's `og` weight rows, as "taps" of the
/// multi-row kernels of `simd/`.
fn row_offsets(og: usize, kk: usize) -> Vec<usize> {
    (0..og).map(|r| r * kk).collect()
}

/// [`forward`] when [`full_kernel`]: `y[n, o] = x[n, group(o)] · w[o]`, a group's `og`
/// dot products at once so that each loaded input vector feeds all of them.
fn full_forward<T: Elem>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let (kk, og, chw) = (g.k(), g.og(), g.c * g.in_hw());
    let rows = row_offsets(og, kk);
    let mut y = vec![T::ZERO; g.n * g.o];
    y.par_chunks_mut(FULL_IMAGES_PER_TASK * g.o)
        .enumerate()
        .for_each(|(chunk, yc)| {
            let n0 = chunk * FULL_IMAGES_PER_TASK;
            for grp in 0..g.groups {
                let wg = &w[grp * og * kk..][..og * kk];
                for (i, yn) in yc.chunks_exact_mut(g.o).enumerate() {
                    let xg = &x[(n0 + i) * chw + grp * kk..][..kk];
                    simd::taps_bwd_filter(&mut yn[grp * og..][..og], xg, wg, &rows);
                }
            }
        });
    y
}

/// [`backward_data`] when [`full_kernel`]: `dx[n, group] = Σ_{o in group} dy[n, o]·w[o]`.
fn full_backward_data<T: Elem>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
    let (kk, og, chw) = (g.k(), g.og(), g.c * g.in_hw());
    let rows = row_offsets(og, kk);
    let mut dx = vec![T::ZERO; g.n * chw];
    dx.par_chunks_mut(FULL_IMAGES_PER_TASK * chw)
        .enumerate()
        .for_each(|(chunk, dxc)| {
            let n0 = chunk * FULL_IMAGES_PER_TASK;
            for grp in 0..g.groups {
                let wg = &w[grp * og * kk..][..og * kk];
                for (i, dxn) in dxc.chunks_exact_mut(chw).enumerate() {
                    let dyg = &dy[(n0 + i) * g.o + grp * og..][..og];
                    simd::taps_fwd(&mut dxn[grp * kk..][..kk], wg, &rows, dyg);
                }
            }
        });
    dx
}

/// [`backward_filter`] when [`full_kernel`]: `dw[o] = Σ_n dy[n, o]·x[n, group(o)]`, one task
/// per group, so each image's input block is read once for all of the group's outputs.
fn full_backward_filter<T: Elem>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    let (kk, og, chw) = (g.k(), g.og(), g.c * g.in_hw());
    let rows = row_offsets(og, kk);
    let mut dw = vec![T::ZERO; g.o * kk];
    dw.par_chunks_mut(og * kk)
        .enumerate()
        .with_min_len(min_tasks(g.n * og * kk))
        .for_each(|(grp, dwg)| {
            for n in 0..g.n {
                let xg = &x[n * chw + grp * kk..][..kk];
                let dyg = &dy[n * g.o + grp * og..][..og];
                simd::taps_bwd_data(dwg, xg, &rows, dyg);
            }
        });
    dw
}
