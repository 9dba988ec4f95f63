//! Weight- and input-gradient kernels: [`wgrad_multi`] and [`wgrad_pixels`] (weight
//! gradients of the direct convolution, as lane-partial sums or in the pixel layout),
//! [`skinny_wgrad`] (a stem's few rows of columns), and [`spread_dgrad`] (the input gradient
//! of an unpadded 1x1 stride-2 convolution).

use super::dispatch::{as_f32, as_f32_mut, as_f32_slots, level, Level};
use super::forward::pixels_fast;
#[cfg(target_arch = "x86_64")]
use super::helpers::regions;
use super::helpers::Background;
use super::loops::{hsum, taps_bwd_filter, TB};
pub use super::shared::WGRAD_BAND;
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use crate::elem::Elem;
use crate::uninit::Slot;

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
            return unsafe { avx2::wgrad_f32(dwv, stride, g, n, src, off) };
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

/// Output rows per register tile of [`spread_dgrad`] for output rows `wo` wide: as many
/// whole rows as fill two vectors with a multiple of 4 positions (then a tile's input rows
/// are whole cache lines), or `None`.
fn spread_rows(wo: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use avx512::SPREAD_TILE;
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
        && cg.is_multiple_of(avx512::SPREAD_MT)
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
/// Returns false, touching nothing, where [`spread_dgrad_applies`] says no. `dx` need not be
/// initialised.
pub fn spread_dgrad<T: Elem, S: Slot<T>>(
    (cg, og, ho, wo): (usize, usize, usize, usize),
    (w, w_cs): (&[T], usize),
    dy: &[T],
    dx: &mut [S],
    ahead: Option<usize>,
    background: &[Background<T>],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if og > 0 && spread_dgrad_applies::<T>((cg, ho, wo)) {
        // SAFETY: the kernel writes only computed values and zeros into `dx`.
        let dx32 = unsafe { as_f32_slots::<T, S>(&mut *dx) };
        if let (Some(rows), Some(w), Some(dy), Some(dx)) =
            (spread_rows(wo), as_f32(w), as_f32(dy), dx32)
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
                avx512::spread_dgrad_f32(
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

/// Rows of columns [`skinny_wgrad`] takes: a 3-channel 3x3 stem's.
pub const SKINNY_WGRAD_ROWS: usize = 27;

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
                avx512::skinny_wgrad_f32::<SKINNY_WGRAD_ROWS>(
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
                return unsafe { avx512::wgrad_pixels_f32(dwt, gt, pix, planes, psize, off) };
            }
            // SAFETY: `pixels_fast` checked AVX2 + FMA, f32, whole 16-channel blocks; the
            // bounds the kernel relies on were asserted above.
            return unsafe { avx2::wgrad_pixels_f32(dwt, gt, pix, planes, psize, off) };
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
