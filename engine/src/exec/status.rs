//! What `fpipe run` would do and why: keys of the stages whose inputs are known, cache
//! look-ups, and an explanation for each stage that would run.

use super::keys::{gather_inputs, Known};
use super::{Engine, RunOptions, StageStatus};
use crate::error::Result;
use crate::keys::KeyParts;
use crate::plan::{Plan, PlannedStage};
use crate::records::{PipelineState, StageMemory};
use fpipe_cache::{ArtifactId, ArtifactStore, PathHasher};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

impl Engine {
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
}

/// Why a stage whose key is not cached must run.
pub(super) fn explain(
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

pub(super) fn diff_values(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
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

pub(super) fn is_path_value(v: &Value) -> bool {
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
