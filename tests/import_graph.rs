//! The workspace's import graph has no cycles, and fpipe-stages keeps its layers.
//!
//! Read from the sources as text, the way a newcomer reads them: every `use` and every
//! `crate::`/`super::`/`self::` path is resolved to the file that defines the module it names
//! (through one level of `pub use` re-exports in `mod.rs`/`lib.rs`). Then:
//!
//! - no cycle among files, within any crate (edges between a module and its own parent or
//!   children are namespace structure, not dependencies, and are left out);
//! - no cycle among the top-level modules of any crate;
//! - in fpipe-stages, a layer imports only layers before it (the order in
//!   `stages/src/lib.rs`), and only `kinds` names `fpipe_engine`.
//!
//! Unit-test modules (`#[cfg(test)] mod ...` to the end of a file) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path of a file inside its crate: `["train", "trainer"]`; the root is `[]`.
type ModPath = Vec<String>;

struct Crate {
    name: &'static str,
    /// Module path -> source text with comments removed.
    files: BTreeMap<ModPath, String>,
}

fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        if in_str {
            if b[i] == b'\\' {
                i += 2;
                continue;
            }
            if b[i] == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if b[i] == b'"' {
            in_str = true;
            out.push(' ');
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'\'' && i + 2 < b.len() && b[i + 2] == b'\'' {
            // A char literal such as '"' must not open a string.
            out.push(' ');
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn load_crate(name: &'static str, root: &Path) -> Crate {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source folder") {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(root).expect("inside root");
                let mut m: ModPath = rel
                    .with_extension("")
                    .iter()
                    .map(|s| s.to_string_lossy().into_owned())
                    .collect();
                if matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                    m.pop();
                }
                let mut text = std::fs::read_to_string(&p).expect("read source");
                // Unit tests may use anything of their crate: only the code counts.
                if let Some(i) = text.find("#[cfg(test)]\nmod ") {
                    text.truncate(i);
                }
                files.insert(m, strip_comments(&text));
            }
        }
    }
    Crate { name, files }
}

/// Expands the use tree `tree` (without `use` and `;`) into full paths.
fn expand_use(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let mut p = prefix.to_vec();
        p.extend(
            head.split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_use(&inner[start..i], &p, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand_use(&inner[start..], &p, out);
    } else if !tree.is_empty() {
        let tree = tree.split(" as ").next().unwrap_or(tree).trim();
        let mut p = prefix.to_vec();
        // `use a::{self, b}`: `self` names `a` itself.
        let at_root = p.is_empty();
        p.extend(
            tree.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty() && (*s != "self" || at_root))
                .map(str::to_string),
        );
        out.push(p);
    }
}

/// Every path the file names: its `use` trees and inline `crate::`/`super::`/`self::` paths.
fn referenced_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = find_use(rest) {
        let after = &rest[i + 4..];
        let end = after.find(';').unwrap_or(after.len());
        expand_use(&after[..end], &[], &mut out);
        rest = &after[end..];
    }
    let bytes = text.as_bytes();
    for anchor in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(off) = text[from..].find(anchor) {
            let start = from + off;
            from = start + anchor.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            if start >= 2 && &text[start - 2..start] == "::" {
                continue; // super::super::x is read from its first segment
            }
            let mut end = start;
            while end < bytes.len()
                && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
            {
                end += 1;
            }
            let path: Vec<String> = text[start..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            out.push(path);
        }
    }
    out
}

/// Position of the next `use ` keyword at a word boundary.
fn find_use(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(off) = s[from..].find("use ") {
        let i = from + off;
        if i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
            return Some(i);
        }
        from = i + 4;
    }
    None
}

impl Crate {
    /// Absolute segments of `path` as written in module `from`, or `None` for other crates.
    fn absolute(&self, from: &ModPath, path: &[String]) -> Option<Vec<String>> {
        let first = path.first()?;
        let mut abs: Vec<String> = match first.as_str() {
            "crate" => vec![],
            "self" => from.clone(),
            "super" => {
                let mut m = from.clone();
                let mut k = 0;
                while path.get(k).map(String::as_str) == Some("super") {
                    m.pop();
                    k += 1;
                }
                m.extend(path[k..].iter().cloned());
                return Some(m);
            }
            // A child module named without `self::` (2018 paths), e.g. `pub use packed::X`.
            name => {
                let mut child = from.clone();
                child.push(name.to_string());
                if self.files.contains_key(&child) {
                    child.extend(path[1..].iter().cloned());
                    return Some(child);
                }
                return None;
            }
        };
        abs.extend(path[1..].iter().cloned());
        Some(abs)
    }

    /// The file module that defines what `abs` names: the longest existing module prefix,
    /// followed through one `pub use` of that module.
    fn resolve(&self, abs: &[String]) -> ModPath {
        let mut k = abs.len();
        while k > 0 && !self.files.contains_key(&abs[..k]) {
            k -= 1;
        }
        let module: ModPath = abs[..k].to_vec();
        if let (Some(name), Some(text)) = (abs.get(k), self.files.get(&module)) {
            for path in reexports(text) {
                if path.last() == Some(name) {
                    if let Some(target) = self.absolute(&module, &path) {
                        let mut j = target.len();
                        while j > 0 && !self.files.contains_key(&target[..j]) {
                            j -= 1;
                        }
                        return target[..j].to_vec();
                    }
                }
            }
        }
        module
    }

    /// File-level edges, leaving out a module's edges to its own ancestors and descendants.
    fn edges(&self) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
        let mut g: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
        for (m, text) in &self.files {
            let set = g.entry(m.clone()).or_default();
            for path in referenced_paths(text) {
                let Some(abs) = self.absolute(m, &path) else {
                    continue;
                };
                let target = self.resolve(&abs);
                if target.starts_with(m) || m.starts_with(&target) {
                    continue;
                }
                set.insert(target);
            }
        }
        g
    }
}

/// Paths of the `pub use` statements of a module.
fn reexports(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("pub use ") {
        let after = &rest[i + 8..];
        let end = after.find(';').unwrap_or(after.len());
        expand_use(&after[..end], &[], &mut out);
        rest = &after[end..];
    }
    out
}

/// One cycle of `g` if it has any (iterative depth-first search).
fn find_cycle<N: Ord + Clone>(g: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let mut mark: BTreeMap<N, Mark> = BTreeMap::new();
    for start in g.keys() {
        if mark.contains_key(start) {
            continue;
        }
        let mut stack: Vec<(N, Vec<N>)> = vec![(start.clone(), g[start].iter().cloned().collect())];
        mark.insert(start.clone(), Mark::Open);
        while let Some((node, next)) = stack.last_mut() {
            match next.pop() {
                Some(n) => match mark.get(&n) {
                    Some(Mark::Open) => {
                        let at = stack.iter().position(|(s, _)| *s == n).unwrap_or(0);
                        let mut cycle: Vec<N> =
                            stack[at..].iter().map(|(s, _)| s.clone()).collect();
                        cycle.push(n);
                        return Some(cycle);
                    }
                    Some(Mark::Done) => {}
                    None => {
                        mark.insert(n.clone(), Mark::Open);
                        let succ = g
                            .get(&n)
                            .map(|s| s.iter().cloned().collect())
                            .unwrap_or_default();
                        stack.push((n, succ));
                    }
                },
                None => {
                    mark.insert(node.clone(), Mark::Done);
                    stack.pop();
                }
            }
        }
    }
    None
}

fn show(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

fn workspace() -> Vec<Crate> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        ("fpipe-cache", "cache/src"),
        ("fpipe-engine", "engine/src"),
        ("fpipe-kernels", "kernels/src"),
        ("fpipe-stages", "stages/src"),
        ("fpipe", "src"),
    ]
    .into_iter()
    .map(|(name, dir)| load_crate(name, &root.join(dir)))
    .collect()
}

#[test]
fn no_file_imports_itself_through_others() {
    let mut found = Vec::new();
    for c in workspace() {
        assert!(c.files.len() > 3, "{}: sources not found", c.name);
        if let Some(cycle) = find_cycle(&c.edges()) {
            let names: Vec<String> = cycle.iter().map(show).collect();
            found.push(format!("{}: {}", c.name, names.join(" -> ")));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn no_top_level_modules_import_each_other() {
    let mut found = Vec::new();
    for c in workspace() {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, tos) in c.edges() {
            let Some(a) = from.first() else { continue };
            let set = g.entry(a.clone()).or_default();
            for to in tos {
                if let Some(b) = to.first() {
                    if b != a {
                        set.insert(b.clone());
                    }
                }
            }
        }
        if let Some(cycle) = find_cycle(&g) {
            found.push(format!("{}: {}", c.name, cycle.join(" -> ")));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

/// The layers of fpipe-stages, in the order of `stages/src/lib.rs`.
const LAYERS: [&str; 7] = ["util", "data", "models", "loss", "train", "eval", "kinds"];

#[test]
fn stages_layers_import_only_earlier_layers() {
    let stages = workspace()
        .into_iter()
        .find(|c| c.name == "fpipe-stages")
        .expect("stages crate");
    let rank = |m: &ModPath| m.first().and_then(|l| LAYERS.iter().position(|x| x == l));
    let mut wrong = Vec::new();
    for (from, tos) in stages.edges() {
        let Some(rf) = rank(&from) else { continue };
        for to in tos {
            if let Some(rt) = rank(&to) {
                if rt > rf {
                    wrong.push(format!("{} imports {}", show(&from), show(&to)));
                }
            }
        }
        if rf + 1 < LAYERS.len() && stages.files[&from].contains("fpipe_engine") {
            wrong.push(format!(
                "{} names fpipe_engine (only kinds may)",
                show(&from)
            ));
        }
    }
    let top: BTreeSet<String> = stages
        .files
        .keys()
        .filter_map(|m| m.first().cloned())
        .collect();
    let unlisted: Vec<&String> = top
        .iter()
        .filter(|t| !LAYERS.contains(&t.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "modules outside the layers: {unlisted:?}"
    );
    assert!(
        wrong.is_empty(),
        "layer order broken:\n{}",
        wrong.join("\n")
    );
}

/// The checks above see a cycle when there is one: a fixture crate with two files that import
/// each other, and one where a lower layer imports a higher one.
#[test]
fn the_checks_catch_a_planted_cycle() {
    let mut files = BTreeMap::new();
    files.insert(vec![], String::new());
    files.insert(vec!["a".to_string()], "use crate::b::Thing;".to_string());
    files.insert(
        vec!["b".to_string()],
        "use super::{a::Other, c};".to_string(),
    );
    files.insert(vec!["c".to_string()], String::new());
    let c = Crate {
        name: "planted",
        files,
    };
    let cycle = find_cycle(&c.edges()).expect("cycle a -> b -> a");
    assert_eq!(cycle.len(), 3, "{cycle:?}");
    files = c.files;
    files.insert(vec!["b".to_string()], "use super::c;".to_string());
    let c = Crate {
        name: "planted",
        files,
    };
    assert!(find_cycle(&c.edges()).is_none());
}
