//! BatchNorm-input statistics of a forward pass: the image features of quality assessment
//! (docs/methods.md §6, 3DiVi `open_midas/bn_extraction`).
//!
//! Every BatchNorm forward of the backbones first calls [`observe`] on its input. Outside
//! [`record_bn_inputs`] that is one thread-local flag test; inside it, each 4-D input
//! `(B, C, H, W)` adds two features per image: with `v_c` the unbiased variance over `H·W` of
//! channel `c`, the unbiased variance over `C` of `v` and the mean over `C` of `v` (both
//! unbiased, as PyTorch's `Tensor.var` default; the reference does not say for the variance
//! over channels). BatchNorm1d inputs (rank 2) are not features, and neither are 4-D inputs
//! with a single pixel or a single channel (an unbiased variance of one value is undefined).
//! Statistics are accumulated in f64.
//!
//! The recorder is thread-local, so the forward must run on the thread that calls
//! [`record_bn_inputs`] (candle's kernels may still use other threads inside each op).

use candle_core::{DType, Result, Tensor};
use std::cell::RefCell;

thread_local! {
    /// Per BatchNorm (forward order), per image: `[var over C of v, mean over C of v]`.
    static RECORDER: RefCell<Option<Vec<Vec<[f64; 2]>>>> = const { RefCell::new(None) };
}

/// Records the input of one BatchNorm when a recording is active (called at the start of the
/// BatchNorm forward path). A no-op otherwise.
pub fn observe(x: &Tensor) -> Result<()> {
    let active = RECORDER.with(|r| r.borrow().is_some());
    if !active || x.rank() != 4 {
        return Ok(());
    }
    let (b, c, h, w) = x.dims4()?;
    let hw = h * w;
    if hw < 2 || c < 2 {
        return Ok(());
    }
    let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let per_image: Vec<[f64; 2]> = data
        .chunks_exact(c * hw)
        .take(b)
        .map(|img| {
            let v: Vec<f64> = img.chunks_exact(hw).map(unbiased_var).collect();
            let mean = v.iter().sum::<f64>() / c as f64;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (c - 1) as f64;
            [var, mean]
        })
        .collect();
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            rec.push(per_image);
        }
    });
    Ok(())
}

/// Unbiased variance of `x` (at least two values), two-pass in f64.
fn unbiased_var(x: &[f32]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    x.iter()
        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
        .sum::<f64>()
        / (n - 1.0)
}

/// Runs `forward` (a backbone forward of `B` images) while recording every BatchNorm input;
/// returns its result and the features, `B` rows of `2 · n_BN` values (BatchNorms in forward
/// order, `[var, mean]` each). Recordings do not nest: an inner call records on its own and
/// the outer one resumes afterwards.
pub fn record_bn_inputs<T>(forward: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Vec<f32>>)> {
    let outer = RECORDER.with(|r| r.borrow_mut().replace(Vec::new()));
    let out = forward();
    let rec = RECORDER.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer));
    let out = out?;
    let rec = rec.unwrap_or_default();
    let b = rec.first().map(Vec::len).unwrap_or(0);
    if rec.iter().any(|layer| layer.len() != b) {
        candle_core::bail!("record_bn_inputs: BatchNorm inputs of different batch sizes");
    }
    let rows = (0..b)
        .map(|i| {
            rec.iter()
                .flat_map(|layer| [layer[i][0] as f32, layer[i][1] as f32])
                .collect()
        })
        .collect();
    Ok((out, rows))
}
