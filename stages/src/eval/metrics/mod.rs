//! Face-verification metrics: insightface's 10-fold accuracy, ROC, TPR at fixed FPR, AUC,
//! EER, IJB-style template pooling, the error-versus-reject curve (docs/methods.md §6, §9) and
//! 1:N identification (exact k-NN search, CMC, DIR at FPIR).
//!
//! Everything here is exact (no binning of scores) and scales to tens of millions of pairs:
//! the ROC is one parallel sort of packed `(score, label)` keys, the 10-fold protocol one pass
//! over the distances into per-fold histograms over the 400 thresholds.

mod erc;
mod identify;
mod roc;
mod templates;
mod verification;

pub use erc::{error_vs_reject, ErcCurve};
pub use identify::{
    cmc, dir_at_fpir, identify, knn_predict, search, split_gallery_probe, DirPoint, Identification,
    IdentifyConfig, ProbeOutcome, Split, Vote,
};
pub use roc::{auc, eer, roc, tpr_at_fpr, Roc, IJB_FPRS};
pub use templates::{flip_sum_normalize, pair_scores_cosine, pool_templates, PooledTemplates};
pub use verification::{pair_distances, verification_10fold, Verification};

/// Errors of the metric functions: inputs that cannot give a meaningful number.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricError {
    /// Two inputs that must match in length do not.
    #[error("{what}: lengths differ ({a} vs {b})")]
    Length {
        what: &'static str,
        a: usize,
        b: usize,
    },
    /// A score or distance is NaN.
    #[error("{what}: value {index} is NaN")]
    NaN { what: &'static str, index: usize },
    /// The labels hold no positive or no negative pair.
    #[error("{0}: needs at least one same-identity and one different-identity pair")]
    OneClass(&'static str),
    /// Anything else that makes the input unusable.
    #[error("{0}")]
    Invalid(String),
}
