//! The portable tap loops: plain loops over fixed-size register blocks that LLVM
//! auto-vectorises, compiled three times (AVX-512, AVX2+FMA, baseline x86-64 / other targets)
//! with the version picked at run time ([`multiversion!`]), because the default x86-64 target
//! only allows SSE2. The inner loops were checked in the release assembly to use full-width
//! `vmulps`/`vaddps` on zmm (AVX-512) registers. They serve every element type, and are the
//! fallback of the intrinsics kernels.
//!
//! A "tap" is one kernel position (i, j); the direct kernels lay the input out so that every
//! tap reads one contiguous run of it, starting at that tap's offset (see `direct.rs`).

use super::dispatch::multiversion;
use crate::elem::Elem;

/// Register block: outputs kept in registers while all taps are added into them.
const B: usize = 64;

multiversion! {
    /// `acc[f] += Σ_t w[t] · src[off[t] + f]` for every `f < acc.len()`: one output run of a
    /// forward convolution from all taps of one (output, input) channel pair.
    fn taps_fwd(acc: &mut [T], src: &[T], off: &[usize], w: &[T]) => taps_fwd_body
}

multiversion! {
    /// `dst[off[t] + f] += w[t] · g[f]` for every tap `t` and `f < g.len()`: the scatter of
    /// one output-gradient run into an input-gradient plane.
    fn taps_bwd_data(dst: &mut [T], g: &[T], off: &[usize], w: &[T]) => taps_bwd_data_body
}

multiversion! {
    /// `dw[t] += Σ_f g[f] · src[off[t] + f]` for every tap `t`: the weight gradient of one
    /// (output, input) channel pair from one image.
    fn taps_bwd_filter(dw: &mut [T], g: &[T], src: &[T], off: &[usize]) => taps_bwd_filter_body
}

#[inline(always)]
fn taps_fwd_body<T: Elem>(acc: &mut [T], src: &[T], off: &[usize], w: &[T]) {
    let n = acc.len();
    let taps = off.len().min(w.len());
    let mut f0 = 0;
    while f0 + B <= n {
        let mut r = [T::ZERO; B];
        r.copy_from_slice(&acc[f0..f0 + B]);
        for t in 0..taps {
            let s = &src[off[t] + f0..][..B];
            let wt = w[t];
            for (rl, &sl) in r.iter_mut().zip(s) {
                *rl += wt * sl;
            }
        }
        acc[f0..f0 + B].copy_from_slice(&r);
        f0 += B;
    }
    let rest = n - f0;
    if rest > 0 {
        let a = &mut acc[f0..];
        for t in 0..taps {
            let s = &src[off[t] + f0..][..rest];
            let wt = w[t];
            for (al, &sl) in a.iter_mut().zip(s) {
                *al += wt * sl;
            }
        }
    }
}

#[inline(always)]
fn taps_bwd_data_body<T: Elem>(dst: &mut [T], g: &[T], off: &[usize], w: &[T]) {
    let n = g.len();
    let taps = off.len().min(w.len());
    let mut f0 = 0;
    while f0 + B <= n {
        let mut r = [T::ZERO; B];
        r.copy_from_slice(&g[f0..f0 + B]);
        for t in 0..taps {
            let d = &mut dst[off[t] + f0..][..B];
            let wt = w[t];
            for (dl, &gl) in d.iter_mut().zip(&r) {
                *dl += wt * gl;
            }
        }
        f0 += B;
    }
    let rest = n - f0;
    if rest > 0 {
        let gr = &g[f0..];
        for t in 0..taps {
            let d = &mut dst[off[t] + f0..][..rest];
            let wt = w[t];
            for (dl, &gl) in d.iter_mut().zip(gr) {
                *dl += wt * gl;
            }
        }
    }
}

#[inline(always)]
fn taps_bwd_filter_body<T: Elem>(dw: &mut [T], g: &[T], src: &[T], off: &[usize]) {
    let taps = dw.len().min(off.len());
    let mut t0 = 0;
    // Up to TB taps per pass over `g`, each with its own register accumulators, so every
    // loaded element of `g` feeds TB multiply-adds.
    while t0 < taps {
        let k = (taps - t0).min(TB);
        let (d, o) = (&mut dw[t0..t0 + k], &off[t0..t0 + k]);
        match k {
            8 => filter_block::<T, 8>(d, g, src, o),
            7 => filter_block::<T, 7>(d, g, src, o),
            6 => filter_block::<T, 6>(d, g, src, o),
            5 => filter_block::<T, 5>(d, g, src, o),
            4 => filter_block::<T, 4>(d, g, src, o),
            3 => filter_block::<T, 3>(d, g, src, o),
            2 => filter_block::<T, 2>(d, g, src, o),
            _ => filter_block::<T, 1>(d, g, src, o),
        }
        t0 += k;
    }
}

/// Taps per pass of the weight-gradient kernel.
pub const TB: usize = 8;
/// Lanes per accumulator of the weight-gradient kernel (one AVX-512 f32 register).
const LB: usize = 16;

#[inline(always)]
fn filter_block<T: Elem, const K: usize>(dw: &mut [T], g: &[T], src: &[T], off: &[usize]) {
    let n = g.len();
    let srcs: [&[T]; K] = std::array::from_fn(|t| &src[off[t]..off[t] + n]);
    let mut acc = [[T::ZERO; LB]; K];
    let mut f0 = 0;
    while f0 + LB <= n {
        let gb = &g[f0..f0 + LB];
        for (a, s) in acc.iter_mut().zip(&srcs) {
            let s = &s[f0..f0 + LB];
            for ((al, &gl), &sl) in a.iter_mut().zip(gb).zip(s) {
                *al += gl * sl;
            }
        }
        f0 += LB;
    }
    for ((d, a), s) in dw.iter_mut().zip(&acc).zip(&srcs) {
        let mut tail = T::ZERO;
        for (&gl, &sl) in g[f0..].iter().zip(&s[f0..]) {
            tail += gl * sl;
        }
        *d += hsum(a) + tail;
    }
}

/// Pairwise sum of a block of partial sums.
#[inline(always)]
pub fn hsum<T: Elem, const N: usize>(a: &[T; N]) -> T {
    let mut v = *a;
    let mut width = N;
    while width > 1 {
        width /= 2;
        let (lo, hi) = v.split_at_mut(width);
        for (l, &h) in lo.iter_mut().zip(hi.iter()) {
            *l += h;
        }
    }
    v[0]
}
