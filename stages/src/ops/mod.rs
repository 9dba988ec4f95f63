//! Tensor operations that candle lacks or does slowly (see `docs/` and issue on CPU conv).

use candle_core::{Result, Tensor};

/// 2-D convolution, NCHW input `x`, weight `[out, in/groups, kh, kw]`, square stride and
/// padding, `groups` dividing both channel counts. Every backbone calls this, never candle's
/// `conv2d` directly, so the fast CPU kernels (and the CUDA path) live in one place.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<Tensor> {
    x.conv2d(w, padding, stride, 1, groups)
}
