//! Computing one stage: the key lock, the input check, the stage kind's `run` in staging
//! folders, and publishing its outputs and action record.

use super::ending::Ending;
use super::{Engine, Event, Recomputed, Reporter, RunOptions};
use crate::error::{EngineError, Result};
use crate::keys::KeyParts;
use crate::plan::{Plan, PlannedStage};
use crate::records::{iso8601, now_unix, ClusterJob, RunRecord, StageState};
use crate::stage::{ProgressSink, StageContext, StageError};
use fpipe_cache::{ActionRecord, ArtifactId, CacheError, CheckDepth, PathHasher};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A stage to compute, with everything it needs resolved.
pub(super) struct Job<'a> {
    pub ps: &'a PlannedStage,
    pub key: String,
    pub parts: KeyParts,
    /// Each input as (port, `stage.port` it comes from, artifact id), for the input check.
    pub sources: Vec<(String, String, ArtifactId)>,
    pub reason: String,
    pub inputs: BTreeMap<String, PathBuf>,
    pub log: PathBuf,
    pub gpus: Vec<usize>,
    pub threads: usize,
    pub forced: bool,
    /// Write the action record (false when recomputing to check someone else's).
    pub publish: bool,
    /// Input artifacts already rehashed in this run.
    pub verified: &'a Mutex<HashSet<ArtifactId>>,
}

/// How computing a [`Job`] ended.
pub(super) enum Outcome {
    Done {
        key: String,
        parts: KeyParts,
        outputs: BTreeMap<String, ArtifactId>,
        metrics: BTreeMap<String, f64>,
        seconds: f64,
        /// False when another process computed it while this one waited for the key.
        ran: bool,
        reason: String,
        log: PathBuf,
        /// The cluster job that computed it (cluster executors only).
        job: Option<ClusterJob>,
    },
    Failed {
        key: String,
        message: String,
        seconds: f64,
        log: PathBuf,
        interrupted: bool,
        /// The cluster job that failed (cluster executors only).
        job: Option<ClusterJob>,
    },
}

impl Engine {
    pub(super) fn execute(
        &self,
        job: &Job<'_>,
        opts: &RunOptions,
        reporter: &Arc<dyn Reporter>,
    ) -> Outcome {
        let t0 = Instant::now();
        let ps = job.ps;
        let fail = |message: String, interrupted: bool| Outcome::Failed {
            key: job.key.clone(),
            message,
            seconds: t0.elapsed().as_secs_f64(),
            log: job.log.clone(),
            interrupted,
            job: None,
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
                    job: None,
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
                job: None,
            },
            Err(StageError::Interrupted) => fail("interrupted".into(), true),
            Err(StageError::Failed(m)) => fail(m, false),
        }
    }
    /// Checks every input artifact of `job` (see [`ArtifactStore::check_artifact`]). The
    /// cheap check is made before every stage (a stage that wrote through its `in/` links
    /// earlier in the run is caught); a full rehash only once per artifact per run.
    pub(super) fn check_inputs(
        &self,
        job: &Job<'_>,
        depth: CheckDepth,
    ) -> std::result::Result<(), String> {
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
    pub(super) fn store_error(&self, e: &CacheError) -> String {
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
            Err(StageError::Failed(m)) => (StageState::Failed, Some(m.clone())),
        };
        let end = Ending {
            seconds: t0.elapsed().as_secs_f64(),
            error,
            ..Ending::new(state)
        };
        reporter.event(end.event(ps.name()));
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
    pub(super) fn compute(
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

/// The inputs of `ps` as (port, `stage.port` it comes from, artifact id).
pub(super) fn sources(
    plan: &Plan,
    ps: &PlannedStage,
    parts: &KeyParts,
) -> Vec<(String, String, ArtifactId)> {
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
pub(super) fn log_line(log: &std::path::Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
}

pub(super) struct Sink {
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

pub(super) fn metrics_of(meta: &Value) -> BTreeMap<String, f64> {
    meta.get("metrics")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default()
}
