//! One artifact tree as one remote object: a *pack*.
//!
//! ```text
//! "fpipe pack v1\n"
//! entry*   tag (1 byte: F file, X executable file, D empty directory)
//!          path length (u32 LE) + path (UTF-8, `/`-separated, relative)
//!          F/X only: size (u64 LE) + that many bytes
//! end      tag E + the artifact id (32 bytes)
//! ```
//!
//! A tree of ten thousand small files is one request, not ten thousand. The reader
//! ([`Unpacker`]) is fed the bytes as they arrive and writes the tree into a staging folder;
//! it refuses a path that climbs out of it, a file named twice and an object that ends early,
//! and the caller rehashes the tree against the id before publishing it. The id at the end is
//! only a guard against a pack stored under the wrong name: the rehash is the authority.

use fpipe_cache::ArtifactId;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

const MAGIC: &[u8] = b"fpipe pack v1\n";

/// The longest path a pack may name (a guard against a hostile length field).
const MAX_PATH: usize = 4096;

/// Why a pack cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{0}")]
    Malformed(String),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Bytes of the pack of a tree, produced in chunks of about `chunk` bytes and handed to `out`
/// (which may stop the packing by returning an error). Returns the pack's length.
pub fn pack_tree<E: From<PackError>>(
    root: &Path,
    id: &ArtifactId,
    chunk: usize,
    mut out: impl FnMut(Vec<u8>) -> Result<(), E>,
) -> Result<u64, E> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| PackError::Io { path, error }
    };
    let entries = fpipe_cache::walk(root).map_err(|e| PackError::Malformed(e.to_string()))?;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk.min(1 << 20));
    let mut total = 0u64;
    buf.extend_from_slice(MAGIC);
    for (rel, abs, is_dir) in entries {
        if is_dir {
            buf.push(b'D');
            put_path(&mut buf, &rel);
            continue;
        }
        let mut f = std::fs::File::open(&abs).map_err(io(&abs))?;
        let meta = f.metadata().map_err(io(&abs))?;
        buf.push(if executable(&meta) { b'X' } else { b'F' });
        put_path(&mut buf, &rel);
        let size = meta.len();
        buf.extend_from_slice(&size.to_le_bytes());
        let mut left = size;
        while left > 0 {
            if buf.len() >= chunk {
                total += buf.len() as u64;
                out(std::mem::replace(&mut buf, Vec::with_capacity(chunk)))?;
            }
            let room = (chunk.saturating_sub(buf.len())).max(64 << 10) as u64;
            let want = left.min(room) as usize;
            let at = buf.len();
            buf.resize(at + want, 0);
            f.read_exact(&mut buf[at..]).map_err(|e| PackError::Io {
                path: abs.clone(),
                error: std::io::Error::new(
                    e.kind(),
                    format!("{e} (the file changed while it was being sent)"),
                ),
            })?;
            left -= want as u64;
        }
    }
    buf.push(b'E');
    buf.extend_from_slice(&id.0);
    total += buf.len() as u64;
    out(buf)?;
    Ok(total)
}

fn put_path(buf: &mut Vec<u8>, rel: &str) {
    buf.extend_from_slice(&(rel.len() as u32).to_le_bytes());
    buf.extend_from_slice(rel.as_bytes());
}

#[cfg(unix)]
fn executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}
#[cfg(not(unix))]
fn executable(_meta: &std::fs::Metadata) -> bool {
    false
}

/// Where the unpacker is in the stream.
enum State {
    Magic,
    /// Waiting for a tag, path and (for files) size.
    Header,
    /// Copying `left` bytes into the open file.
    Body {
        file: std::fs::File,
        path: PathBuf,
        left: u64,
    },
    /// Read the end marker; nothing may follow.
    Done,
}

/// Writes a pack into a folder as its bytes arrive, holding at most one header in memory.
pub struct Unpacker {
    root: PathBuf,
    state: State,
    pending: Vec<u8>,
    id: Option<ArtifactId>,
    bytes: u64,
}

impl Unpacker {
    /// Unpacks into `root`, an empty folder.
    pub fn new(root: &Path) -> Self {
        Unpacker {
            root: root.to_path_buf(),
            state: State::Magic,
            pending: Vec::new(),
            id: None,
            bytes: 0,
        }
    }

    /// Bytes of file content written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes the next piece of the pack.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), PackError> {
        while !data.is_empty() {
            match &mut self.state {
                State::Body { file, path, left } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    file.write_all(&data[..n]).map_err(|error| PackError::Io {
                        path: path.clone(),
                        error,
                    })?;
                    *left -= n as u64;
                    self.bytes += n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::Done => {
                    return Err(PackError::Malformed(
                        "bytes after the end of the pack".into(),
                    ))
                }
                State::Magic | State::Header => {
                    let take = data.len().min(64 << 10);
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    self.parse_pending()?;
                }
            }
        }
        Ok(())
    }

    /// Parses what `pending` holds; leftover file bytes go to the open file.
    fn parse_pending(&mut self) -> Result<(), PackError> {
        loop {
            match self.state {
                State::Magic => {
                    if self.pending.len() < MAGIC.len() {
                        if !MAGIC.starts_with(&self.pending) {
                            return Err(PackError::Malformed("not an fpipe pack".into()));
                        }
                        return Ok(());
                    }
                    if &self.pending[..MAGIC.len()] != MAGIC {
                        return Err(PackError::Malformed("not an fpipe pack".into()));
                    }
                    self.pending.drain(..MAGIC.len());
                    self.state = State::Header;
                }
                State::Header => {
                    let Some(&tag) = self.pending.first() else {
                        return Ok(());
                    };
                    if tag == b'E' {
                        if self.pending.len() < 33 {
                            return Ok(());
                        }
                        let mut id = [0u8; 32];
                        id.copy_from_slice(&self.pending[1..33]);
                        self.id = Some(ArtifactId(id));
                        if self.pending.len() > 33 {
                            return Err(PackError::Malformed(
                                "bytes after the end of the pack".into(),
                            ));
                        }
                        self.pending.clear();
                        self.state = State::Done;
                        return Ok(());
                    }
                    if !matches!(tag, b'F' | b'X' | b'D') {
                        return Err(PackError::Malformed(format!(
                            "unknown entry tag {tag:#04x}"
                        )));
                    }
                    if self.pending.len() < 5 {
                        return Ok(());
                    }
                    let len = u32::from_le_bytes([
                        self.pending[1],
                        self.pending[2],
                        self.pending[3],
                        self.pending[4],
                    ]) as usize;
                    if len == 0 || len > MAX_PATH {
                        return Err(PackError::Malformed(format!("entry path of {len} bytes")));
                    }
                    let head = 5 + len + if tag == b'D' { 0 } else { 8 };
                    if self.pending.len() < head {
                        return Ok(());
                    }
                    let rel = std::str::from_utf8(&self.pending[5..5 + len])
                        .map_err(|_| PackError::Malformed("entry path is not UTF-8".into()))?;
                    let path = self.safe_path(rel)?;
                    if tag == b'D' {
                        std::fs::create_dir_all(&path).map_err(|error| PackError::Io {
                            path: path.clone(),
                            error,
                        })?;
                        self.pending.drain(..head);
                        continue;
                    }
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&self.pending[5 + len..head]);
                    let left = u64::from_le_bytes(size);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|error| PackError::Io {
                            path: parent.to_path_buf(),
                            error,
                        })?;
                    }
                    let file = create_file(&path, tag == b'X')?;
                    self.pending.drain(..head);
                    self.state = State::Body { file, path, left };
                    if left == 0 {
                        self.state = State::Header;
                    }
                }
                State::Body { .. } => {
                    // The rest of `pending` belongs to the file (and what follows it).
                    let rest = std::mem::take(&mut self.pending);
                    return self.feed(&rest);
                }
                State::Done => {
                    if self.pending.is_empty() {
                        return Ok(());
                    }
                    return Err(PackError::Malformed(
                        "bytes after the end of the pack".into(),
                    ));
                }
            }
        }
    }

    /// `rel` under the root, refused when it is absolute, empty or climbs out.
    fn safe_path(&self, rel: &str) -> Result<PathBuf, PackError> {
        let p = Path::new(rel);
        let ok = !rel.contains('\\')
            && p.components().count() > 0
            && p.components().all(|c| matches!(c, Component::Normal(_)))
            && !rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if !ok {
            return Err(PackError::Malformed(format!(
                "entry path {rel:?} is not a plain relative path"
            )));
        }
        Ok(self.root.join(p))
    }

    /// Checks that the whole pack arrived; returns the id its end marker names.
    pub fn finish(self) -> Result<ArtifactId, PackError> {
        match (self.state, self.id) {
            (State::Done, Some(id)) => Ok(id),
            _ => Err(PackError::Malformed(
                "the pack ends early (truncated)".into(),
            )),
        }
    }
}

fn create_file(path: &Path, exec: bool) -> Result<std::fs::File, PackError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(if exec { 0o755 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = exec;
    o.open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            PackError::Malformed(format!("{} is named twice", path.display()))
        } else {
            PackError::Io {
                path: path.to_path_buf(),
                error,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, body) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        d
    }

    fn pack(dir: &Path, chunk: usize) -> Vec<Vec<u8>> {
        let (id, _) = fpipe_cache::tree_id(dir).unwrap();
        let mut chunks = Vec::new();
        pack_tree::<PackError>(dir, &id, chunk, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap();
        chunks
    }

    #[test]
    fn round_trip_in_any_pieces() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let src = tree(&[("a/b.txt", b"hello"), ("big.bin", &big), ("e", b"")]);
        std::fs::create_dir(src.path().join("empty")).unwrap();
        let (id, _) = fpipe_cache::tree_id(src.path()).unwrap();
        let chunks = pack(src.path(), 100_000);
        assert!(chunks.len() > 2, "large files are sent in pieces");
        let whole: Vec<u8> = chunks.concat();
        for piece in [1, 7, 4096, whole.len()] {
            let dst = tempfile::tempdir().unwrap();
            let mut u = Unpacker::new(dst.path());
            for c in whole.chunks(piece) {
                u.feed(c).unwrap();
            }
            assert_eq!(u.finish().unwrap(), id);
            assert_eq!(fpipe_cache::tree_id(dst.path()).unwrap().0, id, "{piece}");
        }
    }

    #[test]
    fn truncated_and_hostile_packs_are_refused() {
        let src = tree(&[("x", b"data")]);
        let whole = pack(src.path(), 1 << 20).concat();
        let dst = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(dst.path());
        u.feed(&whole[..whole.len() - 5]).unwrap();
        let e = u.finish().unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        let mut evil = MAGIC.to_vec();
        evil.push(b'F');
        put_path(&mut evil, "../escape");
        evil.extend_from_slice(&1u64.to_le_bytes());
        evil.push(b'!');
        let dst = tempfile::tempdir().unwrap();
        let e = Unpacker::new(&dst.path().join("in"))
            .feed(&evil)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain relative path"), "{e}");
        assert!(!dst.path().join("escape").exists());

        let mut twice = MAGIC.to_vec();
        for _ in 0..2 {
            twice.push(b'F');
            put_path(&mut twice, "a");
            twice.extend_from_slice(&0u64.to_le_bytes());
        }
        let dst = tempfile::tempdir().unwrap();
        let e = Unpacker::new(dst.path())
            .feed(&twice)
            .unwrap_err()
            .to_string();
        assert!(e.contains("named twice"), "{e}");

        let e = Unpacker::new(dst.path())
            .feed(b"<Error>NoSuchKey</Error>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an fpipe pack"), "{e}");
    }
}
