//! Per-thread scratch buffers of the CPU kernels.
//!
//! Every kernel needs working memory (im2col columns, padded planes). Allocating it per call
//! costs page faults and zeroing that, measured, took about half of a training step's CPU
//! time; so each thread keeps one buffer per element type that only ever grows.

use std::cell::Cell;

/// An element type with a per-thread scratch buffer (f32 and f64; a supertrait of
/// [`crate::elem::Elem`]).
pub trait Scratch: Sized {
    /// Runs `f` on this thread's scratch buffer of at least `len` elements, whose contents
    /// are unspecified (kernels initialise what they read).
    ///
    /// The buffer is taken out of its slot for the duration of `f`, so a nested call on the
    /// same thread (rayon may run another task while one waits) gets a fresh buffer instead
    /// of aliasing this one.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

thread_local! {
    static SCRATCH_F32: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static SCRATCH_F64: Cell<Vec<f64>> = const { Cell::new(Vec::new()) };
}

macro_rules! impl_scratch {
    ($t:ty, $slot:ident) => {
        impl Scratch for $t {
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

impl_scratch!(f32, SCRATCH_F32);
impl_scratch!(f64, SCRATCH_F64);
