//! The float types the CPU kernels run on.

use std::ops::{Add, AddAssign, Mul};

use candle_core::WithDType;

use crate::scratch::Scratch;

/// A float type the convolution and normalisation kernels run on (f32 for training, f64 for
/// gradient tests). Its per-thread working memory comes from [`Scratch`].
pub trait Elem:
    WithDType
    + Copy
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + AddAssign
    + Mul<Output = Self>
    + Scratch
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;

    /// `self · a + b` with one rounding: a single instruction where the caller is compiled
    /// with FMA (the kernels' AVX2 and AVX-512 versions), a libm call elsewhere.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

macro_rules! impl_elem {
    ($t:ty) => {
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
        }
    };
}

impl_elem!(f32);
impl_elem!(f64);
