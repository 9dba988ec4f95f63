//! Thread pools: candle's CPU kernels run on rayon, so a stage that is given `cpu: K` job
//! slots runs its work in a pool of K threads.

/// Runs `f` in a rayon pool of `threads` threads (at least one).
pub fn with_threads<T: Send>(
    threads: usize,
    f: impl FnOnce() -> T + Send,
) -> Result<T, rayon::ThreadPoolBuildError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    Ok(pool.install(f))
}
