//! How a stage of a run ended, built once by whoever settles the stage (the scheduler, or a
//! recompute), and turned into both the reporter's event and the run record.

use super::Event;
use crate::keys::KeyParts;
use crate::plan::PlannedStage;
use crate::records::{ClusterJob, StageRecord, StageState};
use fpipe_cache::ArtifactId;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// How a stage of a run ended: the one source of its [`Event::Finish`] and its
/// [`StageRecord`].
pub(super) struct Ending {
    pub state: StageState,
    /// Known once its inputs were.
    pub key: Option<String>,
    pub seconds: f64,
    pub log: Option<PathBuf>,
    pub error: Option<String>,
    pub outputs: BTreeMap<String, ArtifactId>,
    pub metrics: BTreeMap<String, f64>,
    /// Why it ran, when it ran.
    pub reason: Option<String>,
    /// The cache it was pulled from, when it was cached.
    pub origin: Option<Value>,
    /// The key parts of a stage with outputs, for the next `status` to compare with.
    pub parts: Option<KeyParts>,
    /// The cluster job that ran it, under a cluster executor.
    pub job: Option<ClusterJob>,
}

impl Ending {
    /// An ending in `state` with nothing else known.
    pub fn new(state: StageState) -> Self {
        Ending {
            state,
            key: None,
            seconds: 0.0,
            log: None,
            error: None,
            outputs: BTreeMap::new(),
            metrics: BTreeMap::new(),
            reason: None,
            origin: None,
            parts: None,
            job: None,
        }
    }

    /// The event telling a reporter that stage `name` ended so.
    pub fn event<'a>(&'a self, name: &'a str) -> Event<'a> {
        Event::Finish {
            name,
            state: self.state,
            seconds: self.seconds,
            error: self.error.as_deref(),
        }
    }

    /// The run record's entry for `ps`.
    pub fn record(self, ps: &PlannedStage) -> StageRecord {
        StageRecord {
            name: ps.name().to_string(),
            kind: ps.def.uses.clone(),
            version: ps.kind.version(),
            key: self.key,
            state: self.state,
            seconds: self.seconds,
            outputs: self.outputs,
            metrics: self.metrics,
            log: self.log,
            error: self.error,
            reason: self.reason,
            origin: self.origin,
            job: self.job,
        }
    }
}
