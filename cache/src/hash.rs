//! Content hashing: files, and directory trees as Merkle hashes.

use crate::{io_err, CacheError, Result};
use rayon::prelude::*;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The id of an artifact: blake3 of its tree (see [`tree_id`]). Displayed as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactId(pub [u8; 32]);

impl ArtifactId {
    /// Full lowercase hex form.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }
    /// The first 12 hex digits, for people.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArtifactId({})", self.short())
    }
}

impl FromStr for ArtifactId {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        blake3::Hash::from_hex(s)
            .map(|h| ArtifactId(*h.as_bytes()))
            .map_err(|e| format!("not an artifact id {s:?}: {e}"))
    }
}

impl serde::Serialize for ArtifactId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ArtifactId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One entry of a tree: a file (with its content hash and executable bit) or an empty directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeEntry {
    /// Path relative to the tree root, `/`-separated.
    pub path: String,
    /// `None` for an empty directory.
    pub hash: Option<[u8; 32]>,
    pub executable: bool,
}

/// blake3 of one file's bytes (memory-mapped and multi-threaded for large files).
pub fn hash_file(path: &Path) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.len() > 1 << 20 {
        h.update_mmap_rayon(path).map_err(io_err(path))?;
    } else {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        h.update(&bytes);
    }
    Ok(*h.finalize().as_bytes())
}

/// Lists an artifact tree's files and empty directories, sorted by relative path. A symbolic
/// link anywhere in it is an error naming it: an artifact holds only files and folders, so
/// nothing that reads, hashes or makes read-only an artifact ever goes through a link to
/// somewhere else (producers copy in what their links point to before they publish).
pub fn walk(root: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    // (relative path, absolute path, is_dir_entry)
    let mut out = Vec::new();
    walk_into(root, root, Links::Refuse, &mut out)?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Like [`walk`] for the user's own files (a data folder named by a pipeline), where links are
/// followed: a data set laid out with links hashes as the files they point to. A link that
/// loops or dangles is an error naming it.
pub(crate) fn walk_following(root: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    walk_into(root, root, Links::Follow, &mut out)?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// What a walk does with a symbolic link.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Links {
    Follow,
    Refuse,
}

/// The error for a symbolic link found inside an artifact, naming it and its target.
pub(crate) fn link_in_artifact(path: PathBuf) -> CacheError {
    let target = std::fs::read_link(&path)
        .map(|t| t.display().to_string())
        .unwrap_or_default();
    CacheError::Invalid {
        path,
        message: format!("is a symbolic link (to {target}); artifacts hold only files and folders"),
    }
}

fn walk_into(
    root: &Path,
    dir: &Path,
    links: Links,
    out: &mut Vec<(String, PathBuf, bool)>,
) -> Result<()> {
    let mut any = false;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        any = true;
        let path = entry.path();
        let link = entry.file_type().map_err(io_err(&path))?.is_symlink();
        if link && links == Links::Refuse {
            return Err(link_in_artifact(path));
        }
        let meta = std::fs::metadata(&path).map_err(|e| {
            if link {
                CacheError::Invalid {
                    path: path.clone(),
                    message: format!("symbolic link that dangles or loops: {e}"),
                }
            } else {
                io_err(&path)(e)
            }
        })?;
        if meta.is_dir() {
            walk_into(root, &path, links, out)?;
        } else if meta.is_file() {
            out.push((rel(root, &path)?, path, false));
        } else {
            return Err(CacheError::Invalid {
                path,
                message: "neither a file nor a directory; artifacts hold only files".into(),
            });
        }
    }
    if !any && dir != root {
        out.push((rel(root, dir)?, dir.to_path_buf(), true));
    }
    Ok(())
}

/// Every entry of an artifact tree as (relative path, `f(metadata)`; `None` for an empty
/// directory), sorted by path; a link is an error, as in [`walk`]. One `stat` per file, made
/// relative to its open directory: the whole cost of checking a tree against a fingerprint.
pub(crate) fn walk_stat<T>(
    root: &Path,
    f: impl Fn(&std::fs::Metadata) -> T,
) -> Result<Vec<(String, Option<T>)>> {
    let mut out = Vec::new();
    walk_stat_into(root, "", &mut |rel, meta| {
        out.push((rel, meta.as_ref().map(&f)));
    })?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn walk_stat_into(
    dir: &Path,
    prefix: &str,
    out: &mut dyn FnMut(String, Option<std::fs::Metadata>),
) -> Result<()> {
    let mut any = false;
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        any = true;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(CacheError::Invalid {
                path,
                message: "file name is not valid UTF-8".into(),
            });
        };
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        if entry.file_type().map_err(io_err(&path))?.is_symlink() {
            return Err(link_in_artifact(path));
        }
        let meta = entry.metadata().map_err(io_err(&path))?;
        if meta.is_dir() {
            walk_stat_into(&path, &rel, out)?;
        } else if meta.is_file() {
            out(rel, Some(meta));
        } else {
            return Err(CacheError::Invalid {
                path,
                message: "neither a file nor a directory; artifacts hold only files".into(),
            });
        }
    }
    if !any && !prefix.is_empty() {
        out(prefix.to_string(), None);
    }
    Ok(())
}

fn rel(root: &Path, path: &Path) -> Result<String> {
    let r = path.strip_prefix(root).map_err(|_| CacheError::Invalid {
        path: path.to_path_buf(),
        message: "outside the tree being hashed".into(),
    })?;
    let parts: Vec<&str> = r
        .components()
        .map(|c| {
            c.as_os_str().to_str().ok_or_else(|| CacheError::Invalid {
                path: path.to_path_buf(),
                message: "file name is not valid UTF-8".into(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(parts.join("/"))
}

#[cfg(unix)]
pub(crate) fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}
#[cfg(not(unix))]
pub(crate) fn is_executable(_meta: &std::fs::Metadata) -> bool {
    false
}

/// Hashes every file under `root` (in parallel) and returns the tree's id and entries.
pub fn tree_id(root: &Path) -> Result<(ArtifactId, Vec<TreeEntry>)> {
    let entries = tree_entries(root, Links::Refuse, |abs, _| hash_file(abs))?;
    Ok((id_of_entries(&entries), entries))
}

/// The sorted entries of a tree, each file hashed (in parallel) by `hash`, which gets the
/// file's path and metadata (so a caller may answer from a memo instead of reading it).
pub(crate) fn tree_entries(
    root: &Path,
    links: Links,
    hash: impl Fn(&Path, &std::fs::Metadata) -> Result<[u8; 32]> + Sync,
) -> Result<Vec<TreeEntry>> {
    let files = match links {
        Links::Refuse => walk(root)?,
        Links::Follow => walk_following(root)?,
    };
    files
        .par_iter()
        .map(|(rel, abs, is_dir)| {
            if *is_dir {
                return Ok(TreeEntry {
                    path: rel.clone(),
                    hash: None,
                    executable: false,
                });
            }
            let meta = std::fs::metadata(abs).map_err(io_err(abs))?;
            Ok(TreeEntry {
                path: rel.clone(),
                hash: Some(hash(abs, &meta)?),
                executable: is_executable(&meta),
            })
        })
        .collect()
}

/// The Merkle hash of sorted entries. Changing this changes every id: bump the domain string.
pub fn id_of_entries(entries: &[TreeEntry]) -> ArtifactId {
    let mut h = blake3::Hasher::new_derive_key("fpipe artifact tree v1");
    for e in entries {
        let tag: &[u8] = match (e.hash.is_some(), e.executable) {
            (false, _) => b"D",
            (true, false) => b"F",
            (true, true) => b"X",
        };
        h.update(tag);
        h.update(&(e.path.len() as u64).to_le_bytes());
        h.update(e.path.as_bytes());
        if let Some(fh) = &e.hash {
            h.update(fh);
        }
    }
    ArtifactId(*h.finalize().as_bytes())
}

/// Bytes of the files under `path` (0 where it cannot be read): what removing it frees.
pub fn tree_size(path: &Path) -> u64 {
    walk(path)
        .map(|files| {
            files
                .iter()
                .filter_map(|(_, abs, _)| std::fs::metadata(abs).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_same_id_and_names_matter() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir_all(d.join("x/y")).unwrap();
            std::fs::write(d.join("x/y/f.txt"), b"hello").unwrap();
            std::fs::write(d.join("g"), b"world").unwrap();
        }
        let (ia, ea) = tree_id(a.path()).unwrap();
        let (ib, _) = tree_id(b.path()).unwrap();
        assert_eq!(ia, ib);
        assert_eq!(ea.len(), 2);
        assert_eq!(ea[0].path, "g");
        assert_eq!(ea[1].path, "x/y/f.txt");
        std::fs::rename(b.path().join("g"), b.path().join("h")).unwrap();
        assert_ne!(
            ia,
            tree_id(b.path()).unwrap().0,
            "renaming a file changes the id"
        );
        std::fs::rename(b.path().join("h"), b.path().join("g")).unwrap();
        std::fs::write(b.path().join("g"), b"World").unwrap();
        assert_ne!(
            ia,
            tree_id(b.path()).unwrap().0,
            "changing bytes changes the id"
        );
    }

    #[test]
    fn empty_directories_count() {
        let a = tempfile::tempdir().unwrap();
        let (empty, _) = tree_id(a.path()).unwrap();
        std::fs::create_dir(a.path().join("d")).unwrap();
        let (with_dir, e) = tree_id(a.path()).unwrap();
        assert_ne!(empty, with_dir);
        assert_eq!(e[0].hash, None);
    }

    #[cfg(unix)]
    #[test]
    fn links_are_refused_in_artifacts_and_followed_in_user_files() {
        use std::os::unix::fs::PermissionsExt;
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"mine").unwrap();
        let cache = tempfile::tempdir().unwrap();
        let store = crate::ArtifactStore::open(cache.path()).unwrap();
        let staged = store.staging().unwrap();
        std::fs::write(staged.path().join("a"), b"1").unwrap();
        std::os::unix::fs::symlink(outside.path(), staged.path().join("out")).unwrap();
        let err = store.commit(staged).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(err.contains("out"), "names the link: {err}");
        // Nothing outside was made read-only, and nothing was published.
        let mode = std::fs::metadata(outside.path().join("secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_ne!(mode & 0o200, 0, "the outside file stays writable");
        assert!(store.objects().unwrap().is_empty());
        // A user's data folder laid out with links hashes as the files they point to.
        let data = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), data.path().join("s")).unwrap();
        let hasher = crate::PathHasher::without_memo();
        let linked = hasher.hash_path(data.path()).unwrap();
        let plain = tempfile::tempdir().unwrap();
        std::fs::write(plain.path().join("s"), b"mine").unwrap();
        assert_eq!(linked, hasher.hash_path(plain.path()).unwrap());
        std::os::unix::fs::symlink("missing", data.path().join("dangling")).unwrap();
        let err = hasher.hash_path(data.path()).unwrap_err().to_string();
        assert!(err.contains("dangling") && err.contains("dangles"), "{err}");
    }

    #[test]
    fn id_round_trips_through_hex() {
        let id = ArtifactId([7; 32]);
        let back: ArtifactId = id.to_hex().parse().unwrap();
        assert_eq!(id, back);
        assert!("zz".parse::<ArtifactId>().is_err());
    }
}
