//! fpipe-kernels: tensor operations that candle lacks or runs slowly on the CPU (measured in
//! docs/benchmarks.md, "Convolution and training step"). Nothing here knows about faces or
//! pipelines: these are candle custom ops with their own backward, used by fpipe-stages'
//! backbones. Benchmark: `cargo bench -p fpipe-kernels --bench conv`.
//!
//! - [`conv2d`]: dense, grouped and depthwise convolution with fpipe's own CPU forward and
//!   backward kernels (see [`conv`]); candle's convolution on other devices.
//! - [`batch_norm_train`], [`update_running`], [`prelu`]: fused training-mode BatchNorm and
//!   PReLU with their own backward, instead of candle_nn's chains of full-size temporaries;
//!   [`batch_norm_prelu_train`] the two as one op, and [`conv_batch_norm_train`] a convolution,
//!   its BatchNorm and PReLU as one autograd node (what the backbones' conv units run).

pub mod conv;
mod elem;
mod norm;
mod scratch;
mod uninit;

pub use norm::{
    batch_norm_prelu_eval, batch_norm_prelu_train, batch_norm_train, conv_batch_norm_train, prelu,
    update_running, ConvBatchNorm,
};

use candle_core::{Result, Tensor};

/// 2-D convolution, NCHW input `x`, weight `[out, in/groups, kh, kw]`, square stride and
/// padding, `groups` dividing both channel counts. Every backbone calls this, never candle's
/// `conv2d` directly, so the fast CPU kernels (and the CUDA path) live in one place.
///
/// On the CPU (f32, f64) this is a custom op with its own backward: im2col + GEMM for dense
/// convolutions, direct vectorised kernels for depthwise and narrow-group ones. On CUDA it is
/// candle's convolution, so one model definition serves both devices.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<Tensor> {
    conv::conv2d(x, w, stride, padding, groups)
}
