//! The optional top-level `published:` block: reference numbers (from a paper, a README, a
//! leaderboard) for metrics the pipeline's stages report, each with its source, so a report
//! can put the published value beside the regenerated one. The engine only checks the shape
//! and that each entry names a stage or family of the pipeline; what a metric means is the
//! stage kind's business.
//!
//! ```yaml
//! published:
//!   - {stage: evaluate, metric: accuracy, value: 0.9978, source: "Paper 2019, Table 3 (LFW)"}
//!   - {stage: student, metric: auc, value: 0.99, source: "...", note: "every item"}
//! ```

use crate::error::PipelineError;
use crate::yamlpos::key_line;
use serde::Serialize;
use std::path::Path;

/// One reference number: `metric` of `stage` (a stage name, or a family name meaning each of
/// its items) was `value` in `source`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Published {
    pub stage: String,
    pub metric: String,
    pub value: f64,
    /// Where the number comes from: paper, table, data set.
    pub source: String,
    /// Anything else a reader needs (a different data set, a unit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

const KEYS: &[&str] = &["stage", "metric", "value", "source", "note"];

/// Reads the `published:` block of `doc` (a rendered pipeline file), checking each entry.
pub(super) fn read(
    file: &Path,
    text: &str,
    doc: &serde_yaml::Mapping,
) -> Result<Vec<Published>, PipelineError> {
    let line = || key_line(text, &["published"]);
    let err = |i: usize, m: String| {
        PipelineError::new(file, format!("published[{i}]: {m}"))
            .at(line())
            .hint("each entry is {stage: NAME, metric: NAME, value: NUMBER, source: TEXT} (note: optional)")
    };
    let list = match doc.get("published") {
        None | Some(serde_yaml::Value::Null) => return Ok(vec![]),
        Some(serde_yaml::Value::Sequence(s)) => s,
        Some(_) => {
            return Err(
                PipelineError::new(file, "`published:` must be a list of entries")
                    .at(line())
                    .hint("published:\n  - {stage: evaluate, metric: accuracy, value: 0.99, source: \"Paper, Table 2\"}"),
            )
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, e) in list.iter().enumerate() {
        let Some(m) = e.as_mapping() else {
            return Err(err(i, "is not a mapping".into()));
        };
        for k in m.keys() {
            let k = k.as_str().unwrap_or("?");
            if !KEYS.contains(&k) {
                return Err(err(i, format!("unknown key `{k}`")));
            }
        }
        let text_of = |k: &str| -> Result<String, PipelineError> {
            match m.get(k) {
                Some(serde_yaml::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(serde_yaml::Value::Number(n)) if k != "source" => Ok(n.to_string()),
                Some(_) => Err(err(i, format!("`{k}` must be text"))),
                None => Err(err(i, format!("`{k}` is missing"))),
            }
        };
        let value = match m.get("value") {
            Some(v) => v
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(i, "`value` must be a finite number".into()))?,
            None => return Err(err(i, "`value` is missing".into())),
        };
        let note = match m.get("note") {
            None | Some(serde_yaml::Value::Null) => None,
            Some(_) => Some(text_of("note")?),
        };
        out.push(Published {
            stage: text_of("stage")?,
            metric: text_of("metric")?,
            value,
            source: text_of("source")?,
            note,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::pipeline::{load, Overrides};

    fn load_text(text: &str) -> Result<crate::Pipeline, crate::PipelineError> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, text).unwrap();
        load(&f, &Overrides::default())
    }

    const STAGES: &str =
        "stages:\n  a:\n    uses: shell\n  fam:\n    foreach: 2\n    uses: shell\n";

    #[test]
    fn entries_are_read_with_their_source() {
        let p = load_text(&format!(
            "{STAGES}published:\n  - {{stage: a, metric: accuracy, value: 0.9978, source: \"Paper, Table 3\"}}\n  - {{stage: fam, metric: auc, value: 1, source: README, note: LFW}}\n"
        ))
        .unwrap();
        assert_eq!(p.published.len(), 2);
        assert_eq!(p.published[0].stage, "a");
        assert_eq!(p.published[0].value, 0.9978);
        assert_eq!(p.published[0].source, "Paper, Table 3");
        assert_eq!(p.published[1].note.as_deref(), Some("LFW"));
    }

    #[test]
    fn no_block_means_no_entries() {
        assert!(load_text(STAGES).unwrap().published.is_empty());
    }

    #[test]
    fn bad_entries_name_the_entry_and_line() {
        let cases = [
            ("published: 3\n", "must be a list", 7),
            ("published:\n  - 3\n", "published[0]: is not a mapping", 7),
            (
                "published:\n  - {stage: a, metric: m, value: x, source: s}\n",
                "published[0]: `value` must be a finite number",
                7,
            ),
            (
                "published:\n  - {stage: a, metric: m, value: 1}\n",
                "published[0]: `source` is missing",
                7,
            ),
            (
                "published:\n  - {stage: a, metric: m, value: 1, source: s, url: u}\n",
                "unknown key `url`",
                7,
            ),
            (
                "published:\n  - {stage: nope, metric: m, value: 1, source: s}\n",
                "no stage or family `nope`",
                7,
            ),
        ];
        for (block, want, line) in cases {
            let e = load_text(&format!("{STAGES}{block}")).unwrap_err();
            let s = e.to_string();
            assert!(s.contains(want), "{block}: {s}");
            assert!(s.contains(&format!("p.yaml:{line}")), "{block}: {s}");
        }
    }
}
