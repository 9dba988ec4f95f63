//! The built-in `shell` stage kind.
use crate::stage::*;

/// Runs a shell command in a fresh working directory.
pub struct ShellStage;

impl Stage for ShellStage {
    fn kind(&self) -> &'static str {
        "shell"
    }
    fn version(&self) -> u32 {
        1
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![],
            params: vec![],
        }
    }
    fn run(&self, _ctx: &mut StageContext) -> Result<(), StageError> {
        Err(StageError::msg("todo"))
    }
}
