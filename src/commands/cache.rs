//! `fpipe gc` and `fpipe cache verify|push|pull`.

use super::*;

/// `fpipe gc`: removes artifacts that no pipeline state or recent run record keeps.
pub fn gc(cache: &Option<PathBuf>, args: GcArgs) -> Result<ExitCode> {
    let GcArgs {
        keep_runs,
        dry_run,
        remote,
        yes,
    } = args;
    let store = open_store(&cache_dir(cache, None))?;
    // A remote gc only reads this cache; a local one needs it alone.
    let _lock = match remote {
        Some(_) => store.lock_shared()?,
        None => match store.try_lock_exclusive()? {
            Some(l) => l,
            None => bail!(
                "a run is using the cache {}; try gc again when it has finished",
                store.root().display()
            ),
        },
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
    if let Some(url) = remote {
        if dry_run && yes {
            bail!(
                "--dry-run and --yes contradict each other; a remote gc is a dry run without --yes"
            );
        }
        return super::remote::gc(&keep, &url, yes);
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

/// `fpipe cache verify|push|pull`.
pub fn cache(cache: &Option<PathBuf>, registry: Registry, args: CacheArgs) -> Result<ExitCode> {
    let CacheArgs { command } = args;
    // `pull --check --pipeline FILE`, `push|pull URL FILE` work on FILE's cache, like
    // `run FILE`.
    let file = match &command {
        CacheCommand::Pull { pipeline, file, .. } => pipeline.clone().or(file.clone()),
        CacheCommand::Push { file, .. } => file.clone(),
        _ => None,
    };
    let store = open_store(&cache_dir(cache, file.as_deref()))?;
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
        CacheCommand::Push {
            dest,
            file,
            all: _,
            params,
            params_files,
        } => {
            if fpipe_remote::is_url(&dest) {
                let pipeline = file.map(|file| PipelineArgs {
                    file,
                    params,
                    params_files,
                });
                return super::remote::push(store, registry, &dest, pipeline);
            }
            if file.is_some() {
                bail!("{dest} is a cache folder: a push to a folder copies the whole cache; a pipeline FILE chooses what to push only to a remote URL ({})", fpipe_remote::SCHEMES);
            }
            let dir = PathBuf::from(dest);
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
            src,
            file,
            check,
            pipeline,
            params,
            params_files,
            seed,
        } => {
            let remote = fpipe_remote::is_url(&src);
            if file.is_some() && !remote {
                bail!("{src} is a cache folder: a pull from a folder copies the whole cache; a pipeline FILE chooses what to pull only from a remote URL ({})", fpipe_remote::SCHEMES);
            }
            let pipeline = pipeline.or(file.clone());
            if pipeline.is_none() && !(params.is_empty() && params_files.is_empty()) {
                bail!("-p/--params override a pipeline's parameters: give the pipeline FILE too");
            }
            if remote {
                let plan = match &pipeline {
                    Some(file) => Some(crate::budget::while_loading(|| {
                        fpipe_engine::load_plan(
                            file,
                            &Overrides {
                                files: params_files.clone(),
                                pairs: params.clone(),
                            },
                            &registry,
                        )
                    })?),
                    None => None,
                };
                // Only FILE's needs when FILE was given as what to pull.
                let needs = if file.is_some() { plan.as_ref() } else { None };
                let _lock = match check {
                    Some(_) => match store.try_lock_exclusive()? {
                        Some(l) => l,
                        None => bail!(
                            "a run is using the cache {}; a checked pull needs it alone, try again when the run has finished",
                            store.root().display()
                        ),
                    },
                    None => store.lock_shared()?,
                };
                let r = super::remote::pull(&store, &registry, &src, needs)?;
                return match (check, plan, pipeline) {
                    (Some(n), Some(plan), Some(file)) => {
                        let engine = Engine { store, registry };
                        check_pull(&engine, &plan, &file, &r.actions_added, n, seed)
                    }
                    _ => Ok(ExitCode::SUCCESS),
                };
            }
            let dir = PathBuf::from(src);
            if !dir.join("objects").is_dir() {
                bail!(
                    "{} is not an fpipe cache (no objects/ folder)",
                    dir.display()
                );
            }
            let other = open_store(&dir)?;
            let checked = match (check, pipeline) {
                (Some(n), Some(file)) => {
                    let plan = crate::budget::while_loading(|| {
                        fpipe_engine::load_plan(
                            &file,
                            &Overrides {
                                files: params_files,
                                pairs: params,
                            },
                            &registry,
                        )
                    })?;
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

/// `pulled from DIR` for a record's `meta.origin`.
pub(super) fn origin_source(o: &serde_json::Value) -> Option<String> {
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
pub(super) fn origin_text(origin: Option<&serde_json::Value>) -> Option<String> {
    let o = origin?;
    let at = o.get("at").and_then(|v| v.as_str()).unwrap_or("?");
    Some(format!("{} at {at}", origin_source(o)?))
}

/// One line per cache that supplied action records, for `cache verify`.
pub(super) fn print_origins(store: &ArtifactStore) -> Result<()> {
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
pub(super) fn check_pull(
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
pub(super) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
