//! Errors that name the pipeline file, line and stage, and say what to do.

use std::fmt;
use std::path::PathBuf;

/// A problem with a pipeline file, found before anything runs (`fpipe` exits with code 2).
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineError {
    pub file: PathBuf,
    /// 1-based line in the file (in its rendered form, which matches the source unless
    /// template blocks add or remove lines).
    pub line: Option<usize>,
    pub stage: Option<String>,
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl PipelineError {
    /// An error in `file` with no position yet.
    pub fn new(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        PipelineError {
            file: file.into(),
            line: None,
            stage: None,
            message: message.into(),
            hint: None,
        }
    }
    /// Sets the line.
    pub fn at(mut self, line: Option<usize>) -> Self {
        if self.line.is_none() {
            self.line = line;
        }
        self
    }
    /// Sets the stage.
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        if self.stage.is_none() {
            self.stage = Some(stage.into());
        }
        self
    }
    /// Sets the hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": ")?;
        if let Some(s) = &self.stage {
            write!(f, "stage `{s}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineError {}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline is invalid (exit code 2).
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Several pipeline problems at once.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Pipelines(Vec<PipelineError>),
    #[error(transparent)]
    Cache(#[from] fpipe_cache::CacheError),
    #[error("{0}")]
    Other(String),
}

impl EngineError {
    /// True when the error is the user's pipeline (exit code 2) rather than a failure while
    /// running.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, EngineError::Pipeline(_) | EngineError::Pipelines(_))
    }
}

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, EngineError>;
