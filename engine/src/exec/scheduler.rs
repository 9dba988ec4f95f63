//! `fpipe run`: the run record around a [`Scheduler`], which starts each stage when what it
//! needs is known and slots are free, and settles it (cached, ran, failed, skipped) once.

use super::compute::{metrics_of, sources, Job, Outcome};
use super::ending::Ending;
use super::keys::{gather_inputs, Known};
use super::slurm::SlurmRun;
use super::status::explain;
use super::{Engine, Event, Executor, Reporter, RunOptions, RunSummary};
use crate::error::Result;
use crate::plan::{Plan, PlannedStage};
use crate::records::{
    iso8601, now_unix, PipelineState, RunRecord, RunStatus, StageMemory, StageRecord, StageState,
};
use fpipe_cache::{ActionRecord, ArtifactId, CacheError, PathHasher};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

impl Engine {
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
        let clock = Instant::now();
        let (mut record, log_dir, recording) = self.start_record(plan, opts, reporter)?;
        let verified = Mutex::new(HashSet::new());
        let slurm = match &opts.executor {
            Executor::Local => None,
            Executor::Slurm(o) => Some(
                SlurmRun::new(o, self.store.root(), plan, &log_dir)
                    .map_err(|e| crate::EngineError::Other(e.to_string()))?,
            ),
        };
        let mut scheduler = Scheduler::new(self, plan, opts, reporter, order, force);
        reporter.event(Event::Begin {
            total: scheduler.order.len(),
        });
        scheduler.run(&log_dir, &verified, slurm.as_ref())?;
        let (stages, memory) = scheduler.finish();
        record.stages = stages;

        let count = |s: StageState| record.stages.iter().filter(|r| r.state == s).count();
        let (ran, cached, failed, skipped) = (
            count(StageState::Ran),
            count(StageState::Cached),
            count(StageState::Failed),
            count(StageState::Skipped),
        );
        let seconds = clock.elapsed().as_secs_f64();
        record.seconds = seconds;
        record.status = if opts.cancel.load(Ordering::Relaxed) || count(StageState::Interrupted) > 0
        {
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
            recorded: recording,
        })
    }

    /// The record of a run starting now, saved as running, with its log folder; and whether
    /// the run is recorded at all.
    fn start_record(
        &self,
        plan: &Plan,
        opts: &RunOptions,
        reporter: &Arc<dyn Reporter>,
    ) -> Result<(RunRecord, PathBuf, bool)> {
        let started = now_unix();
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
        let record = RunRecord {
            id: run_id,
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
        Ok((record, log_dir, recording))
    }
}

/// Free job slots and GPU ids.
struct Slots {
    jobs: usize,
    gpus: usize,
    /// Every stage takes one slot and no GPU id (a cluster scheduler places it).
    remote: bool,
    cpu_free: usize,
    gpu_free: Vec<usize>,
}

/// The slots a running stage holds.
struct Grant {
    cpus: usize,
    gpus: Vec<usize>,
}

impl Slots {
    fn new(jobs: usize, gpus: usize) -> Self {
        let jobs = jobs.max(1);
        Slots {
            jobs,
            gpus,
            remote: false,
            cpu_free: jobs,
            gpu_free: (0..gpus).collect(),
        }
    }

    /// Slots for `jobs` stages at once, whatever they ask for.
    fn jobs_only(jobs: usize) -> Self {
        Slots {
            remote: true,
            ..Slots::new(jobs, 0)
        }
    }

    /// Slots for a stage that asks for `cpu` job slots and `gpu` GPUs (at least one job
    /// slot, at most what the run has), if they are free now.
    fn take(&mut self, cpu: usize, gpu: usize) -> Option<Grant> {
        let (cpu, gpu) = if self.remote { (1, 0) } else { (cpu, gpu) };
        let cpus = cpu.clamp(1, self.jobs);
        let gpus = gpu.min(self.gpus);
        if cpus > self.cpu_free || gpus > self.gpu_free.len() {
            return None;
        }
        self.cpu_free -= cpus;
        Some(Grant {
            cpus,
            gpus: self.gpu_free.drain(..gpus).collect(),
        })
    }

    fn give_back(&mut self, grant: Grant) {
        self.cpu_free += grant.cpus;
        self.gpu_free.extend(grant.gpus);
        // Lowest ids first, so a lone GPU stage gets GPU 0.
        self.gpu_free.sort();
    }
}

/// The state of one run: what is settled, what runs, what waits, and the free slots.
struct Scheduler<'r> {
    engine: &'r Engine,
    plan: &'r Plan,
    opts: &'r RunOptions,
    reporter: &'r Arc<dyn Reporter>,
    /// The selected stages, dependencies first (the order of the run record).
    order: Vec<usize>,
    force: HashSet<usize>,
    /// Selected stages neither started nor settled, in `order`.
    waiting: Vec<usize>,
    /// Started stages and the slots they hold.
    running: HashMap<usize, Grant>,
    slots: Slots,
    /// Per stage: its outputs once it ran or was cached; `Failed` when it failed or was
    /// skipped.
    known: Vec<Option<Known>>,
    /// The run record's entries of the settled stages.
    records: BTreeMap<usize, StageRecord>,
    /// What the next `status` of this pipeline compares with.
    memory: PipelineState,
    hasher: PathHasher,
    /// Keys already asked of the substituter.
    substitutes_asked: HashSet<String>,
}

impl<'r> Scheduler<'r> {
    fn new(
        engine: &'r Engine,
        plan: &'r Plan,
        opts: &'r RunOptions,
        reporter: &'r Arc<dyn Reporter>,
        order: Vec<usize>,
        force: HashSet<usize>,
    ) -> Self {
        let mut memory = PipelineState::load(&engine.store, &plan.pipeline.file);
        memory.pipeline = plan.pipeline.file.clone();
        memory.params = plan.pipeline.params.clone();
        Scheduler {
            engine,
            plan,
            opts,
            reporter,
            waiting: order.clone(),
            order,
            force,
            running: HashMap::new(),
            slots: match opts.executor {
                Executor::Local => Slots::new(opts.jobs, opts.gpus),
                // Slurm places the jobs; `jobs` only bounds how many are in flight.
                Executor::Slurm(_) => Slots::jobs_only(opts.jobs),
            },
            known: (0..plan.stages.len()).map(|_| None).collect(),
            records: BTreeMap::new(),
            memory,
            hasher: PathHasher::with_memo(&engine.store.memo_path()),
            substitutes_asked: HashSet::new(),
        }
    }

    /// Starts stages, each on a thread of its own, and settles them as they finish, until
    /// nothing more can start (or the run is cancelled) and nothing runs.
    fn run(
        &mut self,
        log_dir: &Path,
        verified: &'r Mutex<HashSet<ArtifactId>>,
        slurm: Option<&SlurmRun>,
    ) -> Result<()> {
        let (engine, opts, reporter) = (self.engine, self.opts, self.reporter);
        let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
        std::thread::scope(|scope| -> Result<()> {
            let mut launch = |i: usize, job: Job<'r>| {
                let tx = tx.clone();
                scope.spawn(move || {
                    let outcome = match slurm {
                        Some(run) => engine.execute_slurm(&job, opts, run, reporter),
                        None => engine.execute(&job, opts, reporter),
                    };
                    let _ = tx.send((i, outcome));
                });
            };
            loop {
                if !opts.cancel.load(Ordering::Relaxed) {
                    self.start_ready(log_dir, verified, &mut launch)?;
                }
                if self.running.is_empty() {
                    break;
                }
                let Ok((i, outcome)) = rx.recv() else {
                    break;
                };
                self.on_finished(i, outcome);
            }
            Ok(())
        })?;
        let _ = self.hasher.save();
        Ok(())
    }

    /// Settles or starts every waiting stage that can be, in topological order, passing over
    /// the waiting ones again until a pass changes nothing.
    fn start_ready(
        &mut self,
        log_dir: &Path,
        verified: &'r Mutex<HashSet<ArtifactId>>,
        launch: &mut dyn FnMut(usize, Job<'r>),
    ) -> Result<()> {
        let mut progressed = true;
        while progressed {
            progressed = false;
            for i in std::mem::take(&mut self.waiting) {
                if self.try_start(i, log_dir, verified, launch)? {
                    progressed = true;
                } else {
                    self.waiting.push(i);
                }
            }
        }
        Ok(())
    }

    /// Settles stage `i` (skipped, failed to key, cached) or starts it; false when it must
    /// wait for its inputs or for slots.
    fn try_start(
        &mut self,
        i: usize,
        log_dir: &Path,
        verified: &'r Mutex<HashSet<ArtifactId>>,
        launch: &mut dyn FnMut(usize, Job<'r>),
    ) -> Result<bool> {
        let plan = self.plan;
        let ps = &plan.stages[i];
        if self.blocked(ps) {
            self.settle(i, Ending::new(StageState::Skipped));
            return Ok(true);
        }
        // Cheap readiness check first: this runs for every waiting stage on every event.
        if !ps
            .wires
            .iter()
            .all(|w| matches!(self.known[w.from], Some(Known::Outputs(_))))
        {
            return Ok(false);
        }
        let (inputs, pending) = gather_inputs(plan, ps, &self.known);
        if !pending.is_empty() {
            return Ok(false);
        }
        let parts = match self.engine.parts(ps, inputs, &self.hasher) {
            Ok(p) => p,
            Err(e) => {
                let end = Ending {
                    error: Some(e.to_string()),
                    ..Ending::new(StageState::Failed)
                };
                self.settle(i, end);
                return Ok(true);
            }
        };
        let key = parts.key();
        let forced = self.force.contains(&i);
        if !forced {
            let mut found = self.engine.store.action(&key)?;
            if found.is_none() {
                found = self.substitute(ps, &key)?;
            }
            if let Some(rec) = found {
                let end = Ending {
                    key: Some(key),
                    metrics: metrics_of(&rec.meta),
                    origin: rec.meta.get("origin").cloned(),
                    outputs: rec.outputs,
                    parts: Some(parts),
                    ..Ending::new(StageState::Cached)
                };
                self.settle(i, end);
                return Ok(true);
            }
        }
        let Some(grant) = self.slots.take(ps.resources.cpu, ps.resources.gpu) else {
            return Ok(false);
        };
        let reason = if forced {
            "forced (--force)".to_string()
        } else {
            explain(plan, ps, &parts, &key, self.memory.stages.get(ps.name()))
        };
        let job = Job {
            ps,
            key,
            sources: sources(plan, ps, &parts),
            parts,
            reason,
            inputs: self.input_paths(ps),
            log: log_dir.join(format!("{}.log", ps.name())),
            gpus: grant.gpus.clone(),
            threads: grant.cpus,
            forced,
            publish: true,
            verified,
        };
        self.running.insert(i, grant);
        launch(i, job);
        Ok(true)
    }

    /// The record of `key` from the substituter, asked once per key and run (a stage waiting
    /// for slots is tried again on every pass).
    fn substitute(&mut self, ps: &PlannedStage, key: &str) -> Result<Option<ActionRecord>> {
        let Some(sub) = &self.opts.substituter else {
            return Ok(None);
        };
        if !self.substitutes_asked.insert(key.to_string()) {
            return Ok(None);
        }
        match sub.substitute(&self.engine.store, key) {
            Ok(true) => Ok(self.engine.store.action(key)?),
            Ok(false) => Ok(None),
            Err(e) => {
                let message = format!(
                    "stage `{}`: looking its result up elsewhere failed, so it computes here: {e}",
                    ps.name()
                );
                self.reporter.event(Event::Warning { message: &message });
                Ok(None)
            }
        }
    }

    /// Whether something `ps` depends on failed or was skipped, so it cannot run.
    fn blocked(&self, ps: &PlannedStage) -> bool {
        ps.wires
            .iter()
            .any(|w| matches!(self.known[w.from], Some(Known::Failed)))
    }

    /// Where the inputs of `ps` lie in the store.
    fn input_paths(&self, ps: &PlannedStage) -> BTreeMap<String, PathBuf> {
        ps.wires
            .iter()
            .filter_map(|w| match &self.known[w.from] {
                Some(Known::Outputs(o)) => o
                    .get(&w.from_port)
                    .map(|id| (w.port.clone(), self.engine.store.object_path(id))),
                _ => None,
            })
            .collect()
    }

    /// Stage `i` finished computing: frees its slots and settles it.
    fn on_finished(&mut self, i: usize, outcome: Outcome) {
        if let Some(grant) = self.running.remove(&i) {
            self.slots.give_back(grant);
        }
        let end = match outcome {
            Outcome::Done {
                key,
                parts,
                outputs,
                metrics,
                seconds,
                ran,
                reason,
                log,
                job,
            } => Ending {
                key: Some(key),
                seconds,
                log: Some(log),
                outputs,
                metrics,
                reason: ran.then_some(reason),
                parts: Some(parts),
                job,
                ..Ending::new(if ran {
                    StageState::Ran
                } else {
                    StageState::Cached
                })
            },
            Outcome::Failed {
                key,
                message,
                seconds,
                log,
                interrupted,
                job,
            } => Ending {
                key: Some(key),
                seconds,
                // A stage stopped before it started (damaged input, read-only cache) may
                // have no log to point at.
                log: log.exists().then_some(log),
                error: Some(message),
                job,
                ..Ending::new(if interrupted {
                    StageState::Interrupted
                } else {
                    StageState::Failed
                })
            },
        };
        self.settle(i, end);
    }

    /// Stage `i` ended: what depends on it learns its outputs (or that it has none), the
    /// run record and the pipeline's memory take it in, and the reporter is told.
    fn settle(&mut self, i: usize, mut end: Ending) {
        let ps = &self.plan.stages[i];
        let has_outputs = matches!(end.state, StageState::Ran | StageState::Cached);
        self.known[i] = Some(if has_outputs {
            Known::Outputs(end.outputs.clone())
        } else {
            Known::Failed
        });
        if let (Some(parts), Some(key)) = (end.parts.take(), &end.key) {
            self.memory.stages.insert(
                ps.name().to_string(),
                StageMemory {
                    parts,
                    key: key.clone(),
                    outputs: end.outputs.clone(),
                },
            );
        }
        self.reporter.event(end.event(ps.name()));
        self.records.insert(i, end.record(ps));
    }

    /// The run record's entries in `order` (stages never reached are `not_run`), and the
    /// pipeline's memory.
    fn finish(mut self) -> (Vec<StageRecord>, PipelineState) {
        let plan = self.plan;
        let stages = self
            .order
            .iter()
            .map(|i| {
                self.records
                    .remove(i)
                    .unwrap_or_else(|| Ending::new(StageState::NotRun).record(&plan.stages[*i]))
            })
            .collect();
        (stages, self.memory)
    }
}
