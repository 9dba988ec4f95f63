//! Advisory file locks. The OS drops them when a process dies, so a crash never leaves a
//! stale lock behind (Snakemake's `--unlock` chore does not exist here).

use crate::{io_err, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// A lock on the whole store: runs hold it shared, `gc` holds it exclusive, so garbage
/// collection never deletes an artifact a running pipeline is about to use.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl StoreLock {
    /// A shared lock. In a store this process may not write (someone else's, a read-only
    /// mount), the existing lock file is opened for reading, which is enough to share it.
    pub(crate) fn shared(path: &Path) -> Result<Self> {
        let file = match open(path) {
            Ok(f) => f,
            Err(e) if e.is_read_only() => File::open(path).map_err(|_| e)?,
            Err(e) => return Err(e),
        };
        file.lock_shared().map_err(io_err(path))?;
        Ok(StoreLock { _file: file })
    }

    pub(crate) fn exclusive(path: &Path) -> Result<Self> {
        let file = open(path)?;
        file.lock().map_err(io_err(path))?;
        Ok(StoreLock { _file: file })
    }

    pub(crate) fn try_exclusive(path: &Path) -> Result<Option<Self>> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StoreLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(path)(e)),
        }
    }
}

/// An exclusive lock on one action key: the process holding it is the only one computing
/// that key. A second process wanting the same key waits, then finds the result cached.
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
    path: PathBuf,
}

impl KeyLock {
    /// Blocks until the lock is free.
    pub(crate) fn acquire(path: &Path) -> Result<Self> {
        let file = open(path)?;
        file.lock().map_err(io_err(path))?;
        Ok(KeyLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// `None` if another process holds it now.
    pub(crate) fn try_acquire(path: &Path) -> Result<Option<Self>> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(KeyLock {
                _file: file,
                path: path.to_path_buf(),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(path)(e)),
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}
