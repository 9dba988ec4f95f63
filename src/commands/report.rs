//! `fpipe report`: writes one self-contained HTML page for a run of a pipeline (see
//! `src/report/`), optionally beside a second run.

use super::*;
use crate::report;
use crate::ReportArgs;

/// `fpipe report`: the page of the newest run of FILE (or of the run `-p` selects).
pub fn report(cache: &Option<PathBuf>, registry: Registry, args: ReportArgs) -> Result<ExitCode> {
    let ReportArgs {
        file,
        output,
        params,
        compare,
        compare_params,
        json,
    } = args;
    let cache_root = cache_dir(cache, Some(&file));
    let store = open_store(&cache_root)?;
    let records = report::records_of(&store, &file);
    if records.is_empty() {
        bail!(
            "no run of {} in the cache {}; run it first (`fpipe run {}`)",
            file.display(),
            cache_root.display(),
            file.display()
        );
    }
    let base = select(&records, &file, &params, &registry, None)
        .with_context(|| format!("choosing the run of {} to report", file.display()))?;
    let other = match (&compare, compare_params.is_empty()) {
        (Some(_), false) => bail!("give --compare RUN or --compare-param KEY=VALUE, not both"),
        (Some(sel), true) => Some(by_id(&records, sel, base)?),
        (None, false) => Some(
            select(&records, &file, &compare_params, &registry, Some(base))
                .context("choosing the run to compare with (--compare-param)")?,
        ),
        (None, true) => None,
    };
    let page = report::build(&store, &registry, &file, base, other);
    let path = output.unwrap_or_else(|| report::default_path(&cache_root, &base.pipeline_name));
    report::write(&page, &path)?;
    if json {
        let mut v = report::summary(&page);
        v["path"] = serde_json::json!(path);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", open_hint(&path));
    }
    Ok(ExitCode::SUCCESS)
}

/// "report: PATH (open file://ABS in a browser)".
pub(super) fn open_hint(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!(
        "report: {} (open file://{} in a browser)",
        path.display(),
        abs.display()
    )
}

/// The newest record whose pipeline parameters equal those `pairs` give the pipeline (all
/// records when `pairs` is empty), other than `not`.
fn select<'a>(
    records: &'a [RunRecord],
    file: &Path,
    pairs: &[String],
    registry: &Registry,
    not: Option<&RunRecord>,
) -> Result<&'a RunRecord> {
    let others = |r: &&RunRecord| not.is_none_or(|n| n.id != r.id);
    if pairs.is_empty() {
        return records
            .iter()
            .rev()
            .find(others)
            .ok_or_else(|| anyhow!("only one run of {} is recorded", file.display()));
    }
    let _ = registry;
    let wanted = fpipe_engine::load(
        file,
        &Overrides {
            files: vec![],
            pairs: pairs.to_vec(),
        },
    )?
    .params;
    records
        .iter()
        .rev()
        .filter(others)
        .find(|r| r.params == wanted)
        .ok_or_else(|| {
            anyhow!(
                "no recorded run of {} has the parameters {}; `fpipe show {}` lists the runs",
                file.display(),
                pairs.join(" "),
                file.display()
            )
        })
}

/// The record named by `sel`: a run id or its unique prefix, or `previous` (the run before
/// `base`).
fn by_id<'a>(records: &'a [RunRecord], sel: &str, base: &RunRecord) -> Result<&'a RunRecord> {
    if sel == "previous" || sel == "prev" {
        let i = records.iter().position(|r| r.id == base.id).unwrap_or(0);
        return i
            .checked_sub(1)
            .and_then(|j| records.get(j))
            .ok_or_else(|| anyhow!("no run before {}", base.id));
    }
    let hits: Vec<&RunRecord> = records.iter().filter(|r| r.id.starts_with(sel)).collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => bail!(
            "--compare {sel}: no recorded run of this pipeline has that id; runs: {}",
            records
                .iter()
                .rev()
                .take(5)
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => bail!(
            "--compare {sel}: {} runs start with that; give more of the id",
            hits.len()
        ),
    }
}

/// Writes the report of the run just recorded into the cache's `reports/` folder, for the
/// one line `fpipe run` ends with; `None` (and a warning) when that fails.
pub(super) fn after_run(
    cache_root: &Path,
    store: &ArtifactStore,
    registry: &Registry,
    file: &Path,
    record: &RunRecord,
) -> Option<PathBuf> {
    let page = report::build(store, registry, file, record, None);
    let path = report::default_path(cache_root, &record.pipeline_name);
    match report::write(&page, &path) {
        Ok(()) => Some(path),
        Err(e) => {
            say_err!("warning: the run is recorded, but writing its report failed: {e:#}");
            None
        }
    }
}
