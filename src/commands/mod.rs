//! One module per group of subcommands, one function per subcommand; `dispatch` only picks.

mod artifacts;
mod cache;
mod remote;
mod report;
mod run;
pub mod slurm;
mod stages;
mod validate;

use crate::{
    CacheArgs, CacheCommand, Cli, Command, DagArgs, GcArgs, InspectArgs, OutArgs, PipelineArgs,
    RunArgs, ShowArgs, StagesArgs, StatusArgs, ValidateArgs,
};
use anyhow::{anyhow, bail, Context, Result};
use fpipe_cache::{ActionRecord, ArtifactId, ArtifactStore};
use fpipe_engine::records::{PipelineState, RunRecord, StageState};
use fpipe_engine::{Engine, Overrides, Plan, Registry, Reporter, RunOptions};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A command-line choice that cannot work here: reported with exit status 2, nothing run.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

pub(super) fn registry() -> Registry {
    #[allow(unused_mut)]
    let mut r = Registry::with_builtins();
    #[cfg(feature = "faces")]
    fpipe_stages::register_all(&mut r);
    r
}

/// The cache: --cache / FPIPE_CACHE, else `.fpipe/` beside the pipeline file, else `./.fpipe`.
pub(super) fn cache_dir(cli_cache: &Option<PathBuf>, file: Option<&Path>) -> PathBuf {
    if let Some(c) = cli_cache {
        return c.clone();
    }
    match file.and_then(|f| f.parent()) {
        Some(p) if !p.as_os_str().is_empty() => p.join(".fpipe"),
        _ => PathBuf::from(".fpipe"),
    }
}

pub(super) fn open_store(dir: &Path) -> Result<ArtifactStore> {
    ArtifactStore::open(dir).with_context(|| format!("opening cache {}", dir.display()))
}

pub(super) fn overrides(p: &PipelineArgs) -> Overrides {
    Overrides {
        files: p.params_files.clone(),
        pairs: p.params.clone(),
    }
}

pub(super) fn load(p: &PipelineArgs, registry: &Registry) -> Result<Plan> {
    let plan =
        crate::budget::while_loading(|| fpipe_engine::load_plan(&p.file, &overrides(p), registry))?;
    for w in &plan.warnings {
        say_err!(
            "warning: {}",
            fpipe_engine::text::visible(&w.to_string(), true)
        );
    }
    Ok(plan)
}

/// Runs the subcommand `cli` names.
pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    let registry = registry();
    let cache = &cli.cache;
    match cli.command {
        Command::Run(args) => run::run(cache, registry, args),
        Command::Status(args) => run::status(cache, registry, args),
        Command::Validate(args) => validate::validate(registry, args),
        Command::Dag(args) => validate::dag(registry, args),
        Command::Out(args) => artifacts::out(cache, registry, args),
        Command::Inspect(args) => artifacts::inspect(cache, registry, args),
        Command::Show(args) => artifacts::show(cache, args),
        Command::Gc(args) => cache::gc(cache, args),
        Command::Cache(args) => cache::cache(cache, registry, args),
        Command::Stages(args) => stages::stages(registry, args),
        Command::Report(args) => report::report(cache, registry, args),
        Command::SlurmJob(args) => slurm::job(registry, args),
    }
}
