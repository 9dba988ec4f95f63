//! Which instruction set the kernels run on: [`level`], detected once per process and
//! capped by [`SIMD_ENV`], the [`multiversion!`] wrapper that compiles a portable loop once
//! per level, and the casts that hand an f32 slice to the f32-only intrinsics kernels.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use crate::elem::Elem;
use crate::uninit::Slot;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Environment variable that caps the instruction set fpipe's convolution kernels use
/// (gemm picks its own): `base` (portable loops) or `avx2`; anything else, or unset, means
/// the best the CPU has. Read once per process. It lets one machine test every kernel
/// version (`conv::tests`) and rule a vector kernel in or out when a result looks wrong.
pub const SIMD_ENV: &str = "FPIPE_SIMD";

pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var(SIMD_ENV).unwrap_or_default();
        if cap == "base" {
            return Level::Base;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let fma = is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2");
            if fma && is_x86_feature_detected!("avx512f") && cap != "avx2" {
                return Level::Avx512;
            }
            if fma {
                return Level::Avx2;
            }
        }
        Level::Base
    })
}

/// Defines `pub fn $name` that runs `$body` compiled for the best instruction set the CPU has.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),*) => $body:ident) => {
        $(#[$m])*
        pub fn $name<T: $crate::elem::Elem>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512<T: $crate::elem::Elem>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2<T: $crate::elem::Elem>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match $crate::conv::simd::level() {
                    // SAFETY: `level()` detected the features these versions are built for.
                    $crate::conv::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::conv::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::conv::simd::Level::Base => {}
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `v` as f32 when `T` is f32 (the intrinsics kernels are f32-only), else `None`.
pub fn as_f32<T: Elem>(v: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is `f32`, so the slice is reinterpreted as its own type.
        .then(|| unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<f32>(), v.len()) })
}

/// [`as_f32`] for a mutable slice.
pub fn as_f32_mut<T: Elem>(v: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: as in `as_f32`.
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len()) })
}

/// [`as_f32`] for a destination the intrinsics kernels write, initialised or not.
///
/// # Safety
/// Only initialised values are written through the result: where `S` is `T`, the slots hold
/// values that later reads see.
pub unsafe fn as_f32_slots<T: Elem, S: Slot<T>>(v: &mut [S]) -> Option<&mut [MaybeUninit<f32>]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is `f32` and `S` has its layout (`Slot`'s contract); what is written is
        // up to the caller.
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) })
}
