//! Dense and wide-group convolution as im2col / col2im around the `gemm` crate (the GEMM
//! candle itself uses, 150-190 GFLOP/s here).
//!
//! With `K = cg·kh·kw`, per group: forward `y = W·col(x)` (`og×K` times `K×hw`), input
//! gradient `dx = col2im(Wᵀ·dy)`, weight gradient `dW += dy·col(x)ᵀ`. Images are processed in
//! chunks: one image per chunk when its output plane is large, several when it is small (7x7,
//! 14x14), so the GEMM's `n` (forward) or `k` (weight gradient) is long enough for the
//! microkernel. Where one image's columns would not fit the cache (64 channels at 56x56), the
//! forward and weight gradient build and consume them a band of output rows at a time.
//! Chunks run in parallel with single-threaded GEMMs; with fewer chunks than threads the GEMM
//! itself runs in parallel. A 1x1, stride-1, unpadded convolution of one image needs no
//! im2col: the input is its column matrix.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{simd, valid_range, Geom};
use crate::elem::Elem;
use std::mem::MaybeUninit;

use crate::uninit::{
    assume_init, assume_init_mut, fill, output_vec, write_slice, zeroed_output, Slot,
};

/// Output positions per chunk below which several images are batched into one GEMM.
const MIN_CHUNK_COLUMNS: usize = 256;

/// One image's column matrix (elements) beyond which it is built and consumed a band of
/// output rows at a time: 64 channels at 56x56 make 7 MB of columns, which leave the core's
/// 2 MB cache before the GEMM reads them back (weight gradient 0.046 -> 0.035 s, forward
/// 0.031 -> 0.029 s). Smaller matrices stay whole: a band of them gives the weight
/// gradient's GEMM too short a `k` for the `dW` it reads and writes per band.
const MAX_WHOLE_COL_ELEMS: usize = 1 << 20;

/// Elements of one band's columns.
const COL_BAND_ELEMS: usize = 1 << 18;

/// Most column elements the input gradient computes before adding them back: bands of input
/// channels (iresnet's 512-channel 7x7 layer: 5 MB of columns per chunk, in 2 MB bands
/// 0.033 -> 0.030 s; smaller bands measured slower).
const DGRAD_BAND_ELEMS: usize = 1 << 19;

/// Most rows of columns the input gradient computes with [`simd::skinny_matmul`].
const SKINNY_MAX_ROWS: usize = 64;

/// Output rows of one image whose columns are built and consumed at a time.
fn rows_per_col_band(g: &Geom) -> usize {
    if g.k() * g.out_hw() <= MAX_WHOLE_COL_ELEMS {
        return g.ho;
    }
    (COL_BAND_ELEMS / (g.k() * g.wo).max(1)).clamp(1, g.ho.max(1))
}

/// Builds the columns of one image's group `xg` a band of `rows` output rows at a time, at
/// row stride `pitch` (at least `rows·wo`) in a 64-byte aligned buffer, and hands each band to
/// `body(first row, columns in the band, band)`.
fn for_col_bands<T: Elem>(
    g: &Geom,
    xg: &[T],
    (rows, pitch): (usize, usize),
    mut body: impl FnMut(usize, usize, &[T]),
) {
    T::with_scratch(g.k() * pitch + 16, |scr| {
        let start = scr.as_ptr().align_offset(64).min(16);
        let col = &mut scr[start..][..g.k() * pitch];
        for r0 in (0..g.ho).step_by(rows) {
            let r1 = (r0 + rows).min(g.ho);
            im2col_rows(g, xg, col, pitch, 0, (r0, r1));
            body(r0, (r1 - r0) * g.wo, col);
        }
    });
}

/// Images per chunk for `g` with `threads` workers.
fn images_per_chunk(g: &Geom, threads: usize) -> usize {
    let want = MIN_CHUNK_COLUMNS.div_ceil(g.out_hw().max(1));
    // Never fewer chunks than threads when the batch allows it.
    want.min(g.n.div_ceil(threads)).max(1)
}

/// `dst = lhs·rhs` for an `m×k` by `k×n` product. Matrices are given as slices with (row,
/// column) strides; `dst` is row-major with row stride `dst_rs` and need not be initialised.
fn matmul<T: Elem, S: Slot<T>>(
    mnk: (usize, usize, usize),
    dst: &mut [S],
    dst_rs: usize,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    par: Parallelism,
) {
    // SAFETY: not accumulating.
    unsafe { gemm_into(mnk, dst, dst_rs, false, lhs, rhs, par) }
}

/// `dst += lhs·rhs`, otherwise as [`matmul`].
fn matmul_add<T: Elem>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    par: Parallelism,
) {
    // SAFETY: `dst` is initialised.
    unsafe { gemm_into(mnk, dst, dst_rs, true, lhs, rhs, par) }
}

/// `dst = lhs·rhs`, or `dst += lhs·rhs` when `accumulate`, on the `gemm` crate.
///
/// # Safety
/// With `accumulate`, the elements of `dst` the product covers are initialised (`gemm` reads
/// `dst` only then).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Elem, S: Slot<T>>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [S],
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                fill(&mut dst[r * dst_rs..r * dst_rs + n], T::ZERO);
            }
        }
        return;
    }
    // The bounds `gemm` will touch, checked here because it takes raw pointers.
    assert!((m - 1) * dst_rs + n <= dst.len(), "matmul: dst too short");
    assert!(
        (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
        "matmul: lhs too short"
    );
    assert!(
        (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "matmul: rhs too short"
    );
    // SAFETY: the asserts above keep every index gemm computes from these strides inside the
    // slices; `dst` is exclusively borrowed and does not overlap the shared inputs, has `T`'s
    // layout (`Slot`), and is read only when `accumulate` (initialised then, as the caller
    // guarantees).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<T>(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// Writes the im2col matrix of one image's group `x` (`cg·h·w`) into `col`: row `kk` of the
/// `K × pitch` matrix gets that tap's input for every output position, at columns
/// `off..off + ho·wo`.
fn im2col<T: Elem>(g: &Geom, x: &[T], col: &mut [T], pitch: usize, off: usize) {
    im2col_rows(g, x, col, pitch, off, (0, g.ho));
}

/// [`im2col`] for the output rows `r0..r1` only: row `kk` of `col` gets that tap's input for
/// those rows' `(r1 - r0)·wo` positions, at columns `off..`.
fn im2col_rows<T: Elem>(
    g: &Geom,
    x: &[T],
    col: &mut [T],
    pitch: usize,
    off: usize,
    (r0, r1): (usize, usize),
) {
    if g.stride == 2 && g.w <= 2 * MAX_PHASE {
        return im2col_rows_s2(g, x, col, pitch, off, (r0, r1));
    }
    let (s, p, hw) = (g.stride, g.pad, g.in_hw());
    let base = r0 * g.wo;
    let len = (r1 - r0) * g.wo;
    for ci in 0..g.cg() {
        let xp = &x[ci * hw..][..hw];
        for i in 0..g.kh {
            let (hlo, hhi) = valid_range(i, p, s, g.h, g.ho);
            let (hlo, hhi) = (hlo.clamp(r0, r1), hhi.clamp(r0, r1));
            for j in 0..g.kw {
                let (wlo, whi) = valid_range(j, p, s, g.w, g.wo);
                let row = &mut col[((ci * g.kh + i) * g.kw + j) * pitch + off..][..len];
                row[..hlo * g.wo - base].fill(T::ZERO);
                row[hhi * g.wo - base..].fill(T::ZERO);
                if let Some(span) = same_size_span(g, (hlo, hhi), (wlo, whi), (i, j)) {
                    // One copy for all rows, then the columns that wrapped around to the
                    // neighbouring row are zeroed: a copy per row of 7 to 56 values was
                    // mostly call overhead (perf: im2col a tenth of an iresnet18 step).
                    let (d0, s0, n) = span;
                    row[d0 - base..d0 - base + n].copy_from_slice(&xp[s0..s0 + n]);
                    zero_wrapped(g, row, (hlo - r0, hhi - r0), (wlo, whi));
                    continue;
                }
                for oh in hlo..hhi {
                    let src = &xp[(oh * s + i - p) * g.w..][..g.w];
                    let dst = &mut row[(oh - r0) * g.wo..][..g.wo];
                    dst[..wlo].fill(T::ZERO);
                    dst[whi..].fill(T::ZERO);
                    if wlo == whi {
                        continue;
                    }
                    if s == 1 {
                        dst[wlo..whi].copy_from_slice(&src[wlo + j - p..whi + j - p]);
                    } else {
                        for (ow, d) in (wlo..whi).zip(&mut dst[wlo..whi]) {
                            *d = src[ow * s + j - p];
                        }
                    }
                }
            }
        }
    }
}

/// Longest column phase of a stride-2 input row the [`im2col_rows_s2`] / [`col2im`] stack
/// buffers hold (rows up to 512 wide; wider ones take the strided scalar loops).
const MAX_PHASE: usize = 256;

/// [`im2col_rows`] at stride 2: each input row is split once into its even and odd columns
/// (vectorised), after which every tap's output row is one contiguous copy out of a phase.
/// The strided scalar gather this replaces was a sixth of a stride-2 3x3 layer's time (perf).
fn im2col_rows_s2<T: Elem>(
    g: &Geom,
    x: &[T],
    col: &mut [T],
    pitch: usize,
    off: usize,
    (r0, r1): (usize, usize),
) {
    let (p, hw) = (g.pad, g.in_hw());
    let len = (r1 - r0) * g.wo;
    let (ne, no) = (g.w.div_ceil(2), g.w / 2);
    let (mut ev, mut od) = ([T::ZERO; MAX_PHASE], [T::ZERO; MAX_PHASE]);
    for ci in 0..g.cg() {
        let xp = &x[ci * hw..][..hw];
        for i in 0..g.kh {
            let (hlo, hhi) = valid_range(i, p, 2, g.h, g.ho);
            let (hlo, hhi) = (hlo.clamp(r0, r1), hhi.clamp(r0, r1));
            let tap0 = (ci * g.kh + i) * g.kw;
            for j in 0..g.kw {
                let row = &mut col[(tap0 + j) * pitch + off..][..len];
                row[..(hlo.min(hhi) - r0) * g.wo].fill(T::ZERO);
                row[(hhi.max(hlo) - r0) * g.wo..].fill(T::ZERO);
            }
            for oh in hlo..hhi {
                let src = &xp[(oh * 2 + i - p) * g.w..][..g.w];
                if g.kw == 1 {
                    // One tap reads one phase: take it straight into the columns.
                    let (wlo, whi) = valid_range(0, p, 2, g.w, g.wo);
                    let dst = &mut col[tap0 * pitch + off + (oh - r0) * g.wo..][..g.wo];
                    dst[..wlo].fill(T::ZERO);
                    dst[whi.max(wlo)..].fill(T::ZERO);
                    if wlo < whi {
                        simd::take_even(&src[2 * wlo - p..], &mut dst[wlo..whi]);
                    }
                    continue;
                }
                simd::deinterleave2(src, &mut ev[..ne], &mut od[..no]);
                for j in 0..g.kw {
                    let (wlo, whi) = valid_range(j, p, 2, g.w, g.wo);
                    let row = &mut col[(tap0 + j) * pitch + off..][..len];
                    let dst = &mut row[(oh - r0) * g.wo..][..g.wo];
                    dst[..wlo].fill(T::ZERO);
                    dst[whi.max(wlo)..].fill(T::ZERO);
                    if wlo >= whi {
                        continue;
                    }
                    // Input column 2·ow + j - p: phase (j - p) mod 2, index ow + ⌊(j - p)/2⌋,
                    // in range for ow in wlo..whi.
                    let start = 2 * wlo + j - p;
                    let phase = if start % 2 == 0 { &ev } else { &od };
                    dst[wlo..whi].copy_from_slice(&phase[start / 2..start / 2 + whi - wlo]);
                }
            }
        }
    }
}

/// For a stride-1 convolution whose output plane is as wide as its input (`kw = 2·pad + 1`),
/// tap `(i, j)`'s output positions in rows `hlo..hhi`, columns `wlo..whi` read the input at a
/// constant offset, so they lie in one contiguous run of each plane (with the out-of-range
/// columns of the rows in between). Returns (start in the output plane, start in the input
/// plane, length) of that run, or `None` for other geometries or an empty range.
fn same_size_span(
    g: &Geom,
    (hlo, hhi): (usize, usize),
    (wlo, whi): (usize, usize),
    (i, j): (usize, usize),
) -> Option<(usize, usize, usize)> {
    if g.stride != 1 || g.wo != g.w || hlo >= hhi || wlo >= whi {
        return None;
    }
    let d0 = hlo * g.wo + wlo;
    let len = (hhi - 1) * g.wo + whi - d0;
    Some((d0, (hlo + i - g.pad) * g.w + wlo + j - g.pad, len))
}

/// Zeroes columns outside `wlo..whi` in rows `hlo..hhi` of one tap's output plane `row`: the
/// positions that reach padding, which a [`same_size_span`] run fills from the neighbouring
/// input row.
fn zero_wrapped<T: Elem>(
    g: &Geom,
    row: &mut [T],
    (hlo, hhi): (usize, usize),
    (wlo, whi): (usize, usize),
) {
    for oh in hlo..hhi {
        let r = &mut row[oh * g.wo..][..g.wo];
        r[..wlo].fill(T::ZERO);
        r[whi..].fill(T::ZERO);
    }
}

/// Adds the columns `off..off + ho·wo` of the `K × pitch` matrix `col` back onto the input
/// positions they were read from (the adjoint of [`im2col`]).
/// Columns that [`im2col`] left at zero (positions reading padding) are zeroed in `col` first
/// where that lets a whole plane be added in one run.
///
/// Where [`col2im_overwrites`], the centre tap, which reaches every input position, is
/// copied rather than added, so `x` need not be zeroed first. Where [`col2im_s2`], `x` is
/// overwritten whole (its old contents are not added to): callers must not rely on
/// accumulating into it.
///
/// # Safety
/// Unless [`col2im_overwrites`] or [`col2im_s2`], `x` is initialised (the taps add into it).
unsafe fn col2im<T: Elem>(
    g: &Geom,
    col: &mut [T],
    pitch: usize,
    off: usize,
    x: &mut [MaybeUninit<T>],
) {
    if col2im_s2(g) {
        return col2im_rows_s2(g, col, pitch, off, x);
    }
    let (s, p, hw, ohw) = (g.stride, g.pad, g.in_hw(), g.out_hw());
    let centre = col2im_overwrites(g).then_some((p, p));
    // The centre tap first, then the others in order.
    let taps = centre.into_iter().chain(
        (0..g.kh)
            .flat_map(|i| (0..g.kw).map(move |j| (i, j)))
            .filter(|&t| Some(t) != centre),
    );
    for ci in 0..g.cg() {
        let xp = &mut x[ci * hw..][..hw];
        for (i, j) in taps.clone() {
            let (hlo, hhi) = valid_range(i, p, s, g.h, g.ho);
            let (wlo, whi) = valid_range(j, p, s, g.w, g.wo);
            if wlo == whi {
                continue;
            }
            let row = &mut col[((ci * g.kh + i) * g.kw + j) * pitch + off..][..ohw];
            if Some((i, j)) == centre {
                write_slice(xp, row);
                continue;
            }
            // SAFETY: the centre tap, first in `taps`, wrote all of `xp` where there is one;
            // elsewhere the caller initialised `x`.
            let xp = unsafe { assume_init_mut(&mut *xp) };
            if let Some((d0, s0, len)) = same_size_span(g, (hlo, hhi), (wlo, whi), (i, j)) {
                zero_wrapped(g, row, (hlo, hhi), (wlo, whi));
                for (d, &v) in xp[s0..s0 + len].iter_mut().zip(&row[d0..d0 + len]) {
                    *d += v;
                }
                continue;
            }
            for oh in hlo..hhi {
                let dst = &mut xp[(oh * s + i - p) * g.w..][..g.w];
                let src = &row[oh * g.wo..][..g.wo];
                if s == 1 {
                    let d = &mut dst[wlo + j - p..whi + j - p];
                    for (d, &v) in d.iter_mut().zip(&src[wlo..whi]) {
                        *d += v;
                    }
                } else {
                    for (ow, &v) in (wlo..whi).zip(&src[wlo..whi]) {
                        let d = &mut dst[ow * s + j - p];
                        *d += v;
                    }
                }
            }
        }
    }
}

/// Stride 1 with "same" padding (`kh = 2·pad + 1`, `kw` likewise; every 1x1 stride-1
/// convolution): the output plane is the input's size and the centre tap reads every input
/// position once, so [`col2im`] writes all of `x`.
fn col2im_overwrites(g: &Geom) -> bool {
    g.stride == 1 && g.kh == 2 * g.pad + 1 && g.kw == 2 * g.pad + 1
}

/// Whether [`col2im`] runs [`col2im_rows_s2`], which writes every input position.
fn col2im_s2(g: &Geom) -> bool {
    g.stride == 2 && g.w <= 2 * MAX_PHASE
}

/// Largest input plane [`col2im_rows_s2`] builds on the stack for a 1x1 kernel (56x56 is
/// 3136).
const SPREAD_PLANE: usize = 4096;

/// [`col2im`] at stride 2, one input row at a time: every tap that reaches the row adds its
/// contiguous run of columns into the row's even or odd phase, and the phases are
/// interleaved into `x` once, overwriting it (rows no tap reaches get zeros). The strided
/// scalar adds this replaces were a twelfth of a stride-2 3x3 layer's time (perf).
fn col2im_rows_s2<T: Elem>(
    g: &Geom,
    col: &[T],
    pitch: usize,
    off: usize,
    x: &mut [MaybeUninit<T>],
) {
    let (p, hw) = (g.pad, g.in_hw());
    let (ne, no) = (g.w.div_ceil(2), g.w / 2);
    let (mut ev, mut od) = ([T::ZERO; MAX_PHASE], [T::ZERO; MAX_PHASE]);
    // An unpadded 1x1 kernel (a strided shortcut) reaches the even columns of the even rows,
    // once each: those rows are its column rows spread out, the others zero.
    if g.kh == 1 && g.kw == 1 && p == 0 {
        let mut plane = [T::ZERO; SPREAD_PLANE];
        for ci in 0..g.cg() {
            let src = &col[ci * pitch + off..];
            let xp = &mut x[ci * hw..][..hw];
            if hw <= SPREAD_PLANE {
                // Built in L1 and streamed out: most of it is zeros, and its lines need not
                // be read before they are written.
                spread_plane(g, src, &od[..no], &mut plane[..hw]);
                simd::stream_copy(&plane[..hw], xp);
            } else {
                spread_plane(g, src, &od[..no], xp);
            }
        }
        return;
    }
    for ci in 0..g.cg() {
        let xp = &mut x[ci * hw..][..hw];
        for (ih, xrow) in xp.chunks_exact_mut(g.w).enumerate() {
            ev[..ne].fill(T::ZERO);
            od[..no].fill(T::ZERO);
            // Taps i with ih = 2·oh + i - p for an output row oh < ho.
            for i in ((ih + p) % 2..g.kh.min(ih + p + 1)).step_by(2) {
                let oh = (ih + p - i) / 2;
                if oh >= g.ho {
                    continue;
                }
                for j in 0..g.kw {
                    let (wlo, whi) = valid_range(j, p, 2, g.w, g.wo);
                    if wlo >= whi {
                        continue;
                    }
                    let tap = (ci * g.kh + i) * g.kw + j;
                    let src = &col[tap * pitch + off + oh * g.wo..][wlo..whi];
                    let start = 2 * wlo + j - p;
                    let phase = if start % 2 == 0 { &mut ev } else { &mut od };
                    for (d, &v) in phase[start / 2..].iter_mut().zip(src) {
                        *d += v;
                    }
                }
            }
            simd::interleave2(&ev[..ne], &od[..no], xrow);
        }
    }
}

/// One input plane of an unpadded 1x1 stride-2 kernel's [`col2im`]: the even rows are the
/// channel's column rows `col` (row stride `wo`) spread over the even columns with `zeros`
/// between them; the odd rows, and rows past the last output row, are zeros.
fn spread_plane<T: Elem, S: Slot<T>>(g: &Geom, col: &[T], zeros: &[T], plane: &mut [S]) {
    for (ih, row) in plane.chunks_exact_mut(g.w).enumerate() {
        if ih % 2 == 1 || ih / 2 >= g.ho {
            fill(row, T::ZERO);
        } else {
            simd::interleave2(&col[ih / 2 * g.wo..][..g.wo], zeros, row);
        }
    }
}

/// Copies group `grp` of `b` consecutive images of an `(n, o, ho, wo)` tensor into the
/// `og × (b·ho·wo)` matrix `dst` (image-major columns).
fn gather_out<T: Elem>(g: &Geom, y: &[T], grp: usize, b: usize, dst: &mut [T]) {
    let (og, ohw) = (g.og(), g.out_hw());
    let pitch = b * ohw;
    for bi in 0..b {
        for oc in 0..og {
            let src = &y[(bi * g.o + grp * og + oc) * ohw..][..ohw];
            dst[oc * pitch + bi * ohw..][..ohw].copy_from_slice(src);
        }
    }
}

/// How the chunks of a batch are run: in parallel with serial GEMMs, or one after the other
/// with a parallel GEMM.
fn plan(g: &Geom) -> (usize, bool, Parallelism) {
    let threads = rayon::current_num_threads().max(1);
    let nb = images_per_chunk(g, threads);
    let chunks = g.n.div_ceil(nb);
    if chunks >= threads || threads == 1 {
        (nb, true, Parallelism::None)
    } else {
        (nb, false, Parallelism::Rayon(threads))
    }
}

/// Runs `body(chunk_index, chunk)` over `data` split into `chunk_len` pieces, in parallel or
/// not.
fn for_chunks<E: Send>(
    data: &mut [E],
    chunk_len: usize,
    parallel: bool,
    body: impl Fn(usize, &mut [E]) + Sync + Send,
) {
    if parallel {
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| body(i, c));
    } else {
        data.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| body(i, c));
    }
}

/// Forward pass.
pub fn forward<T: Elem>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let (og, kk, ohw) = (g.og(), g.k(), g.out_hw());
    let mut y = output_vec::<T>(g.n * g.o * ohw);
    let (nb, parallel, par) = plan(g);
    for_chunks(&mut y, nb * g.o * ohw, parallel, |chunk, yc| {
        let b = yc.len() / (g.o * ohw);
        let n0 = chunk * nb;
        let pitch = b * ohw;
        for grp in 0..g.groups {
            let wg = (&w[grp * og * kk..][..og * kk], kk, 1);
            if g.is_pointwise() && b == 1 {
                let xg = group_planes(g, x, n0, grp);
                let dst = &mut yc[grp * og * ohw..][..og * ohw];
                matmul((og, ohw, kk), dst, ohw, wg, (xg, ohw, 1), par);
                continue;
            }
            let rows = rows_per_col_band(g);
            if b == 1 && rows < g.ho {
                let xg = group_planes(g, x, n0, grp);
                let pitch = rows * g.wo;
                for_col_bands(g, xg, (rows, pitch), |r0, cols, col| {
                    let dst = &mut yc[grp * og * ohw + r0 * g.wo..];
                    matmul((og, cols, kk), dst, ohw, wg, (col, pitch, 1), par);
                });
                continue;
            }
            let tmp_len = if b > 1 { og * pitch } else { 0 };
            T::with_scratch(kk * pitch + tmp_len, |scr| {
                let (col, tmp) = scr.split_at_mut(kk * pitch);
                for bi in 0..b {
                    im2col(g, group_planes(g, x, n0 + bi, grp), col, pitch, bi * ohw);
                }
                if b == 1 {
                    let dst = &mut yc[grp * og * ohw..][..og * ohw];
                    // Streamed: the output is large and the next op reads it from memory.
                    let cols = (&col[..], pitch);
                    let bg = next_input_rows(g, x, n0, grp);
                    let bg = bg.as_slice();
                    if simd::skinny_matmul((og, ohw, kk), wg, cols, (dst, ohw), true, false, bg) {
                        return;
                    }
                    matmul((og, ohw, kk), dst, ohw, wg, (col, pitch, 1), par);
                    return;
                }
                matmul((og, pitch, kk), tmp, pitch, wg, (col, pitch, 1), par);
                for bi in 0..b {
                    for oc in 0..og {
                        let dst = &mut yc[(bi * g.o + grp * og + oc) * ohw..][..ohw];
                        write_slice(dst, &tmp[oc * pitch + bi * ohw..][..ohw]);
                    }
                }
            });
        }
    });
    // SAFETY: every chunk writes all of its groups' output rows above, through the GEMM or
    // the skinny kernel (which do not read `dst` when not accumulating) or the copy out of
    // `tmp`.
    unsafe { assume_init(y) }
}

/// For a strided shortcut ([`is_strided_shortcut`]), the even input rows
/// of image `n + 1`'s group `grp`, which the kernels working on image `n` bring into L2 for
/// the next image's im2col (a worker usually takes the next image next). Its im2col reads
/// every other row, a pattern the hardware prefetchers follow poorly.
fn next_input_rows<'a, T: Elem>(
    g: &Geom,
    x: &'a [T],
    n: usize,
    grp: usize,
) -> Option<simd::Background<'a, T>> {
    (is_strided_shortcut(g) && n + 1 < g.n).then(|| simd::Background {
        data: group_planes(g, x, n + 1, grp),
        run: g.w,
        stride: 2 * g.w,
    })
}

/// The input planes of image `n`'s group `grp` in the `(n, c, h, w)` tensor `x`.
fn group_planes<'a, T>(g: &Geom, x: &'a [T], n: usize, grp: usize) -> &'a [T] {
    let planes = g.cg() * g.in_hw();
    &x[(n * g.groups + grp) * planes..][..planes]
}

/// Group `grp` of one image's input gradient `dxi` from its output gradient `dyi` on
/// [`simd::spread_dgrad`] (`ahead` and `background` as there); false where that declines.
fn spread_group<T: Elem>(
    g: &Geom,
    grp: usize,
    (w, dyi, dxi): (&[T], &[T], &mut [MaybeUninit<T>]),
    ahead: Option<usize>,
    background: &[simd::Background<T>],
) -> bool {
    let (og, kk, ohw) = (g.og(), g.k(), g.out_hw());
    let dxg = &mut dxi[grp * kk * g.in_hw()..][..kk * g.in_hw()];
    let dyg = &dyi[grp * og * ohw..][..og * ohw];
    let wg = (&w[grp * og * kk..][..og * kk], kk);
    simd::spread_dgrad((kk, og, g.ho, g.wo), wg, dyg, dxg, ahead, background)
}

/// Input gradient.
pub fn backward_data<T: Elem>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
    let (og, kk, ohw, chw) = (g.og(), g.k(), g.out_hw(), g.c * g.in_hw());
    let overwrites = col2im_overwrites(g) || col2im_s2(g);
    let mut dx = if overwrites {
        output_vec::<T>(g.n * chw)
    } else {
        zeroed_output::<T>(g.n * chw)
    };
    let (nb, parallel, par) = plan(g);
    for_chunks(&mut dx, nb * chw, parallel, |chunk, dxc| {
        let b = dxc.len() / chw;
        let n0 = chunk * nb;
        let pitch = b * ohw;
        let dyc = &dy[n0 * g.o * ohw..][..b * g.o * ohw];
        for grp in 0..g.groups {
            // Wᵀ of this group: element (kk, oc) sits at w[(grp·og + oc)·K + kk].
            let wt = (&w[grp * og * kk..][..og * kk], 1, kk);
            if g.is_pointwise() && b == 1 {
                let dst = &mut dxc[grp * kk * ohw..][..kk * ohw];
                let dyg = (&dyc[grp * og * ohw..][..og * ohw], ohw, 1);
                matmul((kk, ohw, og), dst, ohw, wt, dyg, par);
                continue;
            }
            if b == 1 && is_strided_shortcut(g) && spread_group(g, grp, (w, dyc, dxc), Some(2), &[])
            {
                continue;
            }
            // The columns of a band of input channels at a time: they are added back onto
            // those channels' planes alone, and a band stays in cache between the GEMM that
            // writes it and col2im.
            let taps = g.kh * g.kw;
            let cb = (DGRAD_BAND_ELEMS / (taps * pitch)).clamp(1, g.cg());
            let tmp_len = if b > 1 { og * pitch } else { 0 };
            T::with_scratch(cb * taps * pitch + tmp_len, |scr| {
                let (col, tmp) = scr.split_at_mut(cb * taps * pitch);
                let dyg: &[T] = if b == 1 {
                    &dyc[grp * og * ohw..][..og * ohw]
                } else {
                    gather_out(g, dyc, grp, b, tmp);
                    tmp
                };
                for c0 in (0..g.cg()).step_by(cb) {
                    let nc = cb.min(g.cg() - c0);
                    let rows = nc * taps;
                    let wt = (&w[grp * og * kk + c0 * taps..], 1, kk);
                    let gb = Geom {
                        c: nc * g.groups,
                        ..*g
                    };
                    if b == 1 && rows <= SKINNY_MAX_ROWS && skinny_bands_apply(g) {
                        let dxg = &mut dxc[(grp * g.cg() + c0) * g.in_hw()..][..nc * g.in_hw()];
                        if dgrad_skinny_bands(&gb, (rows, og), wt, dyg, col, dxg) {
                            continue;
                        }
                    }
                    let col = &mut col[..rows * pitch];
                    // Not streamed: col2im reads the columns back from cache. The output
                    // gradient comes from memory, so it is fetched ahead. Only for a few
                    // rows of columns (a stem's 27, a shortcut's 64): with 162 (64 channels
                    // x 9 taps) the GEMM was faster (ir.l1 0.036 against 0.045 s).
                    let skinny = rows <= SKINNY_MAX_ROWS
                        && simd::skinny_matmul(
                            (rows, pitch, og),
                            wt,
                            (dyg, pitch),
                            (col, pitch),
                            false,
                            true,
                            &[],
                        );
                    if !skinny {
                        matmul((rows, pitch, og), col, pitch, wt, (dyg, pitch, 1), par);
                    }
                    for bi in 0..b {
                        let dxg = &mut dxc[bi * chw + (grp * g.cg() + c0) * g.in_hw()..];
                        // SAFETY: `dx` is zeroed unless `overwrites` (for `g`, and so for
                        // `gb`, which differs in channels only).
                        unsafe { col2im(&gb, col, pitch, bi * ohw, &mut dxg[..nc * g.in_hw()]) };
                    }
                }
            });
        }
    });
    // SAFETY: every chunk writes all of its groups' input planes: the pointwise GEMM
    // without accumulate, `spread_dgrad` (whole planes), the skinny bands (which zero their
    // planes first), or `col2im`, which copies the centre tap or (stride 2) writes each row
    // whole (see there); elsewhere `dx` was zeroed.
    unsafe { assume_init(dx) }
}

/// Whether `g` is an unpadded 1x1 stride-2 convolution whose output covers its input
/// (even input sizes), as iresnet's shortcuts: [`simd::spread_dgrad`]'s geometry (which
/// also has conditions on the shapes, [`simd::spread_dgrad_applies`]).
fn is_strided_shortcut(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 2 && g.pad == 0 && g.h == 2 * g.ho && g.w == 2 * g.wo
}

/// Output positions per band of [`dgrad_skinny_bands`] (42 of `skinny_matmul`'s 32-column
/// tiles).
const DGRAD_SKINNY_BAND: usize = 1344;

/// Whether [`dgrad_skinny_bands`] takes `g`'s geometry: stride 1 and a kernel wider than
/// 1x1. (At stride 2, `col2im` already sums each input row in registers-sized phase buffers:
/// bands measured slower there, MobileFaceNet's stem 0.0031 against 0.0033-0.0034 s.)
fn skinny_bands_apply(g: &Geom) -> bool {
    g.stride == 1 && g.kh * g.kw > 1
}

/// One image's input gradient for a few rows of columns (a stem's 27) on
/// [`simd::skinny_matmul`], a band of output rows at a time, each band's columns added onto
/// `planes` (`g.cg()` input planes) while they and the rows of the planes they reach are in
/// cache. `col2im` over the whole image made eight read-add-write passes over each 50 KB
/// plane in L2: iresnet's stem 0.0075-0.0078 -> 0.0067-0.0068 s. `col` is scratch. Returns
/// false, having touched nothing, where the skinny kernel does not apply or `col` is short.
fn dgrad_skinny_bands<T: Elem>(
    g: &Geom,
    (rows, og): (usize, usize),
    wt: (&[T], usize, usize),
    dyg: &[T],
    col: &mut [T],
    planes: &mut [MaybeUninit<T>],
) -> bool {
    let ohw = g.out_hw();
    let band_rows = (DGRAD_SKINNY_BAND / g.wo).clamp(1, g.ho.max(1));
    let pitch = band_rows * g.wo;
    if col.len() < rows * pitch {
        return false;
    }
    for r0 in (0..g.ho).step_by(band_rows) {
        let r1 = (r0 + band_rows).min(g.ho);
        let n = (r1 - r0) * g.wo;
        // The output gradient comes from memory, so it is fetched ahead (`from_memory`).
        let dyb = (&dyg[r0 * g.wo..], ohw);
        if !simd::skinny_matmul(
            (rows, n, og),
            wt,
            dyb,
            (&mut col[..], pitch),
            false,
            true,
            &[],
        ) {
            // Its answer depends on the shapes alone, the same for every band.
            debug_assert_eq!(r0, 0, "skinny_matmul refused a later band");
            return false;
        }
        if r0 == 0 {
            fill(planes, T::ZERO);
        }
        // SAFETY: zero-filled at the first band.
        let planes = unsafe { assume_init_mut(&mut *planes) };
        col2im_band_add(g, col, pitch, (r0, r1), planes);
    }
    true
}

/// Adds the columns of output rows `r0..r1` (row `kk` of `col` at `kk·pitch`, the band's
/// positions from 0) onto the `g.cg()` input planes `planes`, which the caller zeroed:
/// [`col2im`] at stride 1 for one band.
fn col2im_band_add<T: Elem>(
    g: &Geom,
    col: &[T],
    pitch: usize,
    (r0, r1): (usize, usize),
    planes: &mut [T],
) {
    debug_assert_eq!(g.stride, 1);
    let (p, hw) = (g.pad, g.in_hw());
    for (ci, plane) in planes.chunks_exact_mut(hw).enumerate().take(g.cg()) {
        for i in 0..g.kh {
            let (hlo, hhi) = valid_range(i, p, 1, g.h, g.ho);
            for j in 0..g.kw {
                let (wlo, whi) = valid_range(j, p, 1, g.w, g.wo);
                if wlo >= whi {
                    continue;
                }
                let row = &col[((ci * g.kh + i) * g.kw + j) * pitch..];
                for oh in hlo.max(r0)..hhi.min(r1) {
                    let src = &row[(oh - r0) * g.wo..][wlo..whi];
                    let at = (oh + i - p) * g.w + wlo + j - p;
                    simd::add_assign(&mut plane[at..at + whi - wlo], src);
                }
            }
        }
    }
}

/// One image's group of [`backward_filter`] on [`simd::skinny_wgrad`]: the columns of whole
/// output rows, up to [`simd::WGRAD_BAND`] positions at a time, built at that fixed row
/// stride (aligned: a row split across lines costs two loads), summed into `lanes`.
fn wgrad_skinny<T: Elem>(g: &Geom, xg: &[T], dyg: &[T], lanes: &mut [T]) {
    let rows = (simd::WGRAD_BAND / g.wo).clamp(1, g.ho.max(1));
    for_col_bands(g, xg, (rows, simd::WGRAD_BAND), |r0, n, band| {
        let dy = (&dyg[r0 * g.wo..], g.out_hw());
        let fetch_next = r0 + rows < g.ho;
        let applied = simd::skinny_wgrad((g.og(), g.k(), n), dy, band, fetch_next, lanes);
        debug_assert!(applied, "skinny_wgrad_applies said yes");
    });
}

/// Adds the weight gradient of images `n0..n0 + b` (one chunk) into `dw`; `lanes` holds
/// [`simd::skinny_wgrad`]'s partial sums (allocated on first use), which the caller folds
/// into `dw` with [`simd::add_lanes`].
#[allow(clippy::too_many_arguments)]
fn filter_chunk<T: Elem>(
    g: &Geom,
    (n0, b): (usize, usize),
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    lanes: &mut Vec<T>,
    par: Parallelism,
) {
    let (og, kk, ohw) = (g.og(), g.k(), g.out_hw());
    let pitch = b * ohw;
    let dyc = &dy[n0 * g.o * ohw..][..b * g.o * ohw];
    for grp in 0..g.groups {
        let dwg = &mut dw[grp * og * kk..][..og * kk];
        if g.is_pointwise() && b == 1 {
            let xg = (group_planes(g, x, n0, grp), 1, ohw);
            let dyg = (&dyc[grp * og * ohw..][..og * ohw], ohw, 1);
            matmul_add((og, kk, ohw), dwg, kk, dyg, xg, par);
            continue;
        }
        if b == 1 && simd::skinny_wgrad_applies::<T>(kk) && g.wo <= simd::WGRAD_BAND {
            if lanes.is_empty() {
                *lanes = vec![T::ZERO; g.o * kk * 16];
            }
            let lg = &mut lanes[grp * og * kk * 16..][..og * kk * 16];
            let xg = group_planes(g, x, n0, grp);
            let dyg = &dyc[grp * og * ohw..][..og * ohw];
            wgrad_skinny(g, xg, dyg, lg);
            continue;
        }
        let rows = rows_per_col_band(g);
        if b == 1 && rows < g.ho {
            let xg = group_planes(g, x, n0, grp);
            let pitch = rows * g.wo;
            for_col_bands(g, xg, (rows, pitch), |r0, cols, col| {
                let dyg = (&dyc[grp * og * ohw + r0 * g.wo..], ohw, 1);
                matmul_add((og, kk, cols), dwg, kk, dyg, (col, 1, pitch), par);
            });
            continue;
        }
        let tmp_len = if b > 1 { og * pitch } else { 0 };
        T::with_scratch(kk * pitch + tmp_len, |scr| {
            let (col, tmp) = scr.split_at_mut(kk * pitch);
            for bi in 0..b {
                im2col(g, group_planes(g, x, n0 + bi, grp), col, pitch, bi * ohw);
            }
            let dyg: &[T] = if b == 1 {
                &dyc[grp * og * ohw..][..og * ohw]
            } else {
                gather_out(g, dyc, grp, b, tmp);
                tmp
            };
            // colᵀ: element (f, kk) sits at col[kk·pitch + f].
            matmul_add(
                (og, kk, pitch),
                dwg,
                kk,
                (dyg, pitch, 1),
                (col, 1, pitch),
                par,
            );
        });
    }
}

/// Sums the workers' weight gradients into the first.
fn sum_partials<T: Elem>(mut partials: Vec<Vec<T>>) -> Vec<T> {
    let mut dw = partials.swap_remove(0);
    for other in &partials {
        for (a, &b) in dw.iter_mut().zip(other) {
            *a += b;
        }
    }
    dw
}

/// Weight gradient: each worker sums `dy·colᵀ` over its share of the batch into its own
/// buffer; the buffers are added at the end.
pub fn backward_filter<T: Elem>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    let (nb, parallel, par) = plan(g);
    let chunks = g.n.div_ceil(nb);
    let parts = if parallel {
        rayon::current_num_threads().clamp(1, chunks)
    } else {
        1
    };
    let part = |p: usize| -> Vec<T> {
        let mut dw = vec![T::ZERO; g.o * g.k()];
        let mut lanes: Vec<T> = Vec::new();
        for chunk in (p * chunks / parts)..((p + 1) * chunks / parts) {
            let n0 = chunk * nb;
            let b = nb.min(g.n - n0);
            filter_chunk(g, (n0, b), x, dy, &mut dw, &mut lanes, par);
        }
        if !lanes.is_empty() {
            simd::add_lanes(&lanes, &mut dw);
        }
        dw
    };
    sum_partials(if parts > 1 {
        (0..parts).into_par_iter().map(part).collect()
    } else {
        vec![part(0)]
    })
}

/// Whether [`backward_spread`] takes `g` for `T` on this CPU.
pub fn backward_spread_applies<T: Elem>(g: &Geom) -> bool {
    // An empty batch or no output channels: the general path's loops simply do nothing.
    g.n > 0
        && g.og() > 0
        && !g.use_direct()
        && is_strided_shortcut(g)
        && simd::spread_dgrad_applies::<T>((g.k(), g.ho, g.wo))
}

/// Both gradients of a convolution [`simd::spread_dgrad`] takes (iresnet's strided
/// shortcuts), one image at a time on each worker: the image's weight gradient, then its
/// input gradient, which reads the output gradient the weight gradient's GEMM has just
/// brought into cache. Each worker takes a contiguous share of the batch and sums its own
/// weight gradient. Returns `[dx | dw]` in one buffer (the caller views the two parts), or
/// `None`, having computed nothing, where the kernel does not apply.
pub fn backward_spread<T: Elem>(g: &Geom, x: &[T], w: &[T], dy: &[T]) -> Option<Vec<T>> {
    let (og, kk, ohw, chw) = (g.og(), g.k(), g.out_hw(), g.c * g.in_hw());
    if !backward_spread_applies::<T>(g) {
        return None;
    }
    let mut out = output_vec::<T>(g.n * chw + g.o * kk);
    let (dx, dw) = out.split_at_mut(g.n * chw);
    let parts = rayon::current_num_threads().clamp(1, g.n.max(1));
    let per = g.n.div_ceil(parts).max(1);
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(per * chw)
        .enumerate()
        .map(|(p, dxp)| {
            let mut dw = vec![T::ZERO; g.o * kk];
            let mut lanes: Vec<T> = Vec::new();
            let images = dxp.len() / chw;
            for (i, dxi) in dxp.chunks_exact_mut(chw).enumerate() {
                let n = p * per + i;
                filter_chunk(g, (n, 1), x, dy, &mut dw, &mut lanes, Parallelism::None);
                let dyi = &dy[n * g.o * ohw..][..g.o * ohw];
                for grp in 0..g.groups {
                    // The group's output gradient and even input rows in the next image
                    // (when this worker takes it), for its weight gradient (and then this
                    // kernel) to find in L2.
                    let next = (i + 1 < images)
                        .then(|| next_input_rows(g, x, n, grp))
                        .flatten()
                        .map(|rows| {
                            let dyg = &dy[((n + 1) * g.groups + grp) * og * ohw..][..og * ohw];
                            let run = dyg.len();
                            [
                                simd::Background {
                                    data: dyg,
                                    run,
                                    stride: run,
                                },
                                rows,
                            ]
                        });
                    let bg = next.as_ref().map_or(&[][..], |b| &b[..]);
                    let applied = spread_group(g, grp, (w, dyi, &mut *dxi), None, bg);
                    // Not a debug assertion: had it declined, `dx` would hold
                    // uninitialised memory.
                    assert!(applied, "spread_dgrad declined what it said it takes");
                }
            }
            if !lanes.is_empty() {
                simd::add_lanes(&lanes, &mut dw);
            }
            dw
        })
        .collect();
    write_slice(dw, &sum_partials(partials));
    // SAFETY: every image's planes were written whole by `spread_dgrad` (checked to apply;
    // it writes the odd rows and columns too), and the weight gradient after them.
    Some(unsafe { assume_init(out) })
}
