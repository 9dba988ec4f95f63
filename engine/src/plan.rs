//! Checking a loaded pipeline against the stage kinds, and building its DAG.
//!
//! Everything a user can get wrong in the wiring is found here, before anything runs: unknown
//! kinds, parameters and ports, wrong types, missing stages, cycles, output paths that escape.

use crate::error::PipelineError;
use crate::pipeline::{suggest_hint, Pipeline, Resources, StageDef};
use crate::registry::Registry;
use crate::stage::{ParamSpec, ParamType, PortSpec, Stage, ANY};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One wired input: this stage's `port` reads `from_port` of stage `from`.
#[derive(Debug, Clone)]
pub struct Wire {
    pub port: String,
    pub from: usize,
    pub from_port: String,
}

/// A stage checked against its kind.
pub struct PlannedStage {
    pub def: StageDef,
    pub kind: Arc<dyn Stage>,
    /// Parameters for the stage: every declared one, defaults filled, paths made absolute.
    pub params: BTreeMap<String, Value>,
    /// Parameters that enter the key (volatile ones left out), before path hashing.
    pub key_params: BTreeMap<String, Value>,
    /// Path parameters: name -> absolute paths (a list parameter has several). Their content
    /// hashes replace them in the key.
    pub path_params: BTreeMap<String, Vec<PathBuf>>,
    /// Companion extensions per path parameter.
    pub companions: BTreeMap<String, &'static [&'static str]>,
    /// Inputs in port order (declared order; by name for kinds that take any port).
    pub wires: Vec<Wire>,
    pub resources: Resources,
}

impl PlannedStage {
    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }
}

/// A checked pipeline: stages, their wiring and a topological order.
pub struct Plan {
    pub pipeline: Pipeline,
    pub stages: Vec<PlannedStage>,
    /// Stage indices, dependencies first.
    pub order: Vec<usize>,
    pub by_name: HashMap<String, usize>,
    /// What still works but should change (a kind used by its former name), with positions.
    pub warnings: Vec<PipelineError>,
}

impl Plan {
    /// Index of the stage called `name` (also `family@last`).
    pub fn find(&self, name: &str) -> Option<usize> {
        if let Some(i) = self.by_name.get(name) {
            return Some(*i);
        }
        let fam = name.strip_suffix("@last")?;
        let last = self.pipeline.families.get(fam)?.last()?;
        self.by_name.get(last).copied()
    }

    /// `targets` and everything they depend on, in topological order.
    pub fn with_ancestors(&self, targets: &[usize]) -> Vec<usize> {
        let mut keep = vec![false; self.stages.len()];
        let mut stack: Vec<usize> = targets.to_vec();
        while let Some(i) = stack.pop() {
            if keep[i] {
                continue;
            }
            keep[i] = true;
            stack.extend(self.stages[i].wires.iter().map(|w| w.from));
        }
        self.order.iter().copied().filter(|i| keep[*i]).collect()
    }

    /// Stages that depend (transitively) on `i`.
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        let mut out = vec![false; self.stages.len()];
        for &j in &self.order {
            if self.stages[j]
                .wires
                .iter()
                .any(|w| w.from == i || out[w.from])
            {
                out[j] = true;
            }
        }
        (0..self.stages.len()).filter(|j| out[*j]).collect()
    }
}

/// Checks `pipeline` against `registry`. Returns every problem found, not just the first.
pub fn plan(pipeline: Pipeline, registry: &Registry) -> Result<Plan, Vec<PipelineError>> {
    let mut errors = Vec::new();
    let by_name: HashMap<String, usize> = pipeline
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let mut planned: Vec<Option<PlannedStage>> = Vec::new();
    let mut warnings = Vec::new();
    for def in &pipeline.stages {
        if let Some((_, Some(current))) = registry.resolve(&def.uses) {
            warnings.push(
                def.err_at(
                    &["uses"],
                    format!("kind `{}` is now called `{current}`", def.uses),
                )
                .hint(format!(
                    "write `uses: {current}`; the old name will stop working in a later release"
                )),
            );
        }
        match check_stage(def, registry) {
            Ok(p) => planned.push(Some(p)),
            Err(e) => {
                errors.push(e);
                planned.push(None);
            }
        }
    }
    // Wiring needs every producer's signature.
    let sigs: Vec<Option<Vec<PortSpec>>> = planned
        .iter()
        .map(|p| p.as_ref().map(|p| p.kind.signature().outputs))
        .collect();
    for (i, slot) in planned.iter_mut().enumerate() {
        let Some(p) = slot else { continue };
        match wire(&pipeline, &by_name, &sigs, i, p) {
            Ok(w) => p.wires = w,
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let stages: Vec<PlannedStage> = planned.into_iter().flatten().collect();
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| g.add_node(i)).collect();
    for (i, s) in stages.iter().enumerate() {
        for w in &s.wires {
            g.add_edge(nodes[w.from], nodes[i], ());
        }
    }
    let order = match petgraph::algo::toposort(&g, None) {
        Ok(o) => o.into_iter().map(|n| g[n]).collect(),
        Err(cycle) => {
            let start = g[cycle.node_id()];
            let path = find_cycle(&stages, start);
            let names: Vec<&str> = path.iter().map(|i| stages[*i].name()).collect();
            let def = &stages[start].def;
            return Err(vec![def
                .err(format!("the stages form a cycle: {}", names.join(" -> ")))
                .hint(
                    "a stage cannot depend on its own output, directly or through others",
                )]);
        }
    };
    Ok(Plan {
        pipeline,
        stages,
        order,
        by_name,
        warnings,
    })
}

/// A cycle through `start`, as stage indices ending where they begin.
fn find_cycle(stages: &[PlannedStage], start: usize) -> Vec<usize> {
    // Walk backwards along inputs (every node in a cycle has an input inside it): find a
    // path start <- ... <- start by DFS.
    fn dfs(
        stages: &[PlannedStage],
        cur: usize,
        start: usize,
        seen: &mut Vec<bool>,
        path: &mut Vec<usize>,
    ) -> bool {
        for w in &stages[cur].wires {
            if w.from == start {
                path.push(start);
                return true;
            }
            if !seen[w.from] {
                seen[w.from] = true;
                path.push(w.from);
                if dfs(stages, w.from, start, seen, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut seen = vec![false; stages.len()];
    let mut path = vec![start];
    if dfs(stages, start, start, &mut seen, &mut path) {
        path.reverse(); // producer -> consumer order
        path
    } else {
        vec![start, start]
    }
}

fn check_stage(def: &StageDef, registry: &Registry) -> Result<PlannedStage, PipelineError> {
    let Some((kind, _)) = registry.resolve(&def.uses) else {
        let close = registry.suggest(&def.uses);
        let hint = if close.is_empty() {
            format!(
                "known kinds: {}",
                registry
                    .kinds()
                    .map(|k| k.kind())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "did you mean {}?",
                close
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        };
        return Err(def
            .err_at(&["uses"], format!("unknown stage kind `{}`", def.uses))
            .hint(hint));
    };
    let sig = kind.signature();
    let known: Vec<&str> = sig.params.iter().map(|p| p.name).collect();
    for k in def.with.keys() {
        if !known.contains(&k.as_str()) {
            let hint = if known.is_empty() {
                format!("`{}` takes no parameters", def.uses)
            } else {
                suggest_hint(k, &known)
            };
            return Err(def
                .err_at(
                    &["with", k],
                    format!("unknown parameter `{k}` for kind `{}`", def.uses),
                )
                .hint(hint));
        }
    }
    let mut params = BTreeMap::new();
    let mut key_params = BTreeMap::new();
    let mut path_params = BTreeMap::new();
    let mut companions = BTreeMap::new();
    for spec in &sig.params {
        let given = def.with.get(spec.name);
        let value = match (given, &spec.default) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => {
                return Err(def
                    .err(format!(
                        "missing required parameter `{}` ({})",
                        spec.name,
                        spec.ty.describe()
                    ))
                    .hint(format!("add it under `with:`: {}", spec.doc)))
            }
        };
        let (value, paths) = check_value(def, spec, &spec.ty, value)?;
        if !paths.is_empty() || matches!(spec.ty, ParamType::Path { .. } | ParamType::LocalPath) {
            path_params.insert(spec.name.to_string(), paths);
        }
        let comp = match &spec.ty {
            ParamType::Path { companions } => Some(*companions),
            ParamType::LocalPath => Some(&[][..]),
            ParamType::List(inner) => match inner.as_ref() {
                ParamType::Path { companions } => Some(*companions),
                ParamType::LocalPath => Some(&[][..]),
                _ => None,
            },
            _ => None,
        };
        if let Some(c) = comp {
            companions.insert(spec.name.to_string(), c);
        }
        let unchanged = spec.keyed_if_changed && spec.default.as_ref() == Some(&value);
        if !spec.volatile && !unchanged {
            key_params.insert(spec.name.to_string(), value.clone());
        }
        params.insert(spec.name.to_string(), value);
    }
    kind.check_params(&params)
        .map_err(|m| def.err_at(&["with"], m))?;
    let mut resources = def.resources;
    if resources.cpu == 0 {
        resources.cpu = kind.default_cpus();
    }
    // A former name plans as the kind it now names: records, status and listings say the
    // current name (the warning about the old one is raised by `plan`).
    let mut def = def.clone();
    def.uses = kind.kind().to_string();
    Ok(PlannedStage {
        def,
        kind: kind.clone(),
        params,
        key_params,
        path_params,
        companions,
        wires: vec![],
        resources,
    })
}

fn check_value(
    def: &StageDef,
    spec: &ParamSpec,
    ty: &ParamType,
    v: Value,
) -> Result<(Value, Vec<PathBuf>), PipelineError> {
    let bad = |what: String| {
        def.err_at(&["with", spec.name], what)
            .hint(format!("`{}`: {}", spec.name, spec.doc))
    };
    let shown = |v: &Value| {
        let s = v.to_string();
        if s.len() > 40 {
            format!("{}...", &s[..40])
        } else {
            s
        }
    };
    match ty {
        ParamType::Any => Ok((v, vec![])),
        ParamType::Bool if v.is_boolean() => Ok((v, vec![])),
        ParamType::Int if v.is_i64() || v.is_u64() => Ok((v, vec![])),
        // 1 and 1.0 are the same number: normalise so they give the same key.
        ParamType::Float if v.is_number() => Ok((v.as_f64().map(Value::from).unwrap_or(v), vec![])),
        ParamType::String if v.is_string() => Ok((v, vec![])),
        ParamType::Enum(opts) => match v.as_str() {
            Some(s) if opts.contains(&s) => Ok((v, vec![])),
            Some(s) => Err(def
                .err_at(
                    &["with", spec.name],
                    format!("parameter `{}`: `{s}` is not allowed", spec.name),
                )
                .hint(suggest_hint(s, opts))),
            None => Err(bad(format!(
                "parameter `{}` must be {}, got {}",
                spec.name,
                ty.describe(),
                shown(&v)
            ))),
        },
        ParamType::List(inner) => {
            let Value::Array(items) = v else {
                return Err(bad(format!(
                    "parameter `{}` must be {}, got {}",
                    spec.name,
                    ty.describe(),
                    shown(&v)
                )));
            };
            let mut out = Vec::new();
            let mut paths = Vec::new();
            for it in items {
                let (x, mut p) = check_value(def, spec, inner, it)?;
                out.push(x);
                paths.append(&mut p);
            }
            Ok((Value::Array(out), paths))
        }
        ParamType::Path { .. } => {
            let Some(s) = v.as_str() else {
                return Err(bad(format!(
                    "parameter `{}` must be a path, got {}",
                    spec.name,
                    shown(&v)
                )));
            };
            let p = def.base_dir.join(s);
            if !p.exists() {
                return Err(missing_path(def, spec, s, &p));
            }
            let abs = std::path::absolute(&p).unwrap_or(p);
            Ok((Value::String(abs.to_string_lossy().to_string()), vec![abs]))
        }
        ParamType::LocalPath => {
            let Some(s) = v.as_str() else {
                return Err(bad(format!(
                    "parameter `{}` must be a path, got {}",
                    spec.name,
                    shown(&v)
                )));
            };
            let rel = inside_folder(s).map_err(|why| {
                def.err_at(&["with", spec.name], format!("parameter `{}`: `{s}` {why}", spec.name))
                    .hint("name a file or folder inside the pipeline file's folder, relative to it (copy it there if it lives elsewhere), so the stage can place it inside its own working directory")
            })?;
            let abs = def.base_dir.join(&rel);
            if std::fs::symlink_metadata(&abs).is_err() {
                return Err(missing_path(def, spec, s, &abs));
            }
            Ok((Value::String(abs.to_string_lossy().to_string()), vec![abs]))
        }
        _ => Err(bad(format!(
            "parameter `{}` must be {}, got {}",
            spec.name,
            ty.describe(),
            shown(&v)
        ))),
    }
}

/// A path parameter's `s` names nothing at `looked`.
fn missing_path(def: &StageDef, spec: &ParamSpec, s: &str, looked: &Path) -> PipelineError {
    def.err_at(
        &["with", spec.name],
        format!("parameter `{}`: `{s}` does not exist", spec.name),
    )
    .hint(format!(
        "paths are relative to the pipeline file; looked for {}",
        looked.display()
    ))
}

/// `s` as a relative path that stays inside the folder it is relative to, with `.` and `..`
/// resolved (`a/../b` is `b`); otherwise why not.
pub(crate) fn inside_folder(s: &str) -> Result<PathBuf, &'static str> {
    use std::path::Component;
    let p = std::path::Path::new(s);
    if p.is_absolute() || s.starts_with('~') {
        return Err("is an absolute path");
    }
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() {
                    return Err("leaves the pipeline file's folder (`..`)");
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    if out.is_empty() {
        return Err("names the pipeline file's folder itself");
    }
    Ok(out.iter().collect())
}

fn wire(
    pipeline: &Pipeline,
    by_name: &HashMap<String, usize>,
    sigs: &[Option<Vec<PortSpec>>],
    i: usize,
    p: &PlannedStage,
) -> Result<Vec<Wire>, Vec<PipelineError>> {
    let def = &p.def;
    let sig = p.kind.signature();
    let any_inputs = p.kind.accepts_any_inputs();
    let mut errors = Vec::new();
    let mut wires: Vec<(usize, Wire)> = Vec::new();
    for (port, reference) in &def.inputs {
        let spec = sig.inputs.iter().position(|s| s.name == port);
        let consumer_ty = match spec {
            Some(k) => sig.inputs[k].ty,
            None if any_inputs => {
                if !port
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    errors.push(def.err_at(
                        &["inputs", port],
                        format!("input name `{port}` must use letters, digits, `_` or `-`"),
                    ));
                    continue;
                }
                ANY
            }
            None => {
                let names: Vec<&str> = sig.inputs.iter().map(|s| s.name).collect();
                errors.push(
                    def.err_at(
                        &["inputs", port],
                        format!("kind `{}` has no input port `{port}`", def.uses),
                    )
                    .hint(if names.is_empty() {
                        format!("`{}` takes no inputs", def.uses)
                    } else {
                        suggest_hint(port, &names)
                    }),
                );
                continue;
            }
        };
        let (from, from_port) = match resolve_ref(pipeline, by_name, sigs, reference) {
            Ok(r) => r,
            Err((msg, hint)) => {
                let mut e = def.err_at(&["inputs", port], format!("input `{port}`: {msg}"));
                if let Some(h) = hint {
                    e = e.hint(h);
                }
                errors.push(e);
                continue;
            }
        };
        if from == i {
            errors.push(
                def.err_at(&["inputs", port], format!("input `{port}` refers to the stage itself; the stages form a cycle: {} -> {}", def.name, def.name))
                    .hint("a stage cannot depend on its own output"),
            );
            continue;
        }
        if let Some(outs) = &sigs[from] {
            if let Some(out) = outs.iter().find(|o| o.name == from_port) {
                if consumer_ty != ANY && out.ty != ANY && out.ty != consumer_ty {
                    errors.push(
                        def.err_at(&["inputs", port], format!(
                            "wrong port type: input `{port}` takes `{consumer_ty}` but `{}.{from_port}` is `{}`",
                            pipeline.stages[from].name, out.ty
                        ))
                        .hint(format!("connect a `{consumer_ty}` output here")),
                    );
                    continue;
                }
            }
        }
        let order = spec.unwrap_or(usize::MAX);
        wires.push((
            order,
            Wire {
                port: port.clone(),
                from,
                from_port,
            },
        ));
    }
    for s in &sig.inputs {
        if !s.optional && !def.inputs.iter().any(|(p, _)| p == s.name) {
            errors.push(
                def.err(format!(
                    "required input `{}` ({}) is not connected",
                    s.name, s.ty
                ))
                .hint(format!(
                    "add `inputs: {{{}: STAGE.PORT}}`: {}",
                    s.name, s.doc
                )),
            );
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // Port order: declared ports in declaration order, then any-ports by name.
    wires.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.port.cmp(&b.1.port)));
    Ok(wires.into_iter().map(|(_, w)| w).collect())
}

type RefError = (String, Option<String>);

fn resolve_ref(
    pipeline: &Pipeline,
    by_name: &HashMap<String, usize>,
    sigs: &[Option<Vec<PortSpec>>],
    reference: &str,
) -> Result<(usize, String), RefError> {
    let lookup = |name: &str| -> Option<usize> {
        if let Some(i) = by_name.get(name) {
            return Some(*i);
        }
        let fam = name.strip_suffix("@last")?;
        let last = pipeline.families.get(fam)?.last()?;
        by_name.get(last).copied()
    };
    let default_port = |from: usize| -> Result<String, RefError> {
        let Some(outs) = &sigs[from] else {
            return Ok(String::new()); // producer had its own error; don't pile on
        };
        match outs.as_slice() {
            [one] => Ok(one.name.to_string()),
            [] => Err((
                format!("stage `{}` has no outputs", pipeline.stages[from].name),
                None,
            )),
            many => Err((
                format!("stage `{}` has several outputs", pipeline.stages[from].name),
                Some(format!(
                    "name one: {}",
                    many.iter()
                        .map(|o| format!("`{}.{}`", pipeline.stages[from].name, o.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            )),
        }
    };
    if let Some(i) = lookup(reference) {
        return Ok((i, default_port(i)?));
    }
    if let Some((stage, port)) = reference.rsplit_once('.') {
        if let Some(i) = lookup(stage) {
            if let Some(outs) = &sigs[i] {
                if !outs.iter().any(|o| o.name == port) {
                    let names: Vec<&str> = outs.iter().map(|o| o.name).collect();
                    return Err((
                        format!("stage `{stage}` has no output port `{port}`"),
                        Some(suggest_hint(port, &names)),
                    ));
                }
            }
            return Ok((i, port.to_string()));
        }
    }
    let stage = reference.split('.').next().unwrap_or(reference);
    if let Some(items) = pipeline.families.get(stage) {
        return Err((
            format!("`{stage}` is a family of {} stages", items.len()),
            Some(format!(
                "name one item (e.g. `{}`) or `{stage}@last`",
                items.first().map(String::as_str).unwrap_or("name@1")
            )),
        ));
    }
    let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    let mut close: Vec<(usize, &str)> = names
        .iter()
        .map(|n| (crate::util::edit_distance(stage, n), *n))
        .filter(|(d, _)| *d <= 3)
        .collect();
    close.sort();
    Err((
        format!("refers to missing stage `{stage}`"),
        Some(match close.first() {
            Some((_, n)) => format!("did you mean `{n}`?"),
            None => format!("stages in this pipeline: {}", names.join(", ")),
        }),
    ))
}
