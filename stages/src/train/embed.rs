//! Embeddings of every image of a data set through a trained model.

use super::artifact::LoadedModel;
use super::trainer::batch_tensor;
use super::{FaceSource, TrainError};
use candle_core::{DType, Device};

/// Flip-sum, L2-normalised embeddings of every image of `data` (rows in data set order).
pub fn embed_all(
    model: &LoadedModel,
    data: &dyn FaceSource,
    batch: usize,
    flip: bool,
    dev: &Device,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<f32>, TrainError> {
    let (h, w, _) = data.image_shape();
    let cfg = &model.card.architecture;
    let (size, norm) = (cfg.input_size(), cfg.normalisation());
    let d = cfg.embedding_size();
    let n = data.len();
    let mut out = Vec::with_capacity(n * d);
    let mut i = 0;
    while i < n {
        let j = (i + batch).min(n);
        let raw = data.read_images(&(i..j).collect::<Vec<_>>())?;
        let x = batch_tensor(&raw, (h, w), &vec![false; j - i], size, norm, dev)?;
        let mut e = model.backbone.forward(&x, false)?;
        if flip {
            let xf = batch_tensor(&raw, (h, w), &vec![true; j - i], size, norm, dev)?;
            e = (e + model.backbone.forward(&xf, false)?)?;
        }
        let e = crate::loss::l2_normalize(&e)?.to_dtype(DType::F32)?;
        out.extend(e.flatten_all()?.to_vec1::<f32>()?);
        i = j;
        progress(i as u64, n as u64);
    }
    Ok(out)
}
