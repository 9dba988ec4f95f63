//! Vector kernels of the convolutions: multiply-adds over many kernel taps at once, and the
//! data movement around them. Each family's entry points check their bounds and the element
//! type, then run an f32 intrinsics kernel for the instruction set [`level`] found, or a
//! portable loop (f64, other CPUs, and `FPIPE_SIMD=base`).
//!
//! - `dispatch.rs`: instruction-set detection ([`level`], [`SIMD_ENV`]) and [`multiversion!`];
//! - `loops.rs`: the portable tap loops ([`taps_fwd`], [`taps_bwd_data`], [`taps_bwd_filter`]),
//!   auto-vectorised once per instruction set;
//! - `forward.rs`: forward kernels with several outputs per load ([`fwd_multi`],
//!   [`fwd_pixels`], [`skinny_matmul`]);
//! - `gradient.rs`: weight- and input-gradient kernels ([`wgrad_multi`], [`wgrad_pixels`],
//!   [`skinny_wgrad`], [`spread_dgrad`]);
//! - `helpers.rs`: transposes, stride-2 phase splits and joins, adds and streamed copies;
//! - `avx2.rs`, `avx512.rs`: the f32 intrinsics kernels at 8 and 16 lanes;
//! - `shared.rs`: the register-block macros both intrinsics files instantiate, and the
//!   constants they share with the dispatchers.
//!
//! Imports run one way: the family files use `dispatch.rs`, `loops.rs` and the intrinsics
//! files, which use only `shared.rs`.

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;
mod dispatch;
mod forward;
mod gradient;
mod helpers;
mod loops;
mod shared;

pub(crate) use dispatch::multiversion;
#[cfg(test)]
pub use dispatch::SIMD_ENV;
pub use dispatch::{as_f32, as_f32_mut, as_f32_slots, level, Level};
pub use forward::{fwd_multi, fwd_pixels, pixel_weights, pixels_fast, skinny_matmul};
#[cfg(test)]
pub use gradient::SKINNY_WGRAD_ROWS;
pub use gradient::{
    add_lanes, fold_lanes, skinny_wgrad, skinny_wgrad_applies, spread_dgrad, spread_dgrad_applies,
    wgrad_multi, wgrad_pixels, WGRAD_BAND, WLANES,
};
pub use helpers::{
    add_assign, deinterleave2, interleave2, stream_copy, take_even, transpose, Background,
};
pub use loops::{taps_bwd_data, taps_bwd_filter, taps_fwd};
