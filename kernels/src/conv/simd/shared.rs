//! What the AVX2 (`avx2.rs`) and AVX-512 (`avx512.rs`) kernels share with each other and
//! with the dispatchers: the register-block macros of [`super::fwd_multi`] and
//! [`super::wgrad_pixels`], instantiated once per vector width, and [`WGRAD_BAND`].

/// Row stride of [`skinny_wgrad`]'s band of columns, and the most positions it covers: 27
/// rows of 256 are 27 KB, which stay in L1 while every output channel's row passes over them.
pub const WGRAD_BAND: usize = 256;

/// Defines the vector kernel of [`fwd_multi`] for one vector width: `$name` (the driver over
/// blocks of output channels), `$run` (one block's runs of outputs) and `$block` (one register
/// block). The AVX2 version (`avx2.rs`) and the AVX-512 one (`avx512.rs`) are this code at 8 and
/// 16 lanes.
#[cfg(target_arch = "x86_64")]
macro_rules! fwd_multi_kernel {
    (
        $(#[$m:meta])*
        fn $name:ident, $run:ident, $block:ident;
        features = $feat:literal, lanes = $lanes:literal, vector = $vec:ty,
        zero = $zero:ident, load = $load:ident, set1 = $set1:ident,
        fma = $fma:ident, store = $store:ident,
        blocks = [4 => $p4:literal, 3 => $p3:literal, 2 => $p2:literal, 1 => $p1:literal]
    ) => {
        $(#[$m])*
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            out: &mut [f32],
            len: usize,
            planes: &[f32],
            psize: usize,
            off: &[usize],
            w: &[f32],
            cg: usize,
        ) {
            let outs = out.len() / len;
            let mut o0 = 0;
            while o0 < outs {
                let o = (outs - o0).min(4);
                let (dst, wb) = (
                    &mut out[o0 * len..(o0 + o) * len],
                    &w[o0 * cg * off.len()..],
                );
                let args = (&mut *dst, len, planes, psize, off, wb, cg);
                // SAFETY: as the caller guarantees.
                let f = unsafe {
                    match o {
                        4 => $run::<4, $p4>(args),
                        3 => $run::<3, $p3>(args),
                        2 => $run::<2, $p2>(args),
                        _ => $run::<1, $p1>(args),
                    }
                };
                // Runs shorter than one vector.
                let taps = off.len();
                for oo in 0..o {
                    for ff in f..len {
                        let mut sum = 0f32;
                        for ci in 0..cg {
                            for (t, &ot) in off.iter().enumerate() {
                                sum += wb[(oo * cg + ci) * taps + t] * planes[ci * psize + ot + ff];
                            }
                        }
                        dst[oo * len + ff] = sum;
                    }
                }
                o0 += o;
            }
        }

        /// Outputs `0..len` of `O` channels in blocks of `P` vectors, then single vectors,
        /// then one last overlapping vector (outputs are overwritten, not accumulated, so
        /// recomputing a few is harmless); returns where the vectors stopped (`len` unless
        /// `len` is shorter than one vector).
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::type_complexity)]
        unsafe fn $run<const O: usize, const P: usize>(
            (dst, len, planes, psize, off, w, cg): (
                &mut [f32],
                usize,
                &[f32],
                usize,
                &[usize],
                &[f32],
                usize,
            ),
        ) -> usize {
            let mut f = 0;
            // SAFETY (all three): f + lanes·P <= len, and the caller's bounds.
            while f + $lanes * P <= len {
                unsafe { $block::<O, P>(dst, len, f, planes, psize, off, w, cg) };
                f += $lanes * P;
            }
            while f + $lanes <= len {
                unsafe { $block::<O, 1>(dst, len, f, planes, psize, off, w, cg) };
                f += $lanes;
            }
            if f < len && len >= $lanes {
                unsafe { $block::<O, 1>(dst, len, len - $lanes, planes, psize, off, w, cg) };
                f = len;
            }
            f
        }

        /// Outputs `f..f + lanes·P` of `O` channels.
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $block<const O: usize, const P: usize>(
            dst: &mut [f32],
            len: usize,
            f: usize,
            planes: &[f32],
            psize: usize,
            off: &[usize],
            w: &[f32],
            cg: usize,
        ) {
            let taps = off.len();
            let mut acc: [[$vec; P]; O] = [[$zero(); P]; O];
            for ci in 0..cg {
                let plane = planes[ci * psize..].as_ptr();
                let wc: [*const f32; O] =
                    std::array::from_fn(|o| w[(o * cg + ci) * taps..].as_ptr());
                for (t, &ot) in off.iter().enumerate() {
                    // SAFETY: ot + f + lanes·P <= ot + len <= psize (asserted by the caller).
                    let x: [$vec; P] = std::array::from_fn(|p| unsafe {
                        $load(plane.add(ot + f + $lanes * p))
                    });
                    for (acc_o, wco) in acc.iter_mut().zip(&wc) {
                        // SAFETY: w holds O·cg·taps weights from `w`.
                        let wv = $set1(unsafe { *wco.add(t) });
                        for (a, xp) in acc_o.iter_mut().zip(&x) {
                            *a = $fma(wv, *xp, *a);
                        }
                    }
                }
            }
            for (o, acc_o) in acc.iter().enumerate() {
                for (p, a) in acc_o.iter().enumerate() {
                    let d = &mut dst[o * len + f + $lanes * p..][..$lanes];
                    // SAFETY: `d` holds one vector of f32.
                    unsafe { $store(d.as_mut_ptr(), *a) };
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use fwd_multi_kernel;

/// Defines `$name`, the driver of [`wgrad_pixels`]' vector kernel: blocks of 16 output
/// channels × up to `$max` (input channel, tap) pairs, each run by `$block::<K>` over all
/// pixels. The AVX2 version (`avx2.rs`) and the AVX-512 one (`avx512.rs`) share this driver;
/// their register blocks differ (two 8-lane vectors per channel block against one).
#[cfg(target_arch = "x86_64")]
macro_rules! wgrad_pixels_driver {
    (
        $(#[$m:meta])*
        fn $name:ident => $block:ident;
        features = $feat:literal, max = $max:literal, pairs = [$($k:literal)*]
    ) => {
        $(#[$m])*
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            dwt: &mut [f32],
            gt: &[f32],
            pix: &[usize],
            planes: &[f32],
            psize: usize,
            off: &[usize],
        ) {
            let (np, taps) = (pix.len(), off.len());
            let outs = gt.len() / np;
            let pairs = dwt.len() / outs;
            for o0 in (0..outs).step_by(16) {
                let mut k0 = 0;
                while k0 < pairs {
                    let k = (pairs - k0).min($max);
                    // Start of each pair's input run: plane ci, tap t.
                    let at = |j: usize| ((k0 + j) / taps) * psize + off[(k0 + j) % taps];
                    // SAFETY: as the caller guarantees; pairs k0..k0 + k exist.
                    unsafe {
                        match k {
                            $($k => $block::<$k>(dwt, gt, pix, planes, outs, o0, k0, at),)*
                            _ => unreachable!("block of {k} pairs"),
                        }
                    }
                    k0 += k;
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use wgrad_pixels_driver;
