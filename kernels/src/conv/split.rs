//! How finely the direct kernels' parallel loops split their work (shared by `direct.rs`
//! and `dw3.rs`).

/// Multiply-adds below which a rayon task is not worth its scheduling (GDC 7x7 on a 7x7
/// input has 49 per plane).
const MIN_TASK_MACS: usize = 1 << 15;

/// Rayon's minimum number of tasks per split, so that a task has about `MIN_TASK_MACS` work.
pub(super) fn min_tasks(macs_per_task: usize) -> usize {
    (MIN_TASK_MACS / macs_per_task.max(1)).max(1)
}
