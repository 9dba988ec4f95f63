//! Vector kernels of the direct convolution: multiply-adds over many kernel taps at once.
//!
//! Written as plain loops over fixed-size blocks that LLVM auto-vectorises, and compiled three
//! times (AVX-512, AVX2+FMA, baseline x86-64 / other targets) with the version picked at run
//! time, because the default x86-64 target only allows SSE2. The inner loops were checked in
//! the release assembly to use full-width `vmulps`/`vaddps` on zmm (AVX-512) registers.
//!
//! A "tap" is one kernel position (i, j); the direct kernels lay the input out so that every
//! tap reads one contiguous run of it, starting at that tap's offset (see `direct.rs`).

use std::sync::OnceLock;

use crate::elem::Elem;

/// Register block: outputs kept in registers while all taps are added into them.
const B: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Level {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Environment variable that caps the instruction set fpipe's convolution kernels use
/// (gemm picks its own): `base` (portable loops) or `avx2`; anything else, or unset, means
/// the best the CPU has. Read once per process. It lets one machine test every kernel
/// version (`conv::tests`) and rule a vector kernel in or out when a result looks wrong.
pub const SIMD_ENV: &str = "FPIPE_SIMD";

pub(super) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var(SIMD_ENV).unwrap_or_default();
        if cap == "base" {
            return Level::Base;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let fma = is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2");
            if fma && is_x86_feature_detected!("avx512f") && cap != "avx2" {
                return Level::Avx512;
            }
            if fma {
                return Level::Avx2;
            }
        }
        Level::Base
    })
}

/// Defines `pub fn $name` that runs `$body` compiled for the best instruction set the CPU has.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),*) => $body:ident) => {
        $(#[$m])*
        pub fn $name<T: Elem>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512<T: Elem>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2<T: Elem>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match level() {
                    // SAFETY: `level()` detected the features these versions are built for.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Base => {}
                }
            }
            $body($($arg),*)
        }
    };
}
pub(super) use multiversion;

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
const TB: usize = 8;
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

/// Lanes of the partial sums [`wgrad_multi`] accumulates into (one AVX2 f32 register).
pub const WLANES: usize = 8;

/// Weight gradient of several output channels of one group against one input plane, as
/// lane-partial sums: `Σ_l dwv[(o·stride + t)·WLANES + l] += Σ_f g[o·n + f] · src[off[t] + f]`
/// for every output channel `o < g.len() / n` (its run of output gradients is
/// `g[o·n..(o + 1)·n]`), every tap `t < off.len()` and `f < n`. Every `off[t] + n <=
/// src.len()`. The caller sums each weight's `WLANES` lanes once at the end
/// ([`fold_lanes`]): on small planes (7x7 runs of 61) a horizontal sum per call cost as much
/// as the multiply-adds.
///
/// One pass over `f` updates a block of up to [`WO`] output channels × `K` taps held in
/// registers: each loaded input run feeds `O` multiply-adds and each loaded output-gradient
/// run feeds `K`, where the one-channel kernel ([`taps_bwd_filter`]) does one multiply-add
/// per load. LLVM does not vectorise this three-level register block well by itself (it
/// splits it into 2-lane pieces), so f32 on AVX2 has an explicit intrinsics version; other
/// element types and CPUs take the portable loop (which adds into lane 0).
pub fn wgrad_multi<T: Elem>(
    dwv: &mut [T],
    stride: usize,
    g: &[T],
    n: usize,
    src: &[T],
    off: &[usize],
) {
    let outs = g.len().checked_div(n).unwrap_or(0);
    if outs == 0 || off.is_empty() {
        return;
    }
    assert!(
        g.len() == outs * n
            && off.iter().all(|&o| o + n <= src.len())
            && dwv.len() >= ((outs - 1) * stride + off.len()) * WLANES,
        "wgrad_multi: runs out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        if let (Some(g), Some(src), Some(dwv)) = (as_f32(g), as_f32(src), as_f32_mut(dwv)) {
            // SAFETY: AVX2 and FMA were detected by `level()`; the bounds the kernel relies
            // on were asserted above.
            return unsafe { x86::wgrad_f32(dwv, stride, g, n, src, off) };
        }
    }
    let mut sums = [T::ZERO; TB];
    for (o, run) in g.chunks_exact(n).enumerate() {
        for (c, offs) in off.chunks(TB).enumerate() {
            let s = &mut sums[..offs.len()];
            s.fill(T::ZERO);
            taps_bwd_filter(s, run, src, offs);
            for (k, &v) in s.iter().enumerate() {
                dwv[(o * stride + c * TB + k) * WLANES] += v;
            }
        }
    }
}

/// `dw[i] = Σ_l dwv[i·WLANES + l]`: the weights from [`wgrad_multi`]'s partial sums.
pub fn fold_lanes<T: Elem>(dwv: &[T], dw: &mut [T]) {
    for (d, v) in dw.iter_mut().zip(dwv.chunks_exact(WLANES)) {
        let mut a = [T::ZERO; WLANES];
        a.copy_from_slice(v);
        *d = hsum(&a);
    }
}

/// `v` as f32 when `T` is f32 (the intrinsics kernels are f32-only), else `None`.
pub(super) fn as_f32<T: Elem>(v: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is `f32`, so the slice is reinterpreted as its own type.
        .then(|| unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<f32>(), v.len()) })
}

/// [`as_f32`] for a mutable slice.
pub(super) fn as_f32_mut<T: Elem>(v: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: as in `as_f32`.
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len()) })
}

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
                return unsafe {
                    super::avx512::fwd_multi_f32(out, len, planes, psize, off, w, cg)
                };
            }
            // SAFETY: AVX2 and FMA were detected by `level()`; the bounds the kernel relies
            // on were asserted above.
            return unsafe { x86::fwd_f32(out, len, planes, psize, off, w, cg) };
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
/// [`SKINNY_MAX_K`], or `m` a multiple of neither 8 nor 9.
pub fn skinny_matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[T], usize, usize),
    (b, pitch): (&[T], usize),
    (c, c_rs): (&mut [T], usize),
    stream: bool,
    from_memory: bool,
    background: &[Background<T>],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 && m > 0 && n > 0 && (1..=SKINNY_MAX_K).contains(&k) {
        if let (Some(a), Some(b), Some(c)) = (as_f32(a), as_f32(b), as_f32_mut(c)) {
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
                use super::avx512::skinny_matmul_f32 as kernel;
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

/// Output rows per register tile of [`spread_dgrad`] for output rows `wo` wide: as many
/// whole rows as fill two vectors with a multiple of 4 positions (then a tile's input rows
/// are whole cache lines), or `None`.
fn spread_rows(wo: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::avx512::SPREAD_TILE;
        (1..=SPREAD_TILE / wo.max(1))
            .rev()
            .find(|r| (r * wo).is_multiple_of(4))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = wo;
        None
    }
}

/// Whether [`spread_dgrad`] runs for `T` and `(cg, ho, wo)` here: f32 on AVX-512, `cg` a
/// multiple of 8, `ho·wo` a multiple of 4, and some number of whole output rows `wo` wide
/// making at most 32 positions, a multiple of 4 (so 28, 14, 7, 12, 10, 8, 4 take it; 9, 11
/// or over 32 do not).
pub fn spread_dgrad_applies<T: Elem>((cg, ho, wo): (usize, usize, usize)) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && cg > 0
        && cg.is_multiple_of(super::avx512::SPREAD_MT)
        && (ho * wo).is_multiple_of(4)
        && spread_rows(wo).is_some()
    {
        return true;
    }
    let _ = (cg, ho, wo);
    false
}

/// The input gradient `dx` (`cg` planes of `2ho × 2wo`) of one image's group of an
/// unpadded 1x1 stride-2 convolution from its output gradient `dy` (`og` planes of
/// `ho × wo`) and weights `a[ci, oc] = w[oc·w_cs + ci]`, written whole: the product at the
/// even rows and columns, zeros elsewhere; non-temporally where `dx` is 64-byte aligned.
/// Returns false, touching nothing, where [`spread_dgrad_applies`] says no.
pub fn spread_dgrad<T: Elem>(
    (cg, og, ho, wo): (usize, usize, usize, usize),
    (w, w_cs): (&[T], usize),
    dy: &[T],
    dx: &mut [T],
    ahead: Option<usize>,
    background: &[Background<T>],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if og > 0 && spread_dgrad_applies::<T>((cg, ho, wo)) {
        if let (Some(rows), Some(w), Some(dy), Some(dx)) =
            (spread_rows(wo), as_f32(w), as_f32(dy), as_f32_mut(dx))
        {
            assert!(
                (og - 1) * w_cs + cg <= w.len()
                    && og * ho * wo <= dy.len()
                    && cg * 4 * ho * wo <= dx.len(),
                "spread_dgrad: runs out of bounds"
            );
            let stream = (dx.as_ptr() as usize).is_multiple_of(64);
            let (regions, nr) = regions(background);
            // SAFETY: AVX-512F detected; the shape conditions are checked by
            // `spread_dgrad_applies` and the bounds asserted.
            unsafe {
                super::avx512::spread_dgrad_f32(
                    (cg, og, ho, wo),
                    rows,
                    (w, w_cs),
                    dy,
                    dx,
                    stream,
                    ahead,
                    &regions[..nr],
                )
            };
            return true;
        }
    }
    let _ = ((cg, og, ho, wo), (w, w_cs), dy, dx, ahead, background);
    false
}

/// The kernels' form of up to 4 [`Background`]s, and how many there are.
#[cfg(target_arch = "x86_64")]
fn regions<T: Elem>(background: &[Background<T>]) -> ([super::avx512::Region; 4], usize) {
    let mut regions = [super::avx512::Region {
        start: std::ptr::null(),
        run: 0,
        stride: 0,
        runs: 0,
    }; 4];
    for (r, b) in regions.iter_mut().zip(background) {
        // A zero stride is one run.
        let runs = if b.run == 0 || b.data.len() < b.run {
            0
        } else {
            (b.data.len() - b.run).checked_div(b.stride).unwrap_or(0) + 1
        };
        *r = super::avx512::Region {
            start: b.data.as_ptr().cast(),
            run: b.run,
            stride: b.stride,
            runs,
        };
    }
    (regions, background.len().min(4))
}

/// Memory a kernel brings into L2 while it computes, for the next one to find there: runs
/// of `run` elements `stride` apart over `data` (as many as fit).
pub struct Background<'a, T> {
    pub data: &'a [T],
    pub run: usize,
    pub stride: usize,
}

/// Rows of columns [`skinny_wgrad`] takes: a 3-channel 3x3 stem's.
pub const SKINNY_WGRAD_ROWS: usize = 27;

/// Row stride of [`skinny_wgrad`]'s band of columns, and the most positions it covers: 27
/// rows of 256 are 27 KB, which stay in L1 while every output channel's row passes over them.
pub const WGRAD_BAND: usize = 256;

/// Whether [`skinny_wgrad`] runs for `T` and `kk` rows of columns here (f32 on AVX-512, 27
/// rows), so a caller can lay out its columns for it.
pub fn skinny_wgrad_applies<T: Elem>(kk: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 && kk == SKINNY_WGRAD_ROWS {
        return std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
    }
    let _ = kk;
    false
}

/// `lanes[(o·kk + t)·16 + l] += Σ_{p ≡ l} dy[o·dy_rs + p] · band[t·WGRAD_BAND + p]` over
/// `p < n <= WGRAD_BAND`: one band of a weight gradient `dW = dy·colᵀ` with few rows of
/// columns (a stem's 27), summed into 16 partial sums per weight that [`add_lanes`] folds
/// into `dW`. The GEMM ran these 27 rows as tiles of 32 and read the output gradient in 64
/// concurrent streams; this kernel reads it three rows at a time (register tiles of 3
/// channels x 9 rows of columns), fetching the rows two blocks ahead as it goes, and with
/// `fetch_next` the first rows of the next band (`n` positions on). Returns false, touching
/// nothing, where [`skinny_wgrad_applies`] is false.
pub fn skinny_wgrad<T: Elem>(
    (og, kk, n): (usize, usize, usize),
    (dy, dy_rs): (&[T], usize),
    band: &[T],
    fetch_next: bool,
    lanes: &mut [T],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if skinny_wgrad_applies::<T>(kk) && og > 0 && n > 0 {
        if let (Some(dy), Some(band), Some(lanes)) = (as_f32(dy), as_f32(band), as_f32_mut(lanes)) {
            assert!(
                n <= WGRAD_BAND
                    && (og - 1) * dy_rs + n <= dy.len()
                    && kk * WGRAD_BAND <= band.len()
                    && og * kk * 16 <= lanes.len(),
                "skinny_wgrad: runs out of bounds"
            );
            // SAFETY: AVX-512F detected; the bounds the kernel relies on were asserted above.
            unsafe {
                super::avx512::skinny_wgrad_f32::<SKINNY_WGRAD_ROWS>(
                    (og, n),
                    (dy, dy_rs),
                    band,
                    fetch_next,
                    lanes,
                )
            };
            return true;
        }
    }
    let _ = ((og, kk, n), (dy, dy_rs), band, fetch_next, lanes);
    false
}

/// `dw[i] += Σ_l lanes[16·i + l]`: folds [`skinny_wgrad`]'s partial sums into the weight
/// gradient.
pub fn add_lanes<T: Elem>(lanes: &[T], dw: &mut [T]) {
    for (d, l) in dw.iter_mut().zip(lanes.chunks_exact(16)) {
        *d += l.iter().fold(T::ZERO, |s, &v| s + v);
    }
}

/// `dst[i] += src[i]`: the banded col2im's inner loop. The crate is built for baseline
/// x86_64, where LLVM gives this loop 4-lane SSE; f32 runs 16 lanes on AVX-512, 8 on AVX2
/// (iresnet's stem's input gradient 0.0071-0.0073 -> 0.0067-0.0070 s).
pub fn add_assign<T: Elem>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "add_assign: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        if let (Some(d), Some(s)) = (as_f32_mut(dst), as_f32(src)) {
            if level() == Level::Avx512 {
                // SAFETY: AVX-512F detected; the lengths are equal (asserted above).
                return unsafe { super::avx512::add_assign_f32(d, s) };
            }
            // SAFETY: `level()` detected AVX2; the lengths are equal.
            return unsafe { x86::add_assign_f32(d, s) };
        }
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d += v;
    }
}

/// `dst.copy_from_slice(src)` with non-temporal stores where the CPU has AVX-512: for a
/// large output written once and not read soon, whose lines then need not be read first.
pub fn stream_copy<T: Elem>(src: &[T], dst: &mut [T]) {
    assert_eq!(src.len(), dst.len(), "stream_copy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        if let (Some(s), Some(d)) = (as_f32(src), as_f32_mut(dst)) {
            // SAFETY: AVX-512F detected; the lengths are equal (asserted above).
            return unsafe { super::avx512::stream_copy_f32(s, d) };
        }
    }
    dst.copy_from_slice(src);
}

/// `even[k] = src[2k]`, `odd[k] = src[2k + 1]` over the lengths of `even` and `odd`
/// (`ceil(n / 2)` and `floor(n / 2)` for a source run of `n`): the column split of one input
/// row into the two column phases of a stride-2 polyphase plane. A strided scalar copy of
/// these rows cost about as much as the stride-2 grouped forward's multiply-adds (perf), so
/// f32 on AVX2 splits 16 elements per step with shuffles.
pub fn deinterleave2<T: Elem>(src: &[T], even: &mut [T], odd: &mut [T]) {
    assert!(
        even.len() >= odd.len() && 2 * odd.len() <= src.len() && 2 * even.len() <= src.len() + 1,
        "deinterleave2: runs out of bounds"
    );
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        if let (Some(s), Some(e), Some(o)) = (as_f32(src), as_f32_mut(even), as_f32_mut(odd)) {
            // SAFETY: AVX2 was detected by `level()`; the kernel stays within `2·odd.len()`
            // elements of `src`, asserted above to be in bounds.
            k = unsafe { x86::deinterleave2_f32(s, e, o) };
        }
    }
    for (i, e) in even.iter_mut().enumerate().skip(k) {
        *e = src[2 * i];
    }
    for (i, o) in odd.iter_mut().enumerate().skip(k) {
        *o = src[2 * i + 1];
    }
}

/// `dst[k] = src[2k]` for every `k < dst.len()`: one column phase of a stride-2 input row
/// (a 1x1 stride-2 convolution's input), without the other phase [`deinterleave2`] also
/// writes.
pub fn take_even<T: Elem>(src: &[T], dst: &mut [T]) {
    assert!(
        2 * dst.len() <= src.len() + 1,
        "take_even: runs out of bounds"
    );
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        if let (Some(s), Some(d)) = (as_f32(src), as_f32_mut(dst)) {
            // SAFETY: AVX2 was detected by `level()`; the bound was asserted above.
            k = unsafe { x86::take_even_f32(s, d) };
        }
    }
    for (i, d) in dst.iter_mut().enumerate().skip(k) {
        *d = src[2 * i];
    }
}

/// The inverse of [`deinterleave2`]: `dst[2k] = even[k]`, `dst[2k + 1] = odd[k]` for
/// `2k (+ 1) < dst.len()`.
pub fn interleave2<T: Elem>(even: &[T], odd: &[T], dst: &mut [T]) {
    assert!(
        even.len() >= dst.len().div_ceil(2) && odd.len() >= dst.len() / 2,
        "interleave2: runs out of bounds"
    );
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        if let (Some(e), Some(o), Some(d)) = (as_f32(even), as_f32(odd), as_f32_mut(dst)) {
            // SAFETY: AVX2 was detected by `level()`; the kernel writes whole pairs within
            // `dst` and reads the matching `even`/`odd` elements, in bounds as asserted.
            k = unsafe { x86::interleave2_f32(e, o, d) };
        }
    }
    for (i, d) in dst.iter_mut().enumerate().skip(2 * k) {
        *d = if i % 2 == 0 { even[i / 2] } else { odd[i / 2] };
    }
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
/// needs only zero padding, not the polyphase split, at any stride.
pub fn fwd_pixels<T: Elem>(
    out: &mut [T],
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
        if let (Some(planes), Some(wt), Some(out)) = (as_f32(planes), as_f32(wt), as_f32_mut(out)) {
            if level() == Level::Avx512 {
                // SAFETY: AVX-512F detected; otherwise as below.
                return unsafe { super::avx512::fwd_pixels_f32(out, pix, planes, psize, off, wt) };
            }
            // SAFETY: `pixels_fast` checked AVX2 + FMA, f32, whole 16-channel blocks and at
            // least 8 pixels; the bounds the kernel relies on were asserted above.
            return unsafe { x86::fwd_pixels_f32(out, pix, planes, psize, off, wt) };
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
            *v = sum;
        }
    }
}

/// Weight gradient of a block of output channels at a list of output pixels, in
/// [`fwd_pixels`]'s layouts: `dwt[(ci·taps + t)·outs + o] += Σ_p gt[p·outs + o] ·
/// planes[ci·psize + pix[p] + off[t]]` for `o < outs = gt.len() / np`, `np = pix.len()`,
/// `taps = off.len()`, `cg = planes.len() / psize`: the output gradients come pixel-major
/// (transposed, [`transpose`]). Every `pix[p] + off[t] < psize`.
///
/// Where [`pixels_fast`], blocks of 16 channels × 6 (input channel, tap) pairs stay in
/// registers across all pixels: each pixel loads the block's output gradients as two
/// vectors and broadcasts one input value per pair. Like [`fwd_pixels`], only real output
/// pixels are visited.
pub fn wgrad_pixels<T: Elem>(
    dwt: &mut [T],
    gt: &[T],
    pix: &[usize],
    planes: &[T],
    psize: usize,
    off: &[usize],
) {
    let (np, taps) = (pix.len(), off.len());
    let outs = gt.len().checked_div(np).unwrap_or(0);
    let cg = planes.len().checked_div(psize).unwrap_or(0);
    let (pmax, omax) = (
        pix.iter().copied().max().unwrap_or(0),
        off.iter().copied().max().unwrap_or(0),
    );
    assert!(
        gt.len() == outs * np
            && planes.len() == cg * psize
            && (np == 0 || taps == 0 || pmax + omax < psize)
            && dwt.len() == cg * taps * outs,
        "wgrad_pixels: runs out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if pixels_fast::<T>(outs, np) {
        if let (Some(gt), Some(planes), Some(dwt)) = (as_f32(gt), as_f32(planes), as_f32_mut(dwt)) {
            if level() == Level::Avx512 {
                // SAFETY: AVX-512F detected; otherwise as below.
                return unsafe {
                    super::avx512::wgrad_pixels_f32(dwt, gt, pix, planes, psize, off)
                };
            }
            // SAFETY: `pixels_fast` checked AVX2 + FMA, f32, whole 16-channel blocks; the
            // bounds the kernel relies on were asserted above.
            return unsafe { x86::wgrad_pixels_f32(dwt, gt, pix, planes, psize, off) };
        }
    }
    for ci in 0..cg {
        for (t, &ot) in off.iter().enumerate() {
            let d = &mut dwt[(ci * taps + t) * outs..][..outs];
            for (&p, g) in pix.iter().zip(gt.chunks_exact(outs.max(1))) {
                let xv = planes[ci * psize + p + ot];
                for (dv, &gv) in d.iter_mut().zip(g) {
                    *dv += gv * xv;
                }
            }
        }
    }
}

/// `dst[c·rows + r] = src[r·cols + c]`: the `rows × cols` matrix `src` transposed.
pub fn transpose<T: Elem>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    assert!(
        src.len() == rows * cols && dst.len() == rows * cols,
        "transpose: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        if let (Some(s), Some(d)) = (as_f32(src), as_f32_mut(dst)) {
            // SAFETY: `level()` detected AVX2.
            return unsafe { x86::transpose_f32(s, rows, cols, d) };
        }
    }
    // Tiles of 8 rows keep the writes of one source row within a few cache lines.
    for r0 in (0..rows).step_by(8) {
        let r1 = (r0 + 8).min(rows);
        for c in 0..cols {
            for r in r0..r1 {
                dst[c * rows + r] = src[r * cols + c];
            }
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

/// Output channels per block of [`wgrad_multi`].
const WO: usize = 3;

/// Taps per block with `o` output channels, leaving `o` registers for the output-gradient
/// runs and one for the input run out of 16 vector registers.
fn wgrad_taps(o: usize) -> usize {
    ((16 - o - 1) / o).clamp(1, 9)
}

/// Defines the vector kernel of [`fwd_multi`] for one vector width: `$name` (the driver over
/// blocks of output channels), `$run` (one block's runs of outputs) and `$block` (one register
/// block). The AVX2 version (`x86`) and the AVX-512 one (`avx512.rs`) are this code at 8 and
/// 16 lanes.
#[cfg(target_arch = "x86_64")]
macro_rules! fwd_multi_kernel {
    (
        $(#[$m:meta])*
        fn $name:ident, $run:ident, $block:ident;
        features = $feat:literal, lanes = $lanes:literal, vector = $vec:ty,
        zero = $zero:ident, load = $load:ident, set1 = $set1:ident,
        fma = $fma:ident, store = $store:ident,
        blocks = [4 => $p4:literal, 3 => $p3:literal, 2 => $p2:literal, 1 => $p1:literal]
    ) => {
        $(#[$m])*
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            out: &mut [f32],
            len: usize,
            planes: &[f32],
            psize: usize,
            off: &[usize],
            w: &[f32],
            cg: usize,
        ) {
            let outs = out.len() / len;
            let mut o0 = 0;
            while o0 < outs {
                let o = (outs - o0).min(4);
                let (dst, wb) = (
                    &mut out[o0 * len..(o0 + o) * len],
                    &w[o0 * cg * off.len()..],
                );
                let args = (&mut *dst, len, planes, psize, off, wb, cg);
                // SAFETY: as the caller guarantees.
                let f = unsafe {
                    match o {
                        4 => $run::<4, $p4>(args),
                        3 => $run::<3, $p3>(args),
                        2 => $run::<2, $p2>(args),
                        _ => $run::<1, $p1>(args),
                    }
                };
                // Runs shorter than one vector.
                let taps = off.len();
                for oo in 0..o {
                    for ff in f..len {
                        let mut sum = 0f32;
                        for ci in 0..cg {
                            for (t, &ot) in off.iter().enumerate() {
                                sum += wb[(oo * cg + ci) * taps + t] * planes[ci * psize + ot + ff];
                            }
                        }
                        dst[oo * len + ff] = sum;
                    }
                }
                o0 += o;
            }
        }

        /// Outputs `0..len` of `O` channels in blocks of `P` vectors, then single vectors,
        /// then one last overlapping vector (outputs are overwritten, not accumulated, so
        /// recomputing a few is harmless); returns where the vectors stopped (`len` unless
        /// `len` is shorter than one vector).
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::type_complexity)]
        unsafe fn $run<const O: usize, const P: usize>(
            (dst, len, planes, psize, off, w, cg): (
                &mut [f32],
                usize,
                &[f32],
                usize,
                &[usize],
                &[f32],
                usize,
            ),
        ) -> usize {
            let mut f = 0;
            // SAFETY (all three): f + lanes·P <= len, and the caller's bounds.
            while f + $lanes * P <= len {
                unsafe { $block::<O, P>(dst, len, f, planes, psize, off, w, cg) };
                f += $lanes * P;
            }
            while f + $lanes <= len {
                unsafe { $block::<O, 1>(dst, len, f, planes, psize, off, w, cg) };
                f += $lanes;
            }
            if f < len && len >= $lanes {
                unsafe { $block::<O, 1>(dst, len, len - $lanes, planes, psize, off, w, cg) };
                f = len;
            }
            f
        }

        /// Outputs `f..f + lanes·P` of `O` channels.
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $block<const O: usize, const P: usize>(
            dst: &mut [f32],
            len: usize,
            f: usize,
            planes: &[f32],
            psize: usize,
            off: &[usize],
            w: &[f32],
            cg: usize,
        ) {
            let taps = off.len();
            let mut acc: [[$vec; P]; O] = [[$zero(); P]; O];
            for ci in 0..cg {
                let plane = planes[ci * psize..].as_ptr();
                let wc: [*const f32; O] =
                    std::array::from_fn(|o| w[(o * cg + ci) * taps..].as_ptr());
                for (t, &ot) in off.iter().enumerate() {
                    // SAFETY: ot + f + lanes·P <= ot + len <= psize (asserted by the caller).
                    let x: [$vec; P] = std::array::from_fn(|p| unsafe {
                        $load(plane.add(ot + f + $lanes * p))
                    });
                    for (acc_o, wco) in acc.iter_mut().zip(&wc) {
                        // SAFETY: w holds O·cg·taps weights from `w`.
                        let wv = $set1(unsafe { *wco.add(t) });
                        for (a, xp) in acc_o.iter_mut().zip(&x) {
                            *a = $fma(wv, *xp, *a);
                        }
                    }
                }
            }
            for (o, acc_o) in acc.iter().enumerate() {
                for (p, a) in acc_o.iter().enumerate() {
                    let d = &mut dst[o * len + f + $lanes * p..][..$lanes];
                    // SAFETY: `d` holds one vector of f32.
                    unsafe { $store(d.as_mut_ptr(), *a) };
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use fwd_multi_kernel;

/// Defines `$name`, the driver of [`wgrad_pixels`]' vector kernel: blocks of 16 output
/// channels × up to `$max` (input channel, tap) pairs, each run by `$block::<K>` over all
/// pixels. The AVX2 version (`x86`) and the AVX-512 one (`avx512.rs`) share this driver;
/// their register blocks differ (two 8-lane vectors per channel block against one).
#[cfg(target_arch = "x86_64")]
macro_rules! wgrad_pixels_driver {
    (
        $(#[$m:meta])*
        fn $name:ident => $block:ident;
        features = $feat:literal, max = $max:literal, pairs = [$($k:literal)*]
    ) => {
        $(#[$m])*
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            dwt: &mut [f32],
            gt: &[f32],
            pix: &[usize],
            planes: &[f32],
            psize: usize,
            off: &[usize],
        ) {
            let (np, taps) = (pix.len(), off.len());
            let outs = gt.len() / np;
            let pairs = dwt.len() / outs;
            for o0 in (0..outs).step_by(16) {
                let mut k0 = 0;
                while k0 < pairs {
                    let k = (pairs - k0).min($max);
                    // Start of each pair's input run: plane ci, tap t.
                    let at = |j: usize| ((k0 + j) / taps) * psize + off[(k0 + j) % taps];
                    // SAFETY: as the caller guarantees; pairs k0..k0 + k exist.
                    unsafe {
                        match k {
                            $($k => $block::<$k>(dwt, gt, pix, planes, outs, o0, k0, at),)*
                            _ => unreachable!("block of {k} pairs"),
                        }
                    }
                    k0 += k;
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use wgrad_pixels_driver;

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{wgrad_taps, WO};

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
    pub unsafe fn interleave2_f32(even: &[f32], odd: &[f32], dst: &mut [f32]) -> usize {
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
    unsafe fn interleave2_f32_block(even: &[f32], odd: &[f32], dst: &mut [f32], k: usize) {
        // SAFETY: in bounds as the caller guarantees.
        unsafe {
            let e = _mm256_loadu_ps(even.as_ptr().add(k));
            let o = _mm256_loadu_ps(odd.as_ptr().add(k));
            // [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7].
            let lo = _mm256_unpacklo_ps(e, o);
            let hi = _mm256_unpackhi_ps(e, o);
            _mm256_storeu_ps(
                dst.as_mut_ptr().add(2 * k),
                _mm256_permute2f128_ps::<0x20>(lo, hi),
            );
            _mm256_storeu_ps(
                dst.as_mut_ptr().add(2 * k + 8),
                _mm256_permute2f128_ps::<0x31>(lo, hi),
            );
        }
    }

    super::wgrad_pixels_driver! {
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
                    unsafe { _mm_storeu_ps(lo.as_mut_ptr(), _mm256_castps256_ps128(rc)) };
                    let hi = &mut out[(o0 + 8 * v + c + 4) * np + p0 + q..][..4];
                    unsafe { _mm_storeu_ps(hi.as_mut_ptr(), _mm256_extractf128_ps::<1>(rc)) };
                }
            }
        }
    }

    super::fwd_multi_kernel! {
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
}

/// Pairwise sum of a block of partial sums.
#[inline(always)]
fn hsum<T: Elem, const N: usize>(a: &[T; N]) -> T {
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
