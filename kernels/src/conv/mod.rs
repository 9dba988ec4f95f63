//! 2-D convolution with its own CPU forward and backward.
//!
//! candle 0.11 runs grouped convolutions as a loop of per-group convolutions and computes the
//! input gradient through a direct `conv_transpose2d` loop (NaN for groups > 1), which makes
//! CPU training 10-80x slower than PyTorch (docs/benchmarks.md). This module replaces that on
//! the CPU by candle custom ops that share one [`Geom`]:
//!
//! - [`Conv2dFwd`]: forward, with `bwd` returning the weight gradient and, where the input
//!   is a variable or comes from one, the input gradient, through the ops below
//!   ([`conv2d_backward`]);
//! - `Conv2dBwdData`: gradient with respect to the input;
//! - `Conv2dBwdFilter`: gradient with respect to the weight;
//! - `Conv2dBwdBoth`: both in one pass over the batch, for the geometry where sharing the
//!   pass pays (iresnet's unpadded 1x1 stride-2 shortcuts, f32 on AVX-512; see
//!   `dense::backward_spread`).
//!
//! Each op picks one of two algorithms ([`Geom::use_direct`]):
//! - `dense`: im2col/col2im on the `gemm` crate that candle itself uses, for ordinary and
//!   wide-group convolutions; 1x1 stride-1 convolutions skip im2col and are a plain GEMM;
//! - `direct`: per-plane multiply-add kernels for depthwise and narrow-group convolutions
//!   (at most [`DIRECT_MAX_GROUP_WIDTH`] input channels per group), vectorised over a
//!   polyphase-padded copy of the input (see `direct.rs`).
//!
//! Both parallelise over the batch or over channel groups with rayon, and take their working
//! memory from a per-thread scratch buffer that is reused across calls, so a call allocates
//! its output and nothing else of size.
//!
//! On devices other than the CPU (and for dtypes other than f32/f64), [`conv2d`] calls
//! candle's own convolution for `groups == 1` (cuDNN or im2col + cuBLAS on CUDA) and runs
//! grouped convolutions as one batched GEMM over the groups (`taps.rs`), instead of candle's
//! loop of one convolution per group.

mod blocked;
mod dense;
mod direct;
mod dw3;
mod simd;
mod split;
pub mod taps;
#[cfg(test)]
mod tests;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

pub use crate::elem::Elem;

/// Widest group (input channels per group) that goes to the direct kernels rather than
/// im2col + GEMM. At 8-16 channels per group the GEMM is too thin (M = 8-16 rows) to reach
/// the microkernel's speed, while the direct kernel's work per loaded input grows with it.
pub const DIRECT_MAX_GROUP_WIDTH: usize = 16;

/// Shape and hyper-parameters of one convolution, validated once and shared by the forward
/// and both backward ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub pad: usize,
    /// Channel groups; divides both `c` and `o`.
    pub groups: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

impl Geom {
    /// Validates an NCHW input shape and an `[o, c/groups, kh, kw]` weight shape.
    pub fn new(
        x_dims: &[usize],
        w_dims: &[usize],
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Result<Self> {
        let (&[n, c, h, w], &[o, cg, kh, kw]) = (x_dims, w_dims) else {
            candle_core::bail!(
                "conv2d: expected 4-D input and weight, got {x_dims:?} and {w_dims:?}"
            );
        };
        if groups == 0 || stride == 0 || kh == 0 || kw == 0 {
            candle_core::bail!(
                "conv2d: groups, stride and kernel size must be positive \
                 (groups {groups}, stride {stride}, kernel {kh}x{kw})"
            );
        }
        if c % groups != 0 || o % groups != 0 || cg * groups != c {
            candle_core::bail!(
                "conv2d: input {x_dims:?} and weight {w_dims:?} do not match groups {groups}"
            );
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "conv2d: kernel {kh}x{kw} larger than padded input {}x{}",
                h + 2 * pad,
                w + 2 * pad
            );
        }
        let ho = (h + 2 * pad - kh) / stride + 1;
        let wo = (w + 2 * pad - kw) / stride + 1;
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            stride,
            pad,
            groups,
            ho,
            wo,
        })
    }

    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Output channels per group.
    pub fn og(&self) -> usize {
        self.o / self.groups
    }

    /// Length of one im2col column: input channels per group times kernel area.
    pub fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }

    /// Output plane size.
    pub fn out_hw(&self) -> usize {
        self.ho * self.wo
    }

    /// Input plane size.
    pub fn in_hw(&self) -> usize {
        self.h * self.w
    }

    /// Whether this convolution goes to the direct (depthwise / narrow-group) kernels.
    pub fn use_direct(&self) -> bool {
        self.groups > 1 && self.cg() <= DIRECT_MAX_GROUP_WIDTH
    }

    /// 1x1, stride 1, no padding: the input already is the im2col matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Multiply-adds of the forward pass (each backward pass has as many).
    pub fn macs(&self) -> usize {
        self.n * self.o * self.out_hw() * self.k()
    }

    fn x_shape(&self) -> Shape {
        Shape::from((self.n, self.c, self.h, self.w))
    }

    fn w_shape(&self) -> Shape {
        Shape::from((self.o, self.cg(), self.kh, self.kw))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.o, self.ho, self.wo))
    }
}

/// 2-D convolution of NCHW `x` with weight `[o, c/groups, kh, kw]`, square `stride` and
/// `padding`. On the CPU with f32/f64 this runs fpipe's kernels (forward and backward);
/// elsewhere (CUDA, other dtypes) it is candle's own `conv2d` for `groups == 1` and
/// [`taps::conv2d`] (one batched GEMM over the groups) for grouped convolutions.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<Tensor> {
    let supported = matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == w.dtype();
    if !x.device().is_cpu() || !supported {
        if groups > 1 {
            return taps::conv2d(x, w, stride, padding, groups);
        }
        return x.conv2d(w, padding, stride, 1, groups);
    }
    let geom = Geom::new(x.dims(), w.dims(), stride, padding, groups)?;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, Conv2dFwd(geom))
}

/// The forward of [`conv2d`] on the CPU (f32/f64) for contiguous operands of `geom`'s
/// shapes, outside the autograd graph (for ops that give the gradients themselves).
pub fn conv2d_detached(x: &Tensor, w: &Tensor, geom: Geom) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &Conv2dFwd(geom))
}

/// Gradient of [`conv2d`] with respect to its input, given the output gradient `dy`
/// (CPU, f32/f64). Exposed for tests and benchmarks; training gets it through `backward()`.
pub fn conv2d_backward_data(dy: &Tensor, w: &Tensor, geom: Geom) -> Result<Tensor> {
    dy.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Conv2dBwdData(geom))
}

/// Gradient of [`conv2d`] with respect to its weight, given the input `x` and the output
/// gradient `dy` (CPU, f32/f64). Exposed for tests and benchmarks.
pub fn conv2d_backward_filter(x: &Tensor, dy: &Tensor, geom: Geom) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &Conv2dBwdFilter(geom))
}

/// Both gradients of [`conv2d`] on the CPU (f32/f64) given the output gradient `dy`: the input
/// gradient only when `want_dx`, and the weight gradient. This is what the op's `bwd` runs.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: Geom,
    want_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let dy = dy.contiguous()?;
    if want_dx && Conv2dBwdBoth::applies(&geom, [x, w, &dy]) {
        // One buffer `[dx | dw]`: dx is a view of its head, dw a copy of its tail (so the
        // weight gradient, kept until the optimiser step, does not keep dx's memory).
        let both = x
            .contiguous()?
            .apply_op3_no_bwd(&w.contiguous()?, &dy, &Conv2dBwdBoth(geom))?;
        let nx = geom.x_shape().elem_count();
        let dx = both.narrow(0, 0, nx)?.reshape(geom.x_shape())?;
        // `to_vec1` copies the view alone (`Tensor::copy` would clone the whole buffer).
        let dw = both
            .narrow(0, nx, geom.w_shape().elem_count())?
            .to_vec1::<f32>()?;
        let dw = Tensor::from_vec(dw, geom.w_shape(), x.device())?;
        return Ok((Some(dx), dw));
    }
    let dx = want_dx
        .then(|| conv2d_backward_data(&dy, w, geom))
        .transpose()?;
    Ok((dx, conv2d_backward_filter(x, &dy, geom)?))
}

/// Both gradients in one op, `(x, w, dy) -> [dx | dw]` flattened, for the convolutions
/// whose input gradient shares a pass over the batch with the weight gradient
/// (`dense::backward_spread`: unpadded 1x1 stride-2, f32 on AVX-512).
#[derive(Clone, Copy, Debug)]
struct Conv2dBwdBoth(Geom);

impl Conv2dBwdBoth {
    fn applies(geom: &Geom, [x, w, dy]: [&Tensor; 3]) -> bool {
        x.device().is_cpu()
            && [x, w, dy].iter().all(|t| t.dtype() == DType::F32)
            && dense::backward_spread_applies::<f32>(geom)
    }
}

impl candle_core::CustomOp3 for Conv2dBwdBoth {
    fn name(&self) -> &'static str {
        "fpipe-conv2d-bwd-both"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, name) = (&self.0, candle_core::CustomOp3::name(self));
        check_operands(
            name,
            &[(l1, g.x_shape()), (l2, g.w_shape()), (l3, g.out_shape())],
        )?;
        let (x, w, dy) = (
            contiguous::<f32>(s1, l1, name)?,
            contiguous::<f32>(s2, l2, name)?,
            contiguous::<f32>(s3, l3, name)?,
        );
        let Some(out) = dense::backward_spread(g, x, w, dy) else {
            candle_core::bail!("{name}: geometry {g:?} not taken on this CPU");
        };
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// An error naming op `name` unless every operand's layout has its expected shape.
fn check_operands(name: &str, operands: &[(&Layout, Shape)]) -> Result<()> {
    if operands.iter().all(|(l, want)| l.shape() == want) {
        return Ok(());
    }
    let list = |shapes: Vec<String>| shapes.join(" and ");
    candle_core::bail!(
        "{name}: operands {}, expected {}",
        list(
            operands
                .iter()
                .map(|(l, _)| format!("{:?}", l.shape()))
                .collect()
        ),
        list(operands.iter().map(|(_, s)| format!("{s:?}")).collect())
    )
}

/// One computation on two contiguous operands, run for f32 or f64.
trait Kernel {
    fn name(&self) -> &'static str;
    /// Shapes the two operands must have.
    fn arg_shapes(&self) -> (Shape, Shape);
    fn out_shape(&self) -> Shape;
    fn run<T: Elem>(&self, a: &[T], b: &[T]) -> Vec<T>;
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{name}: operand is not contiguous");
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

fn cpu_apply<K: Kernel>(
    k: &K,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (sa, sb) = k.arg_shapes();
    check_operands(k.name(), &[(l1, sa), (l2, sb)])?;
    let out = match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => {
            let (a, b) = (
                contiguous::<f32>(s1, l1, k.name())?,
                contiguous(s2, l2, k.name())?,
            );
            CpuStorage::F32(k.run::<f32>(a, b))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) => {
            let (a, b) = (
                contiguous::<f64>(s1, l1, k.name())?,
                contiguous(s2, l2, k.name())?,
            );
            CpuStorage::F64(k.run::<f64>(a, b))
        }
        _ => candle_core::bail!(
            "{}: unsupported dtypes {:?} and {:?} (f32 or f64 expected)",
            k.name(),
            s1.dtype(),
            s2.dtype()
        ),
    };
    Ok((out, k.out_shape()))
}

/// Forward convolution op: `(x, w) -> y`, with `bwd` giving the gradients
/// ([`conv2d_backward`]).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dFwd(pub Geom);

impl Kernel for Conv2dFwd {
    fn name(&self) -> &'static str {
        "fpipe-conv2d"
    }
    fn arg_shapes(&self) -> (Shape, Shape) {
        (self.0.x_shape(), self.0.w_shape())
    }
    fn out_shape(&self) -> Shape {
        self.0.out_shape()
    }
    fn run<T: Elem>(&self, x: &[T], w: &[T]) -> Vec<T> {
        if self.0.use_direct() {
            direct::forward(&self.0, x, w)
        } else {
            dense::forward(&self.0, x, w)
        }
    }
}

impl CustomOp2 for Conv2dFwd {
    fn name(&self) -> &'static str {
        Kernel::name(self)
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_apply(self, s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // An input that is no variable and comes from none (the image a stem reads) needs no
        // gradient: PyTorch skips it too, and for a stem it was half the backward pass.
        let (dx, dw) = conv2d_backward(x, w, dy, self.0, x.track_op())?;
        Ok((dx, Some(dw)))
    }
}

/// Input-gradient op: `(dy, w) -> dx`.
#[derive(Clone, Copy, Debug)]
struct Conv2dBwdData(Geom);

impl Kernel for Conv2dBwdData {
    fn name(&self) -> &'static str {
        "fpipe-conv2d-bwd-data"
    }
    fn arg_shapes(&self) -> (Shape, Shape) {
        (self.0.out_shape(), self.0.w_shape())
    }
    fn out_shape(&self) -> Shape {
        self.0.x_shape()
    }
    fn run<T: Elem>(&self, dy: &[T], w: &[T]) -> Vec<T> {
        if self.0.use_direct() {
            direct::backward_data(&self.0, dy, w)
        } else {
            dense::backward_data(&self.0, dy, w)
        }
    }
}

impl CustomOp2 for Conv2dBwdData {
    fn name(&self) -> &'static str {
        Kernel::name(self)
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_apply(self, s1, l1, s2, l2)
    }
}

/// Weight-gradient op: `(x, dy) -> dw`.
#[derive(Clone, Copy, Debug)]
struct Conv2dBwdFilter(Geom);

impl Kernel for Conv2dBwdFilter {
    fn name(&self) -> &'static str {
        "fpipe-conv2d-bwd-filter"
    }
    fn arg_shapes(&self) -> (Shape, Shape) {
        (self.0.x_shape(), self.0.out_shape())
    }
    fn out_shape(&self) -> Shape {
        self.0.w_shape()
    }
    fn run<T: Elem>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        if self.0.use_direct() {
            direct::backward_filter(&self.0, x, dy)
        } else {
            dense::backward_filter(&self.0, x, dy)
        }
    }
}

impl CustomOp2 for Conv2dBwdFilter {
    fn name(&self) -> &'static str {
        Kernel::name(self)
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_apply(self, s1, l1, s2, l2)
    }
}

/// Start and end (exclusive) of the output indices `o` whose input index `o*stride + tap - pad`
/// lies in `0..len`: the part of an output row or column that reads real input, not padding.
fn valid_range(
    tap: usize,
    pad: usize,
    stride: usize,
    len: usize,
    out_len: usize,
) -> (usize, usize) {
    let lo = if tap >= pad {
        0
    } else {
        (pad - tap).div_ceil(stride)
    };
    let hi = if len + pad <= tap {
        0
    } else {
        (len + pad - tap).div_ceil(stride)
    };
    let hi = hi.min(out_len);
    (lo.min(hi), hi)
}
