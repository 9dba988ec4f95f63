//! Run records (one JSON per `fpipe run`) and the per-pipeline state `status` compares with.

use crate::keys::KeyParts;
use fpipe_cache::{ArtifactId, ArtifactStore};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a stage ended in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Ran,
    Cached,
    Failed,
    /// Not run because something it depends on failed.
    Skipped,
    Interrupted,
    /// Not reached (the run was interrupted first).
    NotRun,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still running, or the process died without finishing its record.
    Running,
    Ok,
    Failed,
    Interrupted,
}

/// One stage in a run record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub kind: String,
    pub version: u32,
    pub key: Option<String>,
    pub state: StageState,
    pub seconds: f64,
    #[serde(default)]
    pub outputs: BTreeMap<String, ArtifactId>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    pub log: Option<PathBuf>,
    pub error: Option<String>,
    /// Why it ran (status reason) when it ran.
    pub reason: Option<String>,
    /// Where a cached result came from, when another cache supplied it (the action record's
    /// `meta.origin`, e.g. `{"pulled_from": DIR, "at": TIME}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Value>,
    /// The cluster job that computed it, when a cluster executor ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<ClusterJob>,
}

/// A stage's job on a cluster scheduler (Slurm): which job, where, how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterJob {
    /// `slurm`.
    pub executor: String,
    /// The scheduler's job id (of the last attempt).
    pub id: String,
    /// The node it ran on, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The scheduler's final state (`COMPLETED`, `FAILED`, `CANCELLED`, `OUT_OF_MEMORY`,
    /// `TIMEOUT`, `NODE_FAIL`, ...), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Jobs submitted for the stage in this run (more than one after retries).
    #[serde(default = "one")]
    pub attempts: u32,
}

fn one() -> u32 {
    1
}

/// The record of one `fpipe run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub pipeline: PathBuf,
    pub pipeline_name: String,
    pub params: Value,
    pub started: String,
    pub started_unix: f64,
    pub seconds: f64,
    pub status: RunStatus,
    pub device: String,
    pub jobs: usize,
    pub stages: Vec<StageRecord>,
}

impl RunRecord {
    /// Where this record lives in `store`.
    pub fn dir(store: &ArtifactStore, id: &str) -> PathBuf {
        store.records_dir().join(id)
    }

    /// Writes the record atomically.
    pub fn save(&self, store: &ArtifactStore) -> fpipe_cache::Result<()> {
        let path = Self::dir(store, &self.id).join("record.json");
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        fpipe_cache::write_atomic(&path, &bytes)
    }

    /// Every readable record in `store`, oldest first.
    pub fn all(store: &ArtifactStore) -> Vec<RunRecord> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(store.records_dir()) else {
            return out;
        };
        for e in rd.flatten() {
            let p = e.path().join("record.json");
            if let Ok(bytes) = std::fs::read(&p) {
                if let Ok(r) = serde_json::from_slice::<RunRecord>(&bytes) {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| {
            a.started_unix
                .partial_cmp(&b.started_unix)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.id.cmp(&b.id))
        });
        out
    }
}

/// What a stage was last computed from, for `fpipe status` reasons.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageMemory {
    pub parts: KeyParts,
    pub key: String,
    pub outputs: BTreeMap<String, ArtifactId>,
}

/// The last known state of each stage of one pipeline file in one store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PipelineState {
    pub pipeline: PathBuf,
    /// The pipeline parameters of the last run.
    #[serde(default)]
    pub params: Value,
    pub stages: BTreeMap<String, StageMemory>,
}

impl PipelineState {
    fn path(store: &ArtifactStore, pipeline: &Path) -> PathBuf {
        let abs = std::fs::canonicalize(pipeline).unwrap_or_else(|_| pipeline.to_path_buf());
        let h = blake3::hash(abs.to_string_lossy().as_bytes()).to_hex();
        store
            .records_dir()
            .join("state")
            .join(format!("{}.json", &h[..16]))
    }

    /// The state of `pipeline`, empty if never run with this store.
    pub fn load(store: &ArtifactStore, pipeline: &Path) -> PipelineState {
        std::fs::read(Self::path(store, pipeline))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Saves it atomically.
    pub fn save(&self, store: &ArtifactStore, pipeline: &Path) -> fpipe_cache::Result<()> {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        fpipe_cache::write_atomic(&Self::path(store, pipeline), &bytes)
    }

    /// Every saved pipeline state in `store` (gc keeps what they reference).
    pub fn all(store: &ArtifactStore) -> Vec<PipelineState> {
        let Ok(rd) = std::fs::read_dir(store.records_dir().join("state")) else {
            return vec![];
        };
        rd.flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }
}

pub use fpipe_cache::{iso8601, now_unix};

#[cfg(test)]
mod tests {
    #[test]
    fn iso_dates() {
        assert_eq!(super::iso8601(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(super::iso8601(1_795_460_701.0), "2026-11-23T19:05:01Z");
    }
}
