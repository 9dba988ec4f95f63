//! One function per subcommand.

use crate::{CacheCommand, Cli, Command, PipelineArgs};
use anyhow::{anyhow, bail, Context, Result};
use fpipe_cache::{ArtifactId, ArtifactStore};
use fpipe_engine::records::{PipelineState, RunRecord, StageState};
use fpipe_engine::{Engine, Overrides, Plan, Registry, Reporter, RunOptions};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn registry() -> Registry {
    #[allow(unused_mut)]
    let mut r = Registry::with_builtins();
    #[cfg(feature = "faces")]
    fpipe_stages::register_all(&mut r);
    r
}

/// The cache: --cache / FPIPE_CACHE, else `.fpipe/` beside the pipeline file, else `./.fpipe`.
fn cache_dir(cli_cache: &Option<PathBuf>, file: Option<&Path>) -> PathBuf {
    if let Some(c) = cli_cache {
        return c.clone();
    }
    match file.and_then(|f| f.parent()) {
        Some(p) if !p.as_os_str().is_empty() => p.join(".fpipe"),
        _ => PathBuf::from(".fpipe"),
    }
}

fn open_store(dir: &Path) -> Result<ArtifactStore> {
    ArtifactStore::open(dir).with_context(|| format!("opening cache {}", dir.display()))
}

fn overrides(p: &PipelineArgs) -> Overrides {
    Overrides {
        files: p.params_files.clone(),
        pairs: p.params.clone(),
    }
}

fn load(p: &PipelineArgs, registry: &Registry) -> Result<Plan> {
    Ok(fpipe_engine::load_plan(&p.file, &overrides(p), registry)?)
}

fn default_gpus() -> usize {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count())
        .unwrap_or(0)
}

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    let registry = registry();
    match cli.command {
        Command::Run {
            pipeline,
            target,
            force,
            dry_run,
            jobs,
            gpus,
            device,
            verbose,
        } => {
            let plan = load(&pipeline, &registry)?;
            let store = open_store(&cache_dir(&cli.cache, Some(&pipeline.file)))?;
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
                say_err!("run interrupted; recorded as such. Rerun to continue: finished stages are cached.");
            }
            say!("{}", summary.line());
            Ok(if summary.interrupted {
                ExitCode::from(130)
            } else if summary.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status {
            pipeline,
            target,
            json,
        } => {
            let plan = load(&pipeline, &registry)?;
            let store = open_store(&cache_dir(&cli.cache, Some(&pipeline.file)))?;
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
        Command::Validate { pipeline } => {
            let plan = load(&pipeline, &registry)?;
            print!("{}", validation_report(&pipeline.file, &plan));
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { pipeline, format } => {
            let plan = load(&pipeline, &registry)?;
            print!("{}", render_dag(&plan, &format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Out {
            stage,
            file,
            params,
        } => {
            let path = output_of(&cli.cache, &registry, &stage, file, params)?;
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            stage,
            file,
            params,
            json,
        } => {
            let path = output_of(&cli.cache, &registry, &stage, file, params)?;
            let (text, value) = inspect_artifact(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { file, last, json } => {
            let store = open_store(&cache_dir(&cli.cache, file.as_deref()))?;
            show(&store, file.as_deref(), last, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { keep_runs, dry_run } => {
            let store = open_store(&cache_dir(&cli.cache, None))?;
            let Some(_lock) = store.try_lock_exclusive()? else {
                bail!(
                    "a run is using the cache {}; try gc again when it has finished",
                    store.root().display()
                );
            };
            let mut keep: HashSet<ArtifactId> = HashSet::new();
            for st in PipelineState::all(&store) {
                for m in st.stages.values() {
                    keep.extend(m.outputs.values().copied());
                }
            }
            let records = RunRecord::all(&store);
            for r in records.iter().rev().take(keep_runs) {
                for s in &r.stages {
                    keep.extend(s.outputs.values().copied());
                }
            }
            let report = store.gc(&keep, dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} artifacts, {} action records, {} staging leftovers ({:.1} MB); kept {} artifacts",
                report.objects_removed.len(),
                report.actions_removed,
                report.staging_removed,
                report.bytes_freed as f64 / 1e6,
                report.objects_kept
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache { command } => {
            // `pull --check --pipeline FILE` works on FILE's cache, like `run FILE`.
            let file = match &command {
                CacheCommand::Pull { pipeline, .. } => pipeline.clone(),
                _ => None,
            };
            let store = open_store(&cache_dir(&cli.cache, file.as_deref()))?;
            match command {
                CacheCommand::Verify { repair } => {
                    let _lock = store.lock_shared()?;
                    let r = store.verify(repair)?;
                    for p in &r.problems {
                        println!("{}: {}", p.path.display(), p.problem);
                    }
                    if !r.invalidated.is_empty() {
                        println!(
                            "{} {} record(s) computed from damaged data ({}) and {} artifact(s) they produced",
                            if repair { "invalidated" } else { "would invalidate" },
                            r.invalidated.len(),
                            r.invalidated.join(", "),
                            r.tainted.len()
                        );
                    }
                    print_origins(&store)?;
                    println!(
                        "checked {} artifacts and {} action records: {} problem(s){}",
                        r.objects_checked,
                        r.actions_checked,
                        r.problems.len(),
                        if repair {
                            format!(", {} removed", r.repaired)
                        } else {
                            String::new()
                        }
                    );
                    Ok(if r.problems.is_empty() || repair {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    })
                }
                CacheCommand::Push { dir } => {
                    let _lock = store.lock_shared()?;
                    let other = open_store(&dir)?;
                    let r = store.push(&other, None)?;
                    println!(
                        "pushed {} artifacts ({:.1} MB) and {} action records to {}; {} already there",
                        r.objects_copied,
                        r.bytes_copied as f64 / 1e6,
                        r.actions_copied,
                        dir.display(),
                        r.objects_present
                    );
                    Ok(ExitCode::SUCCESS)
                }
                CacheCommand::Pull {
                    dir,
                    check,
                    pipeline,
                    params,
                    params_files,
                    seed,
                } => {
                    if !dir.join("objects").is_dir() {
                        bail!(
                            "{} is not an fpipe cache (no objects/ folder)",
                            dir.display()
                        );
                    }
                    let other = open_store(&dir)?;
                    let checked = match (check, pipeline) {
                        (Some(n), Some(file)) => {
                            let plan = fpipe_engine::load_plan(
                                &file,
                                &Overrides {
                                    files: params_files,
                                    pairs: params,
                                },
                                &registry,
                            )?;
                            Some((n, file, plan))
                        }
                        _ => None,
                    };
                    // A checked pull holds the cache alone: no run may use a pulled result
                    // before it is checked.
                    let _lock = match checked {
                        Some(_) => match store.try_lock_exclusive()? {
                            Some(l) => l,
                            None => bail!(
                                "a run is using the cache {}; a checked pull needs it alone, try again when the run has finished",
                                store.root().display()
                            ),
                        },
                        None => store.lock_shared()?,
                    };
                    let r = store.pull(&other, None)?;
                    println!(
                        "pulled {} artifacts ({:.1} MB) and {} action records from {}; {} already here",
                        r.objects_copied,
                        r.bytes_copied as f64 / 1e6,
                        r.actions_copied,
                        dir.display(),
                        r.objects_present
                    );
                    match checked {
                        None => Ok(ExitCode::SUCCESS),
                        Some((n, file, plan)) => {
                            let engine = Engine { store, registry };
                            check_pull(&engine, &plan, &file, &r.actions_added, n, seed)
                        }
                    }
                }
            }
        }
        Command::Stages { kind } => {
            let mut any = false;
            for k in registry.kinds() {
                if kind.as_deref().is_some_and(|n| n != k.kind()) {
                    continue;
                }
                any = true;
                print_kind(k.as_ref());
            }
            if !any {
                bail!("no stage kind `{}`", kind.unwrap_or_default());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `fpipe validate` prints: every program the pipeline would start, with its arguments,
/// the environment it gets and the files linked in beside it, and every file or folder the
/// stages read by path, all with control characters made visible, so a pipeline received
/// from someone else can be reviewed before it runs.
fn validation_report(file: &Path, plan: &Plan) -> String {
    use fpipe_engine::text::{visible, visible_line};
    use std::fmt::Write;
    let mut out = String::new();
    let mut kinds = BTreeSet::new();
    let mut commands = Vec::new();
    let mut reads = Vec::new();
    for s in &plan.stages {
        kinds.insert(s.def.uses.clone());
        for c in s.kind.commands(&s.params, &s.def.base_dir) {
            commands.push((s.name(), c));
        }
        for (param, paths) in &s.path_params {
            for p in paths {
                reads.push((s.name(), param.as_str(), p));
            }
        }
    }
    let _ = writeln!(
        out,
        "{}: ok, {} stages ({})",
        visible_line(&file.display().to_string()),
        plan.stages.len(),
        kinds.into_iter().collect::<Vec<_>>().join(", ")
    );
    if commands.is_empty() {
        let _ = writeln!(out, "runs no shell commands");
    } else {
        let _ = writeln!(out, "shell commands it would run ({}):", commands.len());
        for (stage, c) in &commands {
            let _ = writeln!(out, "  [{stage}]");
            let script = c.args.last().map(String::as_str).unwrap_or_default();
            for line in visible(script, true).lines() {
                let _ = writeln!(out, "    $ {line}");
            }
            let mut argv: Vec<String> = std::iter::once(c.program.as_str())
                .chain(c.args.iter().map(String::as_str))
                .map(|a| shell_word(&visible_line(a)))
                .collect();
            if let Some(last) = argv.last_mut() {
                if c.args.len() > 1 {
                    *last = "<the command above>".into();
                }
            }
            let _ = writeln!(out, "    program: {}", argv.join(" "));
            for (k, v) in &c.env {
                let _ = writeln!(
                    out,
                    "    env: {}={}",
                    visible_line(k),
                    shell_word(&visible_line(v))
                );
            }
            for (at, from) in &c.links {
                let _ = writeln!(
                    out,
                    "    links in: {} -> {}",
                    visible_line(at),
                    visible_line(&from.display().to_string())
                );
            }
        }
        let _ = writeln!(
            out,
            "each also gets FPIPE_STAGE, FPIPE_METRICS, FPIPE_DEVICE, FPIPE_THREADS, CUDA_VISIBLE_DEVICES (with GPU slots) and the environment fpipe runs in"
        );
    }
    if !reads.is_empty() {
        let _ = writeln!(out, "files and folders it reads by path ({}):", reads.len());
        for (stage, param, p) in reads {
            let _ = writeln!(
                out,
                "  [{stage}] {param}: {}",
                visible_line(&p.display().to_string())
            );
        }
    }
    out
}

/// A word as a shell would need it quoted to mean the same (for display).
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn print_kind(k: &dyn fpipe_engine::Stage) {
    let sig = k.signature();
    println!("{} (v{}): {}", k.kind(), k.version(), k.doc());
    for p in &sig.inputs {
        println!(
            "  in  {:<14} {:<10} {}{}",
            p.name,
            p.ty,
            p.doc,
            if p.optional { " (optional)" } else { "" }
        );
    }
    if k.accepts_any_inputs() {
        println!("  in  <any name>     any        placed at in/<name>/");
    }
    for p in &sig.outputs {
        println!("  out {:<14} {:<10} {}", p.name, p.ty, p.doc);
    }
    for p in &sig.params {
        let d = p
            .default
            .as_ref()
            .map(|d| format!(" [default {d}]"))
            .unwrap_or_else(|| " [required]".into());
        println!("  with {:<13} {}{}: {}", p.name, p.ty.describe(), d, p.doc);
    }
    println!();
}

fn print_status(st: &[fpipe_engine::StageStatus], all: bool) {
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

/// `pulled from DIR` for a record's `meta.origin`.
fn origin_source(o: &serde_json::Value) -> Option<String> {
    [
        ("pulled_from", "pulled from"),
        ("pushed_from", "pushed from"),
    ]
    .iter()
    .find_map(|(field, verb)| {
        let from = o.get(field)?.as_str()?;
        Some(format!("{verb} {from}"))
    })
}

/// `pulled from DIR at TIME` for a record's `meta.origin`.
fn origin_text(origin: Option<&serde_json::Value>) -> Option<String> {
    let o = origin?;
    let at = o.get("at").and_then(|v| v.as_str()).unwrap_or("?");
    Some(format!("{} at {at}", origin_source(o)?))
}

/// One line per cache that supplied action records, for `cache verify`.
fn print_origins(store: &ArtifactStore) -> Result<()> {
    let mut by_source: BTreeMap<String, usize> = BTreeMap::new();
    for rec in store.actions()? {
        if let Some(o) = rec.meta.get("origin") {
            let source = origin_source(o).unwrap_or_else(|| o.to_string());
            *by_source.entry(source).or_default() += 1;
        }
    }
    for (source, n) in by_source {
        println!(
            "{n} action record(s) {source} (results computed elsewhere; see `fpipe cache pull --check`)"
        );
    }
    Ok(())
}

/// `cache pull --check N`: recomputes up to `n` stages of `plan` whose cached result a record
/// of this pull (`added`) supplies, chosen by a seeded ranking of their keys, and compares
/// their outputs with the pulled records'. On any difference, or a stage that cannot be
/// recomputed, removes every record the pull added and exits 1.
fn check_pull(
    engine: &Engine,
    plan: &Plan,
    file: &Path,
    added: &[String],
    n: usize,
    seed: Option<u64>,
) -> Result<ExitCode> {
    let added_set: HashSet<&str> = added.iter().map(String::as_str).collect();
    let opts = RunOptions::default();
    let status = engine.status(plan, &opts)?;
    let candidates: Vec<&fpipe_engine::StageStatus> = status
        .iter()
        .filter(|s| !s.will_run && s.key.as_deref().is_some_and(|k| added_set.contains(k)))
        .collect();
    if candidates.is_empty() {
        println!(
            "no stage of {} is cached by a record from this pull; nothing to check",
            file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let seed = seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        mix(t ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000
    });
    // A fair, reproducible sample: rank the candidates by a hash of (seed, key).
    let mut ranked: Vec<(u64, &fpipe_engine::StageStatus)> = candidates
        .iter()
        .map(|s| {
            let key = s.key.as_deref().unwrap_or_default();
            let k = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            (mix(k ^ mix(seed)), *s)
        })
        .collect();
    ranked.sort_by_key(|r| r.0);
    let mut chosen: Vec<&fpipe_engine::StageStatus> =
        ranked.into_iter().take(n).map(|(_, s)| s).collect();
    // Upstream first, as the pipeline runs.
    chosen.sort_by_key(|s| {
        plan.find(&s.name)
            .and_then(|i| plan.order.iter().position(|o| *o == i))
    });
    println!(
        "checking {} of the {} stage(s) of {} cached by this pull (seed {seed}): {}",
        chosen.len(),
        candidates.len(),
        file.display(),
        chosen
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let reporter: Arc<dyn Reporter> = Arc::new(crate::term::Terminal::new(false));
    let show = |o: &BTreeMap<String, ArtifactId>| {
        o.iter()
            .map(|(p, id)| format!("{p}={}", id.short()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut refused = Vec::new();
    for s in &chosen {
        let idx = plan
            .find(&s.name)
            .ok_or_else(|| anyhow!("no stage `{}`", s.name))?;
        match engine.recompute(plan, idx, &opts, &reporter) {
            Ok(r) if Some(&r.key) == s.key.as_ref() && r.outputs == s.outputs => {
                println!("  {}: recomputed, same result", s.name);
            }
            Ok(r) => refused.push(format!(
                "stage `{}`: the pulled record says {}, recomputing gives {} (log: {})",
                s.name,
                show(&s.outputs),
                show(&r.outputs),
                r.log.display()
            )),
            Err(e) => refused.push(format!("{e}")),
        }
    }
    if refused.is_empty() {
        println!(
            "pull accepted: {} of {} pulled stage(s) recomputed to the same result",
            chosen.len(),
            candidates.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut removed = 0;
    for key in added {
        if engine.store.remove_action(key)? {
            removed += 1;
        }
    }
    eprintln!("pull refused: a pulled result is not what this machine computes");
    for r in &refused {
        eprintln!("  {r}");
    }
    eprintln!(
        "removed the {removed} action record(s) this pull added; its artifacts stay (content-addressed, unused) until `fpipe gc`"
    );
    Ok(ExitCode::from(1))
}

/// SplitMix64's finaliser: a well-spread 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn render_dag(plan: &Plan, format: &str) -> String {
    let mut out = String::new();
    match format {
        "dot" => {
            out.push_str("digraph pipeline {\n  rankdir=LR;\n");
            for &i in &plan.order {
                let s = &plan.stages[i];
                out.push_str(&format!(
                    "  \"{}\" [label=\"{}\\n({})\", shape=box];\n",
                    s.name(),
                    s.name(),
                    s.def.uses
                ));
            }
            for &i in &plan.order {
                let s = &plan.stages[i];
                for w in &s.wires {
                    out.push_str(&format!(
                        "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
                        plan.stages[w.from].name(),
                        s.name(),
                        w.port
                    ));
                }
            }
            out.push_str("}\n");
        }
        "mermaid" => {
            out.push_str("graph LR\n");
            for &i in &plan.order {
                let s = &plan.stages[i];
                out.push_str(&format!("  n{i}[\"{}<br/>{}\"]\n", s.name(), s.def.uses));
            }
            for &i in &plan.order {
                for w in &plan.stages[i].wires {
                    out.push_str(&format!("  n{} -->|{}| n{i}\n", w.from, w.port));
                }
            }
        }
        _ => {
            for &i in &plan.order {
                let s = &plan.stages[i];
                out.push_str(&format!("{} ({})\n", s.name(), s.def.uses));
                for w in &s.wires {
                    out.push_str(&format!(
                        "  {} <- {}.{}\n",
                        w.port,
                        plan.stages[w.from].name(),
                        w.from_port
                    ));
                }
            }
        }
    }
    out
}

fn output_of(
    cache: &Option<PathBuf>,
    registry: &Registry,
    stage: &str,
    file: Option<PathBuf>,
    params: Vec<String>,
) -> Result<PathBuf> {
    if let Some(file) = file {
        let store = open_store(&cache_dir(cache, Some(&file)))?;
        let plan = fpipe_engine::load_plan(
            &file,
            &Overrides {
                files: vec![],
                pairs: params,
            },
            registry,
        )?;
        let (name, port) = match plan.find(stage) {
            Some(_) => (stage.to_string(), None),
            None => match stage.rsplit_once('.') {
                Some((s, p)) if plan.find(s).is_some() => (s.to_string(), Some(p.to_string())),
                _ => bail!("no stage `{stage}` in {}", file.display()),
            },
        };
        let engine = Engine {
            store,
            registry: registry.clone(),
        };
        let opts = RunOptions {
            targets: vec![name.clone()],
            ..RunOptions::default()
        };
        let st = engine.status(&plan, &opts)?;
        let idx = plan
            .find(&name)
            .ok_or_else(|| anyhow!("no stage `{name}`"))?;
        let me = st
            .iter()
            .find(|s| s.name == plan.stages[idx].name())
            .ok_or_else(|| anyhow!("no status for `{name}`"))?;
        return fpipe_engine::exec::output_path(&engine.store, me, port.as_deref())
            .map_err(|e| anyhow!(e));
    }
    // No pipeline named: the newest run record that produced this stage.
    let store = open_store(&cache_dir(cache, None))?;
    let records = RunRecord::all(&store);
    let candidates = [
        (stage.to_string(), None),
        match stage.rsplit_once('.') {
            Some((s, p)) => (s.to_string(), Some(p.to_string())),
            None => (String::new(), None),
        },
    ];
    for r in records.iter().rev() {
        for (name, port) in &candidates {
            if let Some(s) = r
                .stages
                .iter()
                .find(|s| &s.name == name && !s.outputs.is_empty())
            {
                let id = match port {
                    Some(p) => s
                        .outputs
                        .get(p)
                        .ok_or_else(|| anyhow!("stage `{name}` has no output `{p}`"))?,
                    None if s.outputs.len() == 1 => s
                        .outputs
                        .values()
                        .next()
                        .ok_or_else(|| anyhow!("no outputs"))?,
                    None => bail!(
                        "stage `{name}` has several outputs; name one: {}",
                        s.outputs
                            .keys()
                            .map(|k| format!("{name}.{k}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let path = store.object_path(id);
                if !path.exists() {
                    bail!("the output of `{name}` was removed from the cache (gc); rerun the pipeline");
                }
                return Ok(path);
            }
        }
    }
    bail!(
        "no run in {} produced stage `{stage}`; run its pipeline first (or pass -f PIPELINE)",
        store.root().display()
    )
}

fn show(store: &ArtifactStore, file: Option<&Path>, last: usize, json: bool) -> Result<()> {
    let canon = file.map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.to_path_buf()));
    let records: Vec<RunRecord> = RunRecord::all(store)
        .into_iter()
        .filter(|r| {
            canon.as_ref().is_none_or(|c| {
                std::fs::canonicalize(&r.pipeline).unwrap_or_else(|_| r.pipeline.clone()) == *c
            })
        })
        .collect();
    let start = records.len().saturating_sub(last);
    let records = &records[start..];
    // Rows: (run, stage) with metrics; columns: metric names.
    let mut rows: Vec<(String, String, String, BTreeMap<String, f64>)> = Vec::new();
    let mut cols: BTreeSet<String> = BTreeSet::new();
    for r in records {
        for s in &r.stages {
            if s.metrics.is_empty() {
                continue;
            }
            cols.extend(s.metrics.keys().cloned());
            rows.push((
                r.started.clone(),
                r.pipeline_name.clone(),
                s.name.clone(),
                s.metrics.clone(),
            ));
        }
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(t, p, s, m)| serde_json::json!({"run": t, "pipeline": p, "stage": s, "metrics": m}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no metrics reported in the last {} run(s)", records.len());
        return Ok(());
    }
    let cols: Vec<String> = cols.into_iter().collect();
    let mut table: Vec<Vec<String>> = vec![];
    let mut header = vec!["run".to_string(), "pipeline".into(), "stage".into()];
    header.extend(cols.iter().cloned());
    table.push(header);
    for (t, p, s, m) in &rows {
        let mut line = vec![t.clone(), p.clone(), s.clone()];
        for c in &cols {
            line.push(
                m.get(c)
                    .map(|v| format_metric(*v))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        table.push(line);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| fpipe_engine::text::visible_line(&r[c]).chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .map(|c| fpipe_engine::text::visible_line(c).into_owned())
            .collect::<Vec<_>>()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

fn format_metric(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if v.abs() >= 0.01 {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

/// A summary of an artifact: a data set's own summary when the stages know its format,
/// otherwise its files and sizes.
fn inspect_artifact(path: &Path) -> Result<(String, serde_json::Value)> {
    #[cfg(feature = "faces")]
    if path.join("dataset.json").is_file() {
        let value = fpipe_stages::data::inspect(path)?;
        let text = fpipe_stages::data::inspect_text(path)?;
        return Ok((text, value));
    }
    let (id, entries) = fpipe_cache::tree_id(path)?;
    let mut text = format!("artifact {}\n{}\n", id.short(), path.display());
    let mut files = Vec::new();
    let mut total = 0u64;
    for e in &entries {
        let size = std::fs::metadata(path.join(&e.path))
            .map(|m| m.len())
            .unwrap_or(0);
        total += size;
        files.push(serde_json::json!({"path": e.path, "bytes": size}));
    }
    text.push_str(&format!(
        "{} files, {:.1} MB\n",
        entries.len(),
        total as f64 / 1e6
    ));
    for e in entries.iter().take(20) {
        text.push_str(&format!("  {}\n", e.path));
    }
    if entries.len() > 20 {
        text.push_str(&format!("  ... {} more\n", entries.len() - 20));
    }
    Ok((
        text,
        serde_json::json!({"id": id, "path": path, "bytes": total, "files": files}),
    ))
}
