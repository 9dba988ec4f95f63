//! Layer 5: training. The loop is in [`trainer`] (arcface_torch's shape: the backbone, the
//! margin head and the optimiser are built from the config and handed in), the optimisers in
//! [`optim`], batch order in [`sampler`], CRAFT filter reactivation in [`reactivation`], model
//! artifacts (weights, model card, class centres) and curves in [`artifact`], embedding a
//! data set with a trained model in [`embed`].

pub mod artifact;
pub mod embed;
pub mod loader;
pub mod optim;
pub mod reactivation;
pub mod sampler;
pub mod trainer;

use crate::data::{DataError, PackedDataset};
use crate::loss::LossError;
use crate::models::{ModelError, ParamStore};
use std::path::Path;

/// Errors of training, embedding and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Model construction or checkpoint error.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Margin configuration error.
    #[error(transparent)]
    Loss(#[from] LossError),
    /// Data set error.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The device named by the stage cannot be used.
    #[error(transparent)]
    Device(#[from] crate::util::device::DeviceError),
    /// File system error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// JSON error.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The loss became NaN or infinite.
    #[error(
        "loss is not finite ({loss}) at step {step}: lower the learning rate, enable grad_clip, \
         or check the data"
    )]
    NonFinite { step: u64, loss: f64 },
    /// A parameter or input is unusable.
    #[error("{0}")]
    Invalid(String),
    /// Cancelled by the user; the checkpoint stays in scratch.
    #[error("interrupted")]
    Interrupted,
}

/// Images with identity labels, as training reads them. Implemented by the memory-mapped
/// [`PackedDataset`]; tests may implement it in memory.
pub trait FaceSource: Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// True when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of identity classes (labels are `0..num_classes`).
    fn num_classes(&self) -> usize;
    /// `(height, width, 3)` of every image.
    fn image_shape(&self) -> (usize, usize, usize);
    /// Label of image `i`.
    fn label(&self, i: usize) -> u32;
    /// Copies image `i` (HWC RGB u8) into `out`.
    fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), TrainError>;
    /// Images `indices` (HWC RGB u8 each), read in parallel.
    fn read_images(&self, indices: &[usize]) -> Result<Vec<Vec<u8>>, TrainError> {
        use rayon::prelude::*;
        let (h, w, c) = self.image_shape();
        indices
            .par_iter()
            .map(|&i| {
                let mut buf = vec![0u8; h * w * c];
                self.read_image(i, &mut buf).map(|_| buf)
            })
            .collect()
    }
}

impl FaceSource for PackedDataset {
    fn len(&self) -> usize {
        PackedDataset::len(self)
    }
    fn num_classes(&self) -> usize {
        PackedDataset::num_classes(self)
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        PackedDataset::image_shape(self)
    }
    fn label(&self, i: usize) -> u32 {
        PackedDataset::label(self, i).max(0) as u32
    }
    fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), TrainError> {
        Ok(PackedDataset::read_image(self, i, out)?)
    }
}

/// Loads backbone weights into `store` under `prefix` from a model artifact directory (its
/// `model.safetensors`), a `.safetensors` file, or a PyTorch `.pth`/`.pt` state dict.
pub fn load_model_weights(store: &ParamStore, prefix: &str, path: &Path) -> Result<(), TrainError> {
    if path.is_dir() {
        store.load(prefix, &path.join(artifact::WEIGHTS))?;
        return Ok(());
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => store.load(prefix, path)?,
        Some("pth") | Some("pt") | Some("bin") => store.load_pth(prefix, path)?,
        _ => {
            return Err(TrainError::Invalid(format!(
                "{}: expected a model directory, .safetensors or .pth",
                path.display()
            )))
        }
    }
    Ok(())
}
