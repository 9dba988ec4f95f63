//! Running a plan: the scheduler ([`Engine::run`]), what would run and why
//! ([`status`]), and computing one stage into the cache ([`compute`]).

mod compute;
mod status;

use compute::{metrics_of, sources};
use status::explain;
pub use status::output_path;

use crate::error::{EngineError, Result};
use crate::keys::KeyParts;
use crate::plan::{Plan, PlannedStage};
use crate::records::{
    iso8601, now_unix, PipelineState, RunRecord, RunStatus, StageMemory, StageRecord, StageState,
};
use crate::stage::{ProgressSink, StageContext, StageError};
use fpipe_cache::{ActionRecord, ArtifactId, ArtifactStore, CacheError, CheckDepth, PathHasher};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

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

enum Known {
    Outputs(BTreeMap<String, ArtifactId>),
    Pending,
    Failed,
}

impl Engine {
    /// Builds the key parts of a stage whose inputs are known.
    pub(super) fn parts(
        &self,
        ps: &PlannedStage,
        inputs: Vec<(String, ArtifactId)>,
        hasher: &PathHasher,
    ) -> Result<KeyParts> {
        let mut params = ps.key_params.clone();
        for (name, paths) in &ps.path_params {
            if !params.contains_key(name) {
                continue; // volatile
            }
            let companions = ps.companions.get(name).copied().unwrap_or(&[]);
            let mut ids = Vec::new();
            for p in paths {
                let id = hasher.hash_path(p).map_err(|e| {
                    EngineError::Pipeline(ps.def.err(format!("parameter `{name}`: {e}")))
                })?;
                let mut entry = json!({ "content": id.to_hex() });
                for ext in companions {
                    let c = p.with_extension(ext);
                    if c.exists() {
                        let cid = hasher.hash_path(&c).map_err(|e| {
                            EngineError::Pipeline(ps.def.err(format!("parameter `{name}`: {e}")))
                        })?;
                        entry[*ext] = Value::String(cid.to_hex());
                    }
                }
                ids.push(entry);
            }
            let v = match params.get(name) {
                Some(Value::Array(_)) => Value::Array(ids),
                _ => ids.into_iter().next().unwrap_or(Value::Null),
            };
            params.insert(name.clone(), v);
        }
        Ok(KeyParts {
            kind: ps.kind.kind().to_string(),
            version: ps.kind.version(),
            params,
            inputs,
        })
    }
    pub(super) fn selected(
        &self,
        plan: &Plan,
        opts: &RunOptions,
    ) -> Result<(Vec<usize>, HashSet<usize>)> {
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
    /// Runs the pipeline: stages whose keys are cached are skipped, the others run in
    /// parallel up to the job and GPU slots. A failing stage stops what depends on it; the
    /// rest finish.
    pub fn run(
        &self,
        plan: &Plan,
        opts: &RunOptions,
        reporter: &Arc<dyn Reporter>,
    ) -> Result<RunSummary> {
        let _store_lock = match self.store.lock_shared() {
            Ok(lock) => Some(lock),
            // Someone else's cache, or a read-only mount: a fully cached run only reads it.
            Err(e) if e.is_read_only() => {
                reporter.event(Event::Warning {
                    message: &format!(
                        "cannot lock the cache ({e}); it is not writable, so this run only reads it"
                    ),
                });
                None
            }
            Err(e) => return Err(e.into()),
        };
        let (order, force) = self.selected(plan, opts)?;
        let started = now_unix();
        let clock = Instant::now();
        let run_id = format!(
            "{}-{}",
            iso8601(started).replace([':', '-'], ""),
            std::process::id()
        );
        let run_dir = RunRecord::dir(&self.store, &run_id);
        let log_dir = run_dir.join("logs");
        // A cache that cannot be written still serves a fully cached run: warn once that the
        // run is not recorded, and let a stage that must compute say what to do.
        let mut recording = true;
        let not_recorded = |e: &dyn std::fmt::Display| {
            reporter.event(Event::Warning {
                message: &format!(
                    "the cache is not writable ({e}): this run is not recorded (`fpipe show` and `fpipe out` will not see it)"
                ),
            });
            false
        };
        if let Err(e) = std::fs::create_dir_all(&log_dir) {
            let e = CacheError::Io {
                path: log_dir.clone(),
                error: e,
            };
            if !e.is_read_only() {
                return Err(e.into());
            }
            recording = not_recorded(&e);
        }
        let mut record = RunRecord {
            id: run_id.clone(),
            pipeline: plan.pipeline.file.clone(),
            pipeline_name: plan.pipeline.name.clone(),
            params: plan.pipeline.params.clone(),
            started: iso8601(started),
            started_unix: started,
            seconds: 0.0,
            status: RunStatus::Running,
            device: opts.device.clone(),
            jobs: opts.jobs,
            stages: vec![],
        };
        if recording {
            if let Err(e) = record.save(&self.store) {
                if !e.is_read_only() {
                    return Err(e.into());
                }
                recording = not_recorded(&e);
            }
        }
        let verified = Mutex::new(HashSet::new());
        let hasher = PathHasher::with_memo(&self.store.memo_path());
        let mut memory = PipelineState::load(&self.store, &plan.pipeline.file);
        memory.pipeline = plan.pipeline.file.clone();
        memory.params = plan.pipeline.params.clone();
        reporter.event(Event::Begin { total: order.len() });

        let n = plan.stages.len();
        let mut known: Vec<Option<Known>> = (0..n).map(|_| None).collect();
        let mut recs: BTreeMap<usize, StageRecord> = BTreeMap::new();
        let mut launched = vec![false; n];
        let jobs = opts.jobs.max(1);
        let mut cpu_free = jobs;
        let mut gpu_free: Vec<usize> = (0..opts.gpus).collect();
        let mut running = 0usize;
        let (tx, rx) = mpsc::channel::<(usize, Outcome, Vec<usize>, usize)>();

        std::thread::scope(|scope| -> Result<()> {
            loop {
                let cancelled = opts.cancel.load(Ordering::Relaxed);
                // Launch (or resolve from cache) every ready stage, in topological order.
                let mut progressed = true;
                while progressed && !cancelled {
                    progressed = false;
                    for &i in &order {
                        if launched[i] {
                            continue;
                        }
                        let ps = &plan.stages[i];
                        if ps
                            .wires
                            .iter()
                            .any(|w| matches!(known[w.from], Some(Known::Failed)))
                        {
                            launched[i] = true;
                            known[i] = Some(Known::Failed);
                            recs.insert(i, stage_record(ps, None, StageState::Skipped, 0.0, None));
                            reporter.event(Event::Finish {
                                name: ps.name(),
                                state: StageState::Skipped,
                                seconds: 0.0,
                                error: None,
                            });
                            progressed = true;
                            continue;
                        }
                        // Cheap readiness check first: this loop rescans on every event.
                        if !ps
                            .wires
                            .iter()
                            .all(|w| matches!(known[w.from], Some(Known::Outputs(_))))
                        {
                            continue;
                        }
                        let (inputs, pending) = gather_inputs(plan, ps, &known);
                        if !pending.is_empty() {
                            continue;
                        }
                        let parts = match self.parts(ps, inputs, &hasher) {
                            Ok(p) => p,
                            Err(e) => {
                                launched[i] = true;
                                known[i] = Some(Known::Failed);
                                let msg = e.to_string();
                                reporter.event(Event::Finish {
                                    name: ps.name(),
                                    state: StageState::Failed,
                                    seconds: 0.0,
                                    error: Some(&msg),
                                });
                                let mut r = stage_record(ps, None, StageState::Failed, 0.0, None);
                                r.error = Some(msg);
                                recs.insert(i, r);
                                progressed = true;
                                continue;
                            }
                        };
                        let key = parts.key();
                        let forced = force.contains(&i);
                        if !forced {
                            if let Some(rec) = self.store.action(&key)? {
                                launched[i] = true;
                                memory.stages.insert(
                                    ps.name().to_string(),
                                    StageMemory {
                                        parts,
                                        key: key.clone(),
                                        outputs: rec.outputs.clone(),
                                    },
                                );
                                let mut r =
                                    stage_record(ps, Some(&key), StageState::Cached, 0.0, None);
                                r.outputs = rec.outputs.clone();
                                r.metrics = metrics_of(&rec.meta);
                                r.origin = rec.meta.get("origin").cloned();
                                recs.insert(i, r);
                                known[i] = Some(Known::Outputs(rec.outputs));
                                reporter.event(Event::Finish {
                                    name: ps.name(),
                                    state: StageState::Cached,
                                    seconds: 0.0,
                                    error: None,
                                });
                                progressed = true;
                                continue;
                            }
                        }
                        // Needs computing: take slots.
                        let cpus = ps.resources.cpu.clamp(1, jobs);
                        let gpus_wanted = ps.resources.gpu.min(opts.gpus);
                        if cpus > cpu_free || gpus_wanted > gpu_free.len() {
                            continue;
                        }
                        launched[i] = true;
                        cpu_free -= cpus;
                        let gpus: Vec<usize> = gpu_free.drain(..gpus_wanted).collect();
                        running += 1;
                        let reason = if forced {
                            "forced (--force)".to_string()
                        } else {
                            explain(plan, ps, &parts, &key, memory.stages.get(ps.name()))
                        };
                        let inputs: BTreeMap<String, PathBuf> = ps
                            .wires
                            .iter()
                            .filter_map(|w| match &known[w.from] {
                                Some(Known::Outputs(o)) => o
                                    .get(&w.from_port)
                                    .map(|id| (w.port.clone(), self.store.object_path(id))),
                                _ => None,
                            })
                            .collect();
                        let tx = tx.clone();
                        let log = log_dir.join(format!("{}.log", ps.name()));
                        let job = Job {
                            ps,
                            key,
                            sources: sources(plan, ps, &parts),
                            parts,
                            reason,
                            inputs,
                            log,
                            gpus: gpus.clone(),
                            threads: cpus,
                            forced,
                            publish: true,
                            verified: &verified,
                        };
                        scope.spawn(move || {
                            let outcome = self.execute(&job, opts, reporter);
                            let _ = tx.send((i, outcome, gpus, cpus));
                        });
                        progressed = true;
                    }
                }
                if running == 0 {
                    break;
                }
                let Ok((i, outcome, gpus, cpus)) = rx.recv() else {
                    break;
                };
                running -= 1;
                cpu_free += cpus;
                gpu_free.extend(gpus);
                gpu_free.sort();
                let ps = &plan.stages[i];
                match outcome {
                    Outcome::Done {
                        key,
                        parts,
                        outputs,
                        metrics,
                        seconds,
                        ran,
                        reason,
                        log,
                    } => {
                        let state = if ran {
                            StageState::Ran
                        } else {
                            StageState::Cached
                        };
                        memory.stages.insert(
                            ps.name().to_string(),
                            StageMemory {
                                parts,
                                key: key.clone(),
                                outputs: outputs.clone(),
                            },
                        );
                        let mut r = stage_record(ps, Some(&key), state, seconds, Some(log));
                        r.outputs = outputs.clone();
                        r.metrics = metrics;
                        r.reason = ran.then_some(reason);
                        recs.insert(i, r);
                        known[i] = Some(Known::Outputs(outputs));
                        reporter.event(Event::Finish {
                            name: ps.name(),
                            state,
                            seconds,
                            error: None,
                        });
                    }
                    Outcome::Failed {
                        key,
                        message,
                        seconds,
                        log,
                        interrupted,
                    } => {
                        let state = if interrupted {
                            StageState::Interrupted
                        } else {
                            StageState::Failed
                        };
                        known[i] = Some(Known::Failed);
                        // A stage stopped before it started (damaged input, read-only
                        // cache) may have no log to point at.
                        let log = log.exists().then_some(log);
                        let mut r = stage_record(ps, Some(&key), state, seconds, log);
                        r.error = Some(message.clone());
                        recs.insert(i, r);
                        reporter.event(Event::Finish {
                            name: ps.name(),
                            state,
                            seconds,
                            error: Some(&message),
                        });
                    }
                }
            }
            Ok(())
        })?;
        let _ = hasher.save();

        let interrupted = opts.cancel.load(Ordering::Relaxed);
        for &i in &order {
            recs.entry(i).or_insert_with(|| {
                stage_record(&plan.stages[i], None, StageState::NotRun, 0.0, None)
            });
        }
        record.stages = order.iter().filter_map(|i| recs.remove(i)).collect();
        let count = |s: StageState| record.stages.iter().filter(|r| r.state == s).count();
        let (ran, cached, failed, skipped) = (
            count(StageState::Ran),
            count(StageState::Cached),
            count(StageState::Failed),
            count(StageState::Skipped),
        );
        let seconds = clock.elapsed().as_secs_f64();
        record.seconds = seconds;
        record.status = if interrupted || count(StageState::Interrupted) > 0 {
            RunStatus::Interrupted
        } else if failed > 0 {
            RunStatus::Failed
        } else {
            RunStatus::Ok
        };
        if recording {
            record.save(&self.store)?;
            memory.save(&self.store, &plan.pipeline.file)?;
        }
        Ok(RunSummary {
            interrupted: record.status == RunStatus::Interrupted,
            record,
            ran,
            cached,
            failed,
            skipped,
            seconds,
        })
    }
}

fn stage_record(
    ps: &PlannedStage,
    key: Option<&str>,
    state: StageState,
    seconds: f64,
    log: Option<PathBuf>,
) -> StageRecord {
    StageRecord {
        name: ps.name().to_string(),
        kind: ps.def.uses.clone(),
        version: ps.kind.version(),
        key: key.map(str::to_string),
        state,
        seconds,
        outputs: BTreeMap::new(),
        metrics: BTreeMap::new(),
        log,
        error: None,
        reason: None,
        origin: None,
    }
}

/// Input ids of a stage whose producers are known; otherwise the pending input names.
fn gather_inputs(
    plan: &Plan,
    ps: &PlannedStage,
    known: &[Option<Known>],
) -> (Vec<(String, ArtifactId)>, Vec<String>) {
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    for w in &ps.wires {
        let from = plan.stages[w.from].name();
        match &known[w.from] {
            Some(Known::Outputs(o)) => match o.get(&w.from_port) {
                Some(id) => ids.push((w.port.clone(), *id)),
                None => pending.push(format!("{}.{}", from, w.from_port)),
            },
            _ => pending.push(format!("{}.{}", from, w.from_port)),
        }
    }
    (ids, pending)
}

struct Job<'a> {
    ps: &'a PlannedStage,
    key: String,
    parts: KeyParts,
    /// Each input as (port, `stage.port` it comes from, artifact id), for the input check.
    sources: Vec<(String, String, ArtifactId)>,
    reason: String,
    inputs: BTreeMap<String, PathBuf>,
    log: PathBuf,
    gpus: Vec<usize>,
    threads: usize,
    forced: bool,
    /// Write the action record (false when recomputing to check someone else's).
    publish: bool,
    /// Input artifacts already rehashed in this run.
    verified: &'a Mutex<HashSet<ArtifactId>>,
}

enum Outcome {
    Done {
        key: String,
        parts: KeyParts,
        outputs: BTreeMap<String, ArtifactId>,
        metrics: BTreeMap<String, f64>,
        seconds: f64,
        ran: bool,
        reason: String,
        log: PathBuf,
    },
    Failed {
        key: String,
        message: String,
        seconds: f64,
        log: PathBuf,
        interrupted: bool,
    },
}
