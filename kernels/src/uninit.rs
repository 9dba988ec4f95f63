//! Kernel outputs that are not zero-filled before the kernels write them.

use crate::elem::Elem;

/// An output buffer of `len` elements that is not zero-filled: for kernels that write every
/// element before anything reads it. Zero-filling outputs that are then overwritten cost 2-5 %
/// of a training step (perf: memset under each conv op's allocation); a 12.8 MB depthwise
/// input gradient spent as long zeroing as computing.
///
/// # Safety
/// The caller must write every element before reading any, and before the vector leaves it.
/// Debug builds (the test suite) fill it with NaN instead, so a kernel that skips an element
/// fails the reference tests rather than reading whatever the allocator left.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn output_vec<T: Elem>(len: usize) -> Vec<T> {
    if cfg!(debug_assertions) {
        return vec![T::from_f64(f64::NAN); len];
    }
    let mut v = Vec::with_capacity(len);
    // SAFETY: capacity is `len`; f32/f64 have no invalid bit patterns and the caller writes
    // every element before it is read (this function's contract).
    unsafe { v.set_len(len) };
    v
}
