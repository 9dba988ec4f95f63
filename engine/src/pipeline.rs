//! Pipeline files: parameters, templating, includes, and `foreach`/`matrix` expansion.
//!
//! Loading is in two steps. The top-level `params:` and `include:` blocks are read as literal
//! YAML first (they may not use templates), merged with included files' parameters and with
//! the command line's overrides. Then every file is rendered by minijinja over `params` and
//! parsed; stage families are expanded into concrete stages named `family@item`.

use crate::error::PipelineError;
use crate::yamlpos::key_line;
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
];
const STAGE_KEYS: &[&str] = &[
    "uses",
    "with",
    "inputs",
    "foreach",
    "matrix",
    "resources",
    "desc",
    "description",
];

/// Loads, renders and expands a pipeline file.
pub fn load(file: &Path, overrides: &Overrides) -> Result<Pipeline, PipelineError> {
    let mut raws = Vec::new();
    let mut seen = HashSet::new();
    read_with_includes(file, &mut raws, &mut seen, 0)?;
    // Parameters: included files first, each overridden by what includes it (the main file
    // is last), then --params files, then -p.
    let mut params = Value::Object(Map::new());
    for raw in &raws {
        merge(&mut params, raw.params.clone());
    }
    for pf in &overrides.files {
        let text = std::fs::read_to_string(pf)
            .map_err(|e| PipelineError::new(pf, format!("cannot read parameter file: {e}")))?;
        let v: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| yaml_err(pf, &e))?;
        let mut v = to_json(pf, v)?;
        if let Some(inner) = v.get("params").cloned() {
            if v.as_object().is_some_and(|m| m.len() == 1) {
                v = inner;
            }
        }
        if !v.is_object() {
            return Err(PipelineError::new(
                pf,
                "a parameter file must be a mapping of names to values",
            ));
        }
        merge(&mut params, v);
    }
    // A `-p` key must name a parameter the pipeline declares, or at least reads as
    // `params.NAME` (a template that takes an optional one with `default`): a misspelt key
    // would otherwise be ignored while the run looks as if the change took effect.
    let declared: Vec<String> = params
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for pair in &overrides.pairs {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            PipelineError::new(file, format!("-p {pair}: expected key=value"))
                .hint("for example -p epochs=3 or -p train.lr=0.05")
        })?;
        let top = k.trim().split('.').next().unwrap_or_default();
        let read_as = format!("params.{top}");
        if !declared.iter().any(|d| d == top) && !raws.iter().any(|r| mentions(&r.text, &read_as)) {
            let names: Vec<&str> = declared.iter().map(String::as_str).collect();
            return Err(PipelineError::new(
                file,
                format!("-p {pair}: the pipeline has no parameter `{top}`"),
            )
            .hint(if names.is_empty() {
                "this pipeline declares no `params:`".to_string()
            } else {
                suggest_hint(top, &names)
            }));
        }
        let v: serde_yaml::Value =
            serde_yaml::from_str(v).unwrap_or_else(|_| serde_yaml::Value::String(v.to_string()));
        let v = to_json(file, v)?;
        set_dotted(&mut params, k.trim(), v);
    }

    let mut pipeline = Pipeline {
        file: file.to_path_buf(),
        name: String::new(),
        params: params.clone(),
        stages: Vec::new(),
        families: BTreeMap::new(),
    };
    let main_index = raws.len() - 1;
    for (i, raw) in raws.iter().enumerate() {
        let rendered = render(&raw.file, &raw.text, &params)?;
        let stage_lines = crate::yamlpos::child_key_lines(&rendered, "stages");
        let source = Arc::new(Source {
            file: raw.file.clone(),
            text: rendered,
            stage_lines,
        });
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

/// Extracts and parses a top-level block (`params:` / `include:`) from unrendered text.
fn literal_block(file: &Path, text: &str, key: &str) -> Result<Option<Value>, PipelineError> {
    let lines: Vec<&str> = text.lines().collect();
    let head = format!("{key}:");
    let Some(start) = lines.iter().position(|l| l.starts_with(&head)) else {
        return Ok(None);
    };
    let mut end = start + 1;
    while end < lines.len() {
        let l = lines[end];
        if l.is_empty()
            || l.starts_with(' ')
            || l.starts_with('\t')
            || l.starts_with('#')
            || l.starts_with('-')
        {
            end += 1;
        } else {
            break;
        }
    }
    let block = lines[start..end].join("\n");
    if block.contains("{{") || block.contains("{%") {
        return Err(
            PipelineError::new(file, format!("`{key}:` may not use templates"))
                .at(Some(start + 1))
                .hint("parameter values are literal; use them elsewhere as {{ params.NAME }}"),
        );
    }
    let v: serde_yaml::Value = serde_yaml::from_str(&block).map_err(|e| {
        let mut pe = yaml_err(file, &e);
        pe.line = pe.line.map(|l| l + start);
        pe
    })?;
    let v = to_json(file, v)?;
    Ok(v.get(key).cloned().filter(|v| !v.is_null()))
}

fn render(file: &Path, text: &str, params: &Value) -> Result<String, PipelineError> {
    if !text.contains("{{") && !text.contains("{%") && !text.contains("{#") {
        return Ok(text.to_string());
    }
    // No loader and no filesystem or environment access: a pipeline file from another team
    // cannot read anything through its templates.
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    // Bounded work: a template that loops too long runs out of fuel instead of spinning.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(TEMPLATE_RECURSION);
    let ctx = minijinja::context! { params => minijinja::Value::from_serialize(params) };
    let limit_err = |what: String| {
        PipelineError::new(file, format!("the template did too much work: {what}"))
            .hint("templates are for parameters and short loops over them; generate very large pipelines with a script instead")
    };
    let template = env
        .template_from_str(text)
        .map_err(|e| template_err(file, e))?;
    let mut out = CappedText::default();
    match template.render_captured_to(ctx, &mut out) {
        Ok(_) => {}
        Err(_) if out.overflowed => {
            return Err(limit_err(format!(
                "it rendered more than {} MB of text",
                TEMPLATE_OUTPUT_BYTES >> 20
            )))
        }
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
            return Err(
                limit_err(format!("it ran out of its budget of {TEMPLATE_FUEL} steps"))
                    .at(e.line()),
            )
        }
        Err(e) => return Err(template_err(file, e)),
    }
    String::from_utf8(out.bytes)
        .map_err(|_| PipelineError::new(file, "the template rendered text that is not UTF-8"))
}

/// Template steps one file may take: about a million loop iterations, far beyond any
/// pipeline's parameter loops.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Nesting of macro calls.
const TEMPLATE_RECURSION: usize = 64;
/// Rendered text of one file.
pub const TEMPLATE_OUTPUT_BYTES: usize = 16 << 20;

/// The rendered text, refusing to grow past [`TEMPLATE_OUTPUT_BYTES`].
#[derive(Default)]
struct CappedText {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_err(file: &Path, e: minijinja::Error) -> PipelineError {
    {
        let mut msg = format!("template error: {}", e.kind());
        if let Some(d) = e.detail() {
            msg.push_str(": ");
            msg.push_str(d);
        }
        PipelineError::new(file, msg)
            .at(e.line())
            .hint("templates see `params` only, e.g. {{ params.epochs }}; set missing ones with -p NAME=VALUE")
    }
}

/// A YAML error in a file after its templates ran. When templates changed the text, the line
/// the parser saw is not the line in the file, and the usual cause is a parameter value (often
/// one given with `-p`) that is not valid YAML where it was inserted: say so, and show the
/// rendered line.
fn rendered_yaml_err(
    raw: &RawFile,
    rendered: &str,
    e: &serde_yaml::Error,
    overrides: &Overrides,
) -> PipelineError {
    let mut pe = yaml_err(&raw.file, e);
    if rendered == raw.text {
        return pe;
    }
    if let Some(line) = pe
        .line
        .and_then(|l| rendered.lines().nth(l.saturating_sub(1)))
    {
        let line = crate::text::visible_line(line.trim());
        pe.message = format!(
            "{} (after templates, line {} reads `{line}`)",
            pe.message,
            pe.line.unwrap_or(0)
        );
    }
    let from_cli: Vec<String> = overrides
        .pairs
        .iter()
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| {
            let top = k.trim().split('.').next().unwrap_or_default();
            mentions(&raw.text, &format!("params.{top}"))
        })
        .map(|(k, v)| format!("-p {}={}", k.trim(), crate::text::visible_line(v)))
        .collect();
    if from_cli.is_empty() {
        pe.hint(
            "a parameter's value inserted by a template is not valid YAML there; quote the template (\"{{ params.NAME }}\") or give a plain value",
        )
    } else {
        pe.hint(format!(
            "the value given with {} is inserted here by a template and is not valid YAML there; give a plain value, or quote the template (\"{{{{ params.NAME }}}}\")",
            from_cli.join(", ")
        ))
    }
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

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Whether `name` occurs in `text` as a whole (not inside a longer identifier).
fn mentions(text: &str, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    !name.is_empty()
        && text.match_indices(name).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + name.len()..].chars().next();
            !before.is_some_and(ident) && !after.is_some_and(ident)
        })
}

fn set_dotted(root: &mut Value, key: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(m) = cur else { return };
        if i == parts.len() - 1 {
            m.insert(part.to_string(), v);
            return;
        }
        cur = m
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
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

/// One item of a family.
struct Item {
    suffix: String,
    value: Value,
    key: Option<String>,
}

fn expand_stage(
    source: &Arc<Source>,
    base_dir: &Path,
    name: &str,
    spec: &serde_yaml::Value,
    _params: &Value,
    pipeline: &mut Pipeline,
) -> Result<(), PipelineError> {
    let line = source.stage_lines.get(name).copied();
    let err = |msg: String| PipelineError::new(&source.file, msg).at(line).stage(name);
    if !valid_stage_name(name) {
        return Err(err(format!("invalid stage name `{}`", crate::text::visible_line(name))).hint(
            "a stage name is letters, digits, `_` and `-`, and does not start with `-` (`@` is reserved for family items, `.` for ports)",
        ));
    }
    let serde_yaml::Value::Mapping(spec) = spec else {
        return Err(err(
            "a stage is a mapping with `uses:` (and `with:`, `inputs:`, ...)".into(),
        ));
    };
    let mut fields: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in spec {
        let k = key_str(source, k, &["stages", name])?;
        if !STAGE_KEYS.contains(&k.as_str()) {
            return Err(
                PipelineError::new(&source.file, format!("unknown stage field `{k}`"))
                    .at(key_line(&source.text, &["stages", name, &k]).or(line))
                    .stage(name)
                    .hint(suggest_hint(&k, STAGE_KEYS)),
            );
        }
        fields.insert(k, to_json(&source.file, v.clone())?);
    }
    let uses = match fields.get("uses") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(err("`uses:` must be a stage kind name".into())),
        None => {
            return Err(err("missing `uses:`".into())
                .hint("name the stage kind, e.g. `uses: shell`; `fpipe stages` lists the kinds"))
        }
    };
    let with = match fields.get("with") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(err(
                "`with:` must be a mapping of parameter names to values".into(),
            ))
        }
    };
    let inputs_raw: Vec<(String, Value)> = match fields.get("inputs") {
        None | Some(Value::Null) => vec![],
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(_) => {
            return Err(
                err("`inputs:` must map port names to `stage` or `stage.port`".into())
                    .hint("for example `inputs: {model: train.model}`"),
            )
        }
    };
    let resources = parse_resources(fields.get("resources")).map_err(err)?;

    let items: Option<Vec<Item>> = match (fields.get("foreach"), fields.get("matrix")) {
        (Some(_), Some(_)) => {
            return Err(err("use either `foreach:` or `matrix:`, not both".into()))
        }
        (Some(f), None) => Some(foreach_items(f, room(pipeline)).map_err(err)?),
        (None, Some(m)) => Some(matrix_items(m, room(pipeline)).map_err(err)?),
        (None, None) => None,
    };

    let Some(items) = items else {
        let inputs = inputs_raw
            .into_iter()
            .map(|(p, v)| match v {
                Value::String(s) => Ok((p, s)),
                _ => Err(err(format!(
                    "input `{p}` must be a reference like `stage` or `stage.port`"
                ))),
            })
            .collect::<Result<_, _>>()?;
        if room(pipeline) == 0 {
            return Err(err(too_many_stages()));
        }
        pipeline.stages.push(StageDef {
            name: name.to_string(),
            family: None,
            uses,
            with,
            inputs,
            resources,
            source: source.clone(),
            line,
            base_dir: base_dir.to_path_buf(),
        });
        return Ok(());
    };
    if items.is_empty() {
        pipeline.families.insert(name.to_string(), vec![]);
        return Ok(());
    }
    let mut instances = Vec::new();
    let mut seen = HashSet::new();
    for (idx, item) in items.iter().enumerate() {
        let inst = format!("{name}@{}", item.suffix);
        if !valid_name(&item.suffix) {
            return Err(err(format!(
                "item `{}` cannot be part of a stage name",
                item.suffix
            ))
            .hint("items used for names may hold letters, digits, `_`, `-`, `.`, `=`, `+`"));
        }
        if !seen.insert(inst.clone()) {
            return Err(err(format!("two items give the same stage name `{inst}`")));
        }
        let prev = idx
            .checked_sub(1)
            .map(|p| format!("{name}@{}", items[p].suffix));
        let vars = Vars {
            item: &item.value,
            key: item.key.as_deref(),
            index: idx + 1,
            prev: prev.as_deref(),
        };
        let with_v = substitute(&Value::Object(with.clone()), &vars).map_err(&err)?;
        let with_i = match with_v {
            Value::Object(m) => m,
            _ => Map::new(), // substitution maps objects to objects
        };
        let mut inputs = Vec::new();
        for (port, v) in &inputs_raw {
            let Value::String(s) = v else {
                return Err(err(format!(
                    "input `{port}` must be a reference like `stage` or `stage.port`"
                )));
            };
            if s.contains("${prev}") && prev.is_none() {
                continue; // the first item has no previous one: the port stays unconnected
            }
            match substitute(&Value::String(s.clone()), &vars).map_err(&err)? {
                Value::String(r) => inputs.push((port.clone(), r)),
                other => inputs.push((port.clone(), other.to_string())),
            }
        }
        pipeline.stages.push(StageDef {
            name: inst.clone(),
            family: Some(name.to_string()),
            uses: uses.clone(),
            with: with_i,
            inputs,
            resources,
            source: source.clone(),
            line,
            base_dir: base_dir.to_path_buf(),
        });
        instances.push(inst);
    }
    pipeline.families.insert(name.to_string(), instances);
    Ok(())
}

/// The most stages one pipeline may expand to. Far above any real experiment (the seed
/// pipelines have tens), low enough that planning a hostile `foreach: 100000000000` fails at
/// once instead of allocating until the machine runs out of memory.
pub const MAX_STAGES: usize = 20_000;

/// How many more stages the pipeline may grow by.
fn room(pipeline: &Pipeline) -> usize {
    MAX_STAGES.saturating_sub(pipeline.stages.len())
}

fn too_many_stages() -> String {
    format!("the pipeline expands to more than {MAX_STAGES} stages")
}

fn parse_resources(v: Option<&Value>) -> Result<Resources, String> {
    let mut r = Resources::default();
    let Some(v) = v else { return Ok(r) };
    let Value::Object(m) = v else {
        return Err("`resources:` must be a mapping like {gpu: 1, cpu: 2}".into());
    };
    for (k, v) in m {
        let n = v
            .as_u64()
            .ok_or_else(|| format!("resource `{k}` must be a whole number"))?
            as usize;
        match k.as_str() {
            "gpu" | "gpus" => r.gpu = n,
            "cpu" | "cpus" | "jobs" => r.cpu = n,
            other => return Err(format!("unknown resource `{other}` (known: cpu, gpu)")),
        }
    }
    Ok(r)
}

fn scalar_suffix(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn foreach_items(f: &Value, room: usize) -> Result<Vec<Item>, String> {
    // `foreach: "{{ params.n }}"` renders to the string "3": read it as the number.
    if let Some(n) = f.as_str().and_then(|s| s.trim().parse::<u64>().ok()) {
        return foreach_items(&Value::from(n), room);
    }
    let count = match f {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::Array(a) => a.len() as u64,
        Value::Object(m) => m.len() as u64,
        _ => 0,
    };
    if count > room as u64 {
        return Err(format!(
            "`foreach:` has {count} items and {}; split the experiment into several pipelines",
            too_many_stages()
        ));
    }
    match f {
        Value::Number(n) => {
            let n = n
                .as_u64()
                .ok_or("`foreach:` with a number needs a whole number N (items 1..N)")?;
            Ok((1..=n)
                .map(|i| Item {
                    suffix: i.to_string(),
                    value: Value::from(i),
                    key: None,
                })
                .collect())
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let suffix = match v {
                    Value::Object(m) => m
                        .values()
                        .map(scalar_suffix)
                        .collect::<Option<Vec<_>>>()
                        .map(|v| v.join("-"))
                        .unwrap_or_else(|| i.to_string()),
                    other => scalar_suffix(other)
                        .ok_or("`foreach:` items must be scalars or mappings")?,
                };
                Ok(Item {
                    suffix,
                    value: v.clone(),
                    key: None,
                })
            })
            .collect(),
        Value::Object(m) => Ok(m
            .iter()
            .map(|(k, v)| Item {
                suffix: k.clone(),
                value: v.clone(),
                key: Some(k.clone()),
            })
            .collect()),
        _ => Err("`foreach:` takes a number N, a list, or a mapping".into()),
    }
}

fn matrix_items(m: &Value, room: usize) -> Result<Vec<Item>, String> {
    let Value::Object(m) = m else {
        return Err(
            "`matrix:` maps names to lists of values, e.g. {lr: [0.1, 0.01], arch: [r18, r50]}"
                .into(),
        );
    };
    let combinations = m.values().try_fold(1u64, |acc, v| {
        acc.checked_mul(v.as_array().map_or(1, |a| a.len() as u64))
    });
    if combinations.is_none_or(|c| c > room as u64) {
        return Err(format!(
            "`matrix:` has {} combinations and {}; split the experiment into several pipelines",
            combinations.map_or("too many".to_string(), |c| c.to_string()),
            too_many_stages()
        ));
    }
    let mut combos: Vec<(Vec<String>, Map<String, Value>)> = vec![(vec![], Map::new())];
    for (k, vals) in m {
        let Value::Array(vals) = vals else {
            return Err(format!("matrix entry `{k}` must be a list"));
        };
        let mut next = Vec::new();
        for (names, map) in &combos {
            for v in vals {
                let s =
                    scalar_suffix(v).ok_or(format!("matrix values of `{k}` must be scalars"))?;
                let mut names = names.clone();
                names.push(s);
                let mut map = map.clone();
                map.insert(k.clone(), v.clone());
                next.push((names, map));
            }
        }
        combos = next;
    }
    Ok(combos
        .into_iter()
        .map(|(names, map)| Item {
            suffix: names.join("-"),
            value: Value::Object(map),
            key: None,
        })
        .collect())
}

/// Letters, digits, `_` and `-`, not starting with `-`: a name that is never a path (`.`,
/// `..`), never reads as `stage.port`, and never as a command-line flag.
fn valid_stage_name(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        && s.chars().next().is_some_and(|c| c != '-')
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '=' | '+' | '@'))
}

struct Vars<'a> {
    item: &'a Value,
    key: Option<&'a str>,
    index: usize,
    prev: Option<&'a str>,
}

/// Replaces `${item}`, `${item.a.b}`, `${key}`, `${index}`, `${prev}` in strings. Other
/// `${...}` (shell variables) are left alone. A string that is exactly one `${item...}` takes
/// the item's value with its type.
fn substitute(v: &Value, vars: &Vars) -> Result<Value, String> {
    match v {
        Value::String(s) => {
            let t = s.trim();
            if t.starts_with("${") && t.ends_with('}') && t.matches("${").count() == 1 {
                if let Some(val) = lookup(&t[2..t.len() - 1], vars)? {
                    return Ok(val);
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                let after = &rest[i + 2..];
                let Some(j) = after.find('}') else {
                    out.push_str(&rest[i..]);
                    rest = "";
                    break;
                };
                match lookup(&after[..j], vars)? {
                    Some(val) => out.push_str(&match val {
                        Value::String(s) => s,
                        other => other.to_string(),
                    }),
                    None => out.push_str(&rest[i..i + 2 + j + 1]),
                }
                rest = &after[j + 1..];
            }
            out.push_str(rest);
            Ok(Value::String(out))
        }
        Value::Array(a) => Ok(Value::Array(
            a.iter()
                .map(|x| substitute(x, vars))
                .collect::<Result<_, _>>()?,
        )),
        Value::Object(m) => {
            let mut o = Map::new();
            for (k, x) in m {
                o.insert(k.clone(), substitute(x, vars)?);
            }
            Ok(Value::Object(o))
        }
        other => Ok(other.clone()),
    }
}

fn lookup(expr: &str, vars: &Vars) -> Result<Option<Value>, String> {
    let mut parts = expr.trim().split('.');
    let head = parts.next().unwrap_or("");
    match head {
        "item" => {
            let mut cur = vars.item;
            for p in parts {
                cur = cur
                    .get(p)
                    .ok_or_else(|| format!("`${{{expr}}}`: the item has no field `{p}`"))?;
            }
            Ok(Some(cur.clone()))
        }
        "key" => vars
            .key
            .map(|k| Some(Value::String(k.to_string())))
            .ok_or_else(|| "`${key}` is only defined when `foreach:` is a mapping".to_string()),
        "index" => Ok(Some(Value::from(vars.index))),
        "prev" => vars
            .prev
            .map(|p| Some(Value::String(p.to_string())))
            .ok_or_else(|| {
                "`${prev}` is used outside `inputs:` for the first item, which has no previous item"
                    .to_string()
            }),
        _ => Ok(None),
    }
}
