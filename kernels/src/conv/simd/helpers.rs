//! Data movement around the kernels: [`transpose`], the stride-2 column phase splits and
//! joins ([`deinterleave2`], [`take_even`], [`interleave2`]), [`add_assign`],
//! [`stream_copy`], and the [`Background`] regions a kernel prefetches for the next one.

use super::dispatch::{as_f32, as_f32_mut, as_f32_slots, level, Level};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use crate::elem::Elem;
use crate::uninit::{write_slice, Slot};

/// The kernels' form of up to 4 [`Background`]s, and how many there are.
#[cfg(target_arch = "x86_64")]
pub fn regions<T: Elem>(background: &[Background<T>]) -> ([avx512::Region; 4], usize) {
    let mut regions = [avx512::Region {
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
        *r = avx512::Region {
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
                return unsafe { avx512::add_assign_f32(d, s) };
            }
            // SAFETY: `level()` detected AVX2; the lengths are equal.
            return unsafe { avx2::add_assign_f32(d, s) };
        }
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d += v;
    }
}

/// `dst.copy_from_slice(src)` with non-temporal stores where the CPU has AVX-512: for a
/// large output written once and not read soon, whose lines then need not be read first.
/// `dst` need not be initialised.
pub fn stream_copy<T: Elem, S: Slot<T>>(src: &[T], dst: &mut [S]) {
    assert_eq!(src.len(), dst.len(), "stream_copy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: the kernel writes only values of `src` into `dst`.
        let d32 = unsafe { as_f32_slots::<T, S>(&mut *dst) };
        if let (Some(s), Some(d)) = (as_f32(src), d32) {
            // SAFETY: AVX-512F detected; the lengths are equal (asserted above).
            return unsafe { avx512::stream_copy_f32(s, d) };
        }
    }
    write_slice(dst, src);
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
            k = unsafe { avx2::deinterleave2_f32(s, e, o) };
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
            k = unsafe { avx2::take_even_f32(s, d) };
        }
    }
    for (i, d) in dst.iter_mut().enumerate().skip(k) {
        *d = src[2 * i];
    }
}

/// The inverse of [`deinterleave2`]: `dst[2k] = even[k]`, `dst[2k + 1] = odd[k]` for
/// `2k (+ 1) < dst.len()`. `dst` need not be initialised.
pub fn interleave2<T: Elem, S: Slot<T>>(even: &[T], odd: &[T], dst: &mut [S]) {
    assert!(
        even.len() >= dst.len().div_ceil(2) && odd.len() >= dst.len() / 2,
        "interleave2: runs out of bounds"
    );
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Base {
        // SAFETY: the kernel writes only values of `even` and `odd` into `dst`.
        let d32 = unsafe { as_f32_slots::<T, S>(&mut *dst) };
        if let (Some(e), Some(o), Some(d)) = (as_f32(even), as_f32(odd), d32) {
            // SAFETY: AVX2 was detected by `level()`; the kernel writes whole pairs within
            // `dst` and reads the matching `even`/`odd` elements, in bounds as asserted.
            k = unsafe { avx2::interleave2_f32(e, o, d) };
        }
    }
    for (i, d) in dst.iter_mut().enumerate().skip(2 * k) {
        d.set(if i % 2 == 0 { even[i / 2] } else { odd[i / 2] });
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
            return unsafe { avx2::transpose_f32(s, rows, cols, d) };
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
