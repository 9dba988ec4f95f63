//! The key of a stage in a run: its inputs from the stages settled so far, and its key parts
//! with path parameters replaced by their content hashes.

use super::Engine;
use crate::error::{EngineError, Result};
use crate::keys::KeyParts;
use crate::plan::{Plan, PlannedStage};
use fpipe_cache::{ArtifactId, PathHasher};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What a run or a status knows of a stage so far.
pub(super) enum Known {
    /// Its outputs (it ran or was cached).
    Outputs(BTreeMap<String, ArtifactId>),
    /// It would run, so its outputs are not known yet (status only).
    Pending,
    /// It failed or was skipped: what depends on it cannot run.
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
}

/// Input ids of a stage whose producers are known; otherwise the pending input names.
pub(super) fn gather_inputs(
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
