//! Layer 6: evaluation and what is decided by it. Verification on pairs ([`verify`]) and
//! IJB-B/C templates ([`ijb`]) over the metrics in [`metrics`]; face-image quality
//! assessment ([`quality`]); data set filtering by clustering ([`filter`]); BatchNorm
//! fine-tuning ([`bn_finetune`]), here rather than in `train` because it keeps the snapshot
//! that verifies best.

pub mod bn_finetune;
pub mod filter;
pub mod ijb;
pub mod metrics;
pub mod quality;
pub mod verify;

use std::path::PathBuf;

/// Errors of evaluation, quality assessment, filtering and BatchNorm fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Loading the model or embedding the images failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// Reading a data set failed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A metric cannot be computed on these scores (for example no impostor pairs).
    #[error(transparent)]
    Metric(#[from] metrics::MetricError),
    /// The quality regressor cannot be fitted or applied.
    #[error(transparent)]
    Gbt(#[from] quality::gbt::GbtError),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A model's weights do not fit what is asked of them.
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    /// File system error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A JSON file that cannot be written or read.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A file that cannot be read or lacks what it must hold.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A line of a protocol file (IJB) that cannot be read.
    #[error("{}: line {line}: {msg}", path.display())]
    Protocol {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// Inputs that do not fit together (model and data set, pairs and quality scores).
    #[error("{0}")]
    Mismatch(String),
    /// Settings that cannot run, or an empty input.
    #[error("{0}")]
    Config(String),
    /// Cancelled by the user.
    #[error("interrupted")]
    Interrupted,
}

impl EvalError {
    fn file(path: &std::path::Path, msg: impl std::fmt::Display) -> Self {
        EvalError::File {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }
}
