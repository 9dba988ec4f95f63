//! Forward kernels with several outputs per loaded input: [`fwd_multi`] (output runs of a
//! group's channels over the polyphase layout), [`fwd_pixels`] (16-channel blocks at a list
//! of pixels) with its weight layout [`pixel_weights`], and [`skinny_matmul`] (a GEMM with
//! few rows and a short inner dimension over a long output row).

use super::dispatch::{as_f32, as_f32_mut, as_f32_slots, level, Level};
#[cfg(target_arch = "x86_64")]
use super::helpers::regions;
use super::helpers::Background;
use super::loops::taps_fwd;
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use crate::elem::Elem;
use crate::uninit::Slot;

/// Forward convolution of a block of output channels from all input planes of their group:
/// `out[o·len + f] = Σ_ci Σ_t w[o·cg·taps + ci·taps + t] · planes[ci·psize + off[t] + f]` for
/// `o < out.len() / len`, `f < len`, where `taps = off.len()` and `cg = planes.len() / psize`.
/// Overwrites `out`. Every `off[t] + len <= psize`.
///
/// Each output run stays in registers across every input channel and tap, and each loaded
/// input run feeds up to four output channels; the portable version ([`taps_fwd`] per
/// channel pair) reloads its accumulators per input channel and does one multiply-add per
/// load. f32 on AVX2 only; elsewhere the portable loop.
pub fn fwd_multi<T: Elem>(
    out: &mut [T],
    len: usize,
    planes: &[T],
    psize: usize,
    off: &[usize],
    w: &[T],
) {
    let (taps, outs) = (off.len(), out.len().checked_div(len).unwrap_or(0));
    let cg = planes.len().checked_div(psize).unwrap_or(0);
    assert!(
        out.len() == outs * len
            && planes.len() == cg * psize
            && off.iter().all(|&o| o + len <= psize)
            && w.len() >= outs * cg * taps,
        "fwd_multi: runs out of bounds"
    );
    if outs == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        if let (Some(planes), Some(w), Some(out)) = (as_f32(planes), as_f32(w), as_f32_mut(out)) {
            if level() == Level::Avx512 && len >= 16 {
                // SAFETY: AVX-512F detected, runs of at least one 16-lane vector; the bounds
                // were asserted above.
                return unsafe { avx512::fwd_multi_f32(out, len, planes, psize, off, w, cg) };
            }
            // SAFETY: AVX2 and FMA were detected by `level()`; the bounds the kernel relies
            // on were asserted above.
            return unsafe { avx2::fwd_f32(out, len, planes, psize, off, w, cg) };
        }
    }
    for (o, acc) in out.chunks_exact_mut(len).enumerate() {
        acc.fill(T::ZERO);
        for (ci, plane) in planes.chunks_exact(psize).enumerate() {
            taps_fwd(acc, plane, off, &w[(o * cg + ci) * taps..][..taps]);
        }
    }
}

/// Longest inner dimension [`skinny_matmul`] takes: beyond it the GEMM's packed kernels win
/// and its output stores are few per multiply-add.
pub const SKINNY_MAX_K: usize = 128;

/// `c[r·c_rs + p] = Σ_t a[r·a_rs + t·a_cs] · b[t·pitch + p]` for `r < m`, `p < n`: a product
/// with few rows and a short inner dimension (`k <= 128`) over a long row of outputs, such as
/// a 3-channel stem's forward (`m` = 64 channels, `k` = 27 taps, `n` = 12544 pixels) or its
/// input gradient's columns. The GEMM writes such an output through the cache, each line
/// read before it is written, and those stores did not overlap its arithmetic (the stem's
/// forward took the sum of the two). With `stream` this kernel stores whole lines
/// non-temporally where `c` allows it (64-byte aligned rows); use it for outputs nothing
/// reads soon. Set `from_memory` where `b` is not in cache: it is then read a few rows at a
/// time, which the hardware prefetcher can follow, and fetched ahead. The kernel brings
/// `background` into L2 as it goes.
/// Returns false, touching nothing, where it does not apply: not f32 on AVX-512, `k` over
/// [`SKINNY_MAX_K`], or `m` a multiple of neither 8 nor 9. `c` need not be initialised.
pub fn skinny_matmul<T: Elem, S: Slot<T>>(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[T], usize, usize),
    (b, pitch): (&[T], usize),
    (c, c_rs): (&mut [S], usize),
    stream: bool,
    from_memory: bool,
    background: &[Background<T>],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 && m > 0 && n > 0 && (1..=SKINNY_MAX_K).contains(&k) {
        // SAFETY: the kernel writes only computed values into `c` (and reads back only those).
        let c32 = unsafe { as_f32_slots::<T, S>(&mut *c) };
        if let (Some(a), Some(b), Some(c)) = (as_f32(a), as_f32(b), c32) {
            assert!(
                (m - 1) * a_rs + (k - 1) * a_cs < a.len()
                    && (k - 1) * pitch + n <= b.len()
                    && (m - 1) * c_rs + n <= c.len(),
                "skinny_matmul: runs out of bounds"
            );
            let stream =
                stream && (c.as_ptr() as usize).is_multiple_of(64) && c_rs.is_multiple_of(16);
            let (a, b, c) = ((a, a_rs, a_cs), (b, pitch), (c, c_rs));
            let (regions, nr) = regions(background);
            let bg = &regions[..nr];
            // SAFETY: AVX-512F detected; the bounds the kernel relies on were asserted
            // above, `m` is a multiple of the tile's rows, and `stream` only with an aligned
            // `c` and row stride.
            unsafe {
                use avx512::skinny_matmul_f32 as kernel;
                if m % 8 == 0 {
                    kernel::<8, 3>((m, n, k), a, b, c, stream, from_memory, bg);
                    return true;
                }
                if m % 9 == 0 {
                    kernel::<9, 2>((m, n, k), a, b, c, stream, from_memory, bg);
                    return true;
                }
            }
        }
    }
    let _ = (
        (m, n, k),
        (a, a_rs, a_cs),
        (b, pitch),
        (c, c_rs),
        stream,
        from_memory,
        background,
    );
    false
}

/// Whether [`fwd_pixels`] runs its vector kernel for `outs` output channels and `npix`
/// output pixels: f32 on AVX2, a multiple of 16 channels, at least 8 pixels. Elsewhere
/// callers keep [`fwd_multi`], which vectorises over pixels. With 8 channels (one vector)
/// each multiply-add needs its own broadcast load, and the kernel measured slower than
/// `fwd_multi` (VarGFaceNet's input gradients, `outs` = 8).
pub fn pixels_fast<T: Elem>(outs: usize, npix: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level() != Level::Base
            && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && outs > 0
            && outs.is_multiple_of(16)
            && npix >= 8
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (outs, npix);
        false
    }
}

/// Forward convolution of a block of output channels at a list of output pixels:
/// `out[o·np + p] = Σ_ci Σ_t wt[(ci·taps + t)·outs + o] · planes[ci·psize + pix[p] + off[t]]`
/// for `o < outs = out.len() / np`, `p < np = pix.len()`, where `taps = off.len()` and
/// `cg = planes.len() / psize`: the weights come input-channel- and tap-major (see
/// [`pixel_weights`]), transposed once per convolution, not per call. Overwrites `out`.
/// Every `pix[p] + off[t] < psize`.
///
/// Where [`pixels_fast`], this vectorises over output channels instead of pixels: blocks of
/// 16 channels × 4 pixels stay in registers across all input channels and taps,
/// each tap loading the block's weights as vectors and broadcasting one input value per
/// pixel. Only real output pixels are computed, where [`fwd_multi`] also computes the
/// padding columns of its pitch layout (a quarter of the work on 7x7 planes), and the input
/// needs only zero padding, not the polyphase split, at any stride. `out` need not be
/// initialised.
pub fn fwd_pixels<T: Elem, S: Slot<T>>(
    out: &mut [S],
    pix: &[usize],
    planes: &[T],
    psize: usize,
    off: &[usize],
    wt: &[T],
) {
    let (np, taps) = (pix.len(), off.len());
    let outs = out.len().checked_div(np).unwrap_or(0);
    let cg = planes.len().checked_div(psize).unwrap_or(0);
    let (pmax, omax) = (
        pix.iter().copied().max().unwrap_or(0),
        off.iter().copied().max().unwrap_or(0),
    );
    assert!(
        out.len() == outs * np
            && planes.len() == cg * psize
            && (np == 0 || taps == 0 || pmax + omax < psize)
            && wt.len() >= outs * cg * taps,
        "fwd_pixels: runs out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if pixels_fast::<T>(outs, np) {
        // SAFETY: the kernels write only computed values into `out`.
        let out32 = unsafe { as_f32_slots::<T, S>(&mut *out) };
        if let (Some(planes), Some(wt), Some(out)) = (as_f32(planes), as_f32(wt), out32) {
            if level() == Level::Avx512 {
                // SAFETY: AVX-512F detected; otherwise as below.
                return unsafe { avx512::fwd_pixels_f32(out, pix, planes, psize, off, wt) };
            }
            // SAFETY: `pixels_fast` checked AVX2 + FMA, f32, whole 16-channel blocks and at
            // least 8 pixels; the bounds the kernel relies on were asserted above.
            return unsafe { avx2::fwd_pixels_f32(out, pix, planes, psize, off, wt) };
        }
    }
    for (o, row) in out.chunks_exact_mut(np.max(1)).enumerate() {
        for (v, &p) in row.iter_mut().zip(pix) {
            let mut sum = T::ZERO;
            for ci in 0..cg {
                for (t, &ot) in off.iter().enumerate() {
                    sum += wt[(ci * taps + t) * outs + o] * planes[ci * psize + p + ot];
                }
            }
            v.set(sum);
        }
    }
}

/// Weights `w[o][ci][t]` of `groups` groups (`outs` output channels, `cg` input channels,
/// `taps` taps each) in [`fwd_pixels`]'s layout, group after group: `[group][ci][t][o]`.
pub fn pixel_weights<T: Elem>(
    w: &[T],
    groups: usize,
    outs: usize,
    cg: usize,
    taps: usize,
) -> Vec<T> {
    let per = outs * cg * taps;
    let mut wt = vec![T::ZERO; groups * per];
    if per == 0 {
        return wt;
    }
    for (wg, dst) in w.chunks_exact(per).zip(wt.chunks_exact_mut(per)) {
        for (o, wo) in wg.chunks_exact(cg * taps).enumerate() {
            for (k, &v) in wo.iter().enumerate() {
                dst[k * outs + o] = v;
            }
        }
    }
    wt
}
