//! The Slurm executor: each stage that must compute becomes one `sbatch` job running
//! `fpipe slurm-job DESCRIPTION` on a compute node, which computes it into staging and
//! publishes it exactly as a local run does (`job`). The controller keeps planning, keys and
//! the cache; it learns how a job ended from the outcome file the job writes, and asks Slurm
//! (`squeue`, bounded and backing off; `sacct` or `scontrol` for the reason) only about jobs
//! that ended without writing one (`queue`).
//!
//! A key's lock and a marker file (`runs/slurm/KEY.json`) keep two controllers on one cache
//! from submitting the same stage twice: the second waits for the first one's job.

mod job;
mod queue;

pub use job::{running_job, JobDescription, JobOutcome};

use super::compute::{Job, Outcome};
use super::{Engine, Event, Reporter, RunOptions};
use crate::plan::{Plan, PlannedStage};
use crate::records::{iso8601, now_unix, ClusterJob, StageState};
use fpipe_cache::CheckDepth;
use job::{script, Marker};
use queue::{Tracker, Watch};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of the Slurm executor.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("`{0}` is not on the PATH: run on a machine that submits Slurm jobs (a login node), or use `--executor local`")]
    Missing(&'static str),
    #[error("the fpipe binary {path} {message}; give one the compute nodes can run with `--slurm-fpipe PATH`")]
    Binary { path: PathBuf, message: String },
    #[error("submitting {stage_script}: {message}")]
    Submit {
        stage_script: PathBuf,
        message: String,
    },
    #[error("job description {path}: {message}")]
    Description { path: PathBuf, message: String },
    #[error("{0}")]
    Io(String),
}

/// How `fpipe run --executor slurm` submits jobs.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// The fpipe binary the jobs run; it must be on a path the compute nodes see.
    pub fpipe: PathBuf,
    /// `sbatch` options for every job (`--partition=gpu`, `--account=lab`, ...), placed
    /// before each stage's own (`--cpus-per-task`, `--gres`, `--mem`, `--time`).
    pub sbatch_args: Vec<String>,
    /// Retries after NODE_FAIL or PREEMPTED for stages without their own `retries:`.
    pub retries: u32,
}

/// Checks before a run submits anything: `sbatch`, `squeue` and `scancel` on the PATH, the
/// fpipe binary an absolute, existing file; returns warnings (a cache or binary on a file
/// system only this machine sees).
pub fn preflight(opts: &SlurmOptions, cache: &Path) -> Result<Vec<String>, SlurmError> {
    for tool in ["sbatch", "squeue", "scancel"] {
        if queue::on_path(tool).is_none() {
            return Err(SlurmError::Missing(tool));
        }
    }
    if !opts.fpipe.is_absolute() || !opts.fpipe.is_file() {
        return Err(SlurmError::Binary {
            path: opts.fpipe.clone(),
            message: "is not an existing file given by an absolute path".into(),
        });
    }
    let mut warnings = Vec::new();
    for (what, path) in [("cache", cache), ("fpipe binary", opts.fpipe.as_path())] {
        if let Some(t) = queue::fs_type(path) {
            if matches!(t.as_str(), "tmpfs" | "ramfs" | "devtmpfs") {
                warnings.push(format!(
                    "the {what} {} is on {t}, which only this machine sees: jobs on other nodes will not find it (put it on the shared file system)",
                    path.display()
                ));
            }
        }
    }
    Ok(warnings)
}

/// The Slurm side of one run: where its job files go, and the shared `squeue` poll.
pub(super) struct SlurmRun {
    opts: SlurmOptions,
    /// `runs/<run id>/slurm/`.
    dir: PathBuf,
    cache: PathBuf,
    pipeline: PathBuf,
    pipeline_name: String,
    params_file: PathBuf,
    tracker: Tracker,
}

impl SlurmRun {
    /// Prepares the run's job folder beside its logs, with the run's final parameters.
    pub fn new(
        opts: &SlurmOptions,
        cache: &Path,
        plan: &Plan,
        log_dir: &Path,
    ) -> Result<Self, SlurmError> {
        let io = |e: std::io::Error| SlurmError::Io(e.to_string());
        let dir = log_dir.parent().unwrap_or(log_dir).join("slurm");
        std::fs::create_dir_all(&dir).map_err(io)?;
        let params_file = dir.join("params.json");
        let bytes = serde_json::to_vec_pretty(&plan.pipeline.params).unwrap_or_default();
        fpipe_cache::write_atomic(&params_file, &bytes)
            .map_err(|e| SlurmError::Io(e.to_string()))?;
        Ok(SlurmRun {
            opts: opts.clone(),
            dir,
            cache: std::path::absolute(cache).map_err(io)?,
            pipeline: std::path::absolute(&plan.pipeline.file).map_err(io)?,
            pipeline_name: plan.pipeline.name.clone(),
            params_file,
            tracker: Tracker::new(),
        })
    }
}

/// The `sbatch` options of stage `ps`: the run's own, then the job name, log, and the stage's
/// resources.
pub(super) fn sbatch_args(
    ps: &PlannedStage,
    pipeline_name: &str,
    log: &Path,
    workdir: &Path,
    defaults: &[String],
) -> Vec<String> {
    let clean = |s: &str| s.replace(|c: char| c.is_whitespace() || c == ',', "_");
    let mut a: Vec<String> = defaults.to_vec();
    a.push(format!(
        "--job-name=fpipe:{}:{}",
        clean(pipeline_name),
        clean(ps.name())
    ));
    a.push(format!("--output={}", log.display()));
    a.push("--open-mode=append".into());
    a.push(format!("--chdir={}", workdir.display()));
    // Kinds that use every core say so with a huge default: leave the count to Slurm.
    if ps.resources.cpu < 1024 {
        a.push(format!("--cpus-per-task={}", ps.resources.cpu.max(1)));
    }
    if ps.resources.gpu > 0 {
        a.push(format!("--gres=gpu:{}", ps.resources.gpu));
    }
    if ps.resources.mem_mb > 0 {
        a.push(format!("--mem={}M", ps.resources.mem_mb));
    }
    if ps.resources.time_s > 0 {
        let t = ps.resources.time_s.div_ceil(60);
        a.push(format!(
            "--time={}-{:02}:{:02}:00",
            t / 1440,
            t / 60 % 24,
            t % 60
        ));
    }
    a
}

/// How watching a job ended.
enum Watched {
    /// The job wrote its outcome.
    Finished(JobOutcome),
    /// It ended without one: Slurm's state, node and exit code.
    Lost {
        state: String,
        node: String,
        exit: String,
    },
    /// The run was cancelled (and the job, when it was this run's, cancelled too).
    Cancelled,
}

impl Engine {
    /// Computes `job` as a Slurm job: submits it (unless its result is cached, or another
    /// controller's job computes it, which is then waited for), watches it, resubmits it after
    /// NODE_FAIL or PREEMPTED up to its retries, and cancels it when the run is cancelled.
    pub(super) fn execute_slurm(
        &self,
        job: &Job<'_>,
        opts: &RunOptions,
        run: &SlurmRun,
        reporter: &Arc<dyn Reporter>,
    ) -> Outcome {
        let t0 = Instant::now();
        let ps = job.ps;
        let retries = ps.resources.retries.unwrap_or(run.opts.retries);
        let mut attempts = 0u32;
        let mut said_waiting = false;
        let mut cluster: Option<ClusterJob> = None;
        let fail =
            |message: String, interrupted: bool, cluster: Option<ClusterJob>| Outcome::Failed {
                key: job.key.clone(),
                message,
                seconds: t0.elapsed().as_secs_f64(),
                log: job.log.clone(),
                interrupted,
                job: cluster,
            };
        let cached = |outputs, metrics, ran: bool, cluster: Option<ClusterJob>| Outcome::Done {
            key: job.key.clone(),
            parts: job.parts.clone(),
            outputs,
            metrics,
            seconds: t0.elapsed().as_secs_f64(),
            ran,
            reason: job.reason.clone(),
            log: job.log.clone(),
            job: cluster,
        };
        let desc_path = run.dir.join(format!("{}.json", file_name(ps.name())));
        let script_path = run.dir.join(format!("{}.sh", file_name(ps.name())));
        loop {
            // The key's lock: held by a job computing it now (this run's or another's), or
            // briefly by a controller submitting it.
            let lock = loop {
                if opts.cancel.load(Ordering::Relaxed) {
                    return fail("interrupted".into(), true, cluster);
                }
                match self.store.try_lock_key(&job.key) {
                    Ok(Some(l)) => break l,
                    Ok(None) => {
                        if !said_waiting {
                            said_waiting = true;
                            reporter.event(Event::Waiting { name: ps.name() });
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return fail(self.store_error(&e), false, cluster),
                }
            };
            if !job.forced || attempts > 0 {
                if let Ok(Some(rec)) = self.store.action(&job.key) {
                    let ran = attempts > 0;
                    return cached(
                        rec.outputs,
                        super::compute::metrics_of(&rec.meta),
                        ran,
                        cluster,
                    );
                }
            }
            // Another controller's job (or a killed controller's) computing this key.
            if let Some(m) = Marker::read(&run.cache, &job.key) {
                if JobOutcome::read(&m.outcome).is_none() {
                    run.tracker.watch(&m.job_id);
                    if let Watch::Seen(s) = run.tracker.state(&m.job_id, true) {
                        if s.alive() {
                            drop(lock);
                            if !said_waiting {
                                said_waiting = true;
                                reporter.event(Event::Waiting { name: ps.name() });
                            }
                            let _ = self.watch(&m.job_id, &m.outcome, false, opts, run);
                            run.tracker.forget(&m.job_id);
                            continue;
                        }
                    }
                    run.tracker.forget(&m.job_id);
                }
            }
            if attempts == 0 {
                if let Err(message) = self.check_inputs(job, opts.verify_inputs) {
                    return fail(message, false, cluster);
                }
            }
            let outcome_path = run.dir.join(format!(
                "{}.outcome-{}.json",
                file_name(ps.name()),
                attempts + 1
            ));
            let desc = JobDescription {
                format: 1,
                pipeline: run.pipeline.clone(),
                params_file: run.params_file.clone(),
                cache: run.cache.clone(),
                stage: ps.name().to_string(),
                key: job.key.clone(),
                inputs: job.parts.inputs.clone(),
                reason: job.reason.clone(),
                log: job.log.clone(),
                outcome: outcome_path.clone(),
                device: opts.device.clone(),
                gpus: ps.resources.gpu,
                cpus: (ps.resources.cpu < 1024).then_some(ps.resources.cpu.max(1)),
                forced: job.forced,
                verify_full: opts.verify_inputs == CheckDepth::Full,
            };
            let submitted = desc.write(&desc_path).and_then(|_| {
                std::fs::write(
                    &script_path,
                    script(&run.opts.fpipe, &desc_path, ps.name(), &job.key),
                )
                .map_err(|e| SlurmError::Io(format!("{}: {e}", script_path.display())))?;
                let args = sbatch_args(
                    ps,
                    &run.pipeline_name,
                    &job.log,
                    &ps.def.base_dir,
                    &run.opts.sbatch_args,
                );
                queue::sbatch(&args, &script_path)
            });
            let id = match submitted {
                Ok(id) => id,
                Err(e) => return fail(e.to_string(), false, cluster),
            };
            attempts += 1;
            run.tracker.watch(&id);
            let _ = Marker {
                job_id: id.clone(),
                stage: ps.name().to_string(),
                outcome: outcome_path.clone(),
                log: job.log.clone(),
                submitted: iso8601(now_unix()),
            }
            .write(&run.cache, &job.key);
            drop(lock);
            if attempts == 1 {
                reporter.event(Event::Start {
                    name: ps.name(),
                    kind: &ps.def.uses,
                    reason: &format!("{} (Slurm job {id})", job.reason),
                });
            }
            let mut info = ClusterJob {
                executor: "slurm".into(),
                id: id.clone(),
                node: None,
                state: None,
                attempts,
            };
            let watched = self.watch(&id, &outcome_path, true, opts, run);
            run.tracker.forget(&id);
            match watched {
                Watched::Finished(o) => {
                    info.node = Some(o.node.clone()).filter(|n| !n.is_empty());
                    let cancelled_here = opts.cancel.load(Ordering::Relaxed);
                    match o.state {
                        StageState::Ran | StageState::Cached => {
                            info.state = Some("COMPLETED".into());
                            return cached(
                                o.outputs,
                                o.metrics,
                                o.state == StageState::Ran,
                                Some(info),
                            );
                        }
                        StageState::Interrupted if cancelled_here => {
                            info.state = Some("CANCELLED".into());
                            return fail("interrupted".into(), true, Some(info));
                        }
                        _ => {
                            let (state, _, _) = queue::final_state(&id).unwrap_or((
                                "FAILED".into(),
                                String::new(),
                                String::new(),
                            ));
                            let state =
                                if o.state == StageState::Interrupted && state == "COMPLETED" {
                                    "CANCELLED".to_string()
                                } else {
                                    state
                                };
                            info.state = Some(state.clone());
                            let msg = o.message.unwrap_or_default();
                            let mut m = format!(
                                "Slurm job {id} on {} ended {state}: {}",
                                o.node,
                                if o.state == StageState::Interrupted {
                                    "it was stopped by a signal (cancelled from outside this run?)"
                                } else {
                                    msg.as_str()
                                }
                            );
                            if o.state == StageState::Interrupted || !msg.contains("last lines of")
                            {
                                m.push_str(&log_tail(&job.log));
                            }
                            return fail(m, false, Some(info));
                        }
                    }
                }
                Watched::Cancelled => {
                    info.state = Some("CANCELLED".into());
                    return fail("interrupted".into(), true, Some(info));
                }
                Watched::Lost { state, node, exit } => {
                    info.state = Some(state.clone());
                    info.node = Some(node.clone()).filter(|n| !n.is_empty());
                    if matches!(state.as_str(), "NODE_FAIL" | "PREEMPTED") && attempts <= retries {
                        reporter.event(Event::Warning {
                            message: &format!(
                                "stage `{}`: Slurm job {id} ended {state}; submitting it again (retry {attempts} of {retries})",
                                ps.name()
                            ),
                        });
                        cluster = Some(info);
                        continue;
                    }
                    let why = match state.as_str() {
                        "OUT_OF_MEMORY" => " (out of memory: raise `resources: {mem: ...}`)",
                        "TIMEOUT" => " (time limit: raise `resources: {time: ...}`)",
                        "NODE_FAIL" | "PREEMPTED" if retries > 0 => " (no retries left)",
                        "NODE_FAIL" | "PREEMPTED" => {
                            " (add `retries: N` to the stage to submit it again)"
                        }
                        "CANCELLED" => " (cancelled from outside this run)",
                        _ => "",
                    };
                    let exit = if exit.is_empty() {
                        String::new()
                    } else {
                        format!(", exit code {exit}")
                    };
                    let node = if node.is_empty() {
                        String::new()
                    } else {
                        format!(" on {node}")
                    };
                    let m = format!(
                        "Slurm job {id}{node} ended {state}{why}{exit} without finishing the stage{}",
                        log_tail(&job.log)
                    );
                    return fail(m, false, Some(info));
                }
            }
        }
    }

    /// Waits for job `id` to write `outcome` or to end without it; an `own` job is cancelled
    /// when the run is.
    fn watch(
        &self,
        id: &str,
        outcome: &Path,
        own: bool,
        opts: &RunOptions,
        run: &SlurmRun,
    ) -> Watched {
        let t0 = Instant::now();
        let mut nap = Duration::from_millis(5);
        loop {
            if let Some(o) = JobOutcome::read(outcome) {
                return Watched::Finished(o);
            }
            if opts.cancel.load(Ordering::Relaxed) {
                if own {
                    queue::scancel(id);
                    // Until Slurm has stopped it (KillWait), so no job outlives the run.
                    let until = Instant::now() + Duration::from_secs(120);
                    while Instant::now() < until {
                        match run.tracker.state(id, true) {
                            Watch::Seen(s) if s.alive() => {}
                            Watch::Unknown => {}
                            _ => break,
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                return Watched::Cancelled;
            }
            let ended = match run.tracker.state(id, false) {
                Watch::Seen(s) => !s.alive(),
                Watch::Vanished => true,
                Watch::Unknown => false,
            };
            if ended {
                // The job writes its outcome before it ends; a shared file system may show it
                // late.
                let until = Instant::now() + Duration::from_secs(5);
                while Instant::now() < until {
                    if let Some(o) = JobOutcome::read(outcome) {
                        return Watched::Finished(o);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let (state, node, exit) =
                    queue::final_state(id).unwrap_or_else(|| match run.tracker.state(id, false) {
                        Watch::Seen(s) => (s.state, s.node, String::new()),
                        _ => ("UNKNOWN".into(), String::new(), String::new()),
                    });
                return Watched::Lost { state, node, exit };
            }
            std::thread::sleep(nap);
            // Quick at first (short stages), then at most twice a second per job.
            let cap =
                (t0.elapsed() / 20).clamp(Duration::from_millis(20), Duration::from_millis(500));
            nap = (nap * 2).min(cap);
        }
    }
}

/// A stage name as a file name (`student@2` stays; slashes would not).
fn file_name(stage: &str) -> String {
    stage.replace(['/', '\\', '\0'], "_")
}

/// The last lines of a job's log, to show under its failure.
fn log_tail(log: &Path) -> String {
    let t = crate::shell::tail(log, 15);
    if t.is_empty() {
        String::new()
    } else {
        format!("; last lines of {}:\n{t}", log.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stages_resources_become_sbatch_options_after_the_runs_own() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("p.yaml");
        std::fs::write(
            &f,
            "name: my pipe\nstages:\n  train:\n    uses: shell\n    resources: {cpu: 4, gpu: 2, mem: 32G, time: 1d2h30m}\n    retries: 2\n    with: {run: \"true\"}\n  small:\n    uses: shell\n    with: {run: \"true\"}\n",
        )
        .unwrap();
        let plan = crate::load_plan(
            &f,
            &crate::Overrides::default(),
            &crate::Registry::with_builtins(),
        )
        .unwrap();
        let log = Path::new("/c/runs/r/logs/train.log");
        let a = sbatch_args(
            &plan.stages[0],
            &plan.pipeline.name,
            log,
            d.path(),
            &["--partition=gpu".to_string()],
        );
        assert_eq!(a[0], "--partition=gpu");
        for want in [
            "--job-name=fpipe:my_pipe:train",
            "--output=/c/runs/r/logs/train.log",
            "--open-mode=append",
            "--cpus-per-task=4",
            "--gres=gpu:2",
            "--mem=32768M",
            "--time=1-02:30:00",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        assert_eq!(plan.stages[0].resources.retries, Some(2));
        let b = sbatch_args(&plan.stages[1], "p", log, d.path(), &[]);
        assert!(b.iter().any(|x| x == "--cpus-per-task=1"), "{b:?}");
        assert!(
            !b.iter().any(|x| x.starts_with("--gres")
                || x.starts_with("--mem")
                || x.starts_with("--time")),
            "{b:?}"
        );
    }
}
