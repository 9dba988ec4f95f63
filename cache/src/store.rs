//! The on-disk store.
//!
//! ```text
//! ROOT/lock                 store lock: shared by runs, exclusive for gc
//! ROOT/objects/ab/<id>/     committed artifact trees (read-only files)
//! ROOT/stat/ab/<id>         fingerprint of each artifact's files (local; see `check`)
//! ROOT/actions/ab/<key>.json  action records: key -> named output ids
//! ROOT/staging/<unique>/    trees being written; never trusted, removed by gc
//! ROOT/locks/<key>.lock     per-key locks: one process computes a key at a time
//! ROOT/scratch/<key>/       resumable state of an unfinished computation
//! ROOT/memo/paths           stat memo of user files (local speed-up, never shared)
//! ```

use crate::hash::{tree_id, tree_size, walk, ArtifactId, TreeEntry};
use crate::lock::{KeyLock, StoreLock};
use crate::{io_err, CacheError, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_name(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{n}-{t:08x}", std::process::id())
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader sees the old
/// content or the new, never a torn write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(unique_name(&format!(".{name}.tmp.")));
    if let Err(e) = std::fs::write(&tmp, bytes) {
        // A full disk leaves a partial temporary file: remove it rather than leave litter.
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// What an action key resolved to: its named output artifacts, the artifacts it was computed
/// from, plus free-form metadata (metrics, timings, where a pulled record came from) that the
/// caller wants to keep with it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ActionRecord {
    pub key: String,
    pub outputs: BTreeMap<String, ArtifactId>,
    /// The input artifacts the outputs were computed from. When one of them is found damaged,
    /// [`ArtifactStore::verify`] invalidates this record and what was computed from it.
    /// Records written before this field existed load with none.
    #[serde(default)]
    pub inputs: Vec<ArtifactId>,
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// A directory being written. Dropped without [`ArtifactStore::commit`], it is deleted.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    armed: bool,
}

impl Staging {
    /// Where to write the tree.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove_tree(&self.path);
        }
    }
}

/// One problem found by [`ArtifactStore::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyProblem {
    pub path: PathBuf,
    pub problem: String,
}

/// Outcome of [`ArtifactStore::verify`].
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub actions_checked: usize,
    /// Everything found wrong: damaged artifacts, records pointing at them, and what was
    /// computed from damaged data (see [`Self::invalidated`]).
    pub problems: Vec<VerifyProblem>,
    /// Entries removed because `repair` was asked for.
    pub repaired: usize,
    /// Action records (by `meta.stage` when known, else key) whose inputs were damaged or
    /// themselves computed from damaged data: their results cannot be trusted.
    pub invalidated: Vec<String>,
    /// Intact artifacts that only invalidated records produced: results computed from
    /// damaged data.
    pub tainted: Vec<ArtifactId>,
}

/// Outcome of [`ArtifactStore::gc`].
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub objects_removed: Vec<ArtifactId>,
    pub actions_removed: usize,
    pub staging_removed: usize,
    pub bytes_freed: u64,
    pub objects_kept: usize,
}

/// Outcome of [`ArtifactStore::push`] / [`ArtifactStore::pull`].
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub objects_copied: usize,
    pub objects_present: usize,
    pub actions_copied: usize,
    pub bytes_copied: u64,
    /// Keys of the action records added to the destination (it had none for them).
    pub actions_added: Vec<String>,
}

/// Why [`ArtifactStore::verify`] does not trust an action record.
enum Verdict {
    Unreadable,
    /// This output is damaged or missing.
    Output(String, ArtifactId),
    /// Computed from this damaged input ...
    FromDamaged(ArtifactId),
    /// ... or from this input, itself computed from damaged data.
    FromTainted(ArtifactId),
}

impl Verdict {
    fn text(&self) -> String {
        match self {
            Verdict::Unreadable => "unreadable action record".into(),
            Verdict::Output(port, id) => {
                format!("output {port} ({}) missing or damaged", id.short())
            }
            Verdict::FromDamaged(id) => format!("computed from damaged input {}", id.short()),
            Verdict::FromTainted(id) => format!(
                "computed from {}, itself computed from damaged data",
                id.short()
            ),
        }
    }
    fn blames_inputs(&self) -> bool {
        matches!(self, Verdict::FromDamaged(_) | Verdict::FromTainted(_))
    }
}

/// The content-addressed store rooted at one directory.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in [
            "objects", "actions", "staging", "locks", "scratch", "memo", "runs",
        ] {
            let p = root.join(sub);
            match std::fs::create_dir_all(&p).map_err(io_err(&p)) {
                Ok(()) => {}
                // A read-only store (someone else's, a read-only mount) is still readable;
                // what needs writing says so when it is attempted.
                Err(e) if e.is_read_only() && root.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        let root = std::path::absolute(root).map_err(io_err(root))?;
        Ok(ArtifactStore { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A directory for the caller's own records (run logs, indexes); the store never reads it.
    pub fn records_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// Where the stat memo for [`crate::PathHasher`] lives.
    pub fn memo_path(&self) -> PathBuf {
        self.root.join("memo").join("paths")
    }

    /// Shared lock held by every process using the store for a run.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        StoreLock::shared(&self.root.join("lock"))
    }

    /// Exclusive lock for maintenance; `None` while any run holds the shared lock.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>> {
        StoreLock::try_exclusive(&self.root.join("lock"))
    }

    /// Exclusive lock, waiting for runs to finish.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        StoreLock::exclusive(&self.root.join("lock"))
    }

    /// Waits for, then holds, the right to compute `key`.
    pub fn lock_key(&self, key: &str) -> Result<KeyLock> {
        KeyLock::acquire(&self.root.join("locks").join(format!("{key}.lock")))
    }

    /// Takes the right to compute `key` if nobody else has it now.
    pub fn try_lock_key(&self, key: &str) -> Result<Option<KeyLock>> {
        KeyLock::try_acquire(&self.root.join("locks").join(format!("{key}.lock")))
    }

    /// A fresh, empty staging directory.
    pub fn staging(&self) -> Result<Staging> {
        let path = self.root.join("staging").join(unique_name(""));
        std::fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(Staging { path, armed: true })
    }

    /// Path where artifact `id` lives (whether or not it exists).
    pub fn object_path(&self, id: &ArtifactId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("objects").join(&hex[..2]).join(hex)
    }

    /// Whether artifact `id` is in the store.
    pub fn contains(&self, id: &ArtifactId) -> bool {
        self.object_path(id).is_dir()
    }

    /// Hashes the staged tree and publishes it under its id by one rename. If the id already
    /// exists (same bytes computed before), the staged copy is discarded.
    pub fn commit(&self, staging: Staging) -> Result<ArtifactId> {
        let (id, _) = tree_id(&staging.path)?;
        self.commit_as(staging, &id)?;
        Ok(id)
    }

    /// Like [`Self::commit`], for a tree that must be artifact `expected` (one copied from
    /// elsewhere): hashes it once and publishes it only when the hash matches, else refuses
    /// with [`CacheError::HashMismatch`] and discards it.
    pub fn commit_as(&self, mut staging: Staging, expected: &ArtifactId) -> Result<()> {
        let (id, entries) = tree_id(&staging.path)?;
        if id != *expected {
            return Err(CacheError::HashMismatch {
                expected: expected.to_hex(),
                actual: id.to_hex(),
            });
        }
        let dest = self.object_path(&id);
        if dest.is_dir() {
            return Ok(());
        }
        make_read_only(&staging.path)?;
        let parent = dest.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        match std::fs::rename(&staging.path, &dest) {
            Ok(()) => {
                staging.armed = false;
                self.write_fingerprint(&id, &entries);
                Ok(())
            }
            Err(_) if dest.is_dir() => Ok(()),
            Err(e) => Err(io_err(&dest)(e)),
        }
    }

    fn action_path(&self, key: &str) -> PathBuf {
        let pre = key.get(..2).unwrap_or("__");
        self.root
            .join("actions")
            .join(pre)
            .join(format!("{key}.json"))
    }

    /// Records that `key` produced `outputs`. Call only after every output is committed.
    pub fn put_action(&self, record: &ActionRecord) -> Result<()> {
        for id in record.outputs.values() {
            if !self.contains(id) {
                return Err(CacheError::Invalid {
                    path: self.object_path(id),
                    message: "action names an artifact that is not in the store".into(),
                });
            }
        }
        let path = self.action_path(&record.key);
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| CacheError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    /// Removes the record for `key`; false if there was none.
    pub fn remove_action(&self, key: &str) -> Result<bool> {
        let path = self.action_path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Removes artifact `id` and its fingerprint.
    fn remove_object(&self, id: &ArtifactId) -> Result<()> {
        remove_tree(&self.object_path(id))?;
        let fp = self.fingerprint_path(id);
        match std::fs::remove_file(&fp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&fp)(e)),
            _ => Ok(()),
        }
    }

    /// The record for `key`, if it exists and all its outputs are present.
    pub fn action(&self, key: &str) -> Result<Option<ActionRecord>> {
        let path = self.action_path(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        // A damaged record is treated as absent: the key is recomputed, never trusted.
        let Ok(rec) = serde_json::from_slice::<ActionRecord>(&bytes) else {
            return Ok(None);
        };
        if rec.key != key || !rec.outputs.values().all(|id| self.contains(id)) {
            return Ok(None);
        }
        Ok(Some(rec))
    }

    /// Every action record in the store (damaged ones skipped).
    pub fn actions(&self) -> Result<Vec<ActionRecord>> {
        let mut out = Vec::new();
        for path in files_under(&self.root.join("actions"), 2)? {
            if path.extension().is_some_and(|e| e == "json") {
                if let Ok(bytes) = std::fs::read(&path) {
                    if let Ok(rec) = serde_json::from_slice::<ActionRecord>(&bytes) {
                        out.push(rec);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every artifact id present.
    pub fn objects(&self) -> Result<Vec<ArtifactId>> {
        let mut out = Vec::new();
        let objects = self.root.join("objects");
        for pre in read_dir_sorted(&objects)? {
            for obj in read_dir_sorted(&pre)? {
                if let Some(id) = obj
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<ArtifactId>().ok())
                {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    /// A directory for resumable state of `key`, kept across killed runs until removed.
    pub fn scratch_dir(&self, key: &str) -> Result<PathBuf> {
        let p = self.root.join("scratch").join(key);
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// Removes the scratch state of `key` (after its outputs are committed).
    pub fn clear_scratch(&self, key: &str) -> Result<()> {
        let p = self.root.join("scratch").join(key);
        if p.exists() {
            remove_tree(&p)?;
        }
        Ok(())
    }

    /// Rehashes every artifact and checks every action record. With `repair`, removes
    /// damaged artifacts and the records that point at them, so the next run recomputes them,
    /// and everything computed from damaged data (see [`Self::invalidated_by`]).
    pub fn verify(&self, repair: bool) -> Result<VerifyReport> {
        use rayon::prelude::*;
        let mut report = VerifyReport::default();
        let objects = self.objects()?;
        report.objects_checked = objects.len();
        let hashed: Vec<(ArtifactId, std::result::Result<Vec<TreeEntry>, String>)> = objects
            .par_iter()
            .map(|id| match tree_id(&self.object_path(id)) {
                Ok((actual, entries)) if actual == *id => (*id, Ok(entries)),
                Ok((actual, _)) => (*id, Err(format!("content hashes to {}", actual.short()))),
                Err(e) => (*id, Err(format!("unreadable: {e}"))),
            })
            .collect();
        let mut bad = Vec::new();
        for (id, result) in hashed {
            match result {
                // Intact: give it a fingerprint if it has none (a store from before them).
                Ok(entries) => {
                    if !self.fingerprint_path(&id).is_file() {
                        self.write_fingerprint(&id, &entries);
                    }
                }
                Err(problem) => bad.push((id, problem)),
            }
        }
        let bad_ids: HashSet<ArtifactId> = bad.iter().map(|(id, _)| *id).collect();
        for (id, problem) in bad {
            report.problems.push(VerifyProblem {
                path: self.object_path(&id),
                problem,
            });
        }
        let records: Vec<(PathBuf, Option<ActionRecord>)> =
            files_under(&self.root.join("actions"), 2)?
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .map(|p| {
                    let rec = std::fs::read(&p)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<ActionRecord>(&b).ok());
                    (p, rec)
                })
                .collect();
        report.actions_checked = records.len();
        let (invalid, derived) = self.invalidated_by(&records, &bad_ids);
        let mut tainted = BTreeMap::new();
        let mut remove_records = Vec::new();
        for ((path, rec), verdict) in records.iter().zip(&invalid) {
            let Some(verdict) = verdict else { continue };
            let who = rec
                .as_ref()
                .map(|r| match r.meta.get("stage").and_then(|s| s.as_str()) {
                    Some(stage) => format!("record of stage `{stage}`"),
                    None => format!("record {}", &r.key[..r.key.len().min(16)]),
                })
                .unwrap_or_else(|| "record".into());
            if let (Some(rec), true) = (rec, verdict.blames_inputs()) {
                report.invalidated.push(
                    rec.meta
                        .get("stage")
                        .and_then(|s| s.as_str())
                        .map(|s| format!("{s} ({})", &rec.key[..16.min(rec.key.len())]))
                        .unwrap_or_else(|| rec.key.clone()),
                );
                for id in rec.outputs.values() {
                    if derived.contains(id) && self.contains(id) {
                        tainted.entry(*id).or_insert_with(|| who.clone());
                    }
                }
            }
            report.problems.push(VerifyProblem {
                path: path.clone(),
                problem: format!("{who}: {}", verdict.text()),
            });
            remove_records.push(path.clone());
        }
        for (id, who) in &tainted {
            report.tainted.push(*id);
            report.problems.push(VerifyProblem {
                path: self.object_path(id),
                problem: format!("computed from damaged data ({who}); not trusted"),
            });
        }
        if repair {
            // Records first: a record never points at an artifact already removed.
            for path in &remove_records {
                std::fs::remove_file(path).map_err(io_err(path))?;
                report.repaired += 1;
            }
            for id in bad_ids.iter().chain(tainted.keys()) {
                self.remove_object(id)?;
                report.repaired += 1;
            }
        }
        Ok(report)
    }

    /// Which action records cannot be trusted once the artifacts in `damaged` are known bad:
    /// a record is invalid when it is unreadable, when an output is damaged or missing, or
    /// when it was computed from an input that is damaged or *tainted*. An artifact is
    /// tainted when a record invalidated for its inputs produced it and no valid record did:
    /// it is a result computed from bad data, so what was computed from it is suspect too.
    /// Computed as a fixpoint (taint only grows as records are invalidated). Records written
    /// before inputs were recorded cannot be traced and are only judged by their outputs.
    fn invalidated_by(
        &self,
        records: &[(PathBuf, Option<ActionRecord>)],
        damaged: &HashSet<ArtifactId>,
    ) -> (Vec<Option<Verdict>>, HashSet<ArtifactId>) {
        let mut verdicts: Vec<Option<Verdict>> = records
            .iter()
            .map(|(_, rec)| match rec {
                None => Some(Verdict::Unreadable),
                Some(r) => r
                    .outputs
                    .iter()
                    .find(|(_, id)| damaged.contains(id) || !self.contains(id))
                    .map(|(port, id)| Verdict::Output(port.clone(), *id)),
            })
            .collect();
        let mut tainted: HashSet<ArtifactId> = damaged.clone();
        loop {
            let mut changed = false;
            for (k, (_, rec)) in records.iter().enumerate() {
                let (None, Some(rec)) = (&verdicts[k], rec) else {
                    continue;
                };
                if let Some(id) = rec.inputs.iter().find(|id| tainted.contains(id)) {
                    verdicts[k] = Some(if damaged.contains(id) {
                        Verdict::FromDamaged(*id)
                    } else {
                        Verdict::FromTainted(*id)
                    });
                    changed = true;
                }
            }
            if !changed {
                tainted.retain(|id| !damaged.contains(id));
                return (verdicts, tainted);
            }
            let trusted: HashSet<ArtifactId> = records
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| v.is_none())
                .filter_map(|((_, r), _)| r.as_ref())
                .flat_map(|r| r.outputs.values().copied())
                .collect();
            for ((_, rec), v) in records.iter().zip(&verdicts) {
                if let (Some(rec), Some(true)) = (rec, v.as_ref().map(Verdict::blames_inputs)) {
                    tainted.extend(rec.outputs.values().filter(|id| !trusted.contains(id)));
                }
            }
        }
    }

    /// Removes every artifact not in `keep`, the action records that then point at nothing,
    /// leftover staging directories and key locks. The caller must hold the exclusive lock
    /// ([`Self::try_lock_exclusive`]) so no run is writing meanwhile.
    pub fn gc(&self, keep: &HashSet<ArtifactId>, dry_run: bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut gone = HashSet::new();
        for id in self.objects()? {
            if keep.contains(&id) {
                report.objects_kept += 1;
                continue;
            }
            let path = self.object_path(&id);
            report.bytes_freed += tree_size(&path);
            if !dry_run {
                self.remove_object(&id)?;
            }
            gone.insert(id);
            report.objects_removed.push(id);
        }
        for path in files_under(&self.root.join("actions"), 2)? {
            let rec = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<ActionRecord>(&b).ok());
            let dead = match rec {
                None => true,
                Some(r) => r
                    .outputs
                    .values()
                    .any(|id| gone.contains(id) || !self.contains(id)),
            };
            if dead {
                report.actions_removed += 1;
                if !dry_run {
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
        }
        for dir in read_dir_sorted(&self.root.join("staging"))? {
            report.staging_removed += 1;
            report.bytes_freed += tree_size(&dir);
            if !dry_run {
                remove_tree(&dir)?;
            }
        }
        if !dry_run {
            for lock in read_dir_sorted(&self.root.join("locks"))? {
                let _ = std::fs::remove_file(lock);
            }
            // Fingerprints of artifacts that are gone.
            for fp in files_under(&self.root.join("stat"), 2)? {
                let id = fp
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse().ok());
                if id.is_none_or(|id| !self.contains(&id)) {
                    let _ = std::fs::remove_file(fp);
                }
            }
        }
        Ok(report)
    }

    /// Copies artifacts (all, or those in `only`) and the action records whose outputs all
    /// exist from this store into `dest`. Every artifact is rehashed on arrival. Each record
    /// added to `dest` says where it came from in `meta.origin`
    /// (`{"pushed_from": <this store>, "at": <time>}`).
    pub fn push(
        &self,
        dest: &ArtifactStore,
        only: Option<&HashSet<ArtifactId>>,
    ) -> Result<SyncReport> {
        sync(self, dest, only, "pushed_from")
    }

    /// Copies from `src` into this store; see [`Self::push`]. Records added here carry
    /// `meta.origin = {"pulled_from": <src>, "at": <time>}`. Artifacts are verified by their
    /// hash, but a record only maps a key to ids: whoever wrote `src` decides what a pulled
    /// key resolves to (see `fpipe cache pull --check`).
    pub fn pull(
        &self,
        src: &ArtifactStore,
        only: Option<&HashSet<ArtifactId>>,
    ) -> Result<SyncReport> {
        sync(src, self, only, "pulled_from")
    }
}

/// Seconds since the epoch, now.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `2026-11-23T19:05:01Z` for a unix time.
pub fn iso8601(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

impl ActionRecord {
    /// This record with `meta.origin = {how: from, "at": at}` stamped on it (`how` is
    /// `pulled_from` or `pushed_from`), keeping an earlier origin under `earlier`.
    pub fn with_origin(self, how: &str, from: &str, at: &str) -> ActionRecord {
        with_origin(self, how, from, at)
    }
}

/// Stamps `meta.origin` on a copied record, keeping an earlier origin under `earlier`.
fn with_origin(mut rec: ActionRecord, how: &str, from: &str, at: &str) -> ActionRecord {
    let mut origin = serde_json::json!({ how: from, "at": at });
    if let Some(earlier) = rec.meta.get("origin") {
        origin["earlier"] = earlier.clone();
    }
    match &mut rec.meta {
        serde_json::Value::Object(m) => {
            m.insert("origin".into(), origin);
        }
        serde_json::Value::Null => rec.meta = serde_json::json!({ "origin": origin }),
        other => *other = serde_json::json!({ "value": other.clone(), "origin": origin }),
    }
    rec
}

fn sync(
    src: &ArtifactStore,
    dst: &ArtifactStore,
    only: Option<&HashSet<ArtifactId>>,
    how: &str,
) -> Result<SyncReport> {
    let mut report = SyncReport::default();
    for id in src.objects()? {
        if only.is_some_and(|o| !o.contains(&id)) {
            continue;
        }
        if dst.contains(&id) {
            report.objects_present += 1;
            continue;
        }
        let staging = dst.staging()?;
        let from = src.object_path(&id);
        report.bytes_copied += copy_tree(&from, staging.path())?;
        dst.commit_as(staging, &id)?;
        report.objects_copied += 1;
    }
    let at = iso8601(now_unix());
    for rec in src.actions()? {
        if rec.outputs.values().all(|id| dst.contains(id)) && dst.action(&rec.key)?.is_none() {
            let key = rec.key.clone();
            dst.put_action(&with_origin(rec, how, &src.root().to_string_lossy(), &at))?;
            report.actions_copied += 1;
            report.actions_added.push(key);
        }
    }
    Ok(report)
}

/// Copies a tree's files (not its permissions' read-only bits) and returns the bytes copied.
pub fn copy_tree(from: &Path, to: &Path) -> Result<u64> {
    let mut bytes = 0;
    for (rel, abs, is_dir) in walk(from)? {
        let target = to.join(&rel);
        if is_dir {
            std::fs::create_dir_all(&target).map_err(io_err(&target))?;
            continue;
        }
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p).map_err(io_err(p))?;
        }
        bytes += std::fs::copy(&abs, &target).map_err(io_err(&target))?;
        set_writable(&target)?;
    }
    Ok(bytes)
}

#[cfg(unix)]
fn set_writable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() | 0o200;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}
#[cfg(not(unix))]
fn set_writable(_path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(unix)]
fn make_read_only(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (_, abs, is_dir) in walk(root)? {
        if is_dir {
            continue;
        }
        let meta = std::fs::metadata(&abs).map_err(io_err(&abs))?;
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o555
        } else {
            0o444
        };
        std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&abs))?;
    }
    Ok(())
}
#[cfg(not(unix))]
fn make_read_only(_root: &Path) -> Result<()> {
    Ok(())
}

/// Removes a directory tree, first renaming it aside so that a crash half-way never leaves a
/// half-deleted tree under a trusted name.
fn remove_tree(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let aside = parent.join(unique_name(".deleting-"));
    match std::fs::rename(path, &aside) {
        Ok(()) => std::fs::remove_dir_all(&aside).map_err(io_err(&aside)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => std::fs::remove_dir_all(path).map_err(io_err(path)),
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn files_under(dir: &Path, depth: usize) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in read_dir_sorted(dir)? {
        if p.is_dir() && depth > 1 {
            out.extend(files_under(&p, depth - 1)?);
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(store: &ArtifactStore, files: &[(&str, &str)]) -> Staging {
        let s = store.staging().unwrap();
        for (name, body) in files {
            let p = s.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        s
    }

    #[test]
    fn commit_is_content_addressed_and_dedupes() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        let a = store.commit(staged(&store, &[("m/x.txt", "1")])).unwrap();
        let b = store.commit(staged(&store, &[("m/x.txt", "1")])).unwrap();
        assert_eq!(a, b);
        assert!(store.contains(&a));
        assert_eq!(
            std::fs::read_to_string(store.object_path(&a).join("m/x.txt")).unwrap(),
            "1"
        );
        assert_eq!(read_dir_sorted(&d.path().join("staging")).unwrap().len(), 0);
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        drop(staged(&store, &[("a", "1")]));
        assert!(store.objects().unwrap().is_empty());
        assert_eq!(read_dir_sorted(&d.path().join("staging")).unwrap().len(), 0);
    }

    #[test]
    fn actions_need_their_outputs() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        let id = store.commit(staged(&store, &[("a", "1")])).unwrap();
        let rec = ActionRecord {
            key: "k1".repeat(32),
            outputs: [("out".to_string(), id)].into(),
            inputs: vec![],
            meta: serde_json::json!({"metrics": {"acc": 0.5}}),
        };
        store.put_action(&rec).unwrap();
        assert_eq!(store.action(&rec.key).unwrap(), Some(rec.clone()));
        let missing = ActionRecord {
            key: "k2".repeat(32),
            outputs: [("out".to_string(), ArtifactId([1; 32]))].into(),
            inputs: vec![],
            meta: serde_json::Value::Null,
        };
        assert!(store.put_action(&missing).is_err());
        // gc without keeping `id` removes the artifact and then the record.
        let r = store.gc(&HashSet::new(), true).unwrap();
        assert_eq!(r.objects_removed, vec![id]);
        assert!(store.contains(&id), "dry run removes nothing");
        let r = store.gc(&HashSet::new(), false).unwrap();
        assert_eq!(r.actions_removed, 1);
        assert!(!store.contains(&id));
        assert_eq!(store.action(&rec.key).unwrap(), None);
    }

    #[test]
    fn verify_finds_and_repairs_damage() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        let id = store.commit(staged(&store, &[("a", "1")])).unwrap();
        let good = store.commit(staged(&store, &[("b", "2")])).unwrap();
        store
            .put_action(&ActionRecord {
                key: "aa".repeat(32),
                outputs: [("out".to_string(), id)].into(),
                inputs: vec![],
                meta: serde_json::Value::Null,
            })
            .unwrap();
        assert!(store.verify(false).unwrap().problems.is_empty());
        let f = store.object_path(&id).join("a");
        set_writable(&f).unwrap();
        std::fs::write(&f, "tampered").unwrap();
        let r = store.verify(false).unwrap();
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        let r = store.verify(true).unwrap();
        assert_eq!(r.repaired, 2);
        assert!(!store.contains(&id));
        assert!(store.contains(&good));
        assert!(store.verify(false).unwrap().problems.is_empty());
    }

    fn record(
        store: &ArtifactStore,
        key: &str,
        stage: &str,
        inputs: &[ArtifactId],
        body: &str,
    ) -> ArtifactId {
        let id = store.commit(staged(store, &[("o", body)])).unwrap();
        store
            .put_action(&ActionRecord {
                key: key.repeat(32),
                outputs: [("out".to_string(), id)].into(),
                inputs: inputs.to_vec(),
                meta: serde_json::json!({ "stage": stage }),
            })
            .unwrap();
        id
    }

    #[test]
    fn repair_invalidates_everything_computed_from_damage() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        // a -> b -> c, and x independent; y reads x and b; z reads x only.
        let a = record(&store, "a1", "a", &[], "A");
        let b = record(&store, "b1", "b", &[a], "B");
        let c = record(&store, "c1", "c", &[b], "C");
        let x = record(&store, "d1", "x", &[], "X");
        let y = record(&store, "e1", "y", &[x, b], "Y");
        let z = record(&store, "f1", "z", &[x], "Z");
        // A second, valid record that also produced C's bytes keeps them trusted.
        let c2 = record(&store, "f2", "c-again", &[x], "C");
        assert_eq!(c, c2);
        assert!(store.verify(false).unwrap().problems.is_empty());
        let f = store.object_path(&a).join("o");
        set_writable(&f).unwrap();
        std::fs::write(&f, "a").unwrap();
        let r = store.verify(false).unwrap();
        let mut inv = r.invalidated.clone();
        inv.sort();
        assert_eq!(
            inv.iter()
                .map(|s| s.split(' ').next().unwrap())
                .collect::<Vec<_>>(),
            ["b", "c", "y"],
            "{:#?}",
            r.problems
        );
        let mut tainted = r.tainted.clone();
        tainted.sort();
        let mut want = vec![b, y];
        want.sort();
        assert_eq!(tainted, want, "C is also the output of a valid record");
        // a's record (output damaged), b, c, y records, the damaged a, the tainted b and y.
        assert_eq!(r.problems.len(), 1 + 4 + 2, "{:#?}", r.problems);
        assert!(store.contains(&a), "nothing removed without repair");
        let r = store.verify(true).unwrap();
        assert_eq!(r.repaired, 7);
        for (id, kept) in [
            (a, false),
            (b, false),
            (y, false),
            (c, true),
            (x, true),
            (z, true),
        ] {
            assert_eq!(store.contains(&id), kept, "{id:?}");
        }
        let keys: Vec<String> = store
            .actions()
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, ["d1".repeat(32), "f1".repeat(32), "f2".repeat(32)]);
        assert!(store.verify(false).unwrap().problems.is_empty());
        assert!(
            files_under(&d.path().join("stat"), 2).unwrap().len() == 3,
            "fingerprints of removed artifacts go with them"
        );
    }

    #[test]
    fn records_without_inputs_still_load() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        let id = store.commit(staged(&store, &[("a", "1")])).unwrap();
        let key = "ab".repeat(32);
        let old = format!(r#"{{"key": "{key}", "outputs": {{"out": "{id}"}}, "meta": null}}"#);
        write_atomic(&store.action_path(&key), old.as_bytes()).unwrap();
        let rec = store.action(&key).unwrap().unwrap();
        assert!(rec.inputs.is_empty());
        assert!(store.remove_action(&key).unwrap());
        assert!(!store.remove_action(&key).unwrap());
        assert_eq!(store.action(&key).unwrap(), None);
    }

    #[test]
    fn io_errors_say_their_cause_once() {
        let e = io_err("/x/lock")(std::io::Error::from_raw_os_error(13));
        assert!(e.is_read_only());
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::PermissionDenied));
        assert!(
            std::error::Error::source(&e).is_none(),
            "shown in the message, not again"
        );
        assert_eq!(e.to_string().matches("os error 13").count(), 1, "{e}");
    }

    #[test]
    fn push_copies_and_checks() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = ArtifactStore::open(a.path()).unwrap();
        let sb = ArtifactStore::open(b.path()).unwrap();
        let id = sa.commit(staged(&sa, &[("x/y", "data")])).unwrap();
        let rec = ActionRecord {
            key: "bb".repeat(32),
            outputs: [("out".to_string(), id)].into(),
            inputs: vec![],
            meta: serde_json::Value::Null,
        };
        sa.put_action(&rec).unwrap();
        let r = sa.push(&sb, None).unwrap();
        assert_eq!((r.objects_copied, r.actions_copied), (1, 1));
        assert_eq!(r.actions_added, vec![rec.key.clone()]);
        assert!(sb.contains(&id));
        let pushed = sb.action(&rec.key).unwrap().unwrap();
        assert_eq!((&pushed.key, &pushed.outputs), (&rec.key, &rec.outputs));
        assert_eq!(
            pushed.meta["origin"]["pushed_from"],
            sa.root().to_string_lossy().as_ref()
        );
        let r = sb.pull(&sa, None).unwrap();
        assert_eq!((r.objects_copied, r.objects_present), (0, 1));
        // A damaged source artifact is refused on arrival.
        let c = tempfile::tempdir().unwrap();
        let sc = ArtifactStore::open(c.path()).unwrap();
        let f = sa.object_path(&id).join("x/y");
        set_writable(&f).unwrap();
        std::fs::write(&f, "evil").unwrap();
        assert!(matches!(
            sa.push(&sc, None),
            Err(CacheError::HashMismatch { .. })
        ));
        assert!(!sc.contains(&id));
    }

    #[test]
    fn key_locks_exclude() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path()).unwrap();
        let held = store.try_lock_key("k").unwrap();
        assert!(held.is_some());
        // A second open file description conflicts even within one process.
        assert!(store.try_lock_key("k").unwrap().is_none());
        drop(held);
        assert!(store.try_lock_key("k").unwrap().is_some());
        let shared = store.lock_shared().unwrap();
        assert!(store.try_lock_exclusive().unwrap().is_none());
        drop(shared);
        assert!(store.try_lock_exclusive().unwrap().is_some());
    }
}
