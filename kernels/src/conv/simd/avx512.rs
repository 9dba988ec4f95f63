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
use std::mem::MaybeUninit;

use super::shared::{fwd_multi_kernel, wgrad_pixels_driver, WGRAD_BAND};
use crate::uninit::write_slice;

/// The mask of the first `n` lanes of a vector (all 16 from `n = 16` on).
#[inline(always)]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        !0
    } else {
        (1u16 << n) - 1
    }
}

/// Output pixels per register block of the forward kernel (one accumulator each).
const FP: usize = 12;

/// [`super::fwd_pixels`] for f32 on AVX-512F.
///
/// # Safety
/// The CPU has AVX-512F; `out.len() / pix.len()` is a positive multiple of 16,
/// `pix.len() >= 8`, and the bounds asserted by `fwd_pixels` hold.
#[target_feature(enable = "avx512f,avx2,fma")]
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
            d.write(row[c]);
        }
    }
}

wgrad_pixels_driver! {
    /// [`super::wgrad_pixels`] for f32 on AVX-512F.
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

fwd_multi_kernel! {
    /// [`super::fwd_multi`] for f32 on AVX-512F: blocks of up to 4 output channels × 64
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

/// Rows of `b` one pass of [`skinny_matmul_f32`] reads when `b` comes from memory: every row
/// is a stream the hardware prefetcher must follow, and with all 64 of a stem's output
/// gradient rows at once it fell behind (the input gradient ran at 9 GB/s of reads).
const SKINNY_STREAMS: usize = 16;

/// Tiles of columns per band of [`skinny_matmul_f32`]: a band's rows of `c` stay in cache
/// across the passes over `b`'s rows.
const SKINNY_BAND_TILES: usize = 42;

/// [`super::skinny_matmul`] for f32 on AVX-512F: tiles of `MT` rows of `c` × `V`
/// vectors of columns (8 × 3 or 9 × 2: 24 or 18 accumulators; at 9 × 3 LLVM no longer kept
/// them in registers), all rows of a tile of columns in turn while that tile of `b` sits in
/// L1. With `from_memory`, bands of columns take `b`'s rows [`SKINNY_STREAMS`] at a time,
/// adding into `c`, and each tile fetches `b` two tiles ahead. With `stream`, every
/// full vector of `c`'s last pass is one aligned cache line, stored non-temporally: no read
/// for ownership, and the stores drain while the next tile computes. Each tile of columns
/// also fetches its share of the lines of `background` into L2.
///
/// # Safety
/// The CPU has AVX-512F; `m` is a multiple of `MT`; `a` reaches `(m - 1)·a_rs + (k - 1)·a_cs`,
/// `b` reaches `(k - 1)·pitch + n` and `c` reaches `(m - 1)·c_rs + n`; with `stream`, `c`
/// starts 64-byte aligned and `c_rs` is a multiple of 16.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn skinny_matmul_f32<const MT: usize, const V: usize>(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, pitch): (&[f32], usize),
    (c, c_rs): (&mut [MaybeUninit<f32>], usize),
    stream: bool,
    from_memory: bool,
    background: &[Region],
) {
    let w = 16 * V;
    let (band, kb) = if from_memory {
        (w * SKINNY_BAND_TILES, SKINNY_STREAMS)
    } else {
        (n, k)
    };
    // One call of `bg.steps` per full tile of columns (for all its row tiles) and pass.
    let tiles = (n / w) * k.div_ceil(kb.max(1));
    let mut bg = Background::new(background, tiles);
    for n0 in (0..n).step_by(band.max(1)) {
        let n1 = (n0 + band).min(n);
        for t0 in (0..k).step_by(kb) {
            let t1 = (t0 + kb).min(k);
            let pass = Pass {
                rows: (t0, t1),
                add: t0 > 0,
                stream: stream && t1 == k,
            };
            let mut p0 = n0;
            while p0 + w <= n1 {
                bg.steps();
                // Two tiles ahead, while that lies in the band, during the first rows
                // (the stems' input gradient: one tile ahead during the last rows
                // 0.0086-0.0092 s, none 0.0100-0.0107 s, two 0.0078-0.0082 s; four the
                // same, eight slower).
                let fetch = (from_memory && p0 + 3 * w <= n1).then_some(p0 + 2 * w);
                for r0 in (0..m).step_by(MT) {
                    let fetch = fetch.filter(|_| r0 == 0);
                    // SAFETY: columns p0..p0 + w and rows r0..r0 + MT exist (caller's
                    // bounds).
                    unsafe {
                        skinny_tile::<MT, V>(
                            (r0, p0),
                            (a, a_rs, a_cs),
                            (b, pitch),
                            (c, c_rs),
                            pass,
                            !0,
                            fetch,
                        )
                    };
                }
                p0 += w;
            }
            while p0 < n1 {
                let mask = first_lanes(n1 - p0);
                for r0 in (0..m).step_by(MT) {
                    // SAFETY: as above; lanes past n1 are masked off.
                    unsafe {
                        skinny_tile::<MT, 1>(
                            (r0, p0),
                            (a, a_rs, a_cs),
                            (b, pitch),
                            (c, c_rs),
                            pass,
                            mask,
                            None,
                        )
                    };
                }
                p0 += 16;
            }
        }
    }
    if stream {
        // Non-temporal stores are weakly ordered: make them visible before the caller hands
        // `c` to another thread.
        _mm_sfence();
    }
}

/// One pass of [`skinny_matmul_f32`] over a band: the rows `t0..t1` of `b` (and columns of
/// `a`), adding to `c` or overwriting it, with streaming stores or not.
#[derive(Clone, Copy)]
struct Pass {
    rows: (usize, usize),
    add: bool,
    stream: bool,
}

/// Rows `r0..r0 + MT` × columns `p0..p0 + 16·V` of [`skinny_matmul_f32`] for one [`Pass`];
/// `mask` keeps the lanes of the last vector that exist; `fetch` names the column where the
/// tile of `b` to prefetch starts.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_tile<const MT: usize, const V: usize>(
    (r0, p0): (usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, pitch): (&[f32], usize),
    (c, c_rs): (&mut [MaybeUninit<f32>], usize),
    pass: Pass,
    mask: __mmask16,
    fetch: Option<usize>,
) {
    // Passes after the first read back what the first one stored (`pass.add`), nothing
    // unwritten.
    let cp = c.as_mut_ptr().cast::<f32>();
    // SAFETY (loads and stores of c): c reaches (m - 1)·c_rs + n, r0 + r < m, and the last
    // vector's lanes past n are masked off.
    let at = |r: usize, v: usize| unsafe { cp.add((r0 + r) * c_rs + p0 + 16 * v) };
    let mut acc = [[_mm512_setzero_ps(); V]; MT];
    if pass.add {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, s) in row.iter_mut().enumerate() {
                // SAFETY: see `at`.
                *s = unsafe { _mm512_maskz_loadu_ps(if v + 1 == V { mask } else { !0 }, at(r, v)) };
            }
        }
    }
    let ap = a[r0 * a_rs..].as_ptr();
    let bp = b.as_ptr();
    for t in pass.rows.0..pass.rows.1 {
        let x: [__m512; V] = std::array::from_fn(|v| {
            // SAFETY: b reaches (k - 1)·pitch + n; the last vector's lanes past n are
            // masked off (not read).
            unsafe {
                let at = bp.add(t * pitch + p0 + 16 * v);
                if v + 1 == V && mask != !0 {
                    _mm512_maskz_loadu_ps(mask, at)
                } else {
                    _mm512_loadu_ps(at)
                }
            }
        });
        if let Some(q) = fetch {
            for v in 0..V {
                // A hint only; the address lies inside b (q + 16·V <= n).
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(t * pitch + q + 16 * v).cast());
            }
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: a reaches (m - 1)·a_rs + (k - 1)·a_cs and r0 + r < m.
            let av = _mm512_set1_ps(unsafe { *ap.add(r * a_rs + t * a_cs) });
            for (s, &xv) in row.iter_mut().zip(&x) {
                *s = _mm512_fmadd_ps(xv, av, *s);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &s) in row.iter().enumerate() {
            // SAFETY: see `at`; with `stream`, row starts and p0 are multiples of 16 floats
            // from an aligned start, so every full vector is one cache line.
            unsafe {
                if mask != !0 && v + 1 == V {
                    _mm512_mask_storeu_ps(at(r, v), mask, s);
                } else if pass.stream {
                    _mm512_stream_ps(at(r, v), s);
                } else {
                    _mm512_storeu_ps(at(r, v), s);
                }
            }
        }
    }
}

/// Output channels and rows of columns per register tile of [`skinny_wgrad_f32`]: 3 x 9
/// accumulators and 3 output-gradient vectors leave one register for a column vector, and
/// each vector step then loads 12 vectors for 27 multiply-adds. One accumulator per row of
/// columns for a single channel (27 of them) loaded one column vector per multiply-add, and
/// the loads, not the multiply-adds, set its pace.
const WGRAD_OB: usize = 3;
const WGRAD_RB: usize = 9;

/// Channel blocks ahead whose output gradient [`skinny_wgrad_f32`] fetches.
const WGRAD_FETCH_BLOCKS: usize = 2;

/// [`super::skinny_wgrad`] for f32 on AVX-512F with `KK` rows of columns (a multiple
/// of [`WGRAD_RB`]), 16 positions per vector, in register tiles of [`WGRAD_OB`] output
/// channels x [`WGRAD_RB`] rows: the column operands come from L1 at fixed offsets (rows
/// [`super::WGRAD_BAND`] apart; with a stride known only at run time LLVM kept the
/// row addresses as one chain of dependent adds, or spilled them, and either halved the
/// speed). Each tile's accumulators are added into `lanes`. Each channel block fetches the
/// output gradient of the block [`WGRAD_FETCH_BLOCKS`] ahead, and with `fetch_next` the last
/// blocks fetch the first rows of the next band (`n` positions on).
///
/// # Safety
/// The CPU has AVX-512F; `n <= WGRAD_BAND`; `dy` reaches `(og - 1)·dy_rs + n`, `band` holds
/// `KK·WGRAD_BAND` floats and `lanes` `og·KK·16`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn skinny_wgrad_f32<const KK: usize>(
    (og, n): (usize, usize),
    (dy, dy_rs): (&[f32], usize),
    band: &[f32],
    fetch_next: bool,
    lanes: &mut [f32],
) {
    const { assert!(KK.is_multiple_of(WGRAD_RB)) };
    let full = og / WGRAD_OB * WGRAD_OB;
    let dy = (dy, dy_rs);
    // The rows two channel blocks ahead in this band, or past the last block the first rows
    // of the next band: each block's output gradient arrives while an earlier one computes.
    let ahead = |o: usize| {
        let o = o + WGRAD_FETCH_BLOCKS * WGRAD_OB;
        if o + WGRAD_OB <= og {
            Some(o * dy_rs)
        } else {
            let o = o.saturating_sub(og);
            (fetch_next && o + WGRAD_OB <= og).then(|| o * dy_rs + n)
        }
    };
    for o0 in (0..full).step_by(WGRAD_OB) {
        for t0 in (0..KK).step_by(WGRAD_RB) {
            let fetch = ahead(o0).filter(|_| t0 == 0);
            // SAFETY: o0 + WGRAD_OB <= og and t0 + WGRAD_RB <= KK; the rest is the caller's.
            unsafe { wgrad_tile::<KK, WGRAD_OB, WGRAD_RB>((o0, t0, n), dy, band, fetch, lanes) };
        }
    }
    for o0 in full..og {
        for t0 in (0..KK).step_by(WGRAD_RB) {
            let fetch = ahead(o0).filter(|_| t0 == 0);
            // SAFETY: as above, one channel.
            unsafe { wgrad_tile::<KK, 1, WGRAD_RB>((o0, t0, n), dy, band, fetch, lanes) };
        }
    }
}

/// Output channels `o0..o0 + OB` x rows of columns `t0..t0 + RB` of [`skinny_wgrad_f32`].
///
/// # Safety
/// As [`skinny_wgrad_f32`], with `o0 + OB <= og` and `t0 + RB <= KK`.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn wgrad_tile<const KK: usize, const OB: usize, const RB: usize>(
    (o0, t0, n): (usize, usize, usize),
    (dy, dy_rs): (&[f32], usize),
    band: &[f32],
    fetch: Option<usize>,
    lanes: &mut [f32],
) {
    const W: usize = WGRAD_BAND;
    let (dp, bp, lp) = (dy.as_ptr(), band.as_ptr(), lanes.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); RB]; OB];
    let mut step = |p: usize, mask: __mmask16| {
        let d: [__m512; OB] = std::array::from_fn(|ob| {
            // SAFETY: p < n, lanes past n masked off: inside dy's row o0 + ob < og.
            unsafe { _mm512_maskz_loadu_ps(mask, dp.add((o0 + ob) * dy_rs + p)) }
        });
        for r in 0..RB {
            // SAFETY: inside the band's row t0 + r < KK, lanes past n masked off.
            let x = unsafe { _mm512_maskz_loadu_ps(mask, bp.add((t0 + r) * W + p)) };
            for (a, &dv) in acc.iter_mut().zip(&d) {
                a[r] = _mm512_fmadd_ps(dv, x, a[r]);
            }
        }
    };
    let mut p = 0;
    while p + 16 <= n {
        if let Some(f) = fetch {
            for ob in 0..OB {
                // A hint only, never dereferenced here.
                _mm_prefetch::<_MM_HINT_T0>(dp.wrapping_add(f + ob * dy_rs + p).cast());
            }
        }
        step(p, !0);
        p += 16;
    }
    if p < n {
        step(p, first_lanes(n - p));
    }
    for (ob, row) in acc.iter().enumerate() {
        for (r, a) in row.iter().enumerate() {
            // SAFETY: lanes holds og·KK·16 floats, o0 + ob < og and t0 + r < KK.
            unsafe {
                let at = lp.add(((o0 + ob) * KK + t0 + r) * 16);
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *a));
            }
        }
    }
}

/// [`super::add_assign`] for f32 on AVX-512F: four vectors a step, the tail masked.
///
/// # Safety
/// The CPU has AVX-512F; `dst.len() == src.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn add_assign_f32(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    let mut i = 0;
    while i + 64 <= n {
        for v in 0..4 {
            // SAFETY: i + 64 <= n, inside both slices.
            unsafe {
                let at = i + 16 * v;
                let x = _mm512_add_ps(_mm512_loadu_ps(d.add(at)), _mm512_loadu_ps(s.add(at)));
                _mm512_storeu_ps(d.add(at), x);
            }
        }
        i += 64;
    }
    while i < n {
        let mask = first_lanes(n - i);
        // SAFETY: lanes past n are masked off.
        unsafe {
            let x = _mm512_add_ps(
                _mm512_maskz_loadu_ps(mask, d.add(i)),
                _mm512_maskz_loadu_ps(mask, s.add(i)),
            );
            _mm512_mask_storeu_ps(d.add(i), mask, x);
        }
        i += 16;
    }
}

/// [`super::stream_copy`] for f32 on AVX-512F: the 64-byte aligned lines of `dst`
/// stored non-temporally, the ends before and after them ordinarily.
///
/// # Safety
/// The CPU has AVX-512F; `src.len() == dst.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn stream_copy_f32(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    let n = dst.len();
    let head = dst.as_ptr().align_offset(64).min(n);
    write_slice(&mut dst[..head], &src[..head]);
    let mut i = head;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n = src.len() = dst.len(); dst + i is 64-byte aligned.
        unsafe {
            _mm512_stream_ps(
                dst.as_mut_ptr().add(i).cast(),
                _mm512_loadu_ps(src.as_ptr().add(i)),
            )
        };
        i += 16;
    }
    write_slice(&mut dst[i..], &src[i..]);
    _mm_sfence();
}

/// Rows `rows` of the output gradient from position `col` on that one tile of
/// [`spread_dgrad_f32`] fetches, one row every `every` steps of its inner loop.
#[derive(Clone, Copy)]
struct Ahead {
    col: usize,
    rows: (usize, usize),
    every: usize,
}

/// Input channels per register tile of [`spread_dgrad_f32`]: 8 channels x 2 vectors of
/// positions are 16 accumulators, and each step loads 2 output-gradient vectors and 8
/// weights for 16 multiply-adds.
pub const SPREAD_MT: usize = 8;

/// Output positions per tile of [`spread_dgrad_f32`]: two vectors.
pub const SPREAD_TILE: usize = 32;

/// Lines to bring into L2 in the background: `runs` runs of `run` floats, `stride` floats
/// apart, from `start` (a hint only: the addresses are never dereferenced).
#[derive(Clone, Copy)]
pub struct Region {
    pub start: *const f32,
    pub run: usize,
    pub stride: usize,
    pub runs: usize,
}

/// Walks the lines of a list of [`Region`]s, `per` lines every `every` calls of
/// [`Self::step`].
#[derive(Clone, Copy)]
struct Background<'a> {
    regions: &'a [Region],
    region: usize,
    run: usize,
    line: usize,
    end: usize,
    every: usize,
    per: usize,
    count: usize,
}

impl<'a> Background<'a> {
    /// Spreads the regions' lines over `steps` calls of [`Self::step`].
    fn new(regions: &'a [Region], steps: usize) -> Self {
        // At most: a run that does not start on a line touches one line more.
        let lines: usize = regions
            .iter()
            .map(|r| r.runs * ((r.run * 4).div_ceil(64) + 1))
            .sum();
        let steps = steps.max(1);
        let mut b = Background {
            regions,
            region: 0,
            run: 0,
            line: 0,
            end: 0,
            every: (steps / lines.max(1)).max(1),
            per: lines.div_ceil(steps).max(1),
            count: 0,
        };
        b.open_run();
        b
    }

    /// Points `line..end` at the current run, or past the last region.
    fn open_run(&mut self) {
        while let Some(r) = self.regions.get(self.region) {
            if self.run < r.runs && r.run > 0 {
                let a = r.start.wrapping_add(self.run * r.stride) as usize;
                self.line = a & !63;
                self.end = a + 4 * r.run;
                return;
            }
            self.region += 1;
            self.run = 0;
        }
        self.end = 0;
        self.line = 0;
    }

    /// One line every `every` calls (for steps at least as many as the lines).
    #[inline(always)]
    fn step(&mut self) {
        self.count += 1;
        if self.count < self.every || self.line >= self.end {
            return;
        }
        self.count = 0;
        self.fetch();
    }

    /// `per` lines every `every` calls (for fewer steps than lines: a loop in the step
    /// slowed `spread_dgrad_f32`'s, 0.0026 -> 0.0028 s).
    fn steps(&mut self) {
        self.count += 1;
        if self.count < self.every {
            return;
        }
        self.count = 0;
        for _ in 0..self.per {
            if self.line >= self.end {
                return;
            }
            self.fetch();
        }
    }

    /// Fetches the next line into L2.
    #[inline(always)]
    fn fetch(&mut self) {
        // SAFETY: a prefetch is a hint; it never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(self.line as *const i8) };
        self.line += 64;
        if self.line >= self.end {
            self.run += 1;
            self.open_run();
        }
    }
}

/// Output vectors of one tile: `SPREAD_MT` channels x up to 8 lines of input rows.
const SPREAD_OUT: usize = SPREAD_MT * 8;

/// A tile's output lines, permuted and waiting to be stored while the next tile computes.
struct Staged {
    lines: [__m512; SPREAD_OUT],
    at: [*mut f32; SPREAD_OUT],
    len: usize,
    /// Non-temporal stores (`dx` is 64-byte aligned), or ordinary ones.
    stream: bool,
}

impl Staged {
    /// Stores line `i`.
    ///
    /// # Safety
    /// `i < self.len`, and line `i`'s address lies in `dx`, aligned where `self.stream`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(&self, i: usize) {
        // SAFETY: as the caller guarantees.
        unsafe {
            if self.stream {
                _mm512_stream_ps(self.at[i], self.lines[i]);
            } else {
                _mm512_storeu_ps(self.at[i], self.lines[i]);
            }
        }
    }
}

/// The input gradient of one image's group of an unpadded 1x1 stride-2 convolution
/// (iresnet's shortcuts), written straight into `dx`: each register tile covers `SPREAD_MT`
/// input channels × `rows` whole output rows (`rows·wo <= 32` positions) and is spread from
/// the registers onto those rows' even input rows and columns, with the odd rows and
/// columns zero, by permutes into whole lines. The next tile stores them, a line every
/// other step, so the stores drain while it computes: stored after the tile's own steps
/// they cost iresnet's first shortcut 0.0033 against 0.0029 s, and computing the columns
/// first and spreading them afterwards took the sum of the two passes.
/// `a[ci, oc] = w[oc·w_cs + ci]`; `dy` holds `og` planes of `ho·wo`, `dx` `cg` planes of
/// `4·ho·wo`. With `ahead`, each tile fetches the output gradient of the tile that many
/// tiles on (for a `dy` in memory), its rows shared out among the tile's row tiles. The
/// steps also fetch the lines of `background` into L2, one every few rounds of steps (as
/// many as there are rounds at most).
///
/// # Safety
/// The CPU has AVX-512F; `cg` is a multiple of `SPREAD_MT`; `1 <= rows`,
/// `rows·wo <= SPREAD_TILE`, `rows·wo` and `ho·wo` are multiples of 4; `w` reaches
/// `(og - 1)·w_cs + cg`, `dy` holds `og·ho·wo` and `dx` `cg·4·ho·wo` floats; with `stream`,
/// `dx` starts 64-byte aligned.
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn spread_dgrad_f32(
    (cg, og, ho, wo): (usize, usize, usize, usize),
    rows: usize,
    (w, w_cs): (&[f32], usize),
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    stream: bool,
    ahead: Option<usize>,
    background: &[Region],
) {
    let (ohw, ihw) = (ho * wo, 4 * ho * wo);
    let table = |r: usize| SpreadTable::new(r * wo, wo);
    let (full, tail) = (table(rows), table(ho % rows));
    let row_tiles = cg / SPREAD_MT;
    let span = og.div_ceil(row_tiles);
    let every = (og / span.max(1)).max(1);
    let tile = rows * wo;
    let mut bg = Background::new(background, ho.div_ceil(rows) * row_tiles * (og / 2));
    // One pointer for every store, the staged ones included, which outlive a tile's call.
    let dp = dx.as_mut_ptr().cast::<f32>();
    let mut staged = Staged {
        lines: [_mm512_setzero_ps(); SPREAD_OUT],
        at: [std::ptr::null_mut(); SPREAD_OUT],
        len: 0,
        stream,
    };
    for oh0 in (0..ho).step_by(rows) {
        let t = if oh0 + rows <= ho { &full } else { &tail };
        let p0 = oh0 * wo;
        let q = ahead.map_or(ohw, |a| p0 + a * tile);
        for rt in 0..row_tiles {
            let fetch = (q < ohw).then_some(Ahead {
                col: q,
                rows: ((rt * span).min(og), ((rt + 1) * span).min(og)),
                every,
            });
            // SAFETY: as the caller guarantees; positions p0..p0 + t.n exist, and the
            // tile's input rows start at 4·p0 floats into each plane.
            unsafe {
                spread_tile(
                    (rt * SPREAD_MT, og, ohw, ihw),
                    p0,
                    (w, w_cs),
                    dy,
                    dp,
                    t,
                    fetch,
                    &mut staged,
                    &mut bg,
                )
            };
        }
    }
    for i in 0..staged.len {
        // SAFETY: staged addresses are lines inside dx.
        unsafe { staged.store(i) };
    }
    _mm_sfence();
}

/// Where each output vector of a [`spread_dgrad_f32`] tile takes its lanes from: lane `l` of
/// vector `j` is position `idx[j][l]` of the tile's two accumulators, or zero where bit `l`
/// of `keep[j]` is clear.
struct SpreadTable {
    /// Positions in the tile (`rows·wo`).
    n: usize,
    /// Output vectors: `4·n / 16`, the tile's input rows.
    vectors: usize,
    idx: [[i32; 16]; 8],
    keep: [u16; 8],
}

impl SpreadTable {
    fn new(n: usize, wo: usize) -> Self {
        let mut t = SpreadTable {
            n,
            vectors: 4 * n / 16,
            idx: [[0; 16]; 8],
            keep: [0; 8],
        };
        let iw = 2 * wo;
        for j in 0..t.vectors {
            for l in 0..16 {
                let o = 16 * j + l;
                let (ih, iw_) = (o / iw, o % iw);
                if ih % 2 == 0 && iw_ % 2 == 0 {
                    t.idx[j][l] = ((ih / 2) * wo + iw_ / 2) as i32;
                    t.keep[j] |= 1 << l;
                }
            }
        }
        t
    }
}

/// One register tile of [`spread_dgrad_f32`]: input channels `c0..c0 + SPREAD_MT`, the
/// output positions `p0..p0 + t.n`, into `dp` (the start of `dx`). Stores the previous
/// tile's `staged` lines during its steps and leaves its own there.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn spread_tile(
    (c0, og, ohw, ihw): (usize, usize, usize, usize),
    p0: usize,
    (w, w_cs): (&[f32], usize),
    dy: &[f32],
    dp: *mut f32,
    t: &SpreadTable,
    fetch: Option<Ahead>,
    staged: &mut Staged,
    bg: &mut Background,
) {
    let (m0, m1) = (first_lanes(t.n), first_lanes(t.n.saturating_sub(16)));
    let mut acc = [[_mm512_setzero_ps(); 2]; SPREAD_MT];
    let (wp, bp) = (w.as_ptr(), dy.as_ptr());
    let (mut next, mut count) = (fetch.map_or(0, |f| f.rows.0), 0);
    let mut fetch_step = || {
        if let Some(f) = fetch {
            count += 1;
            if count == f.every && next < f.rows.1 {
                count = 0;
                let at = bp.wrapping_add(next * ohw + f.col);
                // Hints only: the tile's first, middle and last lines.
                _mm_prefetch::<_MM_HINT_T0>(at.cast());
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(16).cast());
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(t.n - 1).cast());
                next += 1;
            }
        }
    };
    let step = |k: usize, acc: &mut [[__m512; 2]; SPREAD_MT]| {
        // SAFETY: dy holds og planes of ohw; lanes past the tile are masked off (not read).
        let (x0, x1) = unsafe {
            let at = bp.add(k * ohw + p0);
            (
                _mm512_maskz_loadu_ps(m0, at),
                // Not `add`: with 16 positions or fewer this lies past the tile (and may lie
                // past `dy`); the mask reads nothing there.
                _mm512_maskz_loadu_ps(m1, at.wrapping_add(16)),
            )
        };
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: w reaches (og - 1)·w_cs + cg and c0 + r < cg.
            let av = _mm512_set1_ps(unsafe { *wp.add(k * w_cs + c0 + r) });
            row[0] = _mm512_fmadd_ps(x0, av, row[0]);
            row[1] = _mm512_fmadd_ps(x1, av, row[1]);
        }
    };
    let pending = staged.len;
    // Locals, so the loop keeps them in registers (through the `&mut`s it stored them back
    // every step, and the accumulators with them).
    let mut bgl = *bg;
    let mut stored = 0;
    // Two steps a round: one staged line and one background line per round, and half the
    // loop's own instructions per multiply-add.
    let mut k = 0;
    while k + 2 <= og {
        if fetch.is_some() {
            fetch_step();
            fetch_step();
        }
        bgl.step();
        if stored < pending {
            // SAFETY: staged addresses are lines inside dx.
            unsafe { staged.store(stored) };
            stored += 1;
        }
        step(k, &mut acc);
        step(k + 1, &mut acc);
        k += 2;
    }
    if k < og {
        step(k, &mut acc);
    }
    for i in stored..pending {
        // SAFETY: as above.
        unsafe { staged.store(i) };
    }
    *bg = bgl;
    let mut i = 0;
    // A copy: indexed by a run-time row below, `acc` itself would live in memory, and with
    // the stores in the loop above the compiler wrote it back every step.
    let out = acc;
    for (r, row) in out.iter().enumerate() {
        // SAFETY: the tile's input rows lie in plane c0 + r at 4·p0 floats on, 4·t.n
        // floats; 4·p0 and the planes' length are multiples of 16 from an aligned start.
        let at = unsafe { dp.add((c0 + r) * ihw + 4 * p0) };
        for j in 0..t.vectors {
            // SAFETY: idx is a table of 16 i32.
            let idx = unsafe { _mm512_loadu_si512(t.idx[j].as_ptr().cast()) };
            staged.lines[i] = _mm512_maskz_permutex2var_ps(t.keep[j], row[0], idx, row[1]);
            // SAFETY: see `at`.
            staged.at[i] = unsafe { at.add(16 * j) };
            i += 1;
        }
    }
    staged.len = i;
}
