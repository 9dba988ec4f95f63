//! `fpipe out`, `fpipe inspect` and `fpipe show`: what runs left in the cache.

use super::*;

/// `fpipe out`: prints the path of a stage's current output artifact.
pub fn out(cache: &Option<PathBuf>, registry: Registry, args: OutArgs) -> Result<ExitCode> {
    let OutArgs {
        stage,
        file,
        params,
    } = args;
    let path = output_of(cache, &registry, &stage, file, params)?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `fpipe inspect`: summarises a stage's current output artifact.
pub fn inspect(cache: &Option<PathBuf>, registry: Registry, args: InspectArgs) -> Result<ExitCode> {
    let InspectArgs {
        stage,
        file,
        params,
        json,
    } = args;
    let path = output_of(cache, &registry, &stage, file, params)?;
    let (text, value) = inspect_artifact(&path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `fpipe show`: the table of metrics across recent runs.
pub fn show(cache: &Option<PathBuf>, args: ShowArgs) -> Result<ExitCode> {
    let ShowArgs {
        file,
        last,
        json,
        format,
    } = args;
    let format = if json { "json".to_string() } else { format };
    let store = open_store(&cache_dir(cache, file.as_deref()))?;
    metrics_table(&store, file.as_deref(), last, &format)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn output_of(
    cache: &Option<PathBuf>,
    registry: &Registry,
    stage: &str,
    file: Option<PathBuf>,
    params: Vec<String>,
) -> Result<PathBuf> {
    if let Some(file) = file {
        let store = open_store(&cache_dir(cache, Some(&file)))?;
        let plan = crate::budget::while_loading(|| {
            fpipe_engine::load_plan(
                &file,
                &Overrides {
                    files: vec![],
                    pairs: params,
                },
                registry,
            )
        })?;
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

pub(super) fn metrics_table(
    store: &ArtifactStore,
    file: Option<&Path>,
    last: usize,
    format: &str,
) -> Result<()> {
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
    // Rows: (run, stage) with metrics or a cluster job; columns: metric names.
    type Row = (
        String,
        String,
        String,
        BTreeMap<String, f64>,
        Option<String>,
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut cols: BTreeSet<String> = BTreeSet::new();
    let mut jobs: Vec<serde_json::Value> = Vec::new();
    for r in records {
        for s in &r.stages {
            if s.metrics.is_empty() && s.job.is_none() {
                continue;
            }
            cols.extend(s.metrics.keys().cloned());
            // `slurm 1234 on node7`
            let job = s.job.as_ref().map(|j| {
                let mut t = format!("{} {}", j.executor, j.id);
                if let Some(n) = &j.node {
                    t.push_str(&format!(" on {n}"));
                }
                t
            });
            jobs.push(serde_json::to_value(&s.job)?);
            rows.push((
                r.started.clone(),
                r.pipeline_name.clone(),
                s.name.clone(),
                s.metrics.clone(),
                job,
            ));
        }
    }
    if format == "json" {
        let v: Vec<_> = rows
            .iter()
            .zip(&jobs)
            .map(|((t, p, s, m, _), j)| {
                let mut v = serde_json::json!({"run": t, "pipeline": p, "stage": s, "metrics": m});
                if !j.is_null() {
                    v["job"] = j.clone();
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no metrics reported in the last {} run(s)", records.len());
        return Ok(());
    }
    let with_jobs = rows.iter().any(|r| r.4.is_some());
    let cols: Vec<String> = cols.into_iter().collect();
    let mut table: Vec<Vec<String>> = vec![];
    let mut header = vec!["run".to_string(), "pipeline".into(), "stage".into()];
    if with_jobs {
        header.push("job".into());
    }
    header.extend(cols.iter().cloned());
    table.push(header);
    for (t, p, s, m, j) in &rows {
        let mut line = vec![t.clone(), p.clone(), s.clone()];
        if with_jobs {
            line.push(j.clone().unwrap_or_else(|| "-".into()));
        }
        for c in &cols {
            line.push(
                m.get(c)
                    .map(|v| match format {
                        // Full precision: CSV is read back by programs.
                        "csv" => v.to_string(),
                        _ => format_metric(*v),
                    })
                    .unwrap_or_else(|| "-".into()),
            );
        }
        table.push(line);
    }
    match format {
        "csv" => {
            for row in &table {
                let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
                println!("{}", cells.join(","));
            }
            return Ok(());
        }
        "markdown" => {
            for (i, row) in table.iter().enumerate() {
                let cells: Vec<String> = row
                    .iter()
                    .map(|c| {
                        fpipe_engine::text::visible_line(c)
                            .replace('|', "\\|")
                            .to_string()
                    })
                    .collect();
                println!("| {} |", cells.join(" | "));
                if i == 0 {
                    let rule: Vec<&str> = row
                        .iter()
                        .enumerate()
                        .map(|(j, _)| if j < 3 { "---" } else { "---:" })
                        .collect();
                    println!("|{}|", rule.join("|"));
                }
            }
            return Ok(());
        }
        _ => {}
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

/// A CSV cell (RFC 4180): quoted when it holds a comma, quote or line break.
fn csv_cell(c: &str) -> String {
    if c.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c.to_string()
    }
}

pub(super) fn format_metric(v: f64) -> String {
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
pub(super) fn inspect_artifact(path: &Path) -> Result<(String, serde_json::Value)> {
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
