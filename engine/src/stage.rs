//! The `Stage` trait: what a stage kind declares and how it runs.
//!
//! A stage kind is a pure function of its parameters and input artifacts. It declares its
//! ports and parameters so the engine can type-check a pipeline before anything runs, and it
//! writes its outputs into directories the engine gives it. It knows nothing of scheduling,
//! caching or other stages.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Type of a port, e.g. `"dataset"`, `"model"`, `"metrics"`, `"files"`. The engine knows no
/// meaning for them; it only checks that wired ports agree. [`ANY`] accepts every type.
pub type PortType = &'static str;

/// The port type that accepts anything (used by `shell` inputs).
pub const ANY: PortType = "any";

/// One input or output port of a stage kind.
#[derive(Clone, Debug)]
pub struct PortSpec {
    pub name: &'static str,
    pub ty: PortType,
    /// Inputs only: the stage runs without it.
    pub optional: bool,
    pub doc: &'static str,
}

impl PortSpec {
    /// A required port.
    pub fn new(name: &'static str, ty: PortType, doc: &'static str) -> Self {
        PortSpec {
            name,
            ty,
            optional: false,
            doc,
        }
    }
    /// An optional input port.
    pub fn optional(name: &'static str, ty: PortType, doc: &'static str) -> Self {
        PortSpec {
            name,
            ty,
            optional: true,
            doc,
        }
    }
}

/// The type of a stage parameter, checked at plan time.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamType {
    Bool,
    Int,
    Float,
    String,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// A list of values of the given type.
    List(Box<ParamType>),
    /// A file or folder, relative to the pipeline file. It enters the stage key by content
    /// hash (never by path), and the stage receives its absolute path. `companions` are
    /// extensions of sibling files that belong with it (e.g. `idx` beside a `.rec`), hashed
    /// too when present.
    Path {
        companions: &'static [&'static str],
    },
    /// A file or folder inside the pipeline file's folder: relative, with no `..` that leaves
    /// it (checked at plan time). Hashed into the key like [`ParamType::Path`]. For what a
    /// stage places at the same relative path in its own working directory (`shell`'s `deps`).
    LocalPath,
    /// Any YAML value (a map of options, say); checked by the stage itself.
    Any,
}

impl ParamType {
    /// Human name for error messages.
    pub fn describe(&self) -> String {
        match self {
            ParamType::Bool => "a boolean".into(),
            ParamType::Int => "an integer".into(),
            ParamType::Float => "a number".into(),
            ParamType::String => "a string".into(),
            ParamType::Enum(v) => format!("one of {}", v.join(", ")),
            ParamType::List(t) => format!("a list of {}", t.describe()),
            ParamType::Path { .. } => "a path (relative to the pipeline file)".into(),
            ParamType::LocalPath => "a path inside the pipeline file's folder".into(),
            ParamType::Any => "any value".into(),
        }
    }
}

/// One parameter of a stage kind.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `None`: required.
    pub default: Option<Value>,
    pub doc: &'static str,
    /// When true the parameter does not enter the stage key (e.g. a log interval, a device
    /// choice): changing it never reruns the stage.
    pub volatile: bool,
    /// When true the parameter enters the key only when its value differs from the default:
    /// a parameter added to a kind after its keys were in use, so those keys stay the same.
    pub keyed_if_changed: bool,
}

impl ParamSpec {
    /// A required parameter.
    pub fn required(name: &'static str, ty: ParamType, doc: &'static str) -> Self {
        ParamSpec {
            name,
            ty,
            default: None,
            doc,
            volatile: false,
            keyed_if_changed: false,
        }
    }
    /// A parameter with a default.
    pub fn with_default(
        name: &'static str,
        ty: ParamType,
        default: Value,
        doc: &'static str,
    ) -> Self {
        ParamSpec {
            name,
            ty,
            default: Some(default),
            doc,
            volatile: false,
            keyed_if_changed: false,
        }
    }
    /// Marks the parameter as not part of the key.
    pub fn volatile(mut self) -> Self {
        self.volatile = true;
        self
    }
    /// Marks the parameter as part of the key only when it is not its default (see
    /// [`ParamSpec::keyed_if_changed`]).
    pub fn keyed_if_changed(mut self) -> Self {
        self.keyed_if_changed = true;
        self
    }
}

/// A program a stage would start, as `fpipe validate` shows it before anything runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Invocation {
    /// The program, as it will be looked up (a name on `PATH`, or a path).
    pub program: String,
    /// Its arguments, in order.
    pub args: Vec<String>,
    /// Variables the stage sets for it, beyond the environment fpipe itself runs in.
    pub env: Vec<(String, String)>,
    /// Files or folders made visible in its working directory: (path there, what it links to).
    pub links: Vec<(String, PathBuf)>,
}

/// Everything a stage kind declares about itself.
#[derive(Clone, Debug)]
pub struct StageSignature {
    pub inputs: Vec<PortSpec>,
    pub outputs: Vec<PortSpec>,
    pub params: Vec<ParamSpec>,
}

/// Error a stage returns. The engine adds the stage name and log path.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The run was interrupted (Ctrl-C); not a failure of the stage.
    #[error("interrupted")]
    Interrupted,
    /// Anything else, with a message for the user that says what to do.
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    /// Shorthand for [`StageError::Failed`].
    pub fn msg(m: impl Into<String>) -> Self {
        StageError::Failed(m.into())
    }
}

impl From<std::io::Error> for StageError {
    fn from(e: std::io::Error) -> Self {
        StageError::Failed(e.to_string())
    }
}

/// Receives live progress and log lines from a running stage.
pub trait ProgressSink: Send + Sync {
    /// `done` of `total` units (steps, images); `message` is short (loss, lr, images/s).
    fn progress(&self, done: u64, total: u64, message: &str);
    /// One line for the stage's log file.
    fn log(&self, line: &str);
}

/// What a stage is given when it runs.
pub struct StageContext {
    /// The stage's name in the pipeline, e.g. `student@2` (for messages only; not in the key).
    pub name: String,
    /// Resolved parameters: every declared parameter present, defaults filled, `Path`
    /// parameters made absolute.
    pub params: BTreeMap<String, Value>,
    /// Input port -> read-only directory of the input artifact. Absent optional ports are
    /// missing from the map.
    pub inputs: BTreeMap<String, PathBuf>,
    /// Output port -> empty directory to write that output into.
    pub outputs: BTreeMap<String, PathBuf>,
    /// Persistent directory for checkpoints: survives a killed run of the same key, removed
    /// once the stage succeeds. Resume from here.
    pub scratch: PathBuf,
    /// Device to compute on (`cpu`, `cuda:0`), chosen at run time, not part of the key.
    pub device: String,
    /// GPU ids assigned by the scheduler when the stage declared `gpu` resources.
    pub gpus: Vec<usize>,
    /// CPU threads this stage may use.
    pub threads: usize,
    /// The folder of the pipeline file that defined the stage (relative paths resolve here).
    pub base_dir: PathBuf,
    /// The stage's log file (the engine also writes [`StageContext::log`] lines into it).
    pub log_file: PathBuf,
    pub(crate) metrics: BTreeMap<String, f64>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) sink: Arc<dyn ProgressSink>,
}

impl StageContext {
    /// A context for tests and examples: runs a stage outside the engine.
    pub fn standalone(
        name: &str,
        params: BTreeMap<String, Value>,
        inputs: BTreeMap<String, PathBuf>,
        outputs: BTreeMap<String, PathBuf>,
        scratch: PathBuf,
    ) -> Self {
        StageContext {
            name: name.to_string(),
            params,
            inputs,
            outputs,
            scratch,
            device: "cpu".into(),
            gpus: vec![],
            threads: 1,
            base_dir: PathBuf::from("."),
            log_file: std::env::temp_dir().join(format!("fpipe-{name}-{}.log", std::process::id())),
            metrics: BTreeMap::new(),
            cancel: Arc::new(AtomicBool::new(false)),
            sink: Arc::new(NullSink),
        }
    }

    /// Parameter by name (declared parameters are always present).
    pub fn param(&self, name: &str) -> Result<&Value, StageError> {
        self.params
            .get(name)
            .ok_or_else(|| StageError::msg(format!("parameter `{name}` missing")))
    }
    /// Integer parameter.
    pub fn param_i64(&self, name: &str) -> Result<i64, StageError> {
        self.param(name)?
            .as_i64()
            .ok_or_else(|| StageError::msg(format!("parameter `{name}` must be an integer")))
    }
    /// Number parameter.
    pub fn param_f64(&self, name: &str) -> Result<f64, StageError> {
        self.param(name)?
            .as_f64()
            .ok_or_else(|| StageError::msg(format!("parameter `{name}` must be a number")))
    }
    /// Boolean parameter.
    pub fn param_bool(&self, name: &str) -> Result<bool, StageError> {
        self.param(name)?
            .as_bool()
            .ok_or_else(|| StageError::msg(format!("parameter `{name}` must be a boolean")))
    }
    /// String parameter (also `Path` parameters, as their absolute path).
    pub fn param_str(&self, name: &str) -> Result<&str, StageError> {
        self.param(name)?
            .as_str()
            .ok_or_else(|| StageError::msg(format!("parameter `{name}` must be a string")))
    }
    /// Directory of a required input.
    pub fn input(&self, port: &str) -> Result<&Path, StageError> {
        self.inputs
            .get(port)
            .map(|p| p.as_path())
            .ok_or_else(|| StageError::msg(format!("input `{port}` is not connected")))
    }
    /// Directory of an optional input, if connected.
    pub fn input_opt(&self, port: &str) -> Option<&Path> {
        self.inputs.get(port).map(|p| p.as_path())
    }
    /// Directory to write an output into.
    pub fn output(&self, port: &str) -> Result<&Path, StageError> {
        self.outputs
            .get(port)
            .map(|p| p.as_path())
            .ok_or_else(|| StageError::msg(format!("no output port `{port}`")))
    }
    /// Reports a metric; it lands in the run record and in `fpipe show`.
    pub fn metric(&mut self, name: &str, value: f64) {
        self.metrics.insert(name.to_string(), value);
    }
    /// Metrics reported so far.
    pub fn metrics(&self) -> &BTreeMap<String, f64> {
        &self.metrics
    }
    /// Live progress for the terminal.
    pub fn progress(&self, done: u64, total: u64, message: &str) {
        self.sink.progress(done, total, message);
    }
    /// A line for the stage's log file.
    pub fn log(&self, line: &str) {
        self.sink.log(line);
    }
    /// True once the user asked to stop (Ctrl-C). Long loops check it and return
    /// [`StageError::Interrupted`], leaving their checkpoint in `scratch`.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    /// `Err(Interrupted)` if cancelled: `ctx.check_cancel()?` in a loop.
    pub fn check_cancel(&self) -> Result<(), StageError> {
        if self.cancelled() {
            Err(StageError::Interrupted)
        } else {
            Ok(())
        }
    }
}

struct NullSink;
impl ProgressSink for NullSink {
    fn progress(&self, _: u64, _: u64, _: &str) {}
    fn log(&self, _: &str) {}
}

/// A stage kind. Implementations are registered by name in a [`crate::Registry`].
pub trait Stage: Send + Sync {
    /// The kind name used in `uses:`.
    fn kind(&self) -> &'static str;
    /// Implementation version: bump it whenever the same inputs and parameters would give
    /// different outputs, so cached results of the old code are not reused.
    fn version(&self) -> u32;
    /// One line on what it does (shown by `fpipe stages` and in error suggestions).
    fn doc(&self) -> &'static str {
        ""
    }
    /// Ports and parameters.
    fn signature(&self) -> StageSignature;
    /// Checks parameters beyond their types (ranges, combinations); called at plan time.
    fn check_params(&self, _params: &BTreeMap<String, Value>) -> Result<(), String> {
        Ok(())
    }
    /// Every program this stage would start with these parameters (its arguments, the
    /// environment it sets and the files it links in), listed by `fpipe validate` so that a
    /// received pipeline can be reviewed before it runs. `base_dir` is the pipeline file's
    /// folder. Kinds that run only fpipe's own code start nothing.
    fn commands(&self, _params: &BTreeMap<String, Value>, _base_dir: &Path) -> Vec<Invocation> {
        vec![]
    }
    /// True for kinds that take inputs under any port name (of any type), like `shell`.
    fn accepts_any_inputs(&self) -> bool {
        false
    }
    /// Job slots (of `fpipe run -j N`) a stage of this kind takes unless the pipeline says
    /// `resources: {cpu: K}`. Training kinds that use every core say `usize::MAX` (clamped
    /// to `-j`), so two of them do not fight over the cores.
    fn default_cpus(&self) -> usize {
        1
    }
    /// Computes the outputs. Must write only under `ctx.outputs` and `ctx.scratch`.
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError>;
}
