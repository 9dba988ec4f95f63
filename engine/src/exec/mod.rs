//! Running a plan: the scheduler of `fpipe run` ([`Engine::run`], `scheduler`), the keys of
//! stages as their inputs become known (`keys`), what would run and why (`status`), and
//! computing one stage into the cache (`compute`).

mod compute;
mod ending;
mod keys;
mod scheduler;
pub mod slurm;
mod status;

pub use status::output_path;

use crate::error::{EngineError, Result};
use crate::plan::Plan;
use crate::records::{RunRecord, StageState};
use fpipe_cache::{ArtifactId, ArtifactStore, CheckDepth};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What happens to a stage, reported to a [`Reporter`] as it happens.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// The run starts `total` stages' worth of work (after cache checks, some will be cached).
    Begin { total: usize },
    /// A stage starts computing.
    Start {
        name: &'a str,
        kind: &'a str,
        reason: &'a str,
    },
    /// Another process holds the stage's key; waiting for it.
    Waiting { name: &'a str },
    Progress {
        name: &'a str,
        done: u64,
        total: u64,
        message: &'a str,
    },
    /// A stage ended (ran, cached, failed, skipped, interrupted).
    Finish {
        name: &'a str,
        state: StageState,
        seconds: f64,
        error: Option<&'a str>,
    },
    /// Something the user should know that does not stop the run (said once per run).
    Warning { message: &'a str },
}

/// Receives [`Event`]s (the terminal display, or nothing in tests).
pub trait Reporter: Send + Sync {
    fn event(&self, e: Event<'_>);
}

/// A reporter that shows nothing.
pub struct Quiet;
impl Reporter for Quiet {
    fn event(&self, _: Event<'_>) {}
}

/// A second place where the results of stage keys may already exist (a remote cache). The
/// scheduler asks it for a key the local store lacks just before that stage would compute,
/// so a stage whose key is only known once its inputs were computed here is still found;
/// the engine knows nothing of where it looks.
pub trait Substituter: Send + Sync {
    /// Brings the action record of `key`, and the artifacts it names, into `store` when it
    /// has them; true when the record is now in `store`. An error is shown as a warning and
    /// the stage computes.
    fn substitute(&self, store: &ArtifactStore, key: &str) -> std::result::Result<bool, String>;
}

/// Options of `fpipe run` and `fpipe status`.
#[derive(Clone)]
pub struct RunOptions {
    /// Job slots.
    pub jobs: usize,
    /// GPU slots (ids 0..gpus).
    pub gpus: usize,
    /// Run only these stages and what they need (empty: all).
    pub targets: Vec<String>,
    /// Recompute these stages even if cached.
    pub force: Vec<String>,
    /// `--device`, handed to stages.
    pub device: String,
    /// Set to stop the run (Ctrl-C).
    pub cancel: Arc<AtomicBool>,
    /// How the input artifacts of a stage are checked before it computes: a `stat` per file
    /// against the fingerprint taken when they were stored (rehashing what differs), or a
    /// full rehash. Default: `Full` when the environment sets `FPIPE_VERIFY_INPUTS` to
    /// `full` (or `1`, `yes`, `true`), else `Stat`.
    pub verify_inputs: CheckDepth,
    /// Asked for each key the local store lacks before its stage computes (`--remote`).
    pub substituter: Option<Arc<dyn Substituter>>,
    /// Where stages compute: here, or as cluster jobs.
    pub executor: Executor,
}

/// Where the stages of a run compute.
#[derive(Clone, Debug, Default)]
pub enum Executor {
    /// On this machine: threads and child processes, within the job and GPU slots.
    #[default]
    Local,
    /// Each stage one Slurm job (`jobs` then bounds the jobs in flight at once).
    Slurm(slurm::SlurmOptions),
}

/// The input check asked for by `FPIPE_VERIFY_INPUTS`.
pub fn verify_inputs_from_env() -> CheckDepth {
    match std::env::var("FPIPE_VERIFY_INPUTS")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "full" | "1" | "yes" | "true" | "always" => CheckDepth::Full,
        _ => CheckDepth::Stat,
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            gpus: 0,
            targets: vec![],
            force: vec![],
            device: "cpu".into(),
            cancel: Arc::new(AtomicBool::new(false)),
            verify_inputs: verify_inputs_from_env(),
            substituter: None,
            executor: Executor::Local,
        }
    }
}

/// What `status` says about one stage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageStatus {
    pub name: String,
    pub kind: String,
    /// Known when all inputs are known (cached upstream).
    pub key: Option<String>,
    pub will_run: bool,
    /// "cached", "new", "param lr: 0.1 -> 0.05", "input teacher.model changed", ...
    pub reason: String,
    pub outputs: BTreeMap<String, ArtifactId>,
    /// Where the cached result came from when it was pulled or pushed from another cache
    /// (`{"pulled_from": DIR, "at": TIME}`); absent for results computed here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Value>,
}

/// A stage computed again by [`Engine::recompute`].
#[derive(Debug, Clone)]
pub struct Recomputed {
    /// The stage's key (its inputs resolved from the cache).
    pub key: String,
    /// The output ids it computed now.
    pub outputs: BTreeMap<String, ArtifactId>,
    /// Its log.
    pub log: PathBuf,
}

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub record: RunRecord,
    pub ran: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: bool,
    pub seconds: f64,
    /// Whether the run record was saved (false on a cache that cannot be written).
    pub recorded: bool,
}

impl RunSummary {
    /// `ran N, cached M, failed F in T s`.
    pub fn line(&self) -> String {
        format!(
            "ran {}, cached {}, failed {} in {:.2} s",
            self.ran, self.cached, self.failed, self.seconds
        )
    }
}

/// The engine: a store and the stage kinds.
pub struct Engine {
    pub store: ArtifactStore,
    pub registry: crate::Registry,
}

impl Engine {
    /// The stages a run or status covers (the targets and what they need, or all), in
    /// topological order, and the ones to recompute anyway.
    fn selected(&self, plan: &Plan, opts: &RunOptions) -> Result<(Vec<usize>, HashSet<usize>)> {
        let find = |n: &str| {
            plan.find(n).ok_or_else(|| {
                EngineError::Pipeline(
                    crate::PipelineError::new(
                        &plan.pipeline.file,
                        format!("no stage `{n}` in this pipeline"),
                    )
                    .hint(format!(
                        "stages: {}",
                        plan.stages
                            .iter()
                            .map(|s| s.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                )
            })
        };
        let targets: Vec<usize> = opts
            .targets
            .iter()
            .map(|t| find(t))
            .collect::<Result<_>>()?;
        let order = if targets.is_empty() {
            plan.order.clone()
        } else {
            plan.with_ancestors(&targets)
        };
        let force = opts.force.iter().map(|t| find(t)).collect::<Result<_>>()?;
        Ok((order, force))
    }
}
