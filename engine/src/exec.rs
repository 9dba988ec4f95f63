//! Status and execution: keys, cache lookups, the parallel scheduler, run records.

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
    fn parts(
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

    /// Pipeline parameters that differ from the last run of this pipeline with this cache,
    /// as `name: old -> new` (dotted names for nested ones).
    pub fn param_changes(&self, plan: &Plan) -> Vec<String> {
        let memory = PipelineState::load(&self.store, &plan.pipeline.file);
        if memory.stages.is_empty() {
            return vec![];
        }
        let mut out = Vec::new();
        diff_values("", &memory.params, &plan.pipeline.params, &mut out);
        out
    }

    /// What `fpipe run` would do, and why, without running anything.
    pub fn status(&self, plan: &Plan, opts: &RunOptions) -> Result<Vec<StageStatus>> {
        let (order, force) = self.selected(plan, opts)?;
        let hasher = PathHasher::with_memo(&self.store.memo_path());
        let memory = PipelineState::load(&self.store, &plan.pipeline.file);
        let mut known: Vec<Option<Known>> = (0..plan.stages.len()).map(|_| None).collect();
        let mut out = Vec::new();
        for i in order {
            let ps = &plan.stages[i];
            let (inputs, pending) = gather_inputs(plan, ps, &known);
            let mem = memory.stages.get(ps.name());
            let st = if !pending.is_empty() {
                known[i] = Some(Known::Pending);
                StageStatus {
                    name: ps.name().to_string(),
                    kind: ps.def.uses.clone(),
                    key: None,
                    will_run: true,
                    reason: match mem {
                        None => "new".into(),
                        Some(_) => format!("input {} will be recomputed", pending.join(", ")),
                    },
                    outputs: BTreeMap::new(),
                    origin: None,
                }
            } else {
                let parts = self.parts(ps, inputs, &hasher)?;
                let key = parts.key();
                let cached = if force.contains(&i) {
                    None
                } else {
                    self.store.action(&key)?
                };
                match cached {
                    Some(rec) => {
                        known[i] = Some(Known::Outputs(rec.outputs.clone()));
                        StageStatus {
                            name: ps.name().to_string(),
                            kind: ps.def.uses.clone(),
                            key: Some(key),
                            will_run: false,
                            reason: "cached".into(),
                            origin: rec.meta.get("origin").cloned(),
                            outputs: rec.outputs,
                        }
                    }
                    None => {
                        known[i] = Some(Known::Pending);
                        let reason = if force.contains(&i) {
                            "forced (--force)".to_string()
                        } else {
                            explain(plan, ps, &parts, &key, mem)
                        };
                        StageStatus {
                            name: ps.name().to_string(),
                            kind: ps.def.uses.clone(),
                            key: Some(key),
                            will_run: true,
                            reason,
                            outputs: BTreeMap::new(),
                            origin: None,
                        }
                    }
                }
            };
            out.push(st);
        }
        let _ = hasher.save();
        Ok(out)
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

    fn execute(&self, job: &Job<'_>, opts: &RunOptions, reporter: &Arc<dyn Reporter>) -> Outcome {
        let t0 = Instant::now();
        let ps = job.ps;
        let fail = |message: String, interrupted: bool| Outcome::Failed {
            key: job.key.clone(),
            message,
            seconds: t0.elapsed().as_secs_f64(),
            log: job.log.clone(),
            interrupted,
        };
        // One process computes a key at a time; others wait, then reuse its result.
        let lock = match self.store.try_lock_key(&job.key) {
            Ok(Some(l)) => l,
            Ok(None) => {
                reporter.event(Event::Waiting { name: ps.name() });
                match self.store.lock_key(&job.key) {
                    Ok(l) => l,
                    Err(e) => return fail(self.store_error(&e), false),
                }
            }
            Err(e) => return fail(self.store_error(&e), false),
        };
        if !job.forced {
            if let Ok(Some(rec)) = self.store.action(&job.key) {
                return Outcome::Done {
                    key: job.key.clone(),
                    parts: job.parts.clone(),
                    outputs: rec.outputs,
                    metrics: metrics_of(&rec.meta),
                    seconds: 0.0,
                    ran: false,
                    reason: job.reason.clone(),
                    log: job.log.clone(),
                };
            }
        }
        // Never compute from damaged bytes: the wrong result would be cached under a key
        // that says it came from the right ones.
        if let Err(message) = self.check_inputs(job, opts.verify_inputs) {
            log_line(&job.log, &format!("# fpipe: not run: {message}"));
            return fail(message, false);
        }
        reporter.event(Event::Start {
            name: ps.name(),
            kind: &ps.def.uses,
            reason: &job.reason,
        });
        let result = self.compute(job, opts, reporter);
        drop(lock);
        match result {
            Ok((outputs, metrics)) => Outcome::Done {
                key: job.key.clone(),
                parts: job.parts.clone(),
                outputs,
                metrics,
                seconds: t0.elapsed().as_secs_f64(),
                ran: true,
                reason: job.reason.clone(),
                log: job.log.clone(),
            },
            Err(StageError::Interrupted) => fail("interrupted".into(), true),
            Err(StageError::Failed(m)) => fail(m, false),
        }
    }

    /// Checks every input artifact of `job` (see [`ArtifactStore::check_artifact`]). The
    /// cheap check is made before every stage (a stage that wrote through its `in/` links
    /// earlier in the run is caught); a full rehash only once per artifact per run.
    fn check_inputs(&self, job: &Job<'_>, depth: CheckDepth) -> std::result::Result<(), String> {
        for (port, from, id) in &job.sources {
            let full = depth == CheckDepth::Full;
            if full && job.verified.lock().is_ok_and(|v| v.contains(id)) {
                continue;
            }
            if let Err(d) = self.store.check_artifact(id, depth) {
                return Err(format!(
                    "input `{port}` ({from}, artifact {}) is damaged in the cache: {d}. \
                     Not running on it: run `fpipe cache verify --repair` to remove it and \
                     everything computed from it, then run again",
                    id.short()
                ));
            }
            if let (true, Ok(mut v)) = (full, job.verified.lock()) {
                v.insert(*id);
            }
        }
        Ok(())
    }

    /// A message for a store error met while preparing to compute a stage; a store that
    /// cannot be written gets a way out.
    fn store_error(&self, e: &CacheError) -> String {
        if !e.is_read_only() {
            return e.to_string();
        }
        let root = self.store.root().display();
        format!(
            "it must run, but the cache {root} is not writable ({e}). \
             Run with `--cache DIR` on a writable copy (e.g. `cp -a {root} DIR`), or make the cache writable"
        )
    }

    /// Computes stage `stage` of `plan` again, into fresh artifacts, from the inputs the
    /// cache resolves for it (every stage it depends on must be cached), without reading or
    /// writing its action record. Its outputs are committed (content-addressed, so harmless);
    /// nothing maps its key to them. This is how a result someone else computed is checked
    /// (`fpipe cache pull --check`). The inputs are checked like a run's, at `opts.verify_inputs`.
    pub fn recompute(
        &self,
        plan: &Plan,
        stage: usize,
        opts: &RunOptions,
        reporter: &Arc<dyn Reporter>,
    ) -> Result<Recomputed> {
        let ps = plan
            .stages
            .get(stage)
            .ok_or_else(|| EngineError::Other(format!("no stage number {stage}")))?;
        let upstream = self.status(
            plan,
            &RunOptions {
                targets: vec![ps.name().to_string()],
                force: vec![],
                ..opts.clone()
            },
        )?;
        let mut ids = Vec::new();
        let mut paths = BTreeMap::new();
        for w in &ps.wires {
            let from = plan.stages[w.from].name();
            let id = upstream
                .iter()
                .find(|s| s.name == from && !s.will_run)
                .and_then(|s| s.outputs.get(&w.from_port))
                .ok_or_else(|| {
                    EngineError::Other(format!(
                        "stage `{}`: input `{}` ({from}.{}) is not cached; run the pipeline up to `{from}` first",
                        ps.name(),
                        w.port,
                        w.from_port
                    ))
                })?;
            ids.push((w.port.clone(), *id));
            paths.insert(w.port.clone(), self.store.object_path(id));
        }
        let hasher = PathHasher::with_memo(&self.store.memo_path());
        let parts = self.parts(ps, ids, &hasher)?;
        let _ = hasher.save();
        let key = parts.key();
        let id = format!(
            "check-{}-{}",
            iso8601(now_unix()).replace([':', '-'], ""),
            std::process::id()
        );
        let log_dir = RunRecord::dir(&self.store, &id).join("logs");
        std::fs::create_dir_all(&log_dir).map_err(|e| CacheError::Io {
            path: log_dir.clone(),
            error: e,
        })?;
        let log = log_dir.join(format!("{}.log", ps.name()));
        let verified = Mutex::new(HashSet::new());
        let cpus = ps.resources.cpu.clamp(1, opts.jobs.max(1));
        let job = Job {
            ps,
            key: key.clone(),
            sources: sources(plan, ps, &parts),
            parts,
            reason: "recomputed to check a cached result".into(),
            inputs: paths,
            log: log.clone(),
            gpus: (0..ps.resources.gpu.min(opts.gpus)).collect(),
            threads: cpus,
            forced: true,
            publish: false,
            verified: &verified,
        };
        self.check_inputs(&job, opts.verify_inputs)
            .map_err(|m| EngineError::Other(format!("stage `{}`: {m}", ps.name())))?;
        reporter.event(Event::Start {
            name: ps.name(),
            kind: &ps.def.uses,
            reason: &job.reason,
        });
        let t0 = Instant::now();
        let result = self.compute(&job, opts, reporter);
        let (state, error) = match &result {
            Ok(_) => (StageState::Ran, None),
            Err(StageError::Interrupted) => (StageState::Interrupted, None),
            Err(StageError::Failed(m)) => (StageState::Failed, Some(m.as_str())),
        };
        reporter.event(Event::Finish {
            name: ps.name(),
            state,
            seconds: t0.elapsed().as_secs_f64(),
            error,
        });
        let (outputs, _) = result.map_err(|e| {
            EngineError::Other(format!(
                "stage `{}` could not be recomputed: {e} (log: {})",
                ps.name(),
                log.display()
            ))
        })?;
        Ok(Recomputed { key, outputs, log })
    }

    #[allow(clippy::type_complexity)]
    fn compute(
        &self,
        job: &Job<'_>,
        opts: &RunOptions,
        reporter: &Arc<dyn Reporter>,
    ) -> std::result::Result<(BTreeMap<String, ArtifactId>, BTreeMap<String, f64>), StageError>
    {
        let ps = job.ps;
        let sig = ps.kind.signature();
        let mut stagings = Vec::new();
        let mut outputs = BTreeMap::new();
        for port in &sig.outputs {
            let s = self
                .store
                .staging()
                .map_err(|e| StageError::msg(self.store_error(&e)))?;
            outputs.insert(port.name.to_string(), s.path().to_path_buf());
            stagings.push((port.name, s));
        }
        let scratch = self
            .store
            .scratch_dir(&job.key)
            .map_err(|e| StageError::msg(self.store_error(&e)))?;
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&job.log)
            .map_err(|e| StageError::msg(format!("{}: {e}", job.log.display())))?;
        let sink = Arc::new(Sink {
            name: ps.name().to_string(),
            file: Mutex::new(log_file),
            reporter: reporter.clone(),
        });
        sink.log(&format!(
            "# fpipe: stage {} ({} v{}) key {} — {}",
            ps.name(),
            ps.def.uses,
            ps.kind.version(),
            &job.key[..16],
            job.reason
        ));
        let sink_dyn: Arc<dyn ProgressSink> = sink.clone();
        let mut ctx = StageContext {
            name: ps.name().to_string(),
            params: ps.params.clone(),
            inputs: job.inputs.clone(),
            outputs,
            scratch,
            device: opts.device.clone(),
            gpus: job.gpus.clone(),
            threads: job.threads,
            base_dir: ps.def.base_dir.clone(),
            log_file: job.log.clone(),
            metrics: BTreeMap::new(),
            cancel: opts.cancel.clone(),
            sink: sink_dyn,
        };
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ps.kind.run(&mut ctx)));
        let metrics = std::mem::take(&mut ctx.metrics);
        drop(ctx);
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                sink.log(&format!("# fpipe: stage panicked: {msg}"));
                return Err(StageError::msg(format!(
                    "stage panicked (a bug in the stage kind): {msg}"
                )));
            }
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(StageError::Interrupted);
        }
        let mut ids = BTreeMap::new();
        for (port, staging) in stagings {
            let id = self
                .store
                .commit(staging)
                .map_err(|e| StageError::msg(format!("committing output `{port}`: {e}")))?;
            ids.insert(port.to_string(), id);
        }
        if !job.publish {
            let _ = self.store.clear_scratch(&job.key);
            return Ok((ids, metrics));
        }
        let meta = json!({
            "stage": ps.name(),
            "kind": ps.def.uses,
            "version": ps.kind.version(),
            "created": iso8601(now_unix()),
            "metrics": metrics,
        });
        self.store
            .put_action(&ActionRecord {
                key: job.key.clone(),
                outputs: ids.clone(),
                inputs: job.parts.inputs.iter().map(|(_, id)| *id).collect(),
                meta,
            })
            .map_err(|e| StageError::msg(e.to_string()))?;
        let _ = self.store.clear_scratch(&job.key);
        Ok((ids, metrics))
    }
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

/// The inputs of `ps` as (port, `stage.port` it comes from, artifact id).
fn sources(plan: &Plan, ps: &PlannedStage, parts: &KeyParts) -> Vec<(String, String, ArtifactId)> {
    parts
        .inputs
        .iter()
        .map(|(port, id)| {
            let from = ps
                .wires
                .iter()
                .find(|w| &w.port == port)
                .map(|w| format!("output of {}.{}", plan.stages[w.from].name(), w.from_port))
                .unwrap_or_else(|| "an upstream output".into());
            (port.clone(), from, *id)
        })
        .collect()
}

/// Appends a line to a stage's log, if it can.
fn log_line(log: &std::path::Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
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

struct Sink {
    name: String,
    file: Mutex<std::fs::File>,
    reporter: Arc<dyn Reporter>,
}

impl ProgressSink for Sink {
    fn progress(&self, done: u64, total: u64, message: &str) {
        self.reporter.event(Event::Progress {
            name: &self.name,
            done,
            total,
            message,
        });
    }
    fn log(&self, line: &str) {
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn metrics_of(meta: &Value) -> BTreeMap<String, f64> {
    meta.get("metrics")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default()
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

/// Why a stage whose key is not cached must run.
fn explain(
    plan: &Plan,
    ps: &PlannedStage,
    parts: &KeyParts,
    key: &str,
    mem: Option<&StageMemory>,
) -> String {
    let Some(mem) = mem else { return "new".into() };
    let old = &mem.parts;
    if old.kind != parts.kind {
        return format!("kind changed: {} -> {}", old.kind, parts.kind);
    }
    if old.version != parts.version {
        return format!(
            "implementation version changed: v{} -> v{}",
            old.version, parts.version
        );
    }
    let mut why = Vec::new();
    let keys: std::collections::BTreeSet<&String> =
        old.params.keys().chain(parts.params.keys()).collect();
    for k in keys {
        let (a, b) = (old.params.get(k), parts.params.get(k));
        if a != b {
            let show = |v: Option<&Value>| match v {
                None => "(unset)".to_string(),
                Some(Value::Object(m)) if m.contains_key("content") => "file content".to_string(),
                Some(v) => {
                    let s = v.to_string();
                    if s.len() > 40 {
                        format!("{}...", &s[..37])
                    } else {
                        s
                    }
                }
            };
            if a.is_some_and(is_path_value) || b.is_some_and(is_path_value) {
                why.push(format!("file `{k}` changed"));
            } else {
                why.push(format!("param {k}: {} -> {}", show(a), show(b)));
            }
        }
    }
    let old_inputs: BTreeMap<&String, &ArtifactId> =
        old.inputs.iter().map(|(p, i)| (p, i)).collect();
    for (port, id) in &parts.inputs {
        if old_inputs.get(port) != Some(&id) {
            let from = ps
                .wires
                .iter()
                .find(|w| &w.port == port)
                .map(|w| format!("{}.{}", plan.stages[w.from].name(), w.from_port))
                .unwrap_or_else(|| port.clone());
            why.push(format!("input {from} changed"));
        }
    }
    for (port, _) in &old.inputs {
        if !parts.inputs.iter().any(|(p, _)| p == port) {
            why.push(format!("input {port} disconnected"));
        }
    }
    if why.is_empty() {
        if mem.key == key {
            return "outputs no longer in the cache".into();
        }
        return "key changed".into();
    }
    why.join("; ")
}

fn diff_values(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_values(&name, x, y, out),
                    (None, Some(y)) => out.push(format!("{name}: (unset) -> {y}")),
                    (Some(x), None) => out.push(format!("{name}: {x} -> (unset)")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{prefix}: {a} -> {b}")),
        _ => {}
    }
}

fn is_path_value(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.contains_key("content"),
        Value::Array(a) => a.iter().any(is_path_value),
        _ => false,
    }
}

/// Where a stage's output artifact lives, if the stage is up to date.
pub fn output_path(
    store: &ArtifactStore,
    status: &StageStatus,
    port: Option<&str>,
) -> std::result::Result<PathBuf, String> {
    if status.will_run {
        return Err(format!(
            "stage `{}` is not up to date ({}); run it first",
            status.name, status.reason
        ));
    }
    let port = match port {
        Some(p) => p.to_string(),
        None if status.outputs.len() == 1 => {
            status.outputs.keys().next().cloned().unwrap_or_default()
        }
        None => {
            return Err(format!(
                "stage `{}` has several outputs; name one: {}",
                status.name,
                status
                    .outputs
                    .keys()
                    .map(|k| format!("{}.{k}", status.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    status
        .outputs
        .get(&port)
        .map(|id| store.object_path(id))
        .ok_or_else(|| format!("stage `{}` has no output `{port}`", status.name))
}
