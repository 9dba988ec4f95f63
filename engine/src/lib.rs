//! fpipe-engine: pipeline files run as a content-addressed, cached, parallel DAG.
//!
//! The engine reads a pipeline file (YAML rendered by minijinja over its parameters), expands
//! `foreach`/`matrix` families, checks the wiring against each stage kind's declared ports and
//! parameters, computes stage keys (blake3 of kind, version, canonical parameters and input
//! artifact ids), and runs the stages whose keys are not cached, in parallel, committing their
//! outputs to an [`fpipe_cache::ArtifactStore`]. Output ids feed the keys downstream, so a
//! stage that reruns and produces the same bytes invalidates nothing after it.
//!
//! It knows nothing of faces: stage kinds come from a [`Registry`] that the binary fills.
//!
//! A stage kind declares its ports and parameters and writes its outputs where it is told:
//!
//! ```
//! use fpipe_engine::*;
//! struct Hello;
//! impl Stage for Hello {
//!     fn kind(&self) -> &'static str { "hello" }
//!     fn version(&self) -> u32 { 1 }
//!     fn signature(&self) -> StageSignature {
//!         let name = ParamSpec::with_default("name", ParamType::String, "world".into(), "who");
//!         StageSignature { inputs: vec![], outputs: vec![PortSpec::new("text", "files", "a greeting")], params: vec![name] }
//!     }
//!     fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
//!         let text = format!("hello {}\n", ctx.param_str("name")?);
//!         std::fs::write(ctx.output("text")?.join("hello.txt"), text)?;
//!         Ok(())
//!     }
//! }
//! let mut registry = Registry::with_builtins();
//! registry.register(std::sync::Arc::new(Hello));
//! assert!(registry.get("hello").is_some());
//! ```

pub mod error;
pub mod exec;
pub mod gpu;
pub mod keys;
pub mod pipeline;
pub mod plan;
pub mod records;
pub mod registry;
pub mod shell;
pub mod stage;
pub mod text;
mod util;
mod yamlpos;

pub use error::{EngineError, PipelineError};
pub use exec::{Engine, Event, Quiet, Reporter, RunOptions, RunSummary, StageStatus, Substituter};
pub use keys::{KeyParts, StageKey};
pub use pipeline::{load, Overrides, Pipeline, Published};
pub use plan::{plan, Plan};
pub use registry::Registry;
pub use stage::{
    Invocation, ParamSpec, ParamType, PortSpec, PortType, ProgressSink, Stage, StageContext,
    StageError, StageSignature, ANY,
};

/// Loads and checks a pipeline file in one step.
pub fn load_plan(
    file: &std::path::Path,
    overrides: &Overrides,
    registry: &Registry,
) -> Result<Plan, EngineError> {
    let pipeline = load(file, overrides)?;
    plan(pipeline, registry).map_err(|mut errs| {
        if errs.len() == 1 {
            EngineError::Pipeline(errs.remove(0))
        } else {
            EngineError::Pipelines(errs)
        }
    })
}
