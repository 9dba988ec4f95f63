//! fpipe-engine: pipeline files run as a content-addressed, cached, parallel DAG.
//!
//! The engine reads a pipeline file (YAML rendered by minijinja over its parameters), expands
//! `foreach`/`matrix` families, checks the wiring against each stage kind's declared ports and
//! parameters, computes stage keys (blake3 of kind, version, canonical parameters and input
//! artifact ids), and runs the stages whose keys are not cached, in parallel, committing their
//! outputs to an [`fpipe_cache::ArtifactStore`].
//!
//! It knows nothing of faces: stage kinds come from a [`Registry`] that the binary fills.

pub mod registry;
pub mod shell;
pub mod stage;
mod util;

pub use registry::Registry;
pub use stage::{
    ParamSpec, ParamType, PortSpec, PortType, ProgressSink, Stage, StageContext, StageError,
    StageSignature, ANY,
};
