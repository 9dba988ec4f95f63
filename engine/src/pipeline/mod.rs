//! Pipeline files: parameters, templating, includes, and `foreach`/`matrix` expansion.
//!
//! Loading is in two steps. The top-level `params:` and `include:` blocks are read as literal
//! YAML first (they may not use templates), merged with included files' parameters and with
//! the command line's overrides. Then every file is rendered by minijinja over `params` and
//! parsed; stage families are expanded into concrete stages named `family@item`.
//!
//! - [`params`]: the literal `params:`/`include:` blocks and the overrides of the command line;
//! - [`render`]: minijinja over `params`, bounded in work and output;
//! - [`expand`]: stage families (`foreach`/`matrix`) into concrete stages.

mod expand;
mod params;
mod published;
mod render;

use crate::error::PipelineError;
use crate::yamlpos::key_line;
use expand::expand_stage;
pub use expand::MAX_STAGES;
use params::{literal_block, merged_params};
pub use published::Published;
use render::{render, rendered_yaml_err};
pub use render::{TEMPLATE_FUEL, TEMPLATE_OUTPUT_BYTES};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The pipeline format versions this build reads.
pub const FORMAT_VERSIONS: &[u64] = &[1];

/// One pipeline file after rendering.
#[derive(Debug)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
    /// Line of each stage's key, found in one pass (large pipelines have thousands).
    pub stage_lines: std::collections::HashMap<String, usize>,
}

/// Resources a stage asks the scheduler for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// Job slots (of `-j`). 0 means "the kind's default".
    pub cpu: usize,
    /// GPUs; the scheduler hands out ids.
    pub gpu: usize,
    /// Memory in MiB (`mem: 32G`), asked of a cluster scheduler (Slurm `--mem`); 0: unset.
    /// The local executor does not enforce it.
    pub mem_mb: u64,
    /// Wall-clock limit in seconds (`time: 4h`), asked of a cluster scheduler (Slurm
    /// `--time`); 0: unset.
    pub time_s: u64,
    /// How often a cluster job lost to its node (Slurm NODE_FAIL, PREEMPTED) is submitted
    /// again (the stage's `retries:`); `None`: the run's default.
    pub retries: Option<u32>,
}

/// A concrete stage as written (after expansion), not yet checked against its kind.
#[derive(Debug, Clone)]
pub struct StageDef {
    pub name: String,
    /// For `student@2`, `student`.
    pub family: Option<String>,
    pub uses: String,
    /// Parameters as written (`with:`), converted to JSON values.
    pub with: Map<String, Value>,
    /// (port, reference) in the order written.
    pub inputs: Vec<(String, String)>,
    pub resources: Resources,
    pub source: Arc<Source>,
    pub line: Option<usize>,
    /// Directory that relative paths of this stage are resolved against (its file's folder).
    pub base_dir: PathBuf,
}

impl StageDef {
    /// An error located at this stage.
    pub fn err(&self, message: impl Into<String>) -> PipelineError {
        PipelineError::new(&self.source.file, message)
            .at(self.line)
            .stage(&self.name)
    }
    /// An error located at `key` (e.g. `["with", "lr"]`) within this stage when found.
    pub fn err_at(&self, sub: &[&str], message: impl Into<String>) -> PipelineError {
        let family = self.family.as_deref().unwrap_or(&self.name);
        let mut path = vec!["stages", family];
        path.extend_from_slice(sub);
        let line = key_line(&self.source.text, &path).or(self.line);
        PipelineError::new(&self.source.file, message)
            .at(line)
            .stage(&self.name)
    }
}

/// A loaded pipeline.
#[derive(Debug)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    /// Final parameters (file < includes overridden by file < `--params` < `-p`).
    pub params: Value,
    /// Concrete stages in declaration order (includes first).
    pub stages: Vec<StageDef>,
    /// Families: name -> instance names in item order.
    pub families: BTreeMap<String, Vec<String>>,
    /// Reference numbers for the stages' metrics (the `published:` block of every file).
    pub published: Vec<Published>,
}

/// Command-line parameter overrides.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--params FILE` files, in order.
    pub files: Vec<PathBuf>,
    /// `-p key=value` pairs in order; keys may be dotted (`train.lr`); values are YAML.
    pub pairs: Vec<String>,
}

struct RawFile {
    file: PathBuf,
    text: String,
    params: Value,
}

const TOP_KEYS: &[&str] = &[
    "fpipe",
    "name",
    "description",
    "params",
    "include",
    "stages",
    "published",
];

const STAGE_KEYS: &[&str] = &[
    "uses",
    "with",
    "inputs",
    "foreach",
    "matrix",
    "resources",
    "retries",
    "desc",
    "description",
];

/// Loads, renders and expands a pipeline file.
pub fn load(file: &Path, overrides: &Overrides) -> Result<Pipeline, PipelineError> {
    let mut raws = Vec::new();
    let mut seen = HashSet::new();
    read_with_includes(file, &mut raws, &mut seen, 0)?;
    let params = merged_params(file, &raws, overrides)?;

    let mut pipeline = Pipeline {
        file: file.to_path_buf(),
        name: String::new(),
        params: params.clone(),
        stages: Vec::new(),
        families: BTreeMap::new(),
        published: Vec::new(),
    };
    let main_index = raws.len() - 1;
    let mut pending = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let rendered = render(&raw.file, &raw.text, &params)?;
        let stage_lines = crate::yamlpos::child_key_lines(&rendered, "stages");
        let source = Arc::new(Source {
            file: raw.file.clone(),
            text: rendered,
            stage_lines,
        });
        check_nesting(&raw.file, &source.text)?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&source.text)
            .map_err(|e| rendered_yaml_err(raw, &source.text, &e, overrides))?;
        let doc = match doc {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            _ => {
                return Err(PipelineError::new(
                    &raw.file,
                    "a pipeline file is a mapping with `stages:` (and optionally `fpipe:`, `name:`, `params:`, `include:`)",
                )
                .at(Some(1)))
            }
        };
        check_version(&source, &doc)?;
        for (k, _) in doc.iter() {
            let k = key_str(&source, k, &[])?;
            if !TOP_KEYS.contains(&k.as_str()) {
                return Err(
                    PipelineError::new(&raw.file, format!("unknown top-level key `{k}`"))
                        .at(key_line(&source.text, &[&k]))
                        .hint(suggest_hint(&k, TOP_KEYS)),
                );
            }
        }
        if i == main_index {
            pipeline.name = doc
                .get("name")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    file.file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_else(|| "pipeline".into())
                });
        }
        for p in published::read(&raw.file, &source.text, &doc)? {
            pending.push((p, source.clone()));
        }
        let base_dir = raw
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
        match doc.get("stages") {
            None | Some(serde_yaml::Value::Null) => {}
            Some(serde_yaml::Value::Mapping(stages)) => {
                for (name, spec) in stages {
                    let name = key_str(&source, name, &["stages"])?;
                    expand_stage(&source, &base_dir, &name, spec, &params, &mut pipeline)?;
                }
            }
            Some(_) => {
                return Err(PipelineError::new(
                    &raw.file,
                    "`stages:` must be a mapping of stage names to stages",
                )
                .at(key_line(&source.text, &["stages"])))
            }
        }
    }
    // Duplicate names across files or between families and plain stages.
    let mut names: BTreeMap<&str, &StageDef> = BTreeMap::new();
    for s in &pipeline.stages {
        if let Some(prev) = names.insert(&s.name, s) {
            return Err(s.err("duplicate stage name").hint(format!(
                "also defined at {}:{}; give each stage a unique name",
                prev.source.file.display(),
                prev.line.unwrap_or(0)
            )));
        }
    }
    let mut published = Vec::with_capacity(pending.len());
    for (p, source) in pending {
        if !names.contains_key(p.stage.as_str()) && !pipeline.families.contains_key(&p.stage) {
            return Err(PipelineError::new(
                &source.file,
                format!("published: no stage or family `{}`", p.stage),
            )
            .at(key_line(&source.text, &["published"]))
            .hint(suggest_hint(
                &p.stage,
                &names
                    .keys()
                    .copied()
                    .chain(pipeline.families.keys().map(String::as_str))
                    .collect::<Vec<_>>(),
            )));
        }
        published.push(p);
    }
    pipeline.published = published;
    Ok(pipeline)
}

fn read_with_includes(
    file: &Path,
    out: &mut Vec<RawFile>,
    seen: &mut HashSet<PathBuf>,
    depth: usize,
) -> Result<(), PipelineError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        PipelineError::new(file, format!("cannot read pipeline file: {e}"))
            .hint("check the path; paths in `include:` are relative to the including file")
    })?;
    let canon = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    if !seen.insert(canon) {
        return Err(
            PipelineError::new(file, "included twice (or includes itself)")
                .hint("each file may be included once"),
        );
    }
    if depth > 16 {
        return Err(PipelineError::new(
            file,
            "includes nested more than 16 deep",
        ));
    }
    check_nesting(file, &text)?;
    let params = literal_block(file, &text, "params")?.unwrap_or(Value::Object(Map::new()));
    if !params.is_object() {
        return Err(
            PipelineError::new(file, "`params:` must be a mapping of names to values")
                .at(key_line(&text, &["params"])),
        );
    }
    if let Some(inc) = literal_block(file, &text, "include")? {
        let list = match inc {
            Value::String(s) => vec![Value::String(s)],
            Value::Array(a) => a,
            _ => {
                return Err(PipelineError::new(
                    file,
                    "`include:` must be a path or a list of paths",
                )
                .at(key_line(&text, &["include"])))
            }
        };
        let dir = file.parent().unwrap_or(Path::new("."));
        for item in list {
            let Some(rel) = item.as_str() else {
                return Err(PipelineError::new(file, "`include:` entries must be paths")
                    .at(key_line(&text, &["include"])));
            };
            let p = Path::new(rel);
            if p.is_absolute() {
                return Err(PipelineError::new(
                    file,
                    format!("include `{rel}` is an absolute path"),
                )
                .at(key_line(&text, &["include"]))
                .hint("write it relative to this file, so the pipeline works on other machines"));
            }
            let inc_path = dir.join(p);
            if !inc_path.is_file() {
                return Err(
                    PipelineError::new(file, format!("included file `{rel}` not found"))
                        .at(key_line(&text, &["include"]))
                        .hint(format!("looked for {}", inc_path.display())),
                );
            }
            read_with_includes(&inc_path, out, seen, depth + 1)?;
        }
    }
    out.push(RawFile {
        file: file.to_path_buf(),
        text,
        params,
    });
    Ok(())
}

fn check_version(source: &Source, doc: &serde_yaml::Mapping) -> Result<(), PipelineError> {
    match doc.get("fpipe") {
        None => Ok(()), // files without the key are read as format 1
        Some(v) => match v.as_u64() {
            Some(n) if FORMAT_VERSIONS.contains(&n) => Ok(()),
            _ => Err(PipelineError::new(
                &source.file,
                format!("pipeline format version `{}` is not supported", yaml_short(v)),
            )
            .at(key_line(&source.text, &["fpipe"]))
            .hint(format!(
                "this fpipe reads format {}; upgrade fpipe or ask the file's authors for a format {} version",
                FORMAT_VERSIONS.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
                FORMAT_VERSIONS[FORMAT_VERSIONS.len() - 1]
            ))),
        },
    }
}

fn yaml_short(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn key_str(
    source: &Source,
    k: &serde_yaml::Value,
    parent: &[&str],
) -> Result<String, PipelineError> {
    match k {
        serde_yaml::Value::String(s) => Ok(s.clone()),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        other => Err(PipelineError::new(
            &source.file,
            format!("key `{}` must be a string", yaml_short(other)),
        )
        .at(key_line(&source.text, parent))),
    }
}

/// Deepest nesting of flow collections (`[...]`, `{...}`) a file may have: the YAML parser's
/// own recursion limit, checked first because its scanner takes time quadratic in the
/// depth (100 KB of `[` took minutes).
const MAX_FLOW_DEPTH: usize = 128;

/// Refuses text whose flow collections nest deeper than [`MAX_FLOW_DEPTH`], naming the line.
/// Quoted strings and comments are skipped; brackets inside plain scalars are counted, which
/// can only make balanced text look deeper than it is by the unbalanced brackets it holds.
fn check_nesting(file: &Path, text: &str) -> Result<(), PipelineError> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut prev = '\n';
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '#' if prev.is_whitespace() => {
                while chars.peek().is_some_and(|&n| n != '\n') {
                    chars.next();
                }
            }
            '"' | '\'' => {
                while let Some(n) = chars.next() {
                    match n {
                        '\n' => line += 1,
                        '\\' if c == '"' => {
                            chars.next();
                        }
                        n if n == c => break,
                        _ => {}
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(PipelineError::new(
                        file,
                        format!("`[`/`{{` nested more than {MAX_FLOW_DEPTH} deep"),
                    )
                    .at(Some(line))
                    .hint("flatten the value; no pipeline needs such depth"));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    Ok(())
}

fn yaml_err(file: &Path, e: &serde_yaml::Error) -> PipelineError {
    let line = e.location().map(|l| l.line());
    let mut msg = e.to_string();
    // serde_yaml appends " at line L column C"; the position is shown separately.
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    PipelineError::new(file, format!("malformed YAML: {msg}"))
        .at(line)
        .hint("check indentation and quoting near this line")
}

pub(crate) fn to_json(file: &Path, v: serde_yaml::Value) -> Result<Value, PipelineError> {
    serde_json::to_value(v)
        .map_err(|e| PipelineError::new(file, format!("unsupported YAML value: {e}")))
}

pub(crate) fn suggest_hint(word: &str, options: &[&str]) -> String {
    let mut best: Vec<(usize, &str)> = options
        .iter()
        .map(|o| (crate::util::edit_distance(word, o), *o))
        .collect();
    best.sort();
    match best.first() {
        Some((d, o)) if *d <= 3 => format!(
            "did you mean `{o}`? (expected one of: {})",
            options.join(", ")
        ),
        _ => format!("expected one of: {}", options.join(", ")),
    }
}
