//! Cheap checks of a stored artifact before anything reads it.
//!
//! When an artifact is committed the store writes its *fingerprint* to `ROOT/stat/ab/<id>`:
//! for each file its relative path, size, mtime (ns), inode and content hash. Before a stage
//! reads an artifact, [`ArtifactStore::check_artifact`] compares one `stat` per file with the
//! fingerprint. Any difference (a file edited, deleted, truncated, replaced or added), or no
//! fingerprint at all (a store written before fingerprints existed), costs a full rehash of the
//! artifact against its id; a mismatch is [`Damage`] naming the file. With
//! [`CheckDepth::Full`] the artifact is always rehashed, which also finds damage that leaves
//! the stat unchanged (a flipped bit on disk, a file rewritten with its old mtime put back).
//!
//! A fingerprint is local: inodes and mtimes mean nothing in another store, so it is never
//! copied by push/pull. It is only ever a shortcut to "unchanged since committed"; the id is
//! the authority, and a damaged or missing fingerprint only costs a rehash.

use crate::hash::{
    hash_file, id_of_entries, tree_entries, walk_stat, ArtifactId, Links, TreeEntry,
};
use crate::memo::{stat_of, Stat};
use crate::store::{write_atomic, ArtifactStore};
use std::fmt;
use std::path::{Path, PathBuf};

/// How thoroughly [`ArtifactStore::check_artifact`] looks at an artifact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckDepth {
    /// One `stat` per file against the fingerprint; rehash only when something differs.
    #[default]
    Stat,
    /// Always rehash every file.
    Full,
}

/// Why a stored artifact cannot be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub id: ArtifactId,
    /// The damaged file, or the artifact's directory when no single file can be named.
    pub path: PathBuf,
    pub problem: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for Damage {}

const HEADER: &str = "fpipe artifact fingerprint v1";

/// One entry of a fingerprint: a file with its stat and hash, or an empty directory.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    path: String,
    file: Option<(Stat, [u8; 32])>,
}

/// The stat of every entry of a tree as it is now (`None`: an empty directory).
type Listing = Vec<(String, Option<Stat>)>;

fn list(dir: &Path) -> crate::Result<Listing> {
    walk_stat(dir, stat_of)
}

fn render(entries: &[Entry]) -> Option<String> {
    let mut out = String::with_capacity(entries.len() * 120 + HEADER.len() + 1);
    out.push_str(HEADER);
    out.push('\n');
    for e in entries {
        if e.path.contains('\n') {
            return None; // such a name cannot be written; the artifact is rehashed instead
        }
        match &e.file {
            Some((s, h)) => out.push_str(&format!(
                "F {} {} {} {} {}\n",
                s.size,
                s.mtime_ns,
                s.ino,
                blake3::Hash::from(*h).to_hex(),
                e.path
            )),
            None => out.push_str(&format!("D {}\n", e.path)),
        }
    }
    Some(out)
}

fn parse(text: &str) -> Option<Vec<Entry>> {
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let mut out = Vec::new();
    for line in lines {
        if let Some(path) = line.strip_prefix("D ") {
            out.push(Entry {
                path: path.to_string(),
                file: None,
            });
            continue;
        }
        let mut it = line.strip_prefix("F ")?.splitn(5, ' ');
        let size = it.next()?.parse().ok()?;
        let mtime_ns = it.next()?.parse().ok()?;
        let ino = it.next()?.parse().ok()?;
        let hash = *blake3::Hash::from_hex(it.next()?).ok()?.as_bytes();
        let path = it.next()?.to_string();
        out.push(Entry {
            path,
            file: Some((
                Stat {
                    size,
                    mtime_ns,
                    ino,
                },
                hash,
            )),
        });
    }
    // Written sorted; anything else is not ours.
    out.windows(2).all(|w| w[0].path < w[1].path).then_some(out)
}

/// Whether the tree as listed now is the tree the fingerprint describes, stat for stat.
fn unchanged(fp: &[Entry], now: &Listing) -> bool {
    fp.len() == now.len()
        && fp
            .iter()
            .zip(now)
            .all(|(e, (path, st))| e.path == *path && e.file.map(|(s, _)| s) == *st)
}

/// The first difference between the fingerprint and the rehashed tree, as (file, problem).
fn difference(fp: &[Entry], now: &[TreeEntry], stats: &Listing) -> Option<(String, String)> {
    let size_now = |path: &str| {
        stats
            .binary_search_by(|(p, _)| p.as_str().cmp(path))
            .ok()
            .and_then(|i| stats[i].1.map(|s| s.size))
    };
    let (mut i, mut j) = (0, 0);
    while i < fp.len() || j < now.len() {
        let order = match (fp.get(i), now.get(j)) {
            (Some(a), Some(b)) => a.path.cmp(&b.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                return Some((
                    fp[i].path.clone(),
                    "missing: deleted from the artifact".into(),
                ))
            }
            std::cmp::Ordering::Greater => {
                return Some((
                    now[j].path.clone(),
                    "not part of the artifact: added after it was stored".into(),
                ))
            }
            std::cmp::Ordering::Equal => {
                let (a, b) = (&fp[i], &now[j]);
                match (&a.file, &b.hash) {
                    (Some((st, h)), Some(h2)) if h != h2 => {
                        let size = size_now(&b.path).unwrap_or(st.size);
                        let problem = if size < st.size {
                            format!("truncated: {size} bytes, was {}", st.size)
                        } else if size != st.size {
                            format!("rewritten: {size} bytes, was {}", st.size)
                        } else {
                            format!("content changed ({size} bytes, as before)")
                        };
                        return Some((b.path.clone(), problem));
                    }
                    (Some(_), None) => {
                        return Some((b.path.clone(), "a directory where a file was".into()))
                    }
                    (None, Some(_)) => {
                        return Some((b.path.clone(), "a file where a directory was".into()))
                    }
                    _ => {}
                }
                i += 1;
                j += 1;
            }
        }
    }
    None
}

impl ArtifactStore {
    /// Where the fingerprint of `id` lives.
    pub(crate) fn fingerprint_path(&self, id: &ArtifactId) -> PathBuf {
        let hex = id.to_hex();
        self.root().join("stat").join(&hex[..2]).join(hex)
    }

    /// Records the stats of artifact `id` as they are now, with the content hashes of its
    /// files (`entries`, as hashed when it was committed or verified). Best effort: a store
    /// that cannot be written is checked by rehashing instead.
    pub(crate) fn write_fingerprint(&self, id: &ArtifactId, entries: &[TreeEntry]) {
        let Ok(stats) = list(&self.object_path(id)) else {
            return;
        };
        if stats.len() != entries.len() {
            return;
        }
        let mut fp = Vec::with_capacity(entries.len());
        for ((path, st), e) in stats.into_iter().zip(entries) {
            if path != e.path {
                return;
            }
            fp.push(Entry {
                path,
                file: match (st, e.hash) {
                    (Some(s), Some(h)) => Some((s, h)),
                    (None, None) => None,
                    _ => return,
                },
            });
        }
        if let Some(text) = render(&fp) {
            let _ = write_atomic(&self.fingerprint_path(id), text.as_bytes());
        }
    }

    fn read_fingerprint(&self, id: &ArtifactId) -> Option<Vec<Entry>> {
        parse(&std::fs::read_to_string(self.fingerprint_path(id)).ok()?)
    }

    /// Whether artifact `id` can be trusted to hold the bytes it is named by, before a stage
    /// reads it. [`CheckDepth::Stat`] costs one `stat` per file while nothing changed, and a
    /// full rehash otherwise; see the module docs. A rehash that matches the id refreshes the
    /// fingerprint (a store copied with `cp -a` keeps its bytes but not its inodes).
    pub fn check_artifact(&self, id: &ArtifactId, depth: CheckDepth) -> Result<(), Damage> {
        let dir = self.object_path(id);
        let damage = |path: PathBuf, problem: String| Damage {
            id: *id,
            path,
            problem,
        };
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(damage(dir, "not a directory".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(damage(dir, "artifact missing from the cache".into()))
            }
            Err(e) => return Err(damage(dir, format!("unreadable: {e}"))),
        }
        let fp = self.read_fingerprint(id);
        let stats = match list(&dir) {
            Ok(s) => s,
            Err(e) => return Err(damage(dir, format!("unreadable: {e}"))),
        };
        if depth == CheckDepth::Stat && fp.as_deref().is_some_and(|fp| unchanged(fp, &stats)) {
            return Ok(());
        }
        let entries = match tree_entries(&dir, Links::Refuse, |abs, _| hash_file(abs)) {
            Ok(e) => e,
            Err(e) => {
                // A file vanished or cannot be read: name it if the fingerprint knows it.
                let gone = fp.as_deref().and_then(|fp| {
                    fp.iter()
                        .find(|e| e.file.is_some() && !dir.join(&e.path).is_file())
                });
                return Err(match gone {
                    Some(e) => damage(
                        dir.join(&e.path),
                        "missing: deleted from the artifact".into(),
                    ),
                    None => damage(dir, format!("unreadable: {e}")),
                });
            }
        };
        let actual = id_of_entries(&entries);
        if actual == *id {
            let fresh = fp.as_deref().is_some_and(|fp| unchanged(fp, &stats));
            if !fresh {
                self.write_fingerprint(id, &entries);
            }
            return Ok(());
        }
        Err(
            match fp
                .as_deref()
                .and_then(|fp| difference(fp, &entries, &stats))
            {
                Some((file, problem)) => damage(dir.join(file), problem),
                None => damage(
                    dir,
                    format!(
                        "content hashes to {}, not to the id it is stored under",
                        actual.short()
                    ),
                ),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(files: &[(&str, &str)]) -> (tempfile::TempDir, ArtifactStore, ArtifactId) {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        let s = store.staging().unwrap();
        for (name, body) in files {
            let p = s.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let id = store.commit(s).unwrap();
        (d, store, id)
    }

    fn writable(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    #[test]
    fn commit_writes_a_fingerprint_that_passes() {
        let (_d, store, id) = store_with(&[("a/x.txt", "hello"), ("b", "world")]);
        let fp = store
            .read_fingerprint(&id)
            .expect("fingerprint written at commit");
        assert_eq!(fp.len(), 2);
        assert_eq!(fp[0].path, "a/x.txt");
        assert_eq!(store.check_artifact(&id, CheckDepth::Stat), Ok(()));
        assert_eq!(store.check_artifact(&id, CheckDepth::Full), Ok(()));
    }

    #[test]
    fn edits_deletions_truncations_and_additions_are_named() {
        type Harm = fn(&Path);
        let cases: &[(&str, Harm, &str)] = &[
            (
                "x.txt",
                |f| {
                    writable(f);
                    std::fs::write(f, "hellO").unwrap();
                },
                "content changed",
            ),
            ("x.txt", |f| std::fs::remove_file(f).unwrap(), "missing"),
            (
                "x.txt",
                |f| {
                    writable(f);
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(f)
                        .unwrap()
                        .set_len(2)
                        .unwrap();
                },
                "truncated: 2 bytes, was 5",
            ),
            (
                "extra",
                |f| std::fs::write(f, "new").unwrap(),
                "not part of the artifact",
            ),
        ];
        for (file, harm, expect) in cases {
            let (_d, store, id) = store_with(&[("x.txt", "hello"), ("y.txt", "other")]);
            let path = store.object_path(&id).join(file);
            // Let a same-size rewrite land on another mtime tick.
            std::thread::sleep(std::time::Duration::from_millis(10));
            harm(&path);
            let d = store.check_artifact(&id, CheckDepth::Stat).unwrap_err();
            assert_eq!(d.path, path, "{d}");
            assert!(d.problem.contains(expect), "{expect}: {d}");
            assert_eq!(d.id, id);
        }
    }

    #[test]
    fn a_touched_but_intact_artifact_is_rehashed_once_and_trusted() {
        let (_d, store, id) = store_with(&[("x.txt", "hello")]);
        let f = store.object_path(&id).join("x.txt");
        let old = std::fs::read_to_string(store.fingerprint_path(&id)).unwrap();
        std::fs::File::open(&f)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(store.check_artifact(&id, CheckDepth::Stat), Ok(()));
        let new = std::fs::read_to_string(store.fingerprint_path(&id)).unwrap();
        assert_ne!(old, new, "the fingerprint follows the new stat");
        // No fingerprint (a store from before fingerprints): rehashed and written.
        std::fs::remove_file(store.fingerprint_path(&id)).unwrap();
        assert_eq!(store.check_artifact(&id, CheckDepth::Stat), Ok(()));
        assert!(store.fingerprint_path(&id).is_file());
        // A damaged fingerprint is only a reason to rehash.
        std::fs::write(store.fingerprint_path(&id), "garbage").unwrap();
        assert_eq!(store.check_artifact(&id, CheckDepth::Stat), Ok(()));
    }

    #[test]
    fn full_depth_finds_damage_that_keeps_the_stat() {
        let (_d, store, id) = store_with(&[("x.txt", "hello")]);
        let f = store.object_path(&id).join("x.txt");
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        writable(&f);
        std::fs::write(&f, "jello").unwrap();
        std::fs::File::open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        // Same size, same inode, same mtime: the stat check cannot see it ...
        assert_eq!(store.check_artifact(&id, CheckDepth::Stat), Ok(()));
        // ... a rehash does, and names the file.
        let d = store.check_artifact(&id, CheckDepth::Full).unwrap_err();
        assert_eq!(d.path, f);
        assert!(d.problem.contains("content changed"), "{d}");
    }

    #[test]
    fn without_a_fingerprint_damage_names_the_artifact() {
        let (_d, store, id) = store_with(&[("x.txt", "hello")]);
        std::fs::remove_file(store.fingerprint_path(&id)).unwrap();
        std::fs::remove_file(store.object_path(&id).join("x.txt")).unwrap();
        let d = store.check_artifact(&id, CheckDepth::Stat).unwrap_err();
        assert_eq!(d.path, store.object_path(&id));
        assert!(d.problem.contains("content hashes to"), "{d}");
        std::fs::remove_dir_all(store.object_path(&id)).unwrap();
        let d = store.check_artifact(&id, CheckDepth::Stat).unwrap_err();
        assert!(d.problem.contains("missing from the cache"), "{d}");
    }

    #[test]
    fn fingerprints_round_trip_names_with_spaces() {
        let e = vec![
            Entry {
                path: "a b/c".into(),
                file: Some((
                    Stat {
                        size: 3,
                        mtime_ns: -5,
                        ino: 7,
                    },
                    [9; 32],
                )),
            },
            Entry {
                path: "empty dir".into(),
                file: None,
            },
        ];
        assert_eq!(parse(&render(&e).unwrap()), Some(e));
    }
}
