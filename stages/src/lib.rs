//! fpipe-stages: the face-recognition stage kinds of fpipe.
//!
//! Layers, each importing only those above it in this list (`tests/layers.rs` fails on an
//! import that runs the other way):
//!
//! 1. [`util`]: the one seeded random generator, device names, thread pools, a PNG canvas.
//! 2. [`data`]: the packed data set, readers and writers of the field's formats, synthetic
//!    faces, alignment.
//! 3. [`models`]: the backbones (one file each) on `fpipe-kernels`' CPU ops.
//! 4. [`loss`]: margin heads, softmax and triplet objectives, distillation losses.
//! 5. [`train`]: the training loop, optimisers, sampler, CRAFT reactivation, model artifacts.
//! 6. [`eval`]: verification, identification metrics, IJB, quality assessment, data set
//!    filtering, BatchNorm fine-tuning.
//! 7. [`kinds`]: every `impl fpipe_engine::Stage`, all parameter parsing, [`register_all`];
//!    the only layer that talks to `fpipe-engine`.
//!
//! Nothing here knows about scheduling or caching beyond the directories a
//! [`fpipe_engine::StageContext`] hands over.

pub mod data;
pub mod eval;
pub mod kinds;
pub mod loss;
pub mod models;
pub mod train;
pub mod util;

pub use kinds::register_all;
