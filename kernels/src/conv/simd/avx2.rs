//! The f32 kernels for AVX2 + FMA (8 lanes), called by the dispatchers of `forward.rs`,
//! `gradient.rs` and `helpers.rs` once [`super::level`] found the features. The 8x8
//! register transpose is also used by `blocked.rs`.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::shared::{fwd_multi_kernel, wgrad_pixels_driver};

/// Transposes the 8x8 block `r` (row `i` = `r[i]`) in registers.
#[inline(always)]
pub(in crate::conv) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// [`super::add_assign`] for f32 on AVX2.
///
/// # Safety
/// The CPU has AVX2; `dst.len() == src.len()`.
#[target_feature(enable = "avx2")]
pub unsafe fn add_assign_f32(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, inside both slices.
        unsafe {
            let v = _mm256_add_ps(_mm256_loadu_ps(d.add(i)), _mm256_loadu_ps(s.add(i)));
            _mm256_storeu_ps(d.add(i), v);
        }
        i += 8;
    }
    for k in i..n {
        dst[k] += src[k];
    }
}

/// [`super::transpose`] for f32 on AVX2: 8x8 tiles through registers, scalar edges.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn transpose_f32(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(src.len() == rows * cols && dst.len() == rows * cols);
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for r0 in (0..r8).step_by(8) {
        for c0 in (0..c8).step_by(8) {
            // SAFETY: rows r0..r0 + 8 and columns c0..c0 + 8 lie inside both matrices.
            unsafe {
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(s.add((r0 + i) * cols + c0)));
                for (j, v) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(d.add((c0 + j) * rows + r0), v);
                }
            }
        }
        for c in c8..cols {
            for r in r0..r0 + 8 {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
    for r in r8..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// [`super::wgrad_multi`] for f32 on AVX2 + FMA: 8-lane accumulators, blocks of up to
/// `WO` channels × [`wgrad_taps`] taps.
///
/// # Safety
/// The CPU has AVX2 and FMA; the bounds asserted by `wgrad_multi` hold.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn wgrad_f32(
    dwv: &mut [f32],
    stride: usize,
    g: &[f32],
    n: usize,
    src: &[f32],
    off: &[usize],
) {
    let (taps, outs) = (off.len(), g.len() / n);
    let mut o0 = 0;
    while o0 < outs {
        let o = (outs - o0).min(WO);
        let kmax = wgrad_taps(o);
        let mut t0 = 0;
        while t0 < taps {
            let k = (taps - t0).min(kmax);
            let d = &mut dwv[(o0 * stride + t0) * 8..];
            let (gb, of) = (&g[o0 * n..(o0 + o) * n], &off[t0..t0 + k]);
            macro_rules! dispatch {
                ($($oo:literal => [$($kk:literal)*]),*) => {
                    match (o, k) {
                        $($(($oo, $kk) => block::<$oo, $kk>(d, stride, gb, n, src, of),)*)*
                        _ => unreachable!("block {o}x{k}"),
                    }
                };
            }
            dispatch!(1 => [1 2 3 4 5 6 7 8 9], 2 => [1 2 3 4 5 6], 3 => [1 2 3 4]);
            t0 += k;
        }
        o0 += o;
    }
}

/// [`super::deinterleave2`] on whole blocks of 8 pairs; returns the pairs done.
///
/// # Safety
/// The CPU has AVX2; `2·odd.len() <= src.len()`, `even.len() >= odd.len()`.
#[target_feature(enable = "avx2")]
pub unsafe fn deinterleave2_f32(src: &[f32], even: &mut [f32], odd: &mut [f32]) -> usize {
    let mut k = 0;
    while k + 8 <= odd.len() {
        // SAFETY: src[2k..2k + 16] and even/odd[k..k + 8] are in bounds (k + 8 <= odd.len()).
        unsafe { deinterleave2_f32_block(src, even, odd, k) };
        k += 8;
    }
    if k < odd.len() && odd.len() >= 8 {
        // The rest as one block overlapping the last: it rewrites values already stored.
        // SAFETY: as above with k = odd.len() - 8.
        unsafe { deinterleave2_f32_block(src, even, odd, odd.len() - 8) };
        k = odd.len();
    }
    k
}

/// Pairs `k..k + 8` of [`deinterleave2_f32`].
///
/// # Safety
/// The CPU has AVX2; `src[2k..2k + 16]`, `even[k..k + 8]` and `odd[k..k + 8]` exist.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn deinterleave2_f32_block(src: &[f32], even: &mut [f32], odd: &mut [f32], k: usize) {
    // SAFETY: in bounds as the caller guarantees.
    unsafe {
        let lo = _mm256_loadu_ps(src.as_ptr().add(2 * k));
        let hi = _mm256_loadu_ps(src.as_ptr().add(2 * k + 8));
        _mm256_storeu_ps(even.as_mut_ptr().add(k), phase8::<0x88>(lo, hi));
        _mm256_storeu_ps(odd.as_mut_ptr().add(k), phase8::<0xDD>(lo, hi));
    }
}

/// One column phase of the 16 values `lo`, `hi`, in order: the even ones with
/// `SEL = 0x88`, the odd ones with `0xDD`. The shuffle gives [0 2 8 10 | 4 6 12 14] (or
/// the odd ones likewise), then 64-bit lanes 0 2 1 3.
#[target_feature(enable = "avx2")]
#[inline]
fn phase8<const SEL: i32>(lo: __m256, hi: __m256) -> __m256 {
    let p = _mm256_shuffle_ps::<SEL>(lo, hi);
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(p)))
}

/// [`super::take_even`] in blocks of 8 outputs, the last overlapping the one before when
/// the source reaches far enough; returns the outputs done.
///
/// # Safety
/// The CPU has AVX2; `2·dst.len() <= src.len() + 1`.
#[target_feature(enable = "avx2")]
pub unsafe fn take_even_f32(src: &[f32], dst: &mut [f32]) -> usize {
    let mut k = 0;
    while 2 * (k + 8) <= src.len() && k + 8 <= dst.len() {
        // SAFETY: src[2k..2k + 16] and dst[k..k + 8] are in bounds.
        unsafe { take_even_f32_block(src, dst, k) };
        k += 8;
    }
    let n = dst.len();
    if k < n && n >= 8 && 2 * n <= src.len() {
        // SAFETY: as above with k = n - 8.
        unsafe { take_even_f32_block(src, dst, n - 8) };
        k = n;
    }
    k
}

/// Outputs `k..k + 8` of [`take_even_f32`].
///
/// # Safety
/// The CPU has AVX2; `src[2k..2k + 16]` and `dst[k..k + 8]` exist.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn take_even_f32_block(src: &[f32], dst: &mut [f32], k: usize) {
    // SAFETY: in bounds as the caller guarantees.
    unsafe {
        let lo = _mm256_loadu_ps(src.as_ptr().add(2 * k));
        let hi = _mm256_loadu_ps(src.as_ptr().add(2 * k + 8));
        _mm256_storeu_ps(dst.as_mut_ptr().add(k), phase8::<0x88>(lo, hi));
    }
}

/// [`super::interleave2`] on whole blocks of 8 pairs, the last overlapping the one
/// before; returns the pairs done.
///
/// # Safety
/// The CPU has AVX2; `even` and `odd` hold at least `dst.len() / 2` elements.
#[target_feature(enable = "avx2")]
pub unsafe fn interleave2_f32(even: &[f32], odd: &[f32], dst: &mut [MaybeUninit<f32>]) -> usize {
    let pairs = dst.len() / 2;
    let mut k = 0;
    while k + 8 <= pairs {
        // SAFETY: dst[2k..2k + 16] and even/odd[k..k + 8] are in bounds.
        unsafe { interleave2_f32_block(even, odd, dst, k) };
        k += 8;
    }
    if k < pairs && pairs >= 8 {
        // Rewrites pairs already stored with the same values.
        // SAFETY: as above with k = pairs - 8.
        unsafe { interleave2_f32_block(even, odd, dst, pairs - 8) };
        k = pairs;
    }
    k
}

/// Pairs `k..k + 8` of [`interleave2_f32`].
///
/// # Safety
/// The CPU has AVX2; `dst[2k..2k + 16]` and `even/odd[k..k + 8]` exist.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn interleave2_f32_block(even: &[f32], odd: &[f32], dst: &mut [MaybeUninit<f32>], k: usize) {
    // SAFETY: in bounds as the caller guarantees.
    unsafe {
        let e = _mm256_loadu_ps(even.as_ptr().add(k));
        let o = _mm256_loadu_ps(odd.as_ptr().add(k));
        // [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7].
        let lo = _mm256_unpacklo_ps(e, o);
        let hi = _mm256_unpackhi_ps(e, o);
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(2 * k).cast(),
            _mm256_permute2f128_ps::<0x20>(lo, hi),
        );
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(2 * k + 8).cast(),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        );
    }
}

wgrad_pixels_driver! {
    /// [`super::wgrad_pixels`] for f32 on AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `gt.len() / pix.len()` is a positive multiple of 16, and
    /// the bounds asserted by `wgrad_pixels` hold.
    fn wgrad_pixels_f32 => wgrad_pixel_block;
    features = "avx2,fma", max = 6, pairs = [1 2 3 4 5 6]
}

/// Pairs `k0..k0 + K` × channels `o0..o0 + 16`, over all pixels.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn wgrad_pixel_block<const K: usize>(
    dwt: &mut [f32],
    gt: &[f32],
    pix: &[usize],
    planes: &[f32],
    outs: usize,
    o0: usize,
    k0: usize,
    at: impl Fn(usize) -> usize,
) {
    let base: [*const f32; K] = std::array::from_fn(|j| planes[at(j)..].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); K]; 2];
    let g = gt[o0..].as_ptr();
    for (p, &pp) in pix.iter().enumerate() {
        // SAFETY: p < np and o0 + 16 <= outs, so both vectors lie in gt.
        let (g0, g1) = unsafe {
            (
                _mm256_loadu_ps(g.add(p * outs)),
                _mm256_loadu_ps(g.add(p * outs + 8)),
            )
        };
        for j in 0..K {
            // SAFETY: at(j) + pix[p] = ci·psize + off[t] + pix[p] < (ci + 1)·psize.
            let xv = unsafe { _mm256_broadcast_ss(&*base[j].add(pp)) };
            acc[0][j] = _mm256_fmadd_ps(g0, xv, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(g1, xv, acc[1][j]);
        }
    }
    for j in 0..K {
        for (v, a) in acc.iter().enumerate() {
            let d = &mut dwt[(k0 + j) * outs + o0 + 8 * v..][..8];
            // SAFETY: `d` holds 8 f32.
            unsafe {
                _mm256_storeu_ps(
                    d.as_mut_ptr(),
                    _mm256_add_ps(_mm256_loadu_ps(d.as_ptr()), a[j]),
                )
            };
        }
    }
}

/// [`super::fwd_pixels`] for f32 on AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out.len() / pix.len()` is a positive multiple of 16,
/// `pix.len() >= 8`, and the bounds asserted by `fwd_pixels` hold.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fwd_pixels_f32(
    out: &mut [MaybeUninit<f32>],
    pix: &[usize],
    planes: &[f32],
    psize: usize,
    off: &[usize],
    wt: &[f32],
) {
    let np = pix.len();
    let outs = out.len() / np;
    for o0 in (0..outs).step_by(16) {
        let mut p0 = 0;
        while p0 + 4 <= np {
            pixel_block::<2, 4>(out, np, o0, p0, pix, planes, psize, off, wt, outs);
            p0 += 4;
        }
        // The last partial block recomputed as an overlapping one (outputs are
        // overwritten, so the overlap is harmless).
        if p0 < np {
            pixel_block::<2, 4>(out, np, o0, np - 4, pix, planes, psize, off, wt, outs);
        }
    }
}

/// Channels `o0..o0 + 8·V` at pixels `p0..p0 + P` (`P` a multiple of 4).
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pixel_block<const V: usize, const P: usize>(
    out: &mut [MaybeUninit<f32>],
    np: usize,
    o0: usize,
    p0: usize,
    pix: &[usize],
    planes: &[f32],
    psize: usize,
    off: &[usize],
    wt: &[f32],
    outs: usize,
) {
    let cg = planes.len() / psize;
    let base: [*const f32; P] = std::array::from_fn(|p| planes[pix[p0 + p]..].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); P]; V];
    let mut wk = wt[o0..].as_ptr();
    for ci in 0..cg {
        for &ot in off {
            let at = ci * psize + ot;
            // SAFETY: wt holds cg·taps·outs weights and o0 + 8·V <= outs.
            let wv: [__m256; V] =
                std::array::from_fn(|v| unsafe { _mm256_loadu_ps(wk.add(8 * v)) });
            for p in 0..P {
                // SAFETY: pix[p] + ot < psize and ci < cg (asserted by the caller).
                let x = unsafe { _mm256_broadcast_ss(&*base[p].add(at)) };
                for v in 0..V {
                    acc[v][p] = _mm256_fmadd_ps(wv[v], x, acc[v][p]);
                }
            }
            // SAFETY: stays within wt (one past the last row at most).
            wk = unsafe { wk.add(outs) };
        }
    }
    // acc[v][p] holds channels o0 + 8v .. + 8 of pixel p0 + p: transpose 4 pixels at a
    // time into 8 channel rows of 4 pixels.
    for v in 0..V {
        for q in (0..P).step_by(4) {
            let t0 = _mm256_unpacklo_ps(acc[v][q], acc[v][q + 1]);
            let t1 = _mm256_unpackhi_ps(acc[v][q], acc[v][q + 1]);
            let t2 = _mm256_unpacklo_ps(acc[v][q + 2], acc[v][q + 3]);
            let t3 = _mm256_unpackhi_ps(acc[v][q + 2], acc[v][q + 3]);
            // Channel c in the low lane of r[c % 4] for c < 4, the high lane for c >= 4.
            let r = [
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xEE>(t0, t2),
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xEE>(t1, t3),
            ];
            for (c, &rc) in r.iter().enumerate() {
                let lo = &mut out[(o0 + 8 * v + c) * np + p0 + q..][..4];
                // SAFETY: `lo` and `hi` hold 4 f32 each.
                unsafe { _mm_storeu_ps(lo.as_mut_ptr().cast(), _mm256_castps256_ps128(rc)) };
                let hi = &mut out[(o0 + 8 * v + c + 4) * np + p0 + q..][..4];
                unsafe { _mm_storeu_ps(hi.as_mut_ptr().cast(), _mm256_extractf128_ps::<1>(rc)) };
            }
        }
    }
}

fwd_multi_kernel! {
    /// [`super::fwd_multi`] for f32 on AVX2 + FMA: blocks of up to 4 output channels ×
    /// 16 to 64 outputs (8-9 accumulators, at least 8 to cover the FMA latency, at most
    /// 12 of the 16 registers), then 8 outputs, then scalars.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the bounds asserted by `fwd_multi` hold.
    fn fwd_f32, fwd_run, fwd_block;
    features = "avx2,fma", lanes = 8, vector = __m256,
    zero = _mm256_setzero_ps, load = _mm256_loadu_ps, set1 = _mm256_set1_ps,
    fma = _mm256_fmadd_ps, store = _mm256_storeu_ps,
    blocks = [4 => 2, 3 => 3, 2 => 4, 1 => 8]
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block<const O: usize, const K: usize>(
    dwv: &mut [f32],
    stride: usize,
    g: &[f32],
    n: usize,
    src: &[f32],
    off: &[usize],
) {
    let gp: [*const f32; O] = std::array::from_fn(|o| g[o * n..].as_ptr());
    let sp: [*const f32; K] = std::array::from_fn(|t| src[off[t]..].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); K]; O];
    let mut f = 0;
    while f + 8 <= n {
        // SAFETY: f + 8 <= n and every run holds n elements from its pointer.
        let gv: [__m256; O] = std::array::from_fn(|o| unsafe { _mm256_loadu_ps(gp[o].add(f)) });
        for t in 0..K {
            // SAFETY: as above.
            let sv = unsafe { _mm256_loadu_ps(sp[t].add(f)) };
            for o in 0..O {
                acc[o][t] = _mm256_fmadd_ps(gv[o], sv, acc[o][t]);
            }
        }
        f += 8;
    }
    if f < n {
        // The last partial vector with masked loads (lanes past `n` read as zero and
        // touch no memory), instead of a scalar tail per (channel, tap).
        let rest = (n - f) as i32;
        let mask = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(rest),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        // SAFETY: masked lanes are not read; the others lie below `n`.
        let gv: [__m256; O] =
            std::array::from_fn(|o| unsafe { _mm256_maskload_ps(gp[o].add(f), mask) });
        for t in 0..K {
            // SAFETY: as above.
            let sv = unsafe { _mm256_maskload_ps(sp[t].add(f), mask) };
            for o in 0..O {
                acc[o][t] = _mm256_fmadd_ps(gv[o], sv, acc[o][t]);
            }
        }
    }
    for (o, acc_o) in acc.iter().enumerate() {
        for (t, &a) in acc_o.iter().enumerate() {
            let d = &mut dwv[(o * stride + t) * 8..][..8];
            // SAFETY: `d` holds 8 f32.
            unsafe {
                let v = _mm256_add_ps(_mm256_loadu_ps(d.as_ptr()), a);
                _mm256_storeu_ps(d.as_mut_ptr(), v);
            }
        }
    }
}

/// Output channels per block of [`wgrad_multi`].
const WO: usize = 3;

/// Taps per block with `o` output channels, leaving `o` registers for the output-gradient
/// runs and one for the input run out of 16 vector registers.
fn wgrad_taps(o: usize) -> usize {
    ((16 - o - 1) / o).clamp(1, 9)
}
