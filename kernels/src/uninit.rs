//! Kernel outputs that are not zero-filled before the kernels write them.
//!
//! Zero-filling outputs that are then overwritten cost 2-5 % of a training step (perf: memset
//! under each conv op's allocation); a 12.8 MB depthwise input gradient spent as long zeroing
//! as computing. So an op's output starts as a `Vec<MaybeUninit<T>>` ([`output_vec`]), the
//! kernels write it through [`Slot`] (or through raw pointers in the intrinsics kernels), and
//! it becomes a `Vec<T>` ([`assume_init`]) once every element is written. No `&mut [T]` is
//! made over memory that was not written yet.

use std::mem::{ManuallyDrop, MaybeUninit};

use crate::elem::Elem;

/// A destination element that kernels write without reading: `T` itself (scratch, or an
/// output already written) or `MaybeUninit<T>` (a fresh output). Kernels that serve both take
/// `&mut [S]` for some `S: Slot<T>`.
///
/// # Safety
/// Implementors have the size and alignment of `T`, so that a slice of them can be written
/// through a `*mut T` (the intrinsics kernels' stores).
pub unsafe trait Slot<T: Copy>: Sized + Send {
    /// Writes `v` here.
    fn set(&mut self, v: T);
}

// SAFETY: `T` is `T`.
unsafe impl<T: Copy + Send> Slot<T> for T {
    #[inline(always)]
    fn set(&mut self, v: T) {
        *self = v;
    }
}

// SAFETY: `MaybeUninit<T>` has the size and alignment of `T`.
unsafe impl<T: Copy + Send> Slot<T> for MaybeUninit<T> {
    #[inline(always)]
    fn set(&mut self, v: T) {
        self.write(v);
    }
}

/// An output of `len` elements that is not zero-filled, for kernels that write every element
/// before anything reads it; [`assume_init`] once they have. Debug builds (the test suite)
/// fill it with NaN instead, so a kernel that skips an element fails the reference tests
/// rather than leaving whatever the allocator had there.
pub fn output_vec<T: Elem>(len: usize) -> Vec<MaybeUninit<T>> {
    if cfg!(debug_assertions) {
        return vec![MaybeUninit::new(T::from_f64(f64::NAN)); len];
    }
    Box::new_uninit_slice(len).into_vec()
}

/// An output of `len` zeros, for kernels that add into it: allocated zeroed (fresh pages from
/// the system need no memset), in the form [`output_vec`] gives.
pub fn zeroed_output<T: Elem>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = ManuallyDrop::new(vec![T::ZERO; len]);
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, so the allocation is the same one.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// The written output as values.
///
/// # Safety
/// Every element of `v` has been written.
pub unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<T>` has `T`'s layout and the caller guarantees every element is
    // initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// A written part of an output as values, to add into.
///
/// # Safety
/// Every element of `s` has been written.
pub unsafe fn assume_init_mut<T>(s: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: as in `assume_init`.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `dst[i] = src[i]` (equal lengths), as one `memcpy` like `copy_from_slice`.
pub fn write_slice<T: Copy, S: Slot<T>>(dst: &mut [S], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "write_slice: lengths differ");
    // SAFETY: both hold `src.len()` elements of `T`'s layout (`Slot`'s contract); `dst` is
    // exclusively borrowed, so they do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) }
}

/// `dst[i] = v` for every `i`.
#[inline]
pub fn fill<T: Copy, S: Slot<T>>(dst: &mut [S], v: T) {
    for d in dst {
        d.set(v);
    }
}
