//! Grouped convolution from device-generic tensor ops, for devices where fpipe has no kernels
//! of its own (CUDA).
//!
//! candle's `conv2d` runs `groups > 1` as a loop of one convolution per group followed by a
//! `cat`: 512 launches for MobileFaceNet's 512-channel depthwise layer, and its backward goes
//! through the grouped `conv_transpose2d` that returns NaN. Here the groups are one
//! batched GEMM instead: the `kh·kw` shifted (and strided) views of the padded input are
//! stacked into columns `[n·groups, cg·kh·kw, ho·wo]`, and multiplied by the weights
//! `[n·groups, og, cg·kh·kw]` (the group's weights repeated over the batch) in a single
//! `matmul`, whose result already is the NCHW output. Every op used (pad, narrow, reshape,
//! stack, broadcast, matmul) has a backward in candle on every device, so autograd gives both
//! gradients with no kernel of ours; on the CPU the same function is tested against the
//! naive reference (`tests.rs`).

use candle_core::{Result, Tensor, D};

use super::Geom;

/// `conv2d` of NCHW `x` with weight `[o, c/groups, kh, kw]` through tensor ops (see the
/// module comment). Same semantics as [`super::conv2d`].
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize, groups: usize) -> Result<Tensor> {
    let g = Geom::new(x.dims(), w.dims(), stride, pad, groups)?;
    let s = g.stride;
    // Tap (i, j) reads padded rows i, i + s, …, i + (ho - 1)·s. Taking `ho·s` rows from `i`
    // and keeping every s-th needs up to s - 1 rows past the padded input: pad those too.
    let extra_h = (g.kh - 1 + g.ho * s).saturating_sub(g.h + 2 * g.pad);
    let extra_w = (g.kw - 1 + g.wo * s).saturating_sub(g.w + 2 * g.pad);
    let xp = x
        .pad_with_zeros(2, g.pad, g.pad + extra_h)?
        .pad_with_zeros(3, g.pad, g.pad + extra_w)?;
    let mut views = Vec::with_capacity(g.kh * g.kw);
    for i in 0..g.kh {
        let rows = xp.narrow(2, i, g.ho * s)?;
        for j in 0..g.kw {
            let v = rows.narrow(3, j, g.wo * s)?;
            let v = if s == 1 {
                v
            } else {
                // [n, c, ho·s, wo·s] -> [n, c, ho, s, wo, s], first of each s.
                v.contiguous()?
                    .reshape((g.n, g.c, g.ho, s, g.wo, s))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
            };
            views.push(v.reshape((g.n, g.c, g.out_hw()))?);
        }
    }
    // [n, c, taps, ho·wo] -> [n·groups, cg·taps, ho·wo]: channel-major within a group, the
    // order of the weight's `[cg, kh, kw]`.
    let cols = Tensor::stack(&views, 2)?.reshape((g.n * g.groups, g.k(), g.out_hw()))?;
    let wg = w
        .reshape((1, g.groups, g.og(), g.k()))?
        .broadcast_as((g.n, g.groups, g.og(), g.k()))?
        .contiguous()?
        .reshape((g.n * g.groups, g.og(), g.k()))?;
    let y = wg.matmul(&cols)?;
    debug_assert_eq!(y.dim(D::Minus1)?, g.out_hw());
    y.reshape((g.n, g.o, g.ho, g.wo))
}
