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
