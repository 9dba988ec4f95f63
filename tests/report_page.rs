//! `fpipe report` on a small pipeline run twice (the second run changes one evaluation
//! parameter): the page is one self-contained file with the metrics, the published numbers,
//! both runs compared, the DAG, the log tails and the plot data; `fpipe run` names it; the
//! charts stages write are compressed PNGs; `evaluate` writes per-pair scores; `fpipe show`
//! prints CSV and Markdown.
//!
//! Then the page is opened in headless Chromium (`chromium`, or `FPIPE_CHROMIUM`): no console
//! message, no script error or resource that failed to load (the page records both from its
//! first script on), no resource fetched from outside the page, every plot drew data on its
//! canvas, every image decoded; a screenshot lands in the test's target folder
//! (`target/tmp/report-page/report.png`). Without Chromium that part says it is skipped
//! (`.ci/run` installs Chromium).
#![cfg(feature = "faces")]

mod common;
use common::Project;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PIPELINE: &str = r#"fpipe: 1
name: tiny
params:
  fprs: [0.01, 0.1]
stages:
  faces:
    uses: synthetic-faces
    with: {identities: 20, images_per_identity: 5, image_size: 32, test_identities: 10, test_images_per_identity: 4, pairs: 40}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 16, epochs: 2, batch_size: 16}
  evaluate:
    uses: evaluate
    inputs: {model: train.model, pairs: faces.pairs}
    with: {fprs: {{ params.fprs }}}
  heldout:
    uses: identify
    inputs: {model: train.model, pairs: faces.pairs}
    with: {gallery_per_identity: 1, k: 3}
  filters:
    uses: filter-activity
    inputs: {model: train.model}
published:
  - {stage: evaluate, metric: accuracy, value: 0.9978, source: "Example paper 2019, Table 3 (LFW)"}
"#;

/// Runs the pipeline twice (fprs changed the second time) and writes the compared report.
fn project() -> (Project, PathBuf) {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    let first = p.fpipe(&["run", "p.yaml"]).ok();
    assert_eq!(first.counts(), (5, 0, 0));
    // The run names its report, on stderr (the summary stays the last line of stdout).
    let line = first
        .stderr
        .lines()
        .find(|l| l.starts_with("report: "))
        .unwrap_or_else(|| panic!("no report line:\n{}", first.stderr));
    assert!(line.contains("file://"), "{line}");
    assert!(p.path().join(".fpipe/reports/tiny.html").is_file());
    let second = p.fpipe(&["run", "p.yaml", "-p", "fprs=[0.001, 0.1]"]).ok();
    assert_eq!(second.counts(), (1, 4, 0));
    let out = p
        .fpipe(&[
            "report",
            "p.yaml",
            "--compare",
            "previous",
            "-o",
            "out/r.html",
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 2, "{v}");
    let html = p.path().join("out/r.html");
    assert!(html.is_file());
    (p, html)
}

fn stage_dir(p: &Project, spec: &str) -> PathBuf {
    PathBuf::from(p.fpipe(&["out", spec, "-f", "p.yaml"]).ok().stdout.trim())
}

#[test]
fn report_page_charts_scores_and_show_formats() {
    let (p, html_path) = project();
    let html = std::fs::read_to_string(&html_path).unwrap();

    // Self-contained: no reference to anything outside the file. (uPlot's licence banner, a
    // comment, names its home page; that is text, not a reference.)
    for bad in ["<script src", "<link ", "url(", "@import", "<iframe"] {
        assert!(!html.contains(bad), "the page refers outside itself: {bad}");
    }
    for attr in ["src=\"", "href=\""] {
        for value in html.split(attr).skip(1) {
            assert!(
                value.starts_with('#') || value.starts_with("data:"),
                "the page refers outside itself: {attr}{}",
                value.chars().take(60).collect::<String>()
            );
        }
    }
    assert!(html.contains("uPlot"), "uPlot is inlined");
    // Metrics, published numbers with their source, comparison, DAG, log tails.
    for want in [
        "id=\"metrics\"",
        "Example paper 2019, Table 3 (LFW)",
        "0.9978",
        "Compare: A vs B",
        "fprs",
        "tpr@fpr=1e-3",
        "badge cached",
        "badge ran",
        "id=\"logs\"",
        "first-layer filters",
        "data:image/png;base64,",
    ] {
        assert!(html.contains(want), "page lacks {want:?}");
    }
    // The changed pipeline parameter is a highlighted row.
    let row = html
        .split("<tr")
        .find(|r| r.contains("<code>fprs</code>"))
        .expect("fprs row");
    assert!(row.starts_with(" class=\"changed\""), "{row}");
    // Plot data: loss, lr, ROC (two runs), CMC.
    let data = html
        .split("<script type=\"application/json\" id=\"report-data\">")
        .nth(1)
        .and_then(|s| s.split("</script>").next())
        .expect("report data");
    let v: Value = serde_json::from_str(data).unwrap();
    let ids: Vec<&str> = v["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["roc", "loss", "lr", "cmc"]);
    let roc = &v["plots"][0];
    assert_eq!(roc["log_x"], true);
    assert_eq!(roc["series"].as_array().unwrap().len(), 2);
    assert!(roc["series"][0]["x"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_f64().unwrap() > 0.0));

    // Stage charts: compressed PNGs under 60 KB.
    let eval = stage_dir(&p, "evaluate.report");
    let train = stage_dir(&p, "train.report");
    let ident = stage_dir(&p, "heldout.report");
    for f in [
        eval.join("roc.png"),
        train.join("curve.png"),
        ident.join("cmc.png"),
    ] {
        let bytes = std::fs::read(&f).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{}", f.display());
        assert!(
            bytes.len() < 60_000,
            "{}: {} bytes",
            f.display(),
            bytes.len()
        );
    }

    // Per-pair scores: one row per pair, header as documented, scores in [-1, 1].
    let scores = std::fs::read_to_string(eval.join("scores.csv")).unwrap();
    let mut lines = scores.lines();
    assert_eq!(lines.next(), Some("pair,image_a,image_b,score,same"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 40);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[0], i.to_string());
        let s: f64 = r[3].parse().unwrap();
        assert!((-1.0001..=1.0001).contains(&s), "{s}");
        assert!(r[4] == "0" || r[4] == "1");
    }
    let same = rows.iter().filter(|r| r[4] == "1").count();
    assert!(same > 0 && same < 40, "{same} same pairs");

    // `fpipe show` as CSV (full precision) and Markdown.
    let csv = p.fpipe(&["show", "p.yaml", "--format", "csv"]).ok().stdout;
    let header = csv.lines().next().unwrap();
    assert!(header.starts_with("run,pipeline,stage,"), "{header}");
    let ncols = header.split(',').count();
    assert!(csv.lines().all(|l| l.split(',').count() == ncols), "{csv}");
    assert!(csv.lines().any(|l| l.contains(",evaluate,")), "{csv}");
    let md = p
        .fpipe(&["show", "p.yaml", "--format", "markdown"])
        .ok()
        .stdout;
    let mut ml = md.lines();
    assert!(
        ml.next().unwrap().starts_with("| run | pipeline | stage |"),
        "{md}"
    );
    assert!(ml.next().unwrap().starts_with("|---|---|---|---:"), "{md}");
    assert!(
        md.lines().all(|l| l.starts_with('|') && l.ends_with('|')),
        "{md}"
    );
    let json = p.fpipe(&["show", "p.yaml", "--format", "json"]).ok().stdout;
    assert!(serde_json::from_str::<Value>(&json).unwrap().is_array());

    // A bad --compare names the runs there are.
    let bad = p.fpipe(&["report", "p.yaml", "--compare", "nope"]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("no recorded run"), "{}", bad.stderr);

    browser_check(&html_path);
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FPIPE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .find_map(|n| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(n))
                .find(|p| p.is_file())
        })
    })
}

/// Opens the page in headless Chromium and checks the page's own self-check.
fn browser_check(page: &Path) {
    let Some(chrome) = chromium() else {
        eprintln!("skipping the browser check: no chromium on PATH (set FPIPE_CHROMIUM; .ci/run installs it)");
        return;
    };
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let profile = tempfile::tempdir().unwrap();
    let base = |c: &mut Command| {
        c.arg("--headless")
            .arg("--no-sandbox")
            .arg("--disable-gpu")
            .arg("--no-first-run")
            .arg("--disable-extensions")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--enable-logging=stderr")
            .arg("--v=0")
            .arg("--window-size=1280,2400")
            .arg("--virtual-time-budget=10000");
    };
    let mut c = Command::new(&chrome);
    base(&mut c);
    let out = c
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("start chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed:\n{stderr}");
    // Chromium logs every console message of the page as `INFO:CONSOLE:LINE` whatever its
    // level, and the page writes none: any such line (an error, a warning, an uncaught
    // exception) fails the test, as does a resource that failed to load.
    for bad in [
        ":CONSOLE",
        "Uncaught",
        "Failed to load resource",
        "net::ERR_",
    ] {
        let hit = stderr.lines().find(|l| l.contains(bad));
        assert!(hit.is_none(), "browser console: {}", hit.unwrap_or(""));
    }
    let check = dom
        .split("<pre id=\"selfcheck\" hidden=\"\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| {
            panic!(
                "the page did not finish rendering:\n{}",
                &dom[dom.len().saturating_sub(2000)..]
            )
        });
    let check = check
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let v: Value = serde_json::from_str(&check).unwrap_or_else(|e| panic!("{e}: {check}"));
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    assert_eq!(v["external_resources"], serde_json::json!([]), "{v}");
    assert_eq!(v["plots"], 4, "{v}");
    assert_eq!(v["drawn"], v["plots"], "every plot drew data: {v}");
    assert!(v["images"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["images_shown"], v["images"], "{v}");

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-page");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("report.png");
    let _ = std::fs::remove_file(&shot);
    let mut c = Command::new(&chrome);
    base(&mut c);
    let out = c
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .expect("start chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(&png[1..4], b"PNG");
    eprintln!("screenshot: {}", shot.display());
}
