//! Layer 7: the stage kinds. Every `impl Stage`, the parsing of every kind's parameters and
//! the files each kind writes around the layers below; the only layer that talks to
//! `fpipe-engine`.

pub mod bn_finetune;
pub mod data;
pub mod evaluate;
pub mod filter;
pub mod filter_activity;
pub mod identify;
pub mod params;
pub mod quality;
pub mod train;

use fpipe_engine::{Registry, StageError};
use std::sync::Arc;

/// Adds every face-recognition stage kind to `registry`.
pub fn register_all(registry: &mut Registry) {
    registry.register(Arc::new(data::SyntheticFaces));
    registry.register(Arc::new(data::Align { pairs: false }));
    registry.register(Arc::new(data::Align { pairs: true }));
    registry.register(Arc::new(data::RecordIo));
    registry.register(Arc::new(data::WriteRecordIo));
    registry.register(Arc::new(data::VerificationBin));
    registry.register(Arc::new(data::ImageFolder));
    registry.register(Arc::new(train::TrainStage));
    registry.register(Arc::new(train::DistilStage));
    registry.register(Arc::new(train::ImportModelStage));
    registry.register(Arc::new(train::EmbedStage));
    registry.register(Arc::new(evaluate::EvaluateStage));
    registry.register(Arc::new(identify::IdentifyStage));
    registry.register(Arc::new(bn_finetune::BnFinetuneStage));
    registry.register(Arc::new(filter_activity::FilterActivityStage));
    // Said "filters", one letter from `filter` (data set filtering).
    registry.register_alias("filters", "filter-activity");
    registry.register(Arc::new(quality::QaaStage));
    registry.register(Arc::new(quality::QaaScoreStage));
    registry.register(Arc::new(filter::FilterStage));
}

// Errors of the layers below reach the engine as a stage failure with their message; an
// interrupted training run as an interruption (its checkpoint stays for the next run).
impl From<crate::train::TrainError> for StageError {
    fn from(e: crate::train::TrainError) -> Self {
        match e {
            crate::train::TrainError::Interrupted => StageError::Interrupted,
            e => StageError::msg(e.to_string()),
        }
    }
}

impl From<crate::eval::EvalError> for StageError {
    fn from(e: crate::eval::EvalError) -> Self {
        match e {
            crate::eval::EvalError::Interrupted
            | crate::eval::EvalError::Train(crate::train::TrainError::Interrupted) => {
                StageError::Interrupted
            }
            e => StageError::msg(e.to_string()),
        }
    }
}

impl From<crate::data::DataError> for StageError {
    fn from(e: crate::data::DataError) -> Self {
        StageError::Failed(e.to_string())
    }
}

/// Runs `f` in a pool of the stage's `threads` (candle's CPU kernels run on rayon).
pub(crate) fn with_threads<T: Send>(
    threads: usize,
    f: impl FnOnce() -> T + Send,
) -> Result<T, StageError> {
    crate::util::threads::with_threads(threads, f).map_err(|e| StageError::msg(e.to_string()))
}

/// The device the stage was given (`--device`, or the GPU slot the scheduler assigned).
pub(crate) fn device(ctx: &fpipe_engine::StageContext) -> Result<candle_core::Device, StageError> {
    use crate::util::device::{open, DeviceName};
    let err = |e: crate::util::device::DeviceError| StageError::msg(e.to_string());
    let name = DeviceName::parse(&ctx.device)
        .map_err(err)?
        .for_slots(&ctx.gpus);
    let shown = match name {
        DeviceName::Cpu => "cpu".to_string(),
        DeviceName::Cuda(n) => format!("cuda:{n}"),
    };
    let dev = open(name, &shown).map_err(err)?;
    if name != DeviceName::Cpu {
        ctx.log(&format!("device: {shown} (GPU slots {:?})", ctx.gpus));
    }
    Ok(dev)
}
