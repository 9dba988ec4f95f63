//! fpipe-stages: the face-recognition stage kinds of fpipe.
//!
//! Data formats and the packed data set, alignment, backbones and losses on candle,
//! training, distillation, evaluation, data set filtering. Each stage kind implements
//! [`fpipe_engine::Stage`] and is added by [`register_all`]. Nothing here knows about
//! scheduling or caching beyond the directories a [`fpipe_engine::StageContext`] hands over.

pub mod data;
pub mod filter;
pub mod loss;
pub mod metrics;
pub mod models;
pub mod quality;
pub mod train;

/// Adds every face-recognition stage kind to `registry`.
pub fn register_all(registry: &mut fpipe_engine::Registry) {
    data::register(registry);
    train::register(registry);
    quality::register(registry);
    filter::register(registry);
}
