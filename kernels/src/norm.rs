//! Fused training-mode BatchNorm and PReLU for NCHW tensors on the CPU (measured in
//! docs/benchmarks.md).
//!
//! candle_nn builds both from generic element-wise ops: training BatchNorm is about ten
//! full-size temporaries forward and more backward, PReLU four. On the CPU each temporary is a
//! fresh allocation whose pages the kernel faults in and zeroes, which profiling showed to be
//! over half of a MobileFaceNet training step. These ops read and write each activation once
//! per pass, and their backward passes are custom ops as well. Other devices and dtypes
//! fall back to candle's composition.
//!
//! One set of kernels serves BatchNorm with and without a PReLU after it (`BnPreluFwd`
//! and its backward ops): a BatchNorm alone has slopes of 1.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::elem::Elem;
use crate::uninit::{assume_init, output_vec};

fn dims4(x: &Tensor) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = x.dims4()?;
    Ok((n, c, h * w))
}

/// Training-mode BatchNorm over (N, H, W) of NCHW `x` with per-channel `gamma` and `beta`:
/// `y = (x − mean)/sqrt(var + eps)·gamma + beta` with the batch's biased variance, as
/// PyTorch's `BatchNorm2d` in training mode. Returns `(y, batch mean, unbiased batch
/// variance)`; the last two are detached, for the caller's running statistics
/// (`running = (1 − momentum)·running + momentum·batch`, see [`update_running`]).
/// Gradients flow to `x`, `gamma` and `beta`.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, hw) = dims4(x)?;
    let m = n * hw;
    if m < 2 {
        candle_core::bail!("batch_norm_train: need more than one value per channel");
    }
    let fast = matches!(x.dtype(), DType::F32 | DType::F64) && x.device().is_cpu();
    if !fast {
        let mean = x.mean_keepdim((0, 2, 3))?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
        let y = xc
            .broadcast_div(&(var.clone() + eps)?.sqrt()?)?
            .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
            .broadcast_add(&beta.reshape((1, c, 1, 1))?)?;
        let unbiased = (var.flatten_all()? * (m as f64 / (m - 1) as f64))?;
        return Ok((y, mean.flatten_all()?.detach(), unbiased.detach()));
    }
    // Slopes of 1 make the fused op's PReLU the identity.
    let x = x.contiguous()?;
    let (p, mean, unbiased) = bn_params(&x, gamma, beta, None)?;
    Ok((
        x.apply_op2(&p, BnPreluFwd { eps, train: true })?,
        mean,
        unbiased,
    ))
}

/// The parameter rows of [`BnPreluFwd`] for contiguous NCHW `x` (gamma, beta, batch mean,
/// biased batch variance, PReLU slopes: `alpha`, or 1 for a BatchNorm alone), with the batch
/// mean and unbiased variance, both detached, for the running statistics.
fn bn_params(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    alpha: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, _, hw) = dims4(x)?;
    let m = (n * hw) as f64;
    let stats = x.apply_op1_no_bwd(&ChannelStats)?;
    let (mean, var) = (stats.get(0)?, stats.get(1)?);
    let p = param_rows(x, (gamma, beta), (&mean, &var), alpha)?;
    Ok((p, mean, (var * (m / (m - 1.0)))?))
}

/// The `[5, C]` parameter rows of [`BnPreluFwd`] in `x`'s dtype: gamma, beta, the given
/// statistics, and the PReLU slopes `alpha` (checked to have `C` values), or 1 for a
/// BatchNorm alone.
fn param_rows(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
    alpha: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, c, _) = dims4(x)?;
    let dt = x.dtype();
    let alpha = match alpha {
        Some(a) if a.dims() != [c] => {
            candle_core::bail!("batch norm + PReLU: alpha {:?}, expected [{c}]", a.dims())
        }
        Some(a) => a.to_dtype(dt)?,
        None => Tensor::ones(c, dt, x.device())?,
    };
    let rows = [
        gamma.to_dtype(dt)?,
        beta.to_dtype(dt)?,
        mean.to_dtype(dt)?,
        var.to_dtype(dt)?,
        alpha,
    ];
    Tensor::stack(&rows, 0)
}

/// `running ← (1 − momentum)·running + momentum·batch` (PyTorch's momentum convention).
pub fn update_running(running: &candle_core::Var, batch: &Tensor, momentum: f64) -> Result<()> {
    let next = ((running.as_tensor() * (1.0 - momentum))?
        + (batch.to_dtype(running.dtype())? * momentum)?)?;
    running.set(&next.detach())
}

/// Per-channel PReLU of NCHW `x`: `y = x` where `x > 0`, `alpha[c]·x` elsewhere; gradients
/// to `x` and `alpha`.
pub fn prelu(x: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let (_, c, _) = dims4(x)?;
    if !(matches!(x.dtype(), DType::F32 | DType::F64) && x.device().is_cpu()) {
        let a = alpha.reshape((1, c, 1, 1))?;
        let zeros = x.zeros_like()?;
        return x.maximum(&zeros)? + x.minimum(&zeros)?.broadcast_mul(&a)?;
    }
    x.contiguous()?
        .apply_op2(&alpha.to_dtype(x.dtype())?.contiguous()?, Prelu)
}

/// Training-mode BatchNorm followed by per-channel PReLU (slopes `alpha`), as one op:
/// `y = prelu(batch_norm_train(x, gamma, beta, eps), alpha)` with the same returned
/// statistics. The pair is how every backbone's conv units end; fused, the forward writes one
/// full-size tensor instead of two and the backward two instead of six (candle's autograd
/// zeroes and accumulates every intermediate gradient, perf: a tenth of a MobileFaceNet step).
/// Gradients flow to `x`, `gamma`, `beta` and `alpha`.
pub fn batch_norm_prelu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    alpha: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, _, hw) = dims4(x)?;
    let fast = matches!(x.dtype(), DType::F32 | DType::F64) && x.device().is_cpu();
    if !fast || n * hw < 2 {
        let (y, mean, var) = batch_norm_train(x, gamma, beta, eps)?;
        return Ok((prelu(&y, alpha)?, mean, var));
    }
    let x = x.contiguous()?;
    let (p, mean, unbiased) = bn_params(&x, gamma, beta, Some(alpha))?;
    Ok((
        x.apply_op2(&p, BnPreluFwd { eps, train: true })?,
        mean,
        unbiased,
    ))
}

/// Eval-mode BatchNorm (running statistics `mean`, `var`) followed by per-channel PReLU
/// (slopes `alpha`, or none), as one op: `y = prelu((x − mean)·gamma/sqrt(var + eps) + beta,
/// alpha)`. `None` when the fused kernels do not apply (not f32/f64, or not on the CPU), for
/// the caller to compose the separate ops. One full-size pass instead of three (scale, shift,
/// PReLU). Gradients flow to `x`, `gamma`, `beta` and `alpha`; the statistics are constants.
pub fn batch_norm_prelu_eval(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
    alpha: Option<&Tensor>,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !(matches!(x.dtype(), DType::F32 | DType::F64) && x.device().is_cpu()) {
        return Ok(None);
    }
    let stats = (&mean.detach(), &var.detach());
    let p = param_rows(x, (gamma, beta), stats, alpha)?;
    let op = BnPreluFwd { eps, train: false };
    Ok(Some(x.contiguous()?.apply_op2(&p, op)?))
}

// ---------------------------------------------------------------------------------------------
// Kernels. `hw` is the plane size, planes are (n, c) in row-major order.

fn slice<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused norm op: operand is not contiguous");
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

fn nchw(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h * w)),
        d => candle_core::bail!("fused norm op: expected NCHW, got {d:?}"),
    }
}

/// Checks that per-channel operand `what` of op `op` is `[rows, c]`.
fn expect_rows(op: &str, what: &str, l: &Layout, rows: usize, c: usize) -> Result<()> {
    if l.dims() != [rows, c] {
        candle_core::bail!("{op}: {what} {:?}, expected [{rows}, {c}]", l.dims());
    }
    Ok(())
}

/// Applies `f` to f32 or f64 storages.
macro_rules! dispatch {
    ($s:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("fused norm op: f32 or f64 expected"),
        }
    };
}

/// A new buffer shaped like the equal-length inputs `ins`, plane by plane (`hw` values): the
/// values of plane `i` are `kernel(i)` applied to the inputs' values at each position. The
/// buffer is written once without being zeroed first: zero-filling each fresh output took
/// 3-4 % of a MobileFaceNet training step (perf).
fn map_planes<T: Elem, const K: usize, P: Fn([T; K]) -> T>(
    ins: [&[T]; K],
    hw: usize,
    kernel: impl Fn(usize) -> P + Sync + Send,
) -> Vec<T> {
    let len = ins.first().map_or(0, |s| s.len());
    if len == 0 {
        return Vec::new();
    }
    assert!(
        hw > 0 && len.is_multiple_of(hw) && ins.iter().all(|s| s.len() == len),
        "map_planes: inputs of different lengths"
    );
    let mut out = output_vec::<T>(len);
    out.par_chunks_mut(hw).enumerate().for_each(|(i, o)| {
        let k = kernel(i);
        let planes = ins.map(|s| &s[i * hw..][..hw]);
        for (j, slot) in o.iter_mut().enumerate() {
            slot.write(k(planes.map(|p| p[j])));
        }
    });
    // SAFETY: the loop above wrote all `len / hw` planes of `hw` values each.
    unsafe { assume_init(out) }
}

/// Per-channel mean and biased variance (two passes, f64 sums), as a `[2, C]` tensor.
struct ChannelStats;

fn stats<T: Elem>(x: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
    let m = (n * hw) as f64;
    let per: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let [sum] = channel_sums(x, x, (n, c, hw), ch, |v, _| [v]);
            let mean = sum / m;
            let neg = T::from_f64(-mean);
            let [sq] = channel_sums(x, x, (n, c, hw), ch, |v, _| {
                let d = v + neg;
                [d * d]
            });
            let var = sq / m;
            (mean, var)
        })
        .collect();
    per.iter()
        .map(|p| T::from_f64(p.0))
        .chain(per.iter().map(|p| T::from_f64(p.1)))
        .collect()
}

/// Partial sums per reduction. The compiler keeps a floating-point sum in program order, so a
/// single accumulator costs one add latency (4 cycles) per element: the per-channel sums of
/// BatchNorm and PReLU ran at a quarter of memory speed that way. `LANES` independent sums
/// vectorise; each plane's total then goes into an f64 sum.
const LANES: usize = 16;

/// `Σ f(a, b)[k]` over channel `ch`'s planes of two NCHW buffers of `(n, c, hw)`:
/// [`lane_sums`] per plane, the planes' totals summed in f64 in image order.
#[inline(always)]
fn channel_sums<T: Elem, const K: usize>(
    a: &[T],
    b: &[T],
    (n, c, hw): (usize, usize, usize),
    ch: usize,
    f: impl Fn(T, T) -> [T; K],
) -> [f64; K] {
    let mut total = [0.0f64; K];
    for i in 0..n {
        let at = (i * c + ch) * hw;
        let sums = lane_sums(&a[at..][..hw], &b[at..][..hw], &f);
        for (t, v) in total.iter_mut().zip(sums) {
            *t += v.to_f64();
        }
    }
    total
}

/// `K` sums `Σ f(a[i], b[i])[k]` at once (one pass over the runs), in [`LANES`] partial sums
/// each.
#[inline(always)]
fn lane_sums<T: Elem, const K: usize>(a: &[T], b: &[T], f: impl Fn(T, T) -> [T; K]) -> [T; K] {
    let mut acc = [[T::ZERO; LANES]; K];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut total = [T::ZERO; K];
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        for (t, v) in total.iter_mut().zip(f(x, y)) {
            *t += v;
        }
    }
    for (xa, xb) in ca.zip(cb) {
        for (l, (&x, &y)) in xa.iter().zip(xb).enumerate() {
            for (acc_k, v) in acc.iter_mut().zip(f(x, y)) {
                acc_k[l] += v;
            }
        }
    }
    for (t, acc_k) in total.iter_mut().zip(&acc) {
        *t = acc_k.iter().fold(*t, |s, &v| s + v);
    }
    total
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "fpipe-channel-stats"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = nchw(l)?;
        let out = dispatch!(s, |T| T::to_cpu_storage_owned(stats::<T>(
            slice(s, l)?,
            n,
            c,
            hw
        )));
        Ok((out, Shape::from((2, c))))
    }
}

/// Per channel `scale = gamma/sqrt(var + eps)` and `shift = beta − mean·scale`.
fn scale_shift<T: Elem>(p: &[T], c: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .map(|ch| {
            let (g, b, m, v) = (
                p[ch].to_f64(),
                p[c + ch].to_f64(),
                p[2 * c + ch].to_f64(),
                p[3 * c + ch].to_f64(),
            );
            let s = g / (v + eps).sqrt();
            (s, b - m * s)
        })
        .unzip()
}

/// Fused BatchNorm + PReLU forward; rows of `p` are (gamma, beta, mean, var, alpha): in
/// training the batch mean and biased variance, which the gradient to `x` goes through; in
/// eval mode the running statistics, constants. The BatchNorm output `z = x·scale + shift` is
/// recomputed from `x` in the backward ops, with the same arithmetic, so the PReLU branch
/// taken there is the forward's.
struct BnPreluFwd {
    eps: f64,
    train: bool,
}

impl CustomOp2 for BnPreluFwd {
    fn name(&self) -> &'static str {
        if self.train {
            "fpipe-batch-norm-prelu-train"
        } else {
            "fpipe-batch-norm-prelu-eval"
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = nchw(l1)?;
        expect_rows(self.name(), "parameters", l2, 5, c)?;
        let out = dispatch!(s1, |T| {
            let (x, p) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            let (scale, shift) = scale_shift(p, c, self.eps);
            T::to_cpu_storage_owned(map_planes([x], hw, |i| {
                let ch = i % c;
                let (s, t, a) = (
                    T::from_f64(scale[ch]),
                    T::from_f64(shift[ch]),
                    p[4 * c + ch],
                );
                move |[xv]: [T; 1]| {
                    let z = xv * s + t;
                    if z > T::ZERO {
                        z
                    } else {
                        a * z
                    }
                }
            }))
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = bn_prelu_backward(x, p, dy, self.eps, self.train)?;
        Ok((Some(dx), Some(dp)))
    }
}

/// Gradients of [`BnPreluFwd`] at input `x` with parameters `p`, given the output gradient:
/// `(dx, dp)`, `dp` with the rows of `p` (zero for the statistics). With `train`, `dx` goes
/// through the batch statistics; in eval mode they are constants and `dx = scale·dz`.
fn bn_prelu_backward(
    x: &Tensor,
    p: &Tensor,
    dy: &Tensor,
    eps: f64,
    train: bool,
) -> Result<(Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    let (n, _, hw) = dims4(x)?;
    let m = (n * hw) as f64;
    // With dz the gradient at the BatchNorm output: Σ dz, Σ dz·x̂ and the slopes' gradient.
    let sums = x.apply_op3_no_bwd(&dy, p, &BnPreluGradSums { eps })?;
    let (sdz, sdzx, dalpha) = (sums.get(0)?, sums.get(1)?, sums.get(2)?);
    let (gamma, mean, var) = (p.get(0)?, p.get(2)?, p.get(3)?);
    let invstd = (var + eps)?.sqrt()?.recip()?;
    let k = (&gamma * &invstd)?;
    // dx = k·(dz − Σdz/m − x̂·Σdz·x̂/m) = k·dz + b·x + c0 per channel (b = c0 = 0 in eval
    // mode).
    let (b, c0) = if train {
        let b = ((&k * &invstd)? * &sdzx)?.affine(-1.0 / m, 0.0)?;
        let c0 = ((&k * &sdz)?.affine(-1.0 / m, 0.0)? - (&b * &mean)?)?;
        (b, c0)
    } else {
        (k.zeros_like()?, k.zeros_like()?)
    };
    let coef = Tensor::cat(&[&Tensor::stack(&[k, b, c0], 0)?, p], 0)?;
    let dx = dy.apply_op3_no_bwd(x, &coef, &BnPreluDx { eps })?;
    let zeros = sdz.zeros_like()?;
    let dp = Tensor::stack(&[sdzx, sdz, zeros.clone(), zeros, dalpha], 0)?;
    Ok((dx, dp))
}

/// Convolution → training BatchNorm → PReLU as one autograd node; see
/// [`conv_batch_norm_train`].
struct ConvBnPreluFwd {
    geom: super::conv::Geom,
    eps: f64,
    /// The convolution's output, computed without a graph before this op.
    z: Tensor,
}

impl CustomOp3 for ConvBnPreluFwd {
    fn name(&self) -> &'static str {
        "fpipe-conv-batch-norm-prelu-train"
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (zs, zl) = self.z.storage_and_layout();
        let candle_core::Storage::Cpu(zc) = &*zs else {
            candle_core::bail!("{}: convolution output not on the CPU", self.name());
        };
        BnPreluFwd {
            eps: self.eps,
            train: true,
        }
        .cpu_fwd(zc, zl, s3, l3)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dz, dp) = bn_prelu_backward(&self.z, p, dy, self.eps, true)?;
        // An input outside the graph (the images into a stem) needs no gradient.
        let dx = if x.track_op() {
            Some(super::conv::conv2d_backward_data(&dz, w, self.geom)?)
        } else {
            None
        };
        let dw = super::conv::conv2d_backward_filter(x, &dz, self.geom)?;
        Ok((dx, Some(dw), Some(dp)))
    }
}

/// What [`conv_batch_norm_train`] returns.
pub struct ConvBatchNorm {
    /// The unit's output, with gradients to the input, weight and BatchNorm / PReLU parameters.
    pub y: Tensor,
    /// The convolution's output (BatchNorm's input), for observers such as quality features.
    pub z: Tensor,
    /// Batch mean and unbiased batch variance per channel, detached (see [`batch_norm_train`]).
    pub mean: Tensor,
    pub var: Tensor,
}

/// `conv2d(x, w)` → training BatchNorm (`gamma`, `beta`) → PReLU (slopes `alpha`, or none)
/// with one autograd node for the three on the CPU (f32, f64). candle's backward gives every
/// intermediate tensor a gradient of its own, a zero tensor plus an add, full size; between
/// a convolution and its BatchNorm that costs four passes over the activation for nothing
/// (perf: zeros_like + add were a sixth of a MobileFaceNet step). Here the convolution's
/// output is computed first, outside the graph; the node's backward takes the BatchNorm /
/// PReLU gradient on it and feeds it straight to the convolution's gradient kernels. Other
/// devices and dtypes compose [`super::conv2d`] and the BatchNorm ops.
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_train(
    x: &Tensor,
    w: &Tensor,
    (stride, padding, groups): (usize, usize, usize),
    gamma: &Tensor,
    beta: &Tensor,
    alpha: Option<&Tensor>,
    eps: f64,
) -> Result<ConvBatchNorm> {
    let fast = matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
        && x.device().is_cpu();
    let geom = super::conv::Geom::new(x.dims(), w.dims(), stride, padding, groups)?;
    if !fast || geom.n * geom.out_hw() < 2 {
        let z = super::conv2d(x, w, stride, padding, groups)?;
        let (y, mean, var) = match alpha {
            Some(a) => batch_norm_prelu_train(&z, gamma, beta, a, eps)?,
            None => batch_norm_train(&z, gamma, beta, eps)?,
        };
        return Ok(ConvBatchNorm { y, z, mean, var });
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let z = super::conv::conv2d_detached(&x, &w, geom)?;
    let (p, mean, var) = bn_params(&z, gamma, beta, alpha)?;
    let op = ConvBnPreluFwd {
        geom,
        eps,
        z: z.clone(),
    };
    let y = x.apply_op3(&w, &p, op)?;
    Ok(ConvBatchNorm { y, z, mean, var })
}

/// `[3, C]` from (x, dy, p) of [`BnPreluFwd`]: Σ dz, Σ dz·x̂ and `Σ_{z ≤ 0} dy·z`, where `dz`
/// is the gradient at the BatchNorm output.
struct BnPreluGradSums {
    eps: f64,
}

impl CustomOp3 for BnPreluGradSums {
    fn name(&self) -> &'static str {
        "fpipe-batch-norm-prelu-grad-sums"
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
        let (n, c, hw) = nchw(l1)?;
        let out = dispatch!(s1, |T| {
            let (x, dy, p) = (
                slice::<T>(s1, l1)?,
                slice::<T>(s2, l2)?,
                slice::<T>(s3, l3)?,
            );
            let (scale, shift) = scale_shift(p, c, self.eps);
            let per: Vec<[f64; 3]> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (s, t, a) = (
                        T::from_f64(scale[ch]),
                        T::from_f64(shift[ch]),
                        p[4 * c + ch],
                    );
                    let [sdz, sdzx, sda] = channel_sums(x, dy, (n, c, hw), ch, |xv, gv| {
                        let z = xv * s + t;
                        if z > T::ZERO {
                            [gv, gv * xv, T::ZERO]
                        } else {
                            let dz = a * gv;
                            [dz, dz * xv, gv * z]
                        }
                    });
                    let mean = p[2 * c + ch].to_f64();
                    let invstd = 1.0 / (p[3 * c + ch].to_f64() + self.eps).sqrt();
                    [sdz, (sdzx - mean * sdz) * invstd, sda]
                })
                .collect();
            T::to_cpu_storage_owned(
                (0..3)
                    .flat_map(|r| per.iter().map(move |v| T::from_f64(v[r])))
                    .collect(),
            )
        });
        Ok((out, Shape::from((3, c))))
    }
}

/// Input gradient of [`BnPreluFwd`] from (dy, x, coef), coef rows (k, b, c0) then `p`'s five:
/// `dx = k·dz + b·x + c0` with `dz = dy` where `z > 0`, `alpha·dy` elsewhere.
struct BnPreluDx {
    eps: f64,
}

impl CustomOp3 for BnPreluDx {
    fn name(&self) -> &'static str {
        "fpipe-batch-norm-prelu-dx"
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
        let (_, c, hw) = nchw(l1)?;
        expect_rows(self.name(), "coefficients", l3, 8, c)?;
        let out = dispatch!(s1, |T| {
            let (dy, x, k) = (
                slice::<T>(s1, l1)?,
                slice::<T>(s2, l2)?,
                slice::<T>(s3, l3)?,
            );
            let p = &k[3 * c..];
            let (scale, shift) = scale_shift(p, c, self.eps);
            T::to_cpu_storage_owned(map_planes([dy, x], hw, |i| {
                let ch = i % c;
                let (kk, b, c0) = (k[ch], k[c + ch], k[2 * c + ch]);
                let (s, t, a) = (
                    T::from_f64(scale[ch]),
                    T::from_f64(shift[ch]),
                    p[4 * c + ch],
                );
                move |[gv, xv]: [T; 2]| {
                    let dz = if xv * s + t > T::ZERO { gv } else { a * gv };
                    kk * dz + b * xv + c0
                }
            }))
        });
        Ok((out, l1.shape().clone()))
    }
}

/// PReLU forward with its own backward.
struct Prelu;

impl CustomOp2 for Prelu {
    fn name(&self) -> &'static str {
        "fpipe-prelu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = nchw(l1)?;
        if l2.dims() != [c] {
            candle_core::bail!("fpipe-prelu: alpha {:?}, expected [{c}]", l2.dims());
        }
        let out = dispatch!(s1, |T| {
            let (x, a) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
            T::to_cpu_storage_owned(map_planes([x], hw, |i| {
                let av = a[i % c];
                move |[xv]: [T; 1]| if xv > T::ZERO { xv } else { av * xv }
            }))
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(&dy, a, &PreluBwd { alpha_grad: false })?;
        let da = x.apply_op3_no_bwd(&dy, a, &PreluBwd { alpha_grad: true })?;
        Ok((Some(dx), Some(da)))
    }
}

/// From (x, dy, alpha): `dx = dy·(x > 0 ? 1 : alpha)`, or with `alpha_grad`
/// `dalpha[c] = Σ_{x ≤ 0} dy·x`.
struct PreluBwd {
    alpha_grad: bool,
}

impl CustomOp3 for PreluBwd {
    fn name(&self) -> &'static str {
        "fpipe-prelu-bwd"
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
        let (n, c, hw) = nchw(l1)?;
        if self.alpha_grad {
            let out = dispatch!(s1, |T| {
                let (x, g) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
                let da: Vec<T> = (0..c)
                    .into_par_iter()
                    .map(|ch| {
                        let [s] = channel_sums(x, g, (n, c, hw), ch, |xv, gv| {
                            [if xv > T::ZERO { T::ZERO } else { xv * gv }]
                        });
                        T::from_f64(s)
                    })
                    .collect();
                T::to_cpu_storage_owned(da)
            });
            return Ok((out, Shape::from(c)));
        }
        let out = dispatch!(s1, |T| {
            let (x, g, a) = (
                slice::<T>(s1, l1)?,
                slice::<T>(s2, l2)?,
                slice::<T>(s3, l3)?,
            );
            T::to_cpu_storage_owned(map_planes([x, g], hw, |i| {
                let av = a[i % c];
                move |[xv, gv]: [T; 2]| if xv > T::ZERO { gv } else { av * gv }
            }))
        });
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor, Var};

    fn grads_of(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        r: &Tensor,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        grads_of_all(|v| f(&v[0], &v[1], &v[2]), &[x, p1, p2], r)
    }

    /// Output of `f` on variables made from `inputs`, and the gradients of `Σ f(..)·r`.
    fn grads_of_all(
        f: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[&Tensor],
        r: &Tensor,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&tensors);
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        (
            flat(&y),
            vars.iter()
                .map(|v| g.get(v).map(flat).unwrap_or_default())
                .collect(),
        )
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(p, q)| (p - q).abs() <= tol * (1.0 + q.abs()))
    }

    /// Plane sizes below one block of partial sums (12, 15) and above it with a tail (63).
    const SHAPES: [(usize, usize, usize, usize); 2] = [(3, 5, 4, 3), (2, 3, 9, 7)];

    /// Forward, gradients and statistics against candle_nn's BatchNorm (f64).
    #[test]
    fn batch_norm_matches_candle_nn() {
        for shape in SHAPES {
            batch_norm_case(shape);
        }
    }

    fn batch_norm_case((n, c, h, w): (usize, usize, usize, usize)) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0.5f64, 2.0, (n, c, h, w), &dev).unwrap();
        let gamma = Tensor::randn(1f64, 0.3, c, &dev).unwrap();
        let beta = Tensor::randn(0f64, 0.3, c, &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
        let ours =
            |x: &Tensor, g: &Tensor, b: &Tensor| super::batch_norm_train(x, g, b, 1e-5).unwrap().0;
        let reference = |x: &Tensor, g: &Tensor, b: &Tensor| {
            let rm = Tensor::zeros(c, DType::F64, &dev).unwrap();
            let rv = Tensor::ones(c, DType::F64, &dev).unwrap();
            let bn = candle_nn::BatchNorm::new(c, rm, rv, g.clone(), b.clone(), 1e-5).unwrap();
            bn.forward_train(x).unwrap()
        };
        let (y, g) = grads_of(ours, &x, &gamma, &beta, &r);
        let (ry, rg) = grads_of(reference, &x, &gamma, &beta, &r);
        assert!(close(&y, &ry, 1e-10), "forward");
        for (a, b) in g.iter().zip(&rg) {
            assert!(close(a, b, 1e-9), "gradient");
        }
        let (_, mean, var) = super::batch_norm_train(&x, &gamma, &beta, 1e-5).unwrap();
        let rmean = x.mean_keepdim((0, 2, 3)).unwrap().flatten_all().unwrap();
        let m = (n * h * w) as f64;
        let rvar = (x
            .broadcast_sub(&x.mean_keepdim((0, 2, 3)).unwrap())
            .unwrap()
            .sqr()
            .unwrap())
        .sum_keepdim((0, 2, 3))
        .unwrap()
        .flatten_all()
        .unwrap()
        .affine(1.0 / (m - 1.0), 0.0)
        .unwrap();
        let v = |t: &Tensor| t.to_vec1::<f64>().unwrap();
        assert!(close(&v(&mean), &v(&rmean), 1e-12));
        assert!(close(&v(&var), &v(&rvar), 1e-12));
    }

    /// Eval mode, with and without slopes: output and the gradients to x, gamma, beta and
    /// alpha against the composite of separate ops (f64), and an f32 run.
    #[test]
    fn batch_norm_prelu_eval_matches_separate_ops() {
        let dev = Device::Cpu;
        for (n, c, h, w) in SHAPES {
            let x = Tensor::randn(0.5f64, 2.0, (n, c, h, w), &dev).unwrap();
            let gamma = Tensor::randn(1f64, 0.3, c, &dev).unwrap();
            let beta = Tensor::randn(0f64, 0.3, c, &dev).unwrap();
            let alpha = Tensor::randn(0.25f64, 0.1, c, &dev).unwrap();
            let mean = Tensor::randn(0.4f64, 0.5, c, &dev).unwrap();
            let var = Tensor::randn(0f64, 1.0, c, &dev).unwrap().sqr().unwrap();
            let r = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
            for with_slopes in [true, false] {
                let ours = |v: &[Tensor]| {
                    let a = with_slopes.then_some(&v[3]);
                    super::batch_norm_prelu_eval(&v[0], (&v[1], &v[2]), (&mean, &var), a, 1e-5)
                        .unwrap()
                        .expect("fused on the CPU")
                };
                let reference = |v: &[Tensor]| {
                    let scale = (&v[1] / (&var + 1e-5).unwrap().sqrt().unwrap()).unwrap();
                    let shift = (&v[2] - (&mean * &scale).unwrap()).unwrap();
                    let z = v[0]
                        .broadcast_mul(&scale.reshape((1, c, 1, 1)).unwrap())
                        .unwrap()
                        .broadcast_add(&shift.reshape((1, c, 1, 1)).unwrap())
                        .unwrap();
                    if with_slopes {
                        let a = v[3].reshape((1, c, 1, 1)).unwrap();
                        let zeros = z.zeros_like().unwrap();
                        (z.maximum(&zeros).unwrap()
                            + z.minimum(&zeros).unwrap().broadcast_mul(&a).unwrap())
                        .unwrap()
                    } else {
                        z
                    }
                };
                let inputs = [&x, &gamma, &beta, &alpha];
                let (y, g) = grads_of_all(ours, &inputs, &r);
                let (ry, rg) = grads_of_all(reference, &inputs, &r);
                assert!(close(&y, &ry, 1e-10), "forward, slopes {with_slopes}");
                for (i, (a, b)) in g.iter().zip(&rg).enumerate() {
                    if !with_slopes && i == 3 {
                        continue;
                    }
                    assert!(close(a, b, 1e-9), "gradient {i}, slopes {with_slopes}");
                }
            }
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let y32 = super::batch_norm_prelu_eval(
                &f32(&x),
                (&f32(&gamma), &f32(&beta)),
                (&mean, &var),
                Some(&f32(&alpha)),
                1e-5,
            )
            .unwrap()
            .expect("fused on the CPU");
            let y64 = super::batch_norm_prelu_eval(
                &x,
                (&gamma, &beta),
                (&mean, &var),
                Some(&alpha),
                1e-5,
            )
            .unwrap()
            .unwrap();
            let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f64>();
            let d = max_abs(&(y32.to_dtype(DType::F64).unwrap() - &y64).unwrap()).unwrap();
            // Relative to the output's size: a running variance drawn near zero makes a
            // scale of up to 1/sqrt(eps), and outputs in the hundreds (an absolute 1e-4 bound
            // failed once in a fresh-clone run, at 1.1e-4).
            let size = 1.0 + max_abs(&y64).unwrap();
            assert!(
                d < 1e-5 * size,
                "f32 against f64: {d} at outputs up to {size}"
            );
        }
    }

    /// Forward and gradients against candle_nn's PReLU (f64), and f32 runs.
    #[test]
    fn prelu_matches_candle_nn() {
        for (n, _, h, w) in SHAPES {
            prelu_case((n, 4, h, w));
        }
    }

    fn prelu_case((n, c, h, w): (usize, usize, usize, usize)) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
        let alpha = Tensor::randn(0.25f64, 0.1, c, &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
        let unused = Tensor::zeros(1, DType::F64, &dev).unwrap();
        let ours = |x: &Tensor, a: &Tensor, _: &Tensor| super::prelu(x, a).unwrap();
        let reference = |x: &Tensor, a: &Tensor, _: &Tensor| {
            candle_nn::PReLU::new(a.clone(), false).forward(x).unwrap()
        };
        let (y, g) = grads_of(ours, &x, &alpha, &unused, &r);
        let (ry, rg) = grads_of(reference, &x, &alpha, &unused, &r);
        assert!(close(&y, &ry, 1e-12));
        assert!(close(&g[0], &rg[0], 1e-12));
        assert!(close(&g[1], &rg[1], 1e-10));
        let y32 = super::prelu(
            &x.to_dtype(DType::F32).unwrap(),
            &alpha.to_dtype(DType::F32).unwrap(),
        )
        .unwrap();
        let y32: Vec<f32> = y32.flatten_all().unwrap().to_vec1().unwrap();
        assert!(y32
            .iter()
            .zip(&y)
            .all(|(a, b)| (*a as f64 - b).abs() < 1e-5));
    }

    /// The fused BatchNorm + PReLU against the two ops it replaces (f64): output, statistics
    /// and the gradients of x, gamma, beta and alpha, with slopes of both signs and inputs
    /// on both sides of zero; and the f32 version against the f64 one.
    #[test]
    fn batch_norm_prelu_matches_the_unfused_pair() {
        for (n, c, h, w) in SHAPES {
            let dev = Device::Cpu;
            let x = Tensor::randn(0.3f64, 2.0, (n, c, h, w), &dev).unwrap();
            let gamma = Tensor::randn(1f64, 0.5, c, &dev).unwrap();
            let beta = Tensor::randn(0f64, 0.5, c, &dev).unwrap();
            // Slopes of both signs; BatchNorm's output has both signs in every channel.
            let slopes: Vec<f64> = (0..c).map(|i| [0.25, -0.4, 1.3][i % 3]).collect();
            let alpha = Tensor::new(slopes, &dev).unwrap();
            let r = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
            let ins = [&x, &gamma, &beta, &alpha];
            let fused = |v: &[Tensor]| {
                super::batch_norm_prelu_train(&v[0], &v[1], &v[2], &v[3], 1e-5)
                    .unwrap()
                    .0
            };
            let pair = |v: &[Tensor]| {
                let y = super::batch_norm_train(&v[0], &v[1], &v[2], 1e-5)
                    .unwrap()
                    .0;
                super::prelu(&y, &v[3]).unwrap()
            };
            let (y, g) = grads_of_all(fused, &ins, &r);
            let (ry, rg) = grads_of_all(pair, &ins, &r);
            assert!(close(&y, &ry, 1e-12), "forward");
            for (i, (a, b)) in g.iter().zip(&rg).enumerate() {
                assert!(!b.is_empty() && close(a, b, 1e-9), "gradient of input {i}");
            }
            let (_, mean, var) =
                super::batch_norm_prelu_train(&x, &gamma, &beta, &alpha, 1e-5).unwrap();
            let (_, rmean, rvar) = super::batch_norm_train(&x, &gamma, &beta, 1e-5).unwrap();
            let v = |t: &Tensor| t.to_vec1::<f64>().unwrap();
            assert_eq!(v(&mean), v(&rmean));
            assert_eq!(v(&var), v(&rvar));
            let f32s = ins.map(|t| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap());
            let y32 = super::batch_norm_prelu_train(
                f32s[0].as_tensor(),
                f32s[1].as_tensor(),
                f32s[2].as_tensor(),
                f32s[3].as_tensor(),
                1e-5,
            )
            .unwrap()
            .0;
            let r32 = r.to_dtype(DType::F32).unwrap();
            let g32 = (&y32 * &r32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| -> Vec<f64> {
                let t = t.to_dtype(DType::F64).unwrap();
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            assert!(close(&flat(&y32), &y, 1e-5), "f32 forward");
            for (i, var) in f32s.iter().enumerate() {
                let d = flat(g32.get(var).unwrap());
                assert!(close(&d, &g[i], 1e-3), "f32 gradient of input {i}");
            }
        }
    }

    /// Conv → BatchNorm (→ PReLU) as one node against the ops it replaces (f64): output,
    /// conv output, statistics and the gradients of input, weight, gamma, beta (and alpha),
    /// for a dense and a grouped stride-2 convolution, with and without PReLU; and an input
    /// outside the graph still gives the parameters' gradients.
    #[test]
    fn conv_batch_norm_matches_the_separate_ops() {
        let dev = Device::Cpu;
        for (n, c, hw, o, k, s, pad, groups) in [(2, 3, 7, 4, 3, 1, 1, 1), (3, 4, 9, 8, 3, 2, 1, 2)]
        {
            for act in [true, false] {
                let x = Tensor::randn(0f64, 1.0, (n, c, hw, hw), &dev).unwrap();
                let w = Tensor::randn(0f64, 0.5, (o, c / groups, k, k), &dev).unwrap();
                let gamma = Tensor::randn(1f64, 0.5, o, &dev).unwrap();
                let beta = Tensor::randn(0f64, 0.5, o, &dev).unwrap();
                let alpha = Tensor::randn(0f64, 0.5, o, &dev).unwrap();
                let ho = (hw + 2 * pad - k) / s + 1;
                let r = Tensor::randn(0f64, 1.0, (n, o, ho, ho), &dev).unwrap();
                let ins = [&x, &w, &gamma, &beta, &alpha];
                let fused = |v: &[Tensor]| {
                    let a = act.then_some(&v[4]);
                    super::conv_batch_norm_train(
                        &v[0],
                        &v[1],
                        (s, pad, groups),
                        &v[2],
                        &v[3],
                        a,
                        1e-5,
                    )
                    .unwrap()
                    .y
                };
                let separate = |v: &[Tensor]| {
                    let z = crate::conv2d(&v[0], &v[1], s, pad, groups).unwrap();
                    if act {
                        super::batch_norm_prelu_train(&z, &v[2], &v[3], &v[4], 1e-5)
                            .unwrap()
                            .0
                    } else {
                        super::batch_norm_train(&z, &v[2], &v[3], 1e-5).unwrap().0
                    }
                };
                let (y, g) = grads_of_all(fused, &ins, &r);
                let (ry, rg) = grads_of_all(separate, &ins, &r);
                assert!(close(&y, &ry, 1e-12), "forward");
                for (i, (a, b)) in g.iter().zip(&rg).take(if act { 5 } else { 4 }).enumerate() {
                    assert!(!b.is_empty() && close(a, b, 1e-9), "gradient of input {i}");
                }
                let out = super::conv_batch_norm_train(
                    &x,
                    &w,
                    (s, pad, groups),
                    &gamma,
                    &beta,
                    None,
                    1e-5,
                )
                .unwrap();
                let z = crate::conv2d(&x, &w, s, pad, groups).unwrap();
                let (_, mean, var) = super::batch_norm_train(&z, &gamma, &beta, 1e-5).unwrap();
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                assert_eq!(v(&out.z), v(&z));
                assert!(close(&v(&out.mean), &v(&mean), 1e-12));
                assert!(close(&v(&out.var), &v(&var), 1e-12));
                // The input as a plain tensor: no input gradient, the weight's unchanged.
                let wv = Var::from_tensor(&w).unwrap();
                let y = super::conv_batch_norm_train(
                    &x,
                    wv.as_tensor(),
                    (s, pad, groups),
                    &gamma,
                    &beta,
                    None,
                    1e-5,
                )
                .unwrap()
                .y;
                let gs = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(gs.get(&x).is_none());
                let gw = v(gs.get(wv.as_tensor()).unwrap());
                let (_, rg_plain) = grads_of_all(
                    |t: &[Tensor]| {
                        let z = crate::conv2d(&x, &t[0], s, pad, groups).unwrap();
                        super::batch_norm_train(&z, &gamma, &beta, 1e-5).unwrap().0
                    },
                    &[&w],
                    &r,
                );
                assert!(
                    close(&gw, &rg_plain[0], 1e-9),
                    "weight gradient, plain input"
                );
            }
        }
    }

    /// Central differences of BatchNorm's input gradient (f64): the statistics depend on x.
    #[test]
    fn batch_norm_input_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 3, 2, 3);
        let x = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
        let gamma = Tensor::randn(1f64, 0.3, c, &dev).unwrap();
        let beta = Tensor::randn(0f64, 0.3, c, &dev).unwrap();
        let r = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
        let loss = |x: &Tensor| -> f64 {
            let y = super::batch_norm_train(x, &gamma, &beta, 1e-5).unwrap().0;
            (y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let ours =
            |x: &Tensor, g: &Tensor, b: &Tensor| super::batch_norm_train(x, g, b, 1e-5).unwrap().0;
        let (_, g) = grads_of(ours, &x, &gamma, &beta, &r);
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for i in 0..xv.len() {
            let (mut p, mut m) = (xv.clone(), xv.clone());
            p[i] += eps;
            m[i] -= eps;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (n, c, h, w), &dev).unwrap();
            let fd = (loss(&t(p)) - loss(&t(m))) / (2.0 * eps);
            assert!(
                (fd - g[0][i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "dx[{i}]: {fd} vs {}",
                g[0][i]
            );
        }
    }
}
