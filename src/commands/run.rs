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
        cluster,
    } = args;
    let plan = load(&pipeline, &registry)?;
    let cache_path = cache_dir(cache, Some(&pipeline.file));
    let store = open_store(&cache_path)?;
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
    if !dry_run {
        opts.executor = cluster.executor(&cache_path)?;
        if let (fpipe_engine::exec::Executor::Slurm(_), None) = (&opts.executor, jobs) {
            opts.jobs = super::slurm::MAX_IN_FLIGHT;
        }
    }
    // GPUs and the device are this machine's only for local runs: Slurm places each job on a
    // node with the GPUs it asks for, and a login node often has none.
    if matches!(opts.executor, fpipe_engine::exec::Executor::Local) {
        opts.gpus = gpu_slots(&plan, gpus)?;
        check_device(&opts.device)?;
    }
    if dry_run {
        print_status(&engine.status(&plan, &opts)?, false, &BTreeMap::new());
        return Ok(ExitCode::SUCCESS);
    }
    let remote = match &remote {
        Some(url) => Some(Arc::new(super::remote::open_remote(url)?)),
        None => None,
    };
    if let Some(remote) = &remote {
        // Keys known only once their inputs are computed here are looked up as their stages
        // come up; a remote that failed just now is not asked again.
        if let Some(asked) = fetch_from_remote(&engine, &plan, &opts, remote)? {
            opts.substituter = Some(Arc::new(super::remote::RemoteSubstituter::new(
                remote.clone(),
                asked,
            )));
        }
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
    // A run on a read-only cache was not recorded (the engine warned): no report either.
    let report = summary.recorded.then(|| {
        super::report::after_run(
            &cache_root,
            &engine.store,
            &engine.registry,
            &pipeline.file,
            &summary.record,
        )
    });
    if let Some(path) = report.flatten() {
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
/// stages are computed here instead. The keys it asked for, or `None` when the remote failed.
fn fetch_from_remote(
    engine: &Engine,
    plan: &Plan,
    opts: &RunOptions,
    remote: &fpipe_remote::Remote,
) -> Result<Option<HashSet<String>>> {
    let _lock = engine.store.lock_shared()?;
    let bar = super::remote::Bar::new();
    let mut asked = HashSet::new();
    let r = super::remote::pull_for_plan(engine, plan, opts, remote, &bar, &mut asked);
    bar.done();
    match r {
        Ok(r) => {
            if r.actions_copied > 0 {
                say_err!(
                    "fetched the results of {} stage(s) ({} artifacts, {:.1} MB) from {}",
                    r.actions_copied,
                    r.objects_copied,
                    r.bytes_copied as f64 / 1e6,
                    remote.url()
                );
            }
            Ok(Some(asked))
        }
        Err(e) => {
            say_err!(
                "warning: fetching from {}: {}\n  the stages it could not supply are computed here",
                remote.url(),
                fpipe_engine::text::visible(&format!("{e:#}"), true)
            );
            Ok(None)
        }
    }
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
    // Stages a Slurm job computes now (this controller's or another's).
    let on_slurm: BTreeMap<String, (String, String)> = st
        .iter()
        .filter(|s| s.will_run)
        .filter_map(|s| {
            let key = s.key.as_deref()?;
            fpipe_engine::exec::slurm::running_job(engine.store.root(), key)
                .map(|j| (s.name.clone(), j))
        })
        .collect();
    if json {
        let mut v = serde_json::to_value(&st)?;
        if let Some(a) = v.as_array_mut() {
            for s in a {
                let name = s["name"].as_str().unwrap_or("").to_string();
                if let Some((id, node)) = on_slurm.get(&name) {
                    s["slurm_job"] = serde_json::json!({"id": id, "node": node});
                }
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_status(&st, true, &on_slurm);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn print_status(
    st: &[fpipe_engine::StageStatus],
    all: bool,
    on_slurm: &BTreeMap<String, (String, String)>,
) {
    let width = st.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut to_run = 0;
    for s in st {
        if let Some((id, node)) = on_slurm.get(&s.name) {
            to_run += 1;
            let at = if node.is_empty() {
                "pending".to_string()
            } else {
                format!("on {node}")
            };
            println!(
                "  {:<width$}  running on Slurm: job {id} ({at}); {}",
                s.name,
                fpipe_engine::text::visible_line(&s.reason)
            );
        } else if s.will_run {
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

/// GPU slots for the run: `--gpus N` when that many GPUs are visible, else every visible one
/// (the parent's `CUDA_VISIBLE_DEVICES`, else what the driver reports); asking for more than
/// are visible is bad input.
fn gpu_slots(plan: &Plan, asked: Option<u64>) -> Result<usize> {
    use fpipe_engine::gpu;
    let wanted = plan
        .stages
        .iter()
        .map(|s| s.resources.gpu)
        .max()
        .unwrap_or(0);
    let parent = std::env::var(gpu::CUDA_VISIBLE_DEVICES).ok();
    // Only ask the driver when it matters: nvidia-smi takes a moment on GPU machines.
    let driver = if parent.is_none() && (wanted > 0 || asked.is_some_and(|n| n > 0)) {
        driver_gpu_count()
    } else {
        0
    };
    let visible = gpu::visible_gpus(parent.as_deref(), driver);
    let slots = gpu::gpu_slots(asked.map(|n| n as usize), parent.as_deref(), &visible)
        .map_err(|e| BadInput(e.to_string()))?;
    if wanted > slots {
        say_err!(
            "warning: a stage asks for {wanted} GPU(s) but the run has {slots} GPU slot(s); such stages run with what there is (see --gpus)"
        );
    }
    Ok(slots)
}

/// GPUs the driver reports (`nvidia-smi -L`), 0 without a driver.
fn driver_gpu_count() -> usize {
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
        .unwrap_or(0)
}

/// Checks `--device` before anything runs: a build without CUDA or a machine without a driver
/// is bad input (exit 2), not a stage failure.
fn check_device(device: &str) -> Result<()> {
    #[cfg(feature = "faces")]
    fpipe_stages::util::device::check_device(device).map_err(|e| BadInput(e.to_string()))?;
    #[cfg(not(feature = "faces"))]
    if device != "cpu" {
        return Err(BadInput(format!(
            "device `{device}`: this fpipe was built without the face stages (feature `faces`), which are what use a device"
        ))
        .into());
    }
    Ok(())
}
