//! Finding the line of a key in block-style YAML text, for error messages.
//!
//! serde_yaml's values carry no positions, so after parsing we look the key up again in the
//! text. This understands block mappings (the style pipeline files are written in); for a key
//! inside a flow mapping it returns the nearest enclosing block key's line.

/// 1-based line of the key at `path` (e.g. `["stages", "train", "with"]`); `None` when some
/// key of the path is not found as a block key.
pub fn key_line(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut lo = 0usize;
    let mut hi = lines.len();
    let mut found = None;
    let mut parent_indent: isize = -1;
    for key in path {
        // Child indent: the first content line in (lo, hi) deeper than the parent.
        let mut hit = None;
        let mut child_indent = None;
        for (i, line) in lines.iter().enumerate().take(hi).skip(lo) {
            let Some(ind) = content_indent(line) else {
                continue;
            };
            if (ind as isize) <= parent_indent {
                break;
            }
            let ci = *child_indent.get_or_insert(ind);
            if ind != ci {
                continue;
            }
            if line_key(line.trim_start()) == Some(*key) {
                hit = Some((i, ind));
                break;
            }
        }
        let (i, ind) = hit?;
        found = Some(i + 1);
        // The block of this key ends at the next line with indent <= ind.
        let mut end = i + 1;
        while end < hi {
            if let Some(ind2) = content_indent(lines[end]) {
                if ind2 <= ind {
                    break;
                }
            }
            end += 1;
        }
        lo = i + 1;
        hi = end;
        parent_indent = ind as isize;
    }
    found
}

/// The keys directly under the block key `parent` (a top-level key) with their 1-based lines,
/// in one pass: used to locate all stages of a large pipeline without rescanning per stage.
pub fn child_key_lines(text: &str, parent: &str) -> std::collections::HashMap<String, usize> {
    let mut out = std::collections::HashMap::new();
    let mut inside = false;
    let mut child_indent = None;
    for (i, line) in text.lines().enumerate() {
        let Some(ind) = content_indent(line) else {
            continue;
        };
        if ind == 0 {
            inside = line_key(line) == Some(parent);
            continue;
        }
        if !inside {
            continue;
        }
        let ci = *child_indent.get_or_insert(ind);
        if ind == ci {
            if let Some(k) = line_key(line.trim_start()) {
                out.entry(k.to_string()).or_insert(i + 1);
            }
        }
    }
    out
}

fn content_indent(line: &str) -> Option<usize> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    Some(line.len() - t.len())
}

fn line_key(t: &str) -> Option<&str> {
    let (k, _) = t.split_once(':')?;
    let k = k.trim();
    let k = k
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .or_else(|| k.strip_prefix('\'').and_then(|k| k.strip_suffix('\'')))
        .unwrap_or(k);
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys() {
        let t = "fpipe: 1\nstages:\n  a:\n    uses: shell\n  # c\n  b:\n    uses: x\n    with:\n      lr: 1\n";
        assert_eq!(key_line(t, &["stages"]), Some(2));
        assert_eq!(key_line(t, &["stages", "b"]), Some(6));
        assert_eq!(key_line(t, &["stages", "b", "with", "lr"]), Some(9));
        assert_eq!(key_line(t, &["stages", "a", "with"]), None);
        assert_eq!(key_line(t, &["stages", "c"]), None);
        let children = child_key_lines(t, "stages");
        assert_eq!(children.len(), 2);
        assert_eq!((children["a"], children["b"]), (3, 6));
    }
}
