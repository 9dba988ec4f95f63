//! Element types of the CPU kernels and their per-thread scratch buffers.
//!
//! Every kernel needs working memory (im2col columns, padded planes). Allocating it per call
//! costs page faults and zeroing that, measured, took about half of a training step's CPU
//! time; so each thread keeps one buffer per element type that only ever grows.

use std::cell::Cell;
use std::ops::{Add, AddAssign, Mul};

use candle_core::WithDType;

/// A float type the convolution kernels run on (f32 for training, f64 for gradient tests).
pub trait Elem:
    WithDType + Copy + Send + Sync + 'static + Add<Output = Self> + AddAssign + Mul<Output = Self>
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;

    /// Runs `f` on this thread's scratch buffer of at least `len` elements, whose contents
    /// are unspecified (kernels initialise what they read).
    ///
    /// The buffer is taken out of its slot for the duration of `f`, so a nested call on the
    /// same thread (rayon may run another task while one waits) gets a fresh buffer instead
    /// of aliasing this one.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;

    /// `self · a + b` with one rounding: a single instruction where the caller is compiled
    /// with FMA (the kernels' AVX2 and AVX-512 versions), a libm call elsewhere.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

thread_local! {
    static SCRATCH_F32: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static SCRATCH_F64: Cell<Vec<f64>> = const { Cell::new(Vec::new()) };
}

macro_rules! impl_elem {
    ($t:ty, $slot:ident) => {
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }

            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                let mut buf = $slot.with(Cell::take);
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
                let r = f(&mut buf[..len]);
                $slot.with(|slot| {
                    // Keep the larger of this buffer and one a nested call may have left.
                    let other = slot.take();
                    slot.set(if other.len() > buf.len() { other } else { buf });
                });
                r
            }
        }
    };
}

impl_elem!(f32, SCRATCH_F32);
impl_elem!(f64, SCRATCH_F64);

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
pub(super) unsafe fn output_vec<T: Elem>(len: usize) -> Vec<T> {
    if cfg!(debug_assertions) {
        return vec![T::from_f64(f64::NAN); len];
    }
    let mut v = Vec::with_capacity(len);
    // SAFETY: capacity is `len`; f32/f64 have no invalid bit patterns and the caller writes
    // every element before it is read (this function's contract).
    unsafe { v.set_len(len) };
    v
}
