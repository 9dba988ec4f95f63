//! Depthwise 3x3, stride 1, padding 1 (MobileFaceNet's stride-1 depthwise layers, and their
//! input gradient, which `direct::backward_data` turns into the same convolution with the
//! rotated kernel), straight from the unpadded planes.
//!
//! The polyphase path of `direct.rs` copies every input plane into a zero-padded one and every
//! output plane out of a wider row pitch; on 14x14 planes those copies took a third of the
//! layer's time (perf) and left its forward pass at 0.6-0.8x PyTorch's. Here output rows are
//! computed in 8-column vectors read from the input rows in place: only the vectors at a row's
//! two ends need a masked load (the column left of 0 or right of `w - 1` is padding), padding
//! rows are skipped, and each loaded input row feeds two output rows (6 loads per output vector
//! instead of the polyphase kernel's 9). A row's last vector overlaps the one before it when
//! `w` is not a multiple of 8 (outputs are stored, not accumulated, so that is harmless).

use rayon::prelude::*;

use super::simd::{as_f32, as_f32_slots, level, Level};
use super::split::min_tasks;
use super::Geom;
use crate::elem::Elem;
use crate::uninit::{assume_init, output_vec};

/// Whether `g` is a convolution this kernel handles, for element type `T` on this CPU: f32 on
/// AVX2 + FMA, depthwise with multiplier 1, 3x3, stride 1, padding 1, rows of at least one
/// vector.
pub fn applies<T: Elem>(g: &Geom) -> bool {
    let shape =
        g.groups == g.c && g.o == g.c && (g.kh, g.kw, g.stride, g.pad) == (3, 3, 1, 1) && g.w >= 8;
    shape && as_f32::<T>(&[]).is_some() && level() != Level::Base
}

/// Forward pass; the caller checked [`applies`].
pub fn forward<T: Elem>(g: &Geom, x: &[T], w: &[T]) -> Vec<T> {
    let hw = g.in_hw();
    let mut y = output_vec::<T>(g.n * g.o * hw);
    // SAFETY: `x86::plane` writes only computed values.
    let yf = unsafe { as_f32_slots::<T, _>(&mut y[..]) };
    let (Some(xf), Some(wf), Some(yf)) = (as_f32(x), as_f32(w), yf) else {
        unreachable!("dw3::forward called for a type other than f32")
    };
    assert!(
        xf.len() == g.n * g.c * hw && wf.len() == g.c * 9,
        "dw3::forward: buffers do not match {g:?}"
    );
    yf.par_chunks_mut(hw)
        .zip(xf.par_chunks(hw))
        .enumerate()
        .with_min_len(min_tasks(9 * hw))
        .for_each(|(p, (yp, xp))| {
            let c = p % g.c;
            let k: &[f32; 9] = wf[c * 9..c * 9 + 9]
                .try_into()
                .expect("nine taps per channel");
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX2 + FMA and `w >= 8`; both planes hold `h·w`.
            unsafe {
                x86::plane(g.h, g.w, xp, k, yp);
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("dw3 applies only on x86_64 ({xp:?} {k:?} {})", yp.len());
        });
    // SAFETY: `x86::plane` stores every row and every column of each plane.
    unsafe { assume_init(y) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Output plane `y` from input plane `x` (both `h·w`, row-major) and 3x3 kernel `k`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w >= 8`; `x.len() == y.len() == h·w`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn plane(h: usize, w: usize, x: &[f32], k: &[f32; 9], y: &mut [MaybeUninit<f32>]) {
        assert!(
            w >= 8 && x.len() == h * w && y.len() == h * w,
            "dw3 plane bounds"
        );
        let kv: [__m256; 9] = std::array::from_fn(|t| _mm256_set1_ps(k[t]));
        let last = w - 8;
        let mut c = 0;
        loop {
            let col = c.min(last);
            let mut ho = 0;
            while ho + 2 <= h {
                // SAFETY: rows `ho - 1 ..= ho + 2` that exist and columns `col - 1 ..= col + 8`
                // within a row are read (the rest masked off); rows `ho, ho + 1` are written.
                unsafe { rows::<2>(h, w, x, &kv, y, ho, col) };
                ho += 2;
            }
            if ho < h {
                // SAFETY: as above, for one row.
                unsafe { rows::<1>(h, w, x, &kv, y, ho, col) };
            }
            if col == last {
                break;
            }
            c += 8;
        }
    }

    /// Output rows `ho .. ho + R` (R = 1 or 2) at columns `col .. col + 8`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows<const R: usize>(
        h: usize,
        w: usize,
        x: &[f32],
        kv: &[__m256; 9],
        y: &mut [MaybeUninit<f32>],
        ho: usize,
        col: usize,
    ) {
        // Per output row, one partial sum per kernel row, added at the end: three short
        // dependency chains instead of one of nine multiply-adds.
        let mut part = [[_mm256_setzero_ps(); 3]; R];
        // Input rows ho - 1 .. ho + R; row `ho - 1 + d` is kernel row `d - r` of output row
        // `ho + r`.
        for d in 0..R + 2 {
            let Some(hi) = (ho + d).checked_sub(1).filter(|&hi| hi < h) else {
                continue;
            };
            // SAFETY: `hi < h`, `col + 8 <= w`; `load3` masks the columns outside the row.
            let v = unsafe { load3(x, hi * w, col, w) };
            for (r, pr) in part.iter_mut().enumerate() {
                let Some(i) = d.checked_sub(r).filter(|&i| i < 3) else {
                    continue;
                };
                pr[i] = _mm256_mul_ps(kv[3 * i], v[0]);
                pr[i] = _mm256_fmadd_ps(kv[3 * i + 1], v[1], pr[i]);
                pr[i] = _mm256_fmadd_ps(kv[3 * i + 2], v[2], pr[i]);
            }
        }
        for (r, pr) in part.iter().enumerate() {
            if ho + r < h {
                let sum = _mm256_add_ps(_mm256_add_ps(pr[0], pr[1]), pr[2]);
                // SAFETY: row `ho + r < h`, columns `col .. col + 8 <= w`.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add((ho + r) * w + col).cast(), sum) };
            }
        }
    }

    /// Columns `col - 1`, `col` and `col + 1` (8 each) of the row starting at `x[row]`, with
    /// the column left of 0 and right of `w - 1` read as zero.
    ///
    /// # Safety
    /// AVX2; `row + w <= x.len()`, `col + 8 <= w`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load3(x: &[f32], row: usize, col: usize, w: usize) -> [__m256; 3] {
        let p = x.as_ptr().wrapping_add(row + col);
        // SAFETY: `col + 8 <= w`, so p[0..8] is in the row; p[-1..7] is too unless col == 0,
        // where lane 0 (column -1) is masked off, and p[1..9] unless col + 8 == w, where lane
        // 7 (column w) is; masked lanes are not accessed.
        unsafe {
            let left = if col == 0 {
                let m = _mm256_setr_epi32(0, -1, -1, -1, -1, -1, -1, -1);
                _mm256_maskload_ps(p.wrapping_sub(1), m)
            } else {
                _mm256_loadu_ps(p.sub(1))
            };
            let right = if col + 8 == w {
                let m = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0);
                _mm256_maskload_ps(p.add(1), m)
            } else {
                _mm256_loadu_ps(p.add(1))
            };
            [left, _mm256_loadu_ps(p), right]
        }
    }
}
