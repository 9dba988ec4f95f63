//! Parameters: the literal blocks read before templates run, and the command line's
//! overrides merged over them.

use super::*;

/// Extracts and parses a top-level block (`params:` / `include:`) from unrendered text.
pub(super) fn literal_block(
    file: &Path,
    text: &str,
    key: &str,
) -> Result<Option<Value>, PipelineError> {
    let lines: Vec<&str> = text.lines().collect();
    let head = format!("{key}:");
    let Some(start) = lines.iter().position(|l| l.starts_with(&head)) else {
        return Ok(None);
    };
    let mut end = start + 1;
    while end < lines.len() {
        let l = lines[end];
        if l.is_empty()
            || l.starts_with(' ')
            || l.starts_with('\t')
            || l.starts_with('#')
            || l.starts_with('-')
        {
            end += 1;
        } else {
            break;
        }
    }
    let block = lines[start..end].join("\n");
    if block.contains("{{") || block.contains("{%") {
        return Err(
            PipelineError::new(file, format!("`{key}:` may not use templates"))
                .at(Some(start + 1))
                .hint("parameter values are literal; use them elsewhere as {{ params.NAME }}"),
        );
    }
    let v: serde_yaml::Value = serde_yaml::from_str(&block).map_err(|e| {
        let mut pe = yaml_err(file, &e);
        pe.line = pe.line.map(|l| l + start);
        pe
    })?;
    let v = to_json(file, v)?;
    Ok(v.get(key).cloned().filter(|v| !v.is_null()))
}

pub(super) fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Whether `name` occurs in `text` as a whole (not inside a longer identifier).
pub(super) fn mentions(text: &str, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    !name.is_empty()
        && text.match_indices(name).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + name.len()..].chars().next();
            !before.is_some_and(ident) && !after.is_some_and(ident)
        })
}

pub(super) fn set_dotted(root: &mut Value, key: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(m) = cur else { return };
        if i == parts.len() - 1 {
            m.insert(part.to_string(), v);
            return;
        }
        cur = m
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// The final parameters: each file's `params:` (included files first, overridden by what
/// includes them), then `--params` files, then `-p` pairs.
pub(super) fn merged_params(
    file: &Path,
    raws: &[RawFile],
    overrides: &Overrides,
) -> Result<Value, PipelineError> {
    let mut params = Value::Object(Map::new());
    for raw in raws {
        merge(&mut params, raw.params.clone());
    }
    for pf in &overrides.files {
        let text = std::fs::read_to_string(pf)
            .map_err(|e| PipelineError::new(pf, format!("cannot read parameter file: {e}")))?;
        check_nesting(pf, &text)?;
        let v: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| yaml_err(pf, &e))?;
        let mut v = to_json(pf, v)?;
        if let Some(inner) = v.get("params").cloned() {
            if v.as_object().is_some_and(|m| m.len() == 1) {
                v = inner;
            }
        }
        if !v.is_object() {
            return Err(PipelineError::new(
                pf,
                "a parameter file must be a mapping of names to values",
            ));
        }
        merge(&mut params, v);
    }
    // A `-p` key must name a parameter the pipeline declares, or at least reads as
    // `params.NAME` (a template that takes an optional one with `default`): a misspelt key
    // would otherwise be ignored while the run looks as if the change took effect.
    let declared: Vec<String> = params
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for pair in &overrides.pairs {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            PipelineError::new(file, format!("-p {pair}: expected key=value"))
                .hint("for example -p epochs=3 or -p train.lr=0.05")
        })?;
        let top = k.trim().split('.').next().unwrap_or_default();
        let read_as = format!("params.{top}");
        if !declared.iter().any(|d| d == top) && !raws.iter().any(|r| mentions(&r.text, &read_as)) {
            let names: Vec<&str> = declared.iter().map(String::as_str).collect();
            return Err(PipelineError::new(
                file,
                format!("-p {pair}: the pipeline has no parameter `{top}`"),
            )
            .hint(if names.is_empty() {
                "this pipeline declares no `params:`".to_string()
            } else {
                suggest_hint(top, &names)
            }));
        }
        let v: serde_yaml::Value = match check_nesting(file, v) {
            Ok(()) => {
                serde_yaml::from_str(v).unwrap_or_else(|_| serde_yaml::Value::String(v.to_string()))
            }
            Err(_) => serde_yaml::Value::String(v.to_string()),
        };
        let v = to_json(file, v)?;
        set_dotted(&mut params, k.trim(), v);
    }
    Ok(params)
}
