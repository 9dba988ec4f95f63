//! `fpipe run` and `fpipe status`.

use super::cache::origin_text;
use super::*;

/// `fpipe run`: computes the stages whose keys are not cached.
pub fn run(cache: &Option<PathBuf>, registry: Registry, args: RunArgs) -> Result<ExitCode> {
    let RunArgs {
        pipeline,
        target,
        force,
        dry_run,
        jobs,
        gpus,
        device,
        verbose,
        remote,
        push,
    } = args;
    let plan = load(&pipeline, &registry)?;
    let store = open_store(&cache_dir(cache, Some(&pipeline.file)))?;
    let engine = Engine { store, registry };
    let cancel = Arc::new(AtomicBool::new(false));
    let mut opts = RunOptions {
        targets: target,
        force,
        device,
        cancel: cancel.clone(),
        ..RunOptions::default()
    };
    if let Some(j) = jobs {
        opts.jobs = j as usize;
    }
    opts.gpus = gpus.map_or_else(default_gpus, |g| g as usize);
    if dry_run {
        print_status(&engine.status(&plan, &opts)?, false);
        return Ok(ExitCode::SUCCESS);
    }
    let remote = match &remote {
        Some(url) => Some(super::remote::open_remote(url)?),
        None => None,
    };
    if let Some(remote) = &remote {
        fetch_from_remote(&engine, &plan, &opts, remote)?;
    }
    let c = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if !c.swap(true, Ordering::SeqCst) {
            say_err!("\nstopping: waiting for running stages to end (their partial outputs are discarded)");
        }
    });
    let reporter: Arc<dyn Reporter> = Arc::new(crate::term::Terminal::new(verbose));
    let summary = engine.run(&plan, &opts, &reporter)?;
    for s in &summary.record.stages {
        if s.state == StageState::Failed {
            say_err!(
                "\nstage `{}` failed: {}",
                s.name,
                fpipe_engine::text::visible(s.error.as_deref().unwrap_or(""), true)
            );
            if let Some(log) = &s.log {
                say_err!("  log: {}", log.display());
            }
        }
    }
    if summary.skipped > 0 {
        say_err!(
            "{} stage(s) not run because an input failed",
            summary.skipped
        );
    }
    if summary.interrupted {
        say_err!(
            "run interrupted; recorded as such. Rerun to continue: finished stages are cached."
        );
    }
    // On stderr, like the push line: the summary stays the last line on stdout.
    let cache_root = cache_dir(cache, Some(&pipeline.file));
    if let Some(path) = super::report::after_run(
        &cache_root,
        &engine.store,
        &engine.registry,
        &pipeline.file,
        &summary.record,
    ) {
        say_err!("{}", super::report::open_hint(&path));
    }
    say!("{}", summary.line());
    if let (Some(remote), true, false) = (&remote, push, summary.interrupted) {
        let _lock = engine.store.lock_shared()?;
        let (records, ids) = super::remote::current_state(&engine, &plan, &opts)?;
        let bar = super::remote::Bar::new();
        let r = remote.push(&engine.store, &ids, &records, &bar);
        bar.done();
        let r = r.with_context(|| {
            format!(
                "the run is done and cached here, but pushing its results to {} failed; `fpipe cache push {} {}` retries",
                remote.url(),
                remote.url(),
                pipeline.file.display()
            )
        })?;
        // On stderr: the summary stays the last line on stdout.
        say_err!(
            "pushed {} artifacts ({:.1} MB) and {} action records to {}; {} artifacts already there",
            r.objects_copied,
            r.bytes_copied as f64 / 1e6,
            r.actions_copied,
            remote.url(),
            r.objects_present
        );
    }
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else if summary.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Before a run with `--remote`: fetches from the remote the results of the stages whose keys
/// are known and not cached here (repeatedly, as fetched outputs make more keys known). A
/// remote that cannot be reached, or an object that fails its check, is a warning: those
/// stages are computed here instead.
fn fetch_from_remote(
    engine: &Engine,
    plan: &Plan,
    opts: &RunOptions,
    remote: &fpipe_remote::Remote,
) -> Result<()> {
    let _lock = engine.store.lock_shared()?;
    let bar = super::remote::Bar::new();
    let r = super::remote::pull_for_plan(engine, plan, opts, remote, &bar);
    bar.done();
    match r {
        Ok(r) if r.actions_copied > 0 => say_err!(
            "fetched the results of {} stage(s) ({} artifacts, {:.1} MB) from {}",
            r.actions_copied,
            r.objects_copied,
            r.bytes_copied as f64 / 1e6,
            remote.url()
        ),
        Ok(_) => {}
        Err(e) => say_err!(
            "warning: fetching from {}: {}\n  the stages it could not supply are computed here",
            remote.url(),
            fpipe_engine::text::visible(&format!("{e:#}"), true)
        ),
    }
    Ok(())
}

/// `fpipe status`: what `run` would do and why.
pub fn status(cache: &Option<PathBuf>, registry: Registry, args: StatusArgs) -> Result<ExitCode> {
    let StatusArgs {
        pipeline,
        target,
        json,
    } = args;
    let plan = load(&pipeline, &registry)?;
    let store = open_store(&cache_dir(cache, Some(&pipeline.file)))?;
    let engine = Engine { store, registry };
    let opts = RunOptions {
        targets: target,
        ..RunOptions::default()
    };
    let st = engine.status(&plan, &opts)?;
    let changes = engine.param_changes(&plan);
    if !json && !changes.is_empty() {
        println!("params changed since the last run: {}", changes.join(", "));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_status(&st, true);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn print_status(st: &[fpipe_engine::StageStatus], all: bool) {
    let width = st.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut to_run = 0;
    for s in st {
        if s.will_run {
            to_run += 1;
            println!(
                "  {:<width$}  will run: {}",
                s.name,
                fpipe_engine::text::visible_line(&s.reason)
            );
        } else if all {
            match origin_text(s.origin.as_ref()) {
                Some(o) => println!("  {:<width$}  cached ({o})", s.name),
                None => println!("  {:<width$}  cached", s.name),
            }
        }
    }
    println!("{} of {} stages would run", to_run, st.len());
}

pub(super) fn default_gpus() -> usize {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count())
        .unwrap_or(0)
}
