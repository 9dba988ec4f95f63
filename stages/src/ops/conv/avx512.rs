//! AVX-512 versions of the grouped-convolution kernels, picked at run time on CPUs with
//! AVX-512F. On an AVX-512 Xeon, PyTorch's oneDNN runs VarGFaceNet's grouped layers with
//! 16-lane kernels, and fpipe's AVX2 ones measured 0.72-0.97x its speed there.
//!
//! - [`fwd_pixels_f32`], [`wgrad_pixels_f32`] (channel-vectorised, groups with 16 outputs):
//!   one register holds a whole 16-channel block, so a tap costs one weight load and one
//!   broadcast multiply-add per pixel, where the AVX2 kernels need two of each;
//! - [`fwd_multi_f32`] (pixel-vectorised, the other groups and the input gradients): the
//!   AVX2 kernel's register blocks at 16 outputs per vector.
//!
//! Same layouts, bounds and results as the AVX2 kernels (up to the order of the sums); the
//! callers assert the bounds and check the CPU.

use std::arch::x86_64::*;

/// Output pixels per register block of the forward kernel (one accumulator each).
const FP: usize = 12;

/// [`super::simd::fwd_pixels`] for f32 on AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F; `out.len() / pix.len()` is a positive multiple of 16,
/// `pix.len() >= 8`, and the bounds asserted by `fwd_pixels` hold.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn fwd_pixels_f32(
    out: &mut [f32],
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
        while p0 + FP <= np {
            // SAFETY: as the caller guarantees; pixels p0..p0 + FP exist.
            unsafe { fwd_block::<FP>(out, np, o0, p0, pix, planes, psize, off, wt, outs) };
            p0 += FP;
        }
        // The rest in blocks of 4 and a last overlapping block of 4 (outputs are
        // overwritten, so recomputing a few is harmless; np >= 8).
        while p0 + 4 <= np {
            // SAFETY: as above.
            unsafe { fwd_block::<4>(out, np, o0, p0, pix, planes, psize, off, wt, outs) };
            p0 += 4;
        }
        if p0 < np {
            // SAFETY: as above, np >= 4.
            unsafe { fwd_block::<4>(out, np, o0, np - 4, pix, planes, psize, off, wt, outs) };
        }
    }
}

/// Channels `o0..o0 + 16` at pixels `p0..p0 + P`.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn fwd_block<const P: usize>(
    out: &mut [f32],
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
    let mut acc = [_mm512_setzero_ps(); P];
    let mut wk = wt[o0..].as_ptr();
    for ci in 0..cg {
        for &ot in off {
            let at = ci * psize + ot;
            // SAFETY: wt holds cg·taps·outs weights and o0 + 16 <= outs.
            let wv = unsafe { _mm512_loadu_ps(wk) };
            for (a, b) in acc.iter_mut().zip(&base) {
                // SAFETY: pix[p] + ot < psize and ci < cg (asserted by the caller).
                let x = _mm512_set1_ps(unsafe { *b.add(at) });
                *a = _mm512_fmadd_ps(wv, x, *a);
            }
            // SAFETY: stays within wt (one past the last row at most).
            wk = unsafe { wk.add(outs) };
        }
    }
    // acc[p] holds channels o0..o0 + 16 of pixel p0 + p; `out` is channel-major.
    let mut tile = [[0f32; 16]; P];
    for (row, a) in tile.iter_mut().zip(&acc) {
        // SAFETY: `row` holds 16 f32.
        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), *a) };
    }
    for c in 0..16 {
        let dst = &mut out[(o0 + c) * np + p0..][..P];
        for (d, row) in dst.iter_mut().zip(&tile) {
            *d = row[c];
        }
    }
}

super::simd::wgrad_pixels_driver! {
    /// [`super::simd::wgrad_pixels`] for f32 on AVX-512F.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `gt.len() / pix.len()` is a positive multiple of 16, and the
    /// bounds asserted by `wgrad_pixels` hold.
    fn wgrad_pixels_f32 => wgrad_block;
    features = "avx512f,avx2,fma", max = 12, pairs = [1 2 3 4 5 6 7 8 9 10 11 12]
}

/// Pairs `k0..k0 + K` × channels `o0..o0 + 16`, over all pixels.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn wgrad_block<const K: usize>(
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
    let mut acc = [_mm512_setzero_ps(); K];
    let g = gt[o0..].as_ptr();
    for (p, &pp) in pix.iter().enumerate() {
        // SAFETY: p < np and o0 + 16 <= outs, so the vector lies in gt.
        let gv = unsafe { _mm512_loadu_ps(g.add(p * outs)) };
        for (a, b) in acc.iter_mut().zip(&base) {
            // SAFETY: at(j) + pix[p] = ci·psize + off[t] + pix[p] < (ci + 1)·psize.
            let x = _mm512_set1_ps(unsafe { *b.add(pp) });
            *a = _mm512_fmadd_ps(gv, x, *a);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let d = &mut dwt[(k0 + j) * outs + o0..][..16];
        // SAFETY: `d` holds 16 f32.
        unsafe {
            _mm512_storeu_ps(
                d.as_mut_ptr(),
                _mm512_add_ps(_mm512_loadu_ps(d.as_ptr()), *a),
            )
        };
    }
}

super::simd::fwd_multi_kernel! {
    /// [`super::simd::fwd_multi`] for f32 on AVX-512F: blocks of up to 4 output channels × 64
    /// to 128 outputs (16 accumulators), then 16 outputs, then one last overlapping vector.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `len >= 16` (shorter runs keep the AVX2 kernel); the bounds
    /// asserted by `fwd_multi` hold.
    fn fwd_multi_f32, multi_run, multi_block;
    features = "avx512f,avx2,fma", lanes = 16, vector = __m512,
    zero = _mm512_setzero_ps, load = _mm512_loadu_ps, set1 = _mm512_set1_ps,
    fma = _mm512_fmadd_ps, store = _mm512_storeu_ps,
    blocks = [4 => 4, 3 => 5, 2 => 8, 1 => 8]
}
