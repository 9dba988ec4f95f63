//! The files a Slurm job and its controller share through the cache: the job description the
//! controller writes, the outcome the job writes, and the marker that says which job computes
//! a key now; and the job side, which computes one stage exactly as a local run does.

use super::SlurmError;
use crate::exec::compute::{sources, Job, Outcome};
use crate::exec::{Engine, Reporter, RunOptions};
use crate::plan::Plan;
use crate::records::{iso8601, now_unix, StageState};
use fpipe_cache::{write_atomic, ArtifactId, CheckDepth, PathHasher};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// The format of job descriptions this build writes and reads.
const FORMAT: u32 = 1;

/// Everything a job needs to compute one stage: the pipeline is planned again on the node
/// from the same file and final parameters, and the stage's key must come out the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDescription {
    pub format: u32,
    /// The pipeline file (absolute).
    pub pipeline: PathBuf,
    /// The run's final parameters as a JSON file (read like `--params FILE`).
    pub params_file: PathBuf,
    /// The cache (absolute).
    pub cache: PathBuf,
    pub stage: String,
    /// The key the controller computed; the job refuses to run under another.
    pub key: String,
    /// Input artifacts by port, in key order.
    pub inputs: Vec<(String, ArtifactId)>,
    pub reason: String,
    /// The stage's log (Slurm's output file too).
    pub log: PathBuf,
    /// Where the job writes its [`JobOutcome`].
    pub outcome: PathBuf,
    /// `--device` of the run.
    pub device: String,
    /// GPUs asked for (`--gres=gpu:N`).
    pub gpus: usize,
    /// CPUs asked for (`--cpus-per-task`), when asked.
    pub cpus: Option<usize>,
    pub forced: bool,
    /// Rehash every input (`FPIPE_VERIFY_INPUTS=full` on the controller).
    pub verify_full: bool,
}

impl JobDescription {
    /// Reads a description written by [`JobDescription::write`].
    pub fn read(path: &Path) -> Result<Self, SlurmError> {
        let bytes = std::fs::read(path).map_err(|e| SlurmError::Description {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let d: JobDescription =
            serde_json::from_slice(&bytes).map_err(|e| SlurmError::Description {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        if d.format != FORMAT {
            return Err(SlurmError::Description {
                path: path.to_path_buf(),
                message: format!(
                    "format {} (this fpipe reads {FORMAT}): the nodes run another fpipe than the controller",
                    d.format
                ),
            });
        }
        Ok(d)
    }

    pub(super) fn write(&self, path: &Path) -> Result<(), SlurmError> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        write_atomic(path, &bytes).map_err(|e| SlurmError::Io(e.to_string()))
    }
}

/// How a job ended, written by the job itself when it ends (atomically, so a reader sees the
/// whole file or none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobOutcome {
    /// `ran`, `cached` (another process computed it first), `failed` or `interrupted`.
    pub state: StageState,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub outputs: BTreeMap<String, ArtifactId>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Seconds from the job's start to its end.
    pub seconds: f64,
    /// The node (`SLURMD_NODENAME`, else the host name).
    pub node: String,
    /// `SLURM_JOB_ID`.
    #[serde(default)]
    pub job_id: Option<String>,
    pub started: String,
    pub ended: String,
}

impl JobOutcome {
    /// The outcome in `path`, once the job wrote it.
    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// A job that could not even start computing (the pipeline no longer plans, say).
    pub fn failed(message: String, started: f64) -> Self {
        JobOutcome {
            state: StageState::Failed,
            message: Some(message),
            outputs: BTreeMap::new(),
            metrics: BTreeMap::new(),
            seconds: now_unix() - started,
            node: node_name(),
            job_id: std::env::var("SLURM_JOB_ID").ok(),
            started: iso8601(started),
            ended: iso8601(now_unix()),
        }
    }

    /// Writes the outcome atomically.
    pub fn write(&self, path: &Path) -> Result<(), SlurmError> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        write_atomic(path, &bytes).map_err(|e| SlurmError::Io(e.to_string()))
    }

    /// The process exit status of a job that ended so.
    pub fn exit_code(&self) -> u8 {
        match self.state {
            StageState::Ran | StageState::Cached => 0,
            StageState::Interrupted => 130,
            _ => 1,
        }
    }
}

/// Which job computes a key now: written (under the key's lock) when a controller submits,
/// read by any controller about to submit the same key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Marker {
    pub job_id: String,
    pub stage: String,
    pub outcome: PathBuf,
    pub log: PathBuf,
    pub submitted: String,
}

impl Marker {
    pub fn path(cache: &Path, key: &str) -> PathBuf {
        cache.join("runs").join("slurm").join(format!("{key}.json"))
    }
    pub fn read(cache: &Path, key: &str) -> Option<Self> {
        let bytes = std::fs::read(Self::path(cache, key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    pub fn write(&self, cache: &Path, key: &str) -> Result<(), SlurmError> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        write_atomic(&Self::path(cache, key), &bytes).map_err(|e| SlurmError::Io(e.to_string()))
    }
}

/// The job of stage `key` another controller (or an earlier, killed one) submitted, and where
/// it is now, if Slurm still runs it: `(job id, node)`.
pub fn running_job(cache: &Path, key: &str) -> Option<(String, String)> {
    let m = Marker::read(cache, key)?;
    if JobOutcome::read(&m.outcome).is_some() {
        return None;
    }
    let out = std::process::Command::new("squeue")
        .args(["-h", "-o", "%i|%T|%N", "-j", &m.job_id])
        .output()
        .ok()?;
    let seen = super::queue::parse_squeue(&String::from_utf8_lossy(&out.stdout));
    let s = seen.get(&m.job_id)?;
    s.alive().then(|| (m.job_id.clone(), s.node.clone()))
}

/// This node's name as Slurm calls it.
pub(super) fn node_name() -> String {
    if let Ok(n) = std::env::var("SLURMD_NODENAME") {
        return n;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The GPU ids a job may use: Slurm's `CUDA_VISIBLE_DEVICES` (or `SLURM_JOB_GPUS`) when set,
/// else the first `asked` ids.
fn job_gpus(asked: usize) -> Vec<usize> {
    for var in ["CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS"] {
        if let Ok(v) = std::env::var(var) {
            let ids: Option<Vec<usize>> = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().ok())
                .collect();
            if let Some(ids) = ids.filter(|i| !i.is_empty()) {
                return ids;
            }
        }
    }
    (0..asked).collect()
}

impl Engine {
    /// On a compute node: computes the stage `desc` describes, from `plan` (planned again from
    /// the same file and parameters), exactly as a local run computes it (the key's lock,
    /// the input check, staging, atomic publishing), and returns how it ended for the job to
    /// write. A key that differs from the controller's (the pipeline or a file it hashes
    /// changed since submission) fails without computing.
    pub fn run_job(
        &self,
        plan: &Plan,
        desc: &JobDescription,
        cancel: Arc<AtomicBool>,
        reporter: &Arc<dyn Reporter>,
    ) -> JobOutcome {
        let started = now_unix();
        let Some(i) = plan.find(&desc.stage) else {
            return JobOutcome::failed(
                format!(
                    "stage `{}` is no longer in {}; the pipeline changed after the job was submitted",
                    desc.stage,
                    desc.pipeline.display()
                ),
                started,
            );
        };
        let ps = &plan.stages[i];
        let hasher = PathHasher::with_memo(&self.store.memo_path());
        let parts = match self.parts(ps, desc.inputs.clone(), &hasher) {
            Ok(p) => p,
            Err(e) => return JobOutcome::failed(e.to_string(), started),
        };
        let key = parts.key();
        if key != desc.key {
            return JobOutcome::failed(
                format!(
                    "the stage's key on the node ({}) is not the one submitted ({}): {} or a file it reads changed after submission; run again",
                    &key[..16],
                    &desc.key[..16.min(desc.key.len())],
                    desc.pipeline.display()
                ),
                started,
            );
        }
        let threads = desc
            .cpus
            .or_else(|| {
                std::env::var("SLURM_CPUS_PER_TASK")
                    .ok()
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        let verified = Mutex::new(HashSet::new());
        let job = Job {
            ps,
            key,
            sources: sources(plan, ps, &parts),
            parts,
            reason: desc.reason.clone(),
            inputs: desc
                .inputs
                .iter()
                .map(|(p, id)| (p.clone(), self.store.object_path(id)))
                .collect(),
            log: desc.log.clone(),
            gpus: if desc.gpus > 0 {
                job_gpus(desc.gpus)
            } else {
                vec![]
            },
            threads: threads.max(1),
            forced: desc.forced,
            publish: true,
            verified: &verified,
        };
        let opts = RunOptions {
            jobs: job.threads,
            gpus: job.gpus.len(),
            device: desc.device.clone(),
            cancel,
            verify_inputs: if desc.verify_full {
                CheckDepth::Full
            } else {
                CheckDepth::Stat
            },
            ..RunOptions::default()
        };
        let outcome = self.execute(&job, &opts, reporter);
        let _ = hasher.save();
        let (state, message, outputs, metrics) = match outcome {
            Outcome::Done {
                outputs,
                metrics,
                ran,
                ..
            } => (
                if ran {
                    StageState::Ran
                } else {
                    StageState::Cached
                },
                None,
                outputs,
                metrics,
            ),
            Outcome::Failed {
                message,
                interrupted,
                ..
            } => (
                if interrupted {
                    StageState::Interrupted
                } else {
                    StageState::Failed
                },
                Some(message),
                BTreeMap::new(),
                BTreeMap::new(),
            ),
        };
        JobOutcome {
            state,
            message,
            outputs,
            metrics,
            seconds: now_unix() - started,
            node: node_name(),
            job_id: std::env::var("SLURM_JOB_ID").ok(),
            started: iso8601(started),
            ended: iso8601(now_unix()),
        }
    }
}

/// A word for a shell script, single-quoted.
pub(super) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The batch script of a job: `fpipe` on the node, given the description.
pub(super) fn script(fpipe: &Path, desc: &Path, stage: &str, key: &str) -> String {
    format!(
        "#!/bin/sh\n# fpipe: stage {} (key {})\nexec {} slurm-job {}\n",
        stage.replace('\n', " "),
        &key[..16.min(key.len())],
        shell_quote(&fpipe.to_string_lossy()),
        shell_quote(&desc.to_string_lossy())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_quote_paths() {
        let s = script(
            Path::new("/opt/it's/fpipe"),
            Path::new("/c/d.json"),
            "a",
            "0123456789abcdef0123",
        );
        assert!(
            s.contains(r"exec '/opt/it'\''s/fpipe' slurm-job '/c/d.json'"),
            "{s}"
        );
        assert!(s.starts_with("#!/bin/sh\n"));
    }
}
