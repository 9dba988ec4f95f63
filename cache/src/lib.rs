//! fpipe-cache: the content-addressed artifact store.
//!
//! An *artifact* is a directory tree. Its [`ArtifactId`] is a blake3 Merkle hash over the
//! sorted `(relative path, kind, file hash)` entries of the tree, so two trees with the same
//! bytes under the same names have the same id on every machine.
//!
//! The store knows bytes and hashes only: it does not know what a stage, a pipeline or a face
//! is. It offers
//! - [`ArtifactStore::staging`] + [`ArtifactStore::commit`]: write a tree in a private staging
//!   directory, then publish it by one `rename`, so a killed writer leaves nothing a reader
//!   trusts;
//! - an *action cache* ([`ArtifactStore::put_action`] / [`ArtifactStore::action`]) mapping an
//!   opaque key to named output ids, written atomically after the outputs exist;
//! - file locks ([`StoreLock`], [`KeyLock`]) so concurrent processes share one store safely;
//! - [`ArtifactStore::check_artifact`]: a cheap check (a `stat` per file against a
//!   fingerprint taken at commit, a rehash when anything differs) before an artifact is read;
//! - [`ArtifactStore::verify`] (which also invalidates what was computed from damaged
//!   artifacts), [`ArtifactStore::gc`], and [`ArtifactStore::push`] /
//!   [`ArtifactStore::pull`] between two stores, verified by rehashing on arrival;
//! - [`PathHasher`]: hashes user files by content, with a size/mtime/inode memo so that an
//!   unchanged tree of many files is not reread.

mod check;
mod hash;
mod lock;
mod memo;
mod store;

pub use check::{CheckDepth, Damage};
pub use hash::{hash_file, tree_id, tree_size, walk, ArtifactId, TreeEntry};
pub use lock::{KeyLock, StoreLock};
pub use memo::PathHasher;
pub use store::{
    iso8601, now_unix, write_atomic, ActionRecord, ArtifactStore, GcReport, Staging, SyncReport,
    VerifyProblem, VerifyReport,
};

/// Errors of the artifact store. Each names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The message already ends with the OS error, so the error is not also given as a
    /// `source()`: a chain printer (`anyhow`'s `{:#}`) would repeat it.
    #[error("{path}: {error}")]
    Io {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("artifact {expected} arrived with content hashing to {actual}; not stored")]
    HashMismatch { expected: String, actual: String },
}

impl CacheError {
    /// The kind of the OS error behind an I/O failure (a full disk, a permission), for callers
    /// that react to it: the error is part of the message, not a `source()`.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            CacheError::Io { error, .. } => Some(error.kind()),
            _ => None,
        }
    }

    /// True when the error is a refusal to write (permissions, a read-only file system): the
    /// store is usable for reading but nothing can be stored in it.
    pub fn is_read_only(&self) -> bool {
        matches!(self, CacheError::Io { error, .. } if matches!(
            error.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
        ))
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CacheError>;

pub(crate) fn io_err(
    path: impl Into<std::path::PathBuf>,
) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.into();
    move |error| CacheError::Io { path, error }
}
