//! `fpipe report`: one self-contained HTML page for a run of a pipeline (its metrics beside
//! the published ones, overlaid curves, the DAG, the stages' log tails, and optionally a second
//! run side by side). This module gathers what the page shows from the run records, the plan
//! and the files stages wrote into their artifacts; [`html`] writes the page.
//!
//! Plot data comes from the CSV files the stage kinds write beside their PNG charts
//! (`curve.csv`, `roc.csv`, `erc.csv`, `cmc.csv`, `snapshots.csv`); images (`filters.png`) are
//! inlined as data URIs. A file that is missing (an artifact from an older fpipe, or removed by
//! `gc`) leaves its plot out; it never fails the report.

pub mod html;

use anyhow::Result;
use fpipe_cache::ArtifactStore;
use fpipe_engine::records::{RunRecord, StageState};
use fpipe_engine::{Overrides, Registry};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lines of each stage's log the page shows.
const LOG_TAIL_LINES: usize = 40;
/// Points kept per plotted line (the page stays fast with dozens of curves).
const MAX_POINTS: usize = 400;
/// Images larger than this are linked by path, not inlined.
const MAX_INLINE_IMAGE: u64 = 2_000_000;

/// One run as the page shows it.
#[derive(Serialize)]
pub struct RunView {
    pub id: String,
    pub pipeline: String,
    pub file: String,
    pub started: String,
    pub seconds: f64,
    pub status: String,
    pub device: String,
    pub params: Value,
    /// Why the plan could not be rebuilt (the pipeline changed since): stage parameters and
    /// wiring are then missing from the page.
    pub plan_error: Option<String>,
    pub stages: Vec<StageView>,
    pub published: Vec<fpipe_engine::Published>,
}

/// One stage of a run.
#[derive(Serialize)]
pub struct StageView {
    pub name: String,
    pub family: Option<String>,
    pub kind: String,
    pub version: u32,
    pub key: Option<String>,
    pub state: String,
    pub seconds: f64,
    pub reason: Option<String>,
    pub error: Option<String>,
    /// Resolved parameters (defaults filled) when the plan could be rebuilt.
    pub params: Map<String, Value>,
    /// (port, upstream stage, upstream port).
    pub inputs: Vec<(String, String, String)>,
    pub metrics: BTreeMap<String, f64>,
    pub outputs: BTreeMap<String, String>,
    pub log_tail: Option<String>,
}

/// One overlaid chart.
#[derive(Serialize, Default)]
pub struct Plot {
    pub id: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub series: Vec<SeriesData>,
}

/// One line of a chart.
#[derive(Serialize)]
pub struct SeriesData {
    pub label: String,
    /// Index of the run (0: the reported run, 1: the compared one): drawn dashed.
    pub run: usize,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
}

/// A picture a stage wrote (a filter grid).
#[derive(Serialize)]
pub struct Image {
    pub title: String,
    pub run: usize,
    /// `data:image/png;base64,...`, or empty when too large (then `path` says where it is).
    pub data_uri: String,
    pub path: String,
}

/// Everything on the page.
#[derive(Serialize)]
pub struct Report {
    pub generated: String,
    pub runs: Vec<RunView>,
    pub plots: Vec<Plot>,
    pub images: Vec<Image>,
}

/// Records of `file` in `store`, oldest first.
pub fn records_of(store: &ArtifactStore, file: &Path) -> Vec<RunRecord> {
    let canon = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    RunRecord::all(store)
        .into_iter()
        .filter(|r| {
            std::fs::canonicalize(&r.pipeline).unwrap_or_else(|_| r.pipeline.clone()) == canon
        })
        .collect()
}

/// The `-p key=value` pairs that reproduce `params` (a record's pipeline parameters).
fn pairs_of(params: &Value) -> Vec<String> {
    params
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the view of `record`, rebuilding its plan from `file` with the record's parameters.
pub fn run_view(
    store: &ArtifactStore,
    registry: &Registry,
    file: &Path,
    record: &RunRecord,
) -> RunView {
    let overrides = Overrides {
        files: vec![],
        pairs: pairs_of(&record.params),
    };
    let plan = fpipe_engine::load_plan(file, &overrides, registry);
    let (plan, plan_error) = match plan {
        Ok(p) => (Some(p), None),
        Err(e) => (
            None,
            Some(fpipe_engine::text::visible(&e.to_string(), true).into_owned()),
        ),
    };
    let mut stages = Vec::with_capacity(record.stages.len());
    for s in &record.stages {
        let planned = plan.as_ref().and_then(|p| p.find(&s.name).map(|i| (p, i)));
        let (params, inputs, family) = match planned {
            Some((p, i)) => {
                let ps = &p.stages[i];
                let params: Map<String, Value> = ps
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let inputs = ps
                    .wires
                    .iter()
                    .map(|w| {
                        (
                            w.port.clone(),
                            p.stages[w.from].name().to_string(),
                            w.from_port.clone(),
                        )
                    })
                    .collect();
                (params, inputs, ps.def.family.clone())
            }
            None => (
                Map::new(),
                vec![],
                s.name.split_once('@').map(|f| f.0.to_string()),
            ),
        };
        let outputs = s
            .outputs
            .iter()
            .map(|(port, id)| (port.clone(), id.to_string()))
            .collect();
        stages.push(StageView {
            name: s.name.clone(),
            family,
            kind: s.kind.clone(),
            version: s.version,
            key: s.key.clone(),
            state: state_name(s.state).into(),
            seconds: s.seconds,
            reason: s.reason.clone(),
            error: s.error.clone(),
            params,
            inputs,
            metrics: s.metrics.clone(),
            outputs,
            log_tail: s.log.as_deref().and_then(log_tail),
        });
    }
    let _ = store;
    RunView {
        id: record.id.clone(),
        pipeline: record.pipeline_name.clone(),
        file: record.pipeline.display().to_string(),
        started: record.started.clone(),
        seconds: record.seconds,
        status: format!("{:?}", record.status).to_lowercase(),
        device: record.device.clone(),
        params: record.params.clone(),
        plan_error,
        stages,
        published: plan.map(|p| p.pipeline.published).unwrap_or_default(),
    }
}

fn state_name(s: StageState) -> &'static str {
    match s {
        StageState::Ran => "ran",
        StageState::Cached => "cached",
        StageState::Failed => "failed",
        StageState::Skipped => "skipped",
        StageState::Interrupted => "interrupted",
        StageState::NotRun => "not run",
    }
}

/// The last lines of a log file; `None` when it is gone.
fn log_tail(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    Some(fpipe_engine::text::visible(&lines[start..].join("\n"), true).into_owned())
}

/// A CSV file as its header and numeric rows (cells that are not numbers read as NaN).
fn read_csv(path: &Path) -> Option<(Vec<String>, Vec<Vec<f64>>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let rows = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(',')
                .map(|c| c.trim().parse::<f64>().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    Some((header, rows))
}

/// Column `name` against column `x` of a CSV, finite points only, thinned to [`MAX_POINTS`]
/// (always keeping the first and last point).
fn columns(header: &[String], rows: &[Vec<f64>], x: &str, y: &str) -> Option<(Vec<f64>, Vec<f64>)> {
    let xi = header.iter().position(|h| h == x)?;
    let yi = header.iter().position(|h| h == y)?;
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((*r.get(xi)?, *r.get(yi)?)))
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return None;
    }
    let step = pts.len().div_ceil(MAX_POINTS).max(1);
    let mut kept: Vec<(f64, f64)> = pts.iter().copied().step_by(step).collect();
    if kept.last() != pts.last() {
        if let Some(last) = pts.last() {
            kept.push(*last);
        }
    }
    Some(kept.into_iter().unzip())
}

/// Plot ids in page order, with their titles and axes.
const PLOTS: &[(&str, &str, &str, &str, bool)] = &[
    (
        "roc",
        "ROC",
        "false positive rate (log)",
        "true positive rate",
        true,
    ),
    ("loss", "Training loss", "step", "loss", false),
    ("lr", "Learning rate", "step", "learning rate", false),
    (
        "erc",
        "Error versus reject (quality assessment)",
        "fraction rejected",
        "FNMR",
        false,
    ),
    (
        "cmc",
        "CMC (identification)",
        "rank",
        "identification rate",
        false,
    ),
    (
        "snapshots",
        "BN fine-tune snapshots",
        "step",
        "selection score",
        false,
    ),
];

/// Gathers the plots and images of `runs` (run 0 first) from their stages' artifacts.
pub fn plots_and_images(store: &ArtifactStore, runs: &[&RunRecord]) -> (Vec<Plot>, Vec<Image>) {
    let mut plots: BTreeMap<&str, Plot> = BTreeMap::new();
    let mut images = Vec::new();
    let suffix = |run: usize| {
        if runs.len() > 1 {
            format!(" [{}]", ["A", "B"][run.min(1)])
        } else {
            String::new()
        }
    };
    for (run, r) in runs.iter().enumerate() {
        for s in &r.stages {
            for (port, id) in &s.outputs {
                let dir = store.object_path(id);
                if !dir.is_dir() {
                    continue;
                }
                let label = format!("{}{}", s.name, suffix(run));
                let mut add = |plot: &'static str, label: String, x: &str, y: &str, file: &str| {
                    let Some((h, rows)) = read_csv(&dir.join(file)) else {
                        return;
                    };
                    let Some((xs, ys)) = columns(&h, &rows, x, y) else {
                        return;
                    };
                    let (xs, ys) = if plot == "roc" {
                        xs.into_iter().zip(ys).filter(|p| p.0 > 0.0).unzip()
                    } else {
                        (xs, ys)
                    };
                    plots.entry(plot).or_default().series.push(SeriesData {
                        label,
                        run,
                        x: xs,
                        y: ys,
                    });
                };
                add("loss", label.clone(), "step", "loss", "curve.csv");
                add("lr", label.clone(), "step", "lr", "curve.csv");
                add("roc", label.clone(), "fpr", "tpr", "roc.csv");
                add(
                    "cmc",
                    label.clone(),
                    "rank",
                    "identification_rate",
                    "cmc.csv",
                );
                add("snapshots", label.clone(), "step", "score", "snapshots.csv");
                if let Some((h, _)) = read_csv(&dir.join("erc.csv")) {
                    for col in h.iter().skip(1) {
                        let name = col.trim_start_matches("fnmr@");
                        add(
                            "erc",
                            format!("{label} {name}"),
                            "reject",
                            col.as_str(),
                            "erc.csv",
                        );
                    }
                }
                let grid = dir.join("filters.png");
                if let Ok(meta) = std::fs::metadata(&grid) {
                    let data_uri = if meta.len() <= MAX_INLINE_IMAGE {
                        std::fs::read(&grid)
                            .map(|b| format!("data:image/png;base64,{}", base64(&b)))
                            .unwrap_or_default()
                    } else {
                        String::new()
                    };
                    images.push(Image {
                        title: format!("{}.{port}{}: first-layer filters", s.name, suffix(run)),
                        run,
                        data_uri,
                        path: grid.display().to_string(),
                    });
                }
            }
        }
    }
    let plots = PLOTS
        .iter()
        .filter_map(|&(id, title, x, y, log_x)| {
            let mut p = plots.remove(id)?;
            p.id = id.into();
            p.title = title.into();
            p.x_label = x.into();
            p.y_label = y.into();
            p.log_x = log_x;
            (!p.series.is_empty()).then_some(p)
        })
        .collect();
    (plots, images)
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | (b[2] as u32);
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= c.len() {
                out.push(T[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The default place of a pipeline's report: `reports/NAME.html` in its cache.
pub fn default_path(cache: &Path, pipeline_name: &str) -> PathBuf {
    let safe: String = pipeline_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cache.join("reports").join(format!("{safe}.html"))
}

/// Builds the whole report of `base` (and `other` beside it).
pub fn build(
    store: &ArtifactStore,
    registry: &Registry,
    file: &Path,
    base: &RunRecord,
    other: Option<&RunRecord>,
) -> Report {
    let mut runs = vec![run_view(store, registry, file, base)];
    let mut recs = vec![base];
    if let Some(o) = other {
        runs.push(run_view(store, registry, file, o));
        recs.push(o);
    }
    let (plots, images) = plots_and_images(store, &recs);
    Report {
        generated: fpipe_engine::records::iso8601(fpipe_engine::records::now_unix()),
        runs,
        plots,
        images,
    }
}

/// Writes `report` as HTML to `path` (creating its folder), atomically.
pub fn write(report: &Report, path: &Path) -> Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let page = html::page(report);
    fpipe_cache::write_atomic(path, page.as_bytes())
        .with_context(|| format!("writing the report {}", path.display()))?;
    Ok(())
}

/// A JSON summary of the report's numbers (for tests and scripts).
pub fn summary(report: &Report) -> Value {
    json!({
        "runs": report.runs.iter().map(|r| &r.id).collect::<Vec<_>>(),
        "plots": report.plots.iter().map(|p| json!({"id": p.id, "series": p.series.len()})).collect::<Vec<_>>(),
        "images": report.images.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (a, b) in cases {
            assert_eq!(base64(a.as_bytes()), b);
        }
    }

    #[test]
    fn columns_thin_long_curves_and_keep_the_ends() {
        let h = vec!["step".to_string(), "loss".to_string()];
        let rows: Vec<Vec<f64>> = (0..1001)
            .map(|i| vec![i as f64, 1.0 / (1.0 + i as f64)])
            .collect();
        let (x, y) = columns(&h, &rows, "step", "loss").unwrap();
        assert!(x.len() <= MAX_POINTS + 1, "{}", x.len());
        assert_eq!(x[0], 0.0);
        assert_eq!(*x.last().unwrap(), 1000.0);
        assert_eq!(x.len(), y.len());
        assert!(columns(&h, &rows, "step", "lr").is_none());
    }
}
