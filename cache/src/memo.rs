//! Hashing of user files passed by path, with a stat memo.
//!
//! A pipeline may name a 10,000-file data folder. Re-reading it on every `status` would cost
//! seconds, so each file's hash is remembered with its (size, mtime, inode); a file whose stat
//! is unchanged is not reread. The memo is local to a store and never enters a key: keys use
//! only content hashes, so two machines get the same id for the same bytes.

use crate::hash::{id_of_entries, ArtifactId, TreeEntry};
use crate::{io_err, CacheError, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a `stat` says about a file that changes when its bytes do (in practice).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stat {
    pub(crate) size: u64,
    pub(crate) mtime_ns: i128,
    pub(crate) ino: u64,
}

pub(crate) fn stat_of(meta: &std::fs::Metadata) -> Stat {
    #[cfg(unix)]
    let ino = {
        use std::os::unix::fs::MetadataExt;
        meta.ino()
    };
    #[cfg(not(unix))]
    let ino = 0;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(-1);
    Stat {
        size: meta.len(),
        mtime_ns,
        ino,
    }
}

/// Hashes files and folders by content, remembering stats to skip unchanged files.
pub struct PathHasher {
    memo_path: Option<PathBuf>,
    memo: Mutex<HashMap<PathBuf, (Stat, [u8; 32])>>,
    dirty: Mutex<bool>,
}

impl PathHasher {
    /// A hasher whose memo lives at `memo_path` (loaded now if present; a damaged memo is
    /// ignored, since it is only a speed-up).
    pub fn with_memo(memo_path: &Path) -> Self {
        let mut memo = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(memo_path) {
            for line in text.lines() {
                if let Some((k, v)) = parse_line(line) {
                    memo.insert(k, v);
                }
            }
        }
        PathHasher {
            memo_path: Some(memo_path.to_path_buf()),
            memo: Mutex::new(memo),
            dirty: Mutex::new(false),
        }
    }

    /// A hasher that remembers nothing between processes.
    pub fn without_memo() -> Self {
        PathHasher {
            memo_path: None,
            memo: Mutex::new(HashMap::new()),
            dirty: Mutex::new(false),
        }
    }

    /// The id of a file or folder by content. A single file's id is the id of a tree holding
    /// that one file under the name `""`, so renaming the file does not change it.
    pub fn hash_path(&self, path: &Path) -> Result<ArtifactId> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_file() {
            let h = self.file_hash(path, &meta)?;
            return Ok(id_of_entries(&[TreeEntry {
                path: String::new(),
                hash: Some(h),
                executable: false,
            }]));
        }
        if !meta.is_dir() {
            return Err(CacheError::Invalid {
                path: path.to_path_buf(),
                message: "neither a file nor a directory".into(),
            });
        }
        let entries = crate::hash::tree_entries(path, crate::hash::Links::Follow, |abs, meta| {
            self.file_hash(abs, meta)
        })?;
        Ok(id_of_entries(&entries))
    }

    fn file_hash(&self, path: &Path, meta: &std::fs::Metadata) -> Result<[u8; 32]> {
        let st = stat_of(meta);
        let key = std::path::absolute(path).map_err(io_err(path))?;
        if let Some((s, h)) = self.memo.lock().map_err(poisoned)?.get(&key) {
            if *s == st {
                return Ok(*h);
            }
        }
        let h = crate::hash::hash_file(path)?;
        self.memo.lock().map_err(poisoned)?.insert(key, (st, h));
        *self.dirty.lock().map_err(poisoned)? = true;
        Ok(h)
    }

    /// Writes the memo back (atomically) if anything was learnt.
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.memo_path else {
            return Ok(());
        };
        if !*self.dirty.lock().map_err(poisoned)? {
            return Ok(());
        }
        let memo = self.memo.lock().map_err(poisoned)?;
        let mut out = String::with_capacity(memo.len() * 120);
        for (p, (s, h)) in memo.iter() {
            let Some(ps) = p.to_str() else { continue };
            if ps.contains('\n') {
                continue;
            }
            out.push_str(&format!(
                "{} {} {} {} {}\n",
                blake3::Hash::from(*h).to_hex(),
                s.size,
                s.mtime_ns,
                s.ino,
                ps
            ));
        }
        crate::store::write_atomic(path, out.as_bytes())
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> CacheError {
    CacheError::Invalid {
        path: PathBuf::new(),
        message: "path memo lock poisoned by a panic in another thread".into(),
    }
}

fn parse_line(line: &str) -> Option<(PathBuf, (Stat, [u8; 32]))> {
    let mut it = line.splitn(5, ' ');
    let h = blake3::Hash::from_hex(it.next()?).ok()?;
    let size = it.next()?.parse().ok()?;
    let mtime_ns = it.next()?.parse().ok()?;
    let ino = it.next()?.parse().ok()?;
    let path = PathBuf::from(it.next()?);
    Some((
        path,
        (
            Stat {
                size,
                mtime_ns,
                ino,
            },
            *h.as_bytes(),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_survives_and_detects_changes() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        for i in 0..20 {
            std::fs::write(data.join(format!("{i}.txt")), format!("file {i}")).unwrap();
        }
        let memo = d.path().join("memo");
        let h1 = PathHasher::with_memo(&memo);
        let id1 = h1.hash_path(&data).unwrap();
        h1.save().unwrap();
        assert!(memo.exists());
        let h2 = PathHasher::with_memo(&memo);
        assert_eq!(h2.memo.lock().unwrap().len(), 20);
        assert_eq!(h2.hash_path(&data).unwrap(), id1);
        // Same size, different bytes: the mtime moves, so the change is seen.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(data.join("3.txt"), "file X").unwrap();
        assert_ne!(h2.hash_path(&data).unwrap(), id1);
        // Same content in another place gives the same id (no machine path in the id).
        let copy = d.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        for i in 0..20 {
            std::fs::write(copy.join(format!("{i}.txt")), format!("file {i}")).unwrap();
        }
        assert_eq!(PathHasher::without_memo().hash_path(&copy).unwrap(), id1);
    }

    #[test]
    fn single_file_id_ignores_its_name() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "x").unwrap();
        std::fs::write(d.path().join("b"), "x").unwrap();
        let h = PathHasher::without_memo();
        assert_eq!(
            h.hash_path(&d.path().join("a")).unwrap(),
            h.hash_path(&d.path().join("b")).unwrap()
        );
    }
}
