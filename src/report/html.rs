//! The report page: tables written as HTML here, charts drawn in the browser by uPlot
//! (`assets/uplot/`, 1.6.32, MIT) from JSON inlined in the page. Nothing is fetched at view
//! time: styles, scripts, data and images are all inside the one file.

use super::{Report, RunView, StageView};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

const UPLOT_JS: &str = include_str!("assets/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uplot/uPlot.min.css");
const PAGE_JS: &str = include_str!("assets/report.js");
const PAGE_CSS: &str = include_str!("assets/report.css");
/// Runs first, in `<head>`: records script errors and resources that fail to load (an image's
/// `error` event does not bubble; a capturing listener on `window` sees it) for the page's
/// self-check (`assets/report.js`).
const ERROR_WATCH: &str = "window.__reportErrors=[];window.addEventListener(\"error\",function(e){\
var t=e.target;window.__reportErrors.push(t&&t!==window?\"failed to load \"+(t.tagName||\"\")+\" \"+\
String(t.src||t.href||\"\").slice(0,80):String(e.message||e));},true);";

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// JSON safe inside `<script>`: no `</` can close the element early.
fn script_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v)
        .unwrap_or_else(|_| "null".into())
        .replace("</", "<\\/")
        .replace("<!--", "<\\!--")
}

fn num(v: f64) -> String {
    let a = v.abs();
    if v == v.trunc() && a < 1e9 {
        format!("{v:.0}")
    } else if a >= 0.01 || a == 0.0 {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

fn secs(v: f64) -> String {
    if v >= 60.0 {
        format!("{:.0} min {:.0} s", (v / 60.0).floor(), v % 60.0)
    } else {
        format!("{v:.1} s")
    }
}

fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// The whole page.
pub fn page(r: &Report) -> String {
    let base = &r.runs[0];
    let other = r.runs.get(1);
    let mut h = String::with_capacity(200_000);
    let title = match other {
        Some(o) => format!(
            "{}: run {} vs {}",
            base.pipeline,
            short(&base.id),
            short(&o.id)
        ),
        None => format!("{}: run {}", base.pipeline, short(&base.id)),
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{UPLOT_CSS}</style><style>{PAGE_CSS}</style>\
         <script>{ERROR_WATCH}</script></head><body>\n",
        esc(&title)
    );
    let _ = write!(h, "<header><h1>{}</h1><div class=\"meta\">", esc(&title));
    for (i, run) in r.runs.iter().enumerate() {
        let tag = if other.is_some() {
            ["A: ", "B: "][i]
        } else {
            ""
        };
        let _ = write!(
            h,
            "<div>{tag}<b>{}</b> started {} · {} · {} · device {} · <code>{}</code></div>",
            esc(&run.id),
            esc(&run.started),
            secs(run.seconds),
            esc(&run.status),
            esc(&run.device),
            esc(&run.file)
        );
    }
    let _ = writeln!(
        h,
        "<div>generated {} by fpipe {}</div></div></header>",
        esc(&r.generated),
        env!("CARGO_PKG_VERSION")
    );
    h.push_str("<nav><a href=\"#metrics\">Metrics</a><a href=\"#published\">Published</a>");
    if other.is_some() {
        h.push_str("<a href=\"#compare\">Compare</a>");
    }
    h.push_str(
        "<a href=\"#plots\">Plots</a><a href=\"#dag\">DAG</a><a href=\"#logs\">Logs</a></nav><main>\n",
    );
    for run in &r.runs {
        if let Some(e) = &run.plan_error {
            let _ = write!(
                h,
                "<section><p class=\"err\">Run {}: the pipeline no longer plans with this run's \
                 parameters, so stage parameters and wiring are missing: <code>{}</code></p></section>",
                esc(&run.id),
                esc(e)
            );
        }
    }
    metrics_section(&mut h, r);
    published_section(&mut h, r);
    if let Some(o) = other {
        compare_section(&mut h, base, o);
    }
    plots_section(&mut h, r);
    dag_section(&mut h, r);
    logs_section(&mut h, r);
    h.push_str("<pre id=\"selfcheck\" hidden></pre></main>\n");
    let _ = write!(
        h,
        "<script type=\"application/json\" id=\"report-data\">{}</script>\n\
         <script>{}</script>\n<script>{}</script>\n</body></html>\n",
        script_json(&serde_json::json!({"plots": r.plots})),
        UPLOT_JS.replace("</script", "<\\/script"),
        PAGE_JS
    );
    h
}

fn short(id: &str) -> &str {
    id.get(..19).unwrap_or(id)
}

/// The metrics tables: one per family (its items as rows), one for the other stages.
fn metrics_section(h: &mut String, r: &Report) {
    h.push_str("<section id=\"metrics\"><h2>Metrics</h2>");
    let base = &r.runs[0];
    let with_metrics: Vec<&StageView> = base
        .stages
        .iter()
        .filter(|s| !s.metrics.is_empty())
        .collect();
    if with_metrics.is_empty() {
        h.push_str("<p class=\"muted\">No stage of this run reported metrics.</p></section>");
        return;
    }
    // Group: family name (items as rows) or "" for plain stages.
    let mut groups: Vec<(String, Vec<&StageView>)> = Vec::new();
    for s in with_metrics {
        let g = s.family.clone().unwrap_or_default();
        match groups.iter_mut().find(|(n, _)| *n == g) {
            Some((_, v)) => v.push(s),
            None => groups.push((g, vec![s])),
        }
    }
    groups.sort_by_key(|(g, _)| !g.is_empty());
    let published: BTreeMap<(String, String), f64> = base
        .published
        .iter()
        .map(|p| ((p.stage.clone(), p.metric.clone()), p.value))
        .collect();
    let other = r.runs.get(1);
    for (g, stages) in groups {
        let cols: BTreeSet<&str> = stages
            .iter()
            .flat_map(|s| s.metrics.keys().map(String::as_str))
            .collect();
        if g.is_empty() {
            h.push_str("<h3>Stages</h3>");
        } else {
            let _ = write!(
                h,
                "<h3>Family <code>{}</code> (one row per item)</h3>",
                esc(&g)
            );
        }
        h.push_str("<div class=\"scroll\"><table class=\"metrics\"><tr><th>stage</th>");
        for c in &cols {
            let _ = write!(h, "<th>{}</th>", esc(c));
        }
        h.push_str("</tr>");
        for s in stages {
            let theirs = other.and_then(|o| o.stages.iter().find(|t| t.name == s.name));
            let _ = write!(h, "<tr><td><code>{}</code></td>", esc(&s.name));
            for c in &cols {
                let v = s.metrics.get(*c);
                let mut cell = v.map(|v| num(*v)).unwrap_or_else(|| "-".into());
                let mut class = "num".to_string();
                if let Some(t) = theirs.and_then(|t| t.metrics.get(*c)) {
                    if v != Some(t) {
                        class.push_str(" changed");
                    }
                    let _ = write!(cell, " <span class=\"muted\">/ B {}</span>", num(*t));
                }
                let fam = s.family.clone().unwrap_or_default();
                let p = published
                    .get(&(s.name.clone(), c.to_string()))
                    .or_else(|| published.get(&(fam, c.to_string())));
                if let Some(p) = p {
                    let _ = write!(
                        cell,
                        " <span class=\"muted\" title=\"published\">(pub. {})</span>",
                        num(*p)
                    );
                }
                let _ = write!(h, "<td class=\"{class}\">{cell}</td>");
            }
            h.push_str("</tr>");
        }
        h.push_str("</table></div>");
    }
    h.push_str("</section>\n");
}

/// Regenerated next to published: every `published:` entry of the pipeline.
fn published_section(h: &mut String, r: &Report) {
    let base = &r.runs[0];
    h.push_str("<section id=\"published\"><h2>Regenerated vs published</h2>");
    if base.published.is_empty() {
        h.push_str(
            "<p class=\"muted\">The pipeline declares no <code>published:</code> numbers.</p></section>\n",
        );
        return;
    }
    h.push_str("<div class=\"scroll\"><table><tr><th>stage</th><th>metric</th><th>this run</th>");
    if r.runs.len() > 1 {
        h.push_str("<th>run B</th>");
    }
    h.push_str("<th>published</th><th>difference</th><th>source</th></tr>");
    for p in &base.published {
        let matching: Vec<&StageView> = base
            .stages
            .iter()
            .filter(|s| s.name == p.stage || s.family.as_deref() == Some(&p.stage))
            .collect();
        let rows: Vec<(String, Option<f64>)> = if matching.is_empty() {
            vec![(p.stage.clone(), None)]
        } else {
            matching
                .iter()
                .map(|s| (s.name.clone(), s.metrics.get(&p.metric).copied()))
                .collect()
        };
        for (name, v) in rows {
            let b = r.runs.get(1).map(|o| {
                o.stages
                    .iter()
                    .find(|s| s.name == name)
                    .and_then(|s| s.metrics.get(&p.metric).copied())
            });
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td>",
                esc(&name),
                esc(&p.metric),
                v.map(num).unwrap_or_else(|| "-".into())
            );
            if let Some(b) = b {
                let _ = write!(
                    h,
                    "<td class=\"num\">{}</td>",
                    b.map(num).unwrap_or("-".into())
                );
            }
            let diff = v.map(|v| v - p.value);
            let _ = write!(
                h,
                "<td class=\"num\">{}</td><td class=\"num delta {}\">{}</td><td>{}{}</td></tr>",
                num(p.value),
                match diff {
                    Some(d) if d > 0.0 => "up",
                    Some(d) if d < 0.0 => "down",
                    _ => "",
                },
                diff.map(|d| format!("{d:+.4}"))
                    .unwrap_or_else(|| "-".into()),
                esc(&p.source),
                p.note
                    .as_ref()
                    .map(|n| format!(" <span class=\"muted\">({})</span>", esc(n)))
                    .unwrap_or_default()
            );
        }
    }
    h.push_str("</table></div></section>\n");
}

/// Differences between two runs, as `dvc exp diff` shows them: parameters, then metrics.
fn compare_section(h: &mut String, a: &RunView, b: &RunView) {
    h.push_str("<section id=\"compare\"><h2>Compare: A vs B</h2>");
    let _ = write!(
        h,
        "<p>A = <code>{}</code>, B = <code>{}</code>. Changed rows are highlighted.</p>",
        esc(&a.id),
        esc(&b.id)
    );
    // Pipeline parameters.
    let empty = serde_json::Map::new();
    let pa = a.params.as_object().unwrap_or(&empty);
    let pb = b.params.as_object().unwrap_or(&empty);
    let keys: BTreeSet<&String> = pa.keys().chain(pb.keys()).collect();
    h.push_str(
        "<h3>Pipeline parameters</h3><table><tr><th>parameter</th><th>A</th><th>B</th></tr>",
    );
    let mut changed_params = 0;
    for k in keys {
        let (x, y) = (pa.get(k), pb.get(k));
        let changed = x != y;
        changed_params += usize::from(changed);
        let _ = write!(
            h,
            "<tr{}><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            if changed { " class=\"changed\"" } else { "" },
            esc(k),
            esc(&x.map(value_text).unwrap_or("-".into())),
            esc(&y.map(value_text).unwrap_or("-".into()))
        );
    }
    h.push_str("</table>");
    if changed_params == 0 {
        h.push_str("<p class=\"muted\">Same pipeline parameters.</p>");
    }
    // Stage parameters that differ.
    h.push_str("<h3>Stage parameters that differ</h3><table><tr><th>stage</th><th>parameter</th><th>A</th><th>B</th></tr>");
    let mut any = false;
    for sa in &a.stages {
        let Some(sb) = b.stages.iter().find(|s| s.name == sa.name) else {
            continue;
        };
        let keys: BTreeSet<&String> = sa.params.keys().chain(sb.params.keys()).collect();
        for k in keys {
            let (x, y) = (sa.params.get(k), sb.params.get(k));
            if x != y {
                any = true;
                let _ = write!(
                    h,
                    "<tr class=\"changed\"><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&sa.name),
                    esc(k),
                    esc(&x.map(value_text).unwrap_or("-".into())),
                    esc(&y.map(value_text).unwrap_or("-".into()))
                );
            }
        }
    }
    if !any {
        h.push_str("<tr><td colspan=\"4\" class=\"muted\">none</td></tr>");
    }
    h.push_str("</table>");
    // Metrics.
    h.push_str("<h3>Metrics</h3><div class=\"scroll\"><table><tr><th>stage</th><th>metric</th><th>A</th><th>B</th><th>B − A</th></tr>");
    let names: Vec<&str> = a
        .stages
        .iter()
        .map(|s| s.name.as_str())
        .chain(
            b.stages
                .iter()
                .map(|s| s.name.as_str())
                .filter(|n| !a.stages.iter().any(|s| s.name == *n)),
        )
        .collect();
    for n in names {
        let ma = a.stages.iter().find(|s| s.name == n).map(|s| &s.metrics);
        let mb = b.stages.iter().find(|s| s.name == n).map(|s| &s.metrics);
        let keys: BTreeSet<&String> = ma
            .into_iter()
            .flat_map(|m| m.keys())
            .chain(mb.into_iter().flat_map(|m| m.keys()))
            .collect();
        for k in keys {
            let x = ma.and_then(|m| m.get(k)).copied();
            let y = mb.and_then(|m| m.get(k)).copied();
            let changed = x != y;
            let d = x.zip(y).map(|(x, y)| y - x);
            let _ = write!(
                h,
                "<tr{}><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num delta {}\">{}</td></tr>",
                if changed { " class=\"changed\"" } else { "" },
                esc(n),
                esc(k),
                x.map(num).unwrap_or("-".into()),
                y.map(num).unwrap_or("-".into()),
                match d {
                    Some(d) if d > 0.0 => "up",
                    Some(d) if d < 0.0 => "down",
                    _ => "",
                },
                d.map(|d| format!("{d:+.4}")).unwrap_or("-".into())
            );
        }
    }
    h.push_str("</table></div></section>\n");
}

fn plots_section(h: &mut String, r: &Report) {
    h.push_str("<section id=\"plots\"><h2>Plots</h2>");
    if r.plots.is_empty() && r.images.is_empty() {
        h.push_str("<p class=\"muted\">No stage of this run wrote curves (curve.csv, roc.csv, erc.csv, cmc.csv, snapshots.csv).</p>");
    }
    if r.runs.len() > 1 {
        h.push_str("<p class=\"muted\">Run B is drawn dashed.</p>");
    }
    h.push_str("<div class=\"plots\">");
    for p in &r.plots {
        let _ = write!(
            h,
            "<div class=\"plot\"><h3>{}</h3><div id=\"plot-{}\"></div></div>",
            esc(&p.title),
            esc(&p.id)
        );
    }
    h.push_str("</div>");
    if !r.images.is_empty() {
        h.push_str("<h3>Images</h3><div class=\"images\">");
        for i in &r.images {
            if i.data_uri.is_empty() {
                let _ = write!(
                    h,
                    "<figure><figcaption>{} (too large to inline: <code>{}</code>)</figcaption></figure>",
                    esc(&i.title),
                    esc(&i.path)
                );
            } else {
                let _ = write!(
                    h,
                    "<figure><img class=\"inline\" alt=\"{0}\" src=\"{1}\"><figcaption>{0}</figcaption></figure>",
                    esc(&i.title),
                    i.data_uri
                );
            }
        }
        h.push_str("</div>");
    }
    h.push_str("</section>\n");
}

fn dag_section(h: &mut String, r: &Report) {
    h.push_str("<section id=\"dag\"><h2>DAG</h2>");
    for (i, run) in r.runs.iter().enumerate() {
        if r.runs.len() > 1 {
            let _ = write!(
                h,
                "<h3>Run {} <code>{}</code></h3>",
                ["A", "B"][i.min(1)],
                esc(&run.id)
            );
        }
        let ran = run.stages.iter().filter(|s| s.state == "ran").count();
        let cached = run.stages.iter().filter(|s| s.state == "cached").count();
        let _ = write!(
            h,
            "<p>{} stages in dependency order: {ran} ran, {cached} cached, {} other.</p>",
            run.stages.len(),
            run.stages.len() - ran - cached
        );
        h.push_str("<div class=\"scroll\"><table class=\"dag\"><tr><th>stage</th><th>kind</th><th>state</th><th>time</th><th>inputs from</th><th>key</th><th>parameters</th></tr>");
        for s in &run.stages {
            let inputs: Vec<String> = s
                .inputs
                .iter()
                .map(|(port, from, fport)| {
                    format!(
                        "{} ← <a href=\"#stage-{i}-{}\"><code>{}.{}</code></a>",
                        esc(port),
                        esc(from),
                        esc(from),
                        esc(fport)
                    )
                })
                .collect();
            let params: Vec<String> = s
                .params
                .iter()
                .map(|(k, v)| format!("{} = {}", esc(k), esc(&value_text(v))))
                .collect();
            let _ = write!(
                h,
                "<tr id=\"stage-{i}-{0}\"><td><code>{0}</code></td><td>{1} v{2}</td><td><span class=\"badge {3}\" title=\"{4}\">{3}</span>{5}</td><td class=\"num\">{6}</td><td>{7}</td><td class=\"key\" title=\"{8}\">{9}</td><td>",
                esc(&s.name),
                esc(&s.kind),
                s.version,
                esc(&s.state),
                esc(s.reason.as_deref().unwrap_or("")),
                s.error
                    .as_ref()
                    .map(|e| format!("<div class=\"err\">{}</div>", esc(e)))
                    .unwrap_or_default(),
                secs(s.seconds),
                inputs.join("<br>"),
                esc(s.key.as_deref().unwrap_or("")),
                esc(s.key.as_deref().map(|k| k.get(..12).unwrap_or(k)).unwrap_or("-"))
            );
            if !params.is_empty() {
                let _ = write!(
                    h,
                    "<details><summary>{} parameters</summary><pre>{}</pre></details>",
                    params.len(),
                    params.join("\n")
                );
            }
            h.push_str("</td></tr>");
        }
        h.push_str("</table></div>");
    }
    h.push_str("</section>\n");
}

fn logs_section(h: &mut String, r: &Report) {
    h.push_str("<section id=\"logs\"><h2>Log tails</h2>");
    for (i, run) in r.runs.iter().enumerate() {
        if r.runs.len() > 1 {
            let _ = write!(h, "<h3>Run {}</h3>", ["A", "B"][i.min(1)]);
        }
        for s in &run.stages {
            match &s.log_tail {
                Some(t) if !t.trim().is_empty() => {
                    let _ = write!(
                        h,
                        "<details><summary><code>{}</code> ({})</summary><pre>{}</pre></details>",
                        esc(&s.name),
                        esc(&s.state),
                        esc(t)
                    );
                }
                _ => {}
            }
        }
    }
    h.push_str("</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_script_close() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let j = script_json(&serde_json::json!({"s": "</script><!--"}));
        assert!(!j.contains("</script"), "{j}");
        assert!(!j.contains("<!--"), "{j}");
    }
}
