//! fpipe-remote: a remote cache on object storage, for an [`ArtifactStore`].
//!
//! A remote is a URL: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`,
//! `file:///path`. Access goes through the Arrow project's `object_store` crate, and
//! credentials and endpoints come from each cloud's usual environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, ...), never
//! from a pipeline. Layout under the prefix:
//!
//! ```text
//! objects/ab/<id>.pack     one artifact tree as one object (see `pack`)
//! actions/ab/<key>.json    action records, written only after every output they name
//! ```
//!
//! Like the local store this crate knows bytes and hashes only. Every artifact that arrives
//! is unpacked into a staging folder of the local store and published only when its tree
//! hashes to its id; an object store publishes an upload whole or not at all (a single PUT,
//! or a multipart upload that is completed only after its last part), so a killed transfer
//! leaves nothing partial on either side. The async runtime is owned here: callers see
//! blocking functions.

mod pack;

use bytes::Bytes;
use fpipe_cache::{ActionRecord, ArtifactId, ArtifactStore, CacheError};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

pub use pack::PackError;

/// Objects moved at once.
const JOBS: usize = 16;
/// Size of the pieces a pack is read, sent and (for large artifacts) uploaded in; above it an
/// upload is multipart. S3 needs parts of at least 5 MiB.
const PART: usize = 8 << 20;
/// Parts of one multipart upload in flight at once: a single large artifact is limited by
/// the round trip of each part, so several go at once (as boto3's 10 threads do).
const PARTS_IN_FLIGHT: usize = 8;
/// Multipart uploads at once (each holds about 11 parts in memory: one being read, one
/// queued, one being filled, eight in flight).
const LARGE_AT_ONCE: usize = 2;

/// Errors of a remote. Each names the remote object or URL it concerns.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote {url:?}: {message}")]
    BadUrl { url: String, message: String },
    /// The object store refused or failed a request (network, credentials, permissions).
    #[error("{url}: {message}")]
    Store { url: String, message: String },
    /// A remote object that is not what its name says: damaged, truncated or replaced.
    #[error("remote object {url} is corrupt: {problem}")]
    Corrupt { url: String, problem: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Some transfers failed; the others completed. Nothing partial was stored.
    #[error("{failed} of {total} transfers failed (nothing partial was stored; what completed is kept, run again to retry):\n  {}", .problems.join("\n  "))]
    Incomplete {
        failed: usize,
        total: usize,
        problems: Vec<String>,
        /// What the transfers that completed did.
        report: Box<SyncReport>,
    },
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
}

impl RemoteError {
    /// Whether this error, or one of the failed transfers it lists, is corruption.
    pub fn is_corruption(&self) -> bool {
        match self {
            RemoteError::Corrupt { .. } => true,
            RemoteError::Incomplete { problems, .. } => {
                problems.iter().any(|p| p.contains(" is corrupt: "))
            }
            _ => false,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, RemoteError>;

/// What a transfer did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SyncReport {
    pub objects_copied: usize,
    pub objects_present: usize,
    pub bytes_copied: u64,
    pub actions_copied: usize,
    /// Keys of the action records added to the receiving side.
    pub actions_added: Vec<String>,
}

/// What a remote gc found (and removed, unless a dry run).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RemoteGcReport {
    pub objects_removed: Vec<ArtifactId>,
    pub actions_removed: Vec<String>,
    pub bytes_freed: u64,
    pub objects_kept: usize,
}

/// Told about a transfer as it goes; called from several threads.
pub trait Progress: Send + Sync {
    /// A transfer of `objects` objects of about `bytes` bytes (0: unknown) starts.
    fn start(&self, _what: &str, _objects: u64, _bytes: u64) {}
    /// `n` more bytes moved.
    fn bytes(&self, _n: u64) {}
    /// One more object done.
    fn object(&self) {}
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A remote cache.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// The schemes a remote URL may have, for messages.
pub const SCHEMES: &str =
    "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///PATH";

/// Whether `s` is meant as a remote URL (has a scheme) rather than a local folder.
pub fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        // FPIPE_REMOTE_RETRIES: how often a failed request is retried (default 3; 0 in tests
        // that cut the connection on purpose).
        max_retries: std::env::var("FPIPE_REMOTE_RETRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
        retry_timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    }
}

/// The S3 endpoint the environment sets, if any.
fn aws_endpoint() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
}

impl Remote {
    /// Opens the remote at `url`. Nothing is contacted yet: a wrong endpoint or missing
    /// credentials show in the first transfer.
    pub fn open(url: &str) -> Result<Remote> {
        let bad = |message: String| RemoteError::BadUrl {
            url: url.to_string(),
            message,
        };
        let parsed = url::Url::parse(url)
            .map_err(|e| bad(format!("not a URL ({e}); a remote is {SCHEMES}")))?;
        let (scheme, path) = ObjectStoreScheme::parse(&parsed)
            .map_err(|_| bad(format!("unknown kind of remote; a remote is {SCHEMES}")))?;
        let build = |e: object_store::Error| bad(e.to_string());
        let (store, prefix): (Arc<dyn ObjectStore>, ObjPath) = match scheme {
            ObjectStoreScheme::Local => {
                // Rooted at `/` with the folder as prefix: opening a remote creates nothing
                // (`validate` only names it); the first upload creates the folders.
                if parsed.to_file_path().is_err() {
                    return Err(bad("not a local path".into()));
                }
                (Arc::new(object_store::local::LocalFileSystem::new()), path)
            }
            ObjectStoreScheme::AmazonS3 => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_retry(retry_config());
                // An endpoint on plain http (a local S3-compatible server) is the user's
                // explicit choice; object_store refuses http unless told.
                if aws_endpoint().is_some_and(|e| e.starts_with("http://")) {
                    b = b.with_allow_http(true);
                }
                (Arc::new(b.build().map_err(build)?), path)
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry_config());
                (Arc::new(b.build().map_err(build)?), path)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                let b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry_config());
                (Arc::new(b.build().map_err(build)?), path)
            }
            _ => {
                return Err(bad(format!(
                    "this kind of remote is not supported; a remote is {SCHEMES}"
                )))
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("fpipe-remote")
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        Ok(Remote {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
            rt,
        })
    }

    /// The remote's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where requests for this remote go, as the environment configures it (for `validate`).
    pub fn describe(url: &str) -> String {
        let scheme = url.split("://").next().unwrap_or("");
        match scheme {
            "s3" | "s3a" => match aws_endpoint() {
                Some(e) => format!("{url} (S3 API at {e}, from AWS_ENDPOINT_URL)"),
                None => format!("{url} (Amazon S3)"),
            },
            "gs" => format!("{url} (Google Cloud Storage)"),
            "az" | "azure" | "abfs" | "abfss" | "adl" => format!("{url} (Azure Blob Storage)"),
            "file" => format!("{url} (a local folder)"),
            _ => url.to_string(),
        }
    }

    fn object_path(&self, id: &ArtifactId) -> ObjPath {
        let hex = id.to_hex();
        self.prefix
            .clone()
            .join("objects")
            .join(&hex[..2])
            .join(format!("{hex}.pack"))
    }

    fn action_path(&self, key: &str) -> ObjPath {
        let pre = key.get(..2).unwrap_or("__");
        self.prefix
            .clone()
            .join("actions")
            .join(pre)
            .join(format!("{key}.json"))
    }

    /// The full URL of an object, for messages.
    fn show(&self, p: &ObjPath) -> String {
        let rel = p
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(p.as_ref())
            .trim_start_matches('/');
        format!("{}/{rel}", self.url)
    }

    fn store_err(&self, p: &ObjPath) -> impl Fn(object_store::Error) -> RemoteError + '_ {
        let url = self.show(p);
        move |e| RemoteError::Store {
            url: url.clone(),
            message: short_store_error(&e),
        }
    }

    /// Names (without `suffix`) and sizes of the objects under `folder` whose names end in
    /// `suffix`.
    fn list_named(&self, folder: &str, suffix: &str) -> Result<Vec<(String, u64)>> {
        let dir = self.prefix.clone().join(folder);
        let err = self.store_err(&dir);
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut list = self.store.list(Some(&dir));
            while let Some(meta) = list.next().await {
                let meta = meta.map_err(&err)?;
                if let Some(name) = meta
                    .location
                    .filename()
                    .and_then(|n| n.strip_suffix(suffix))
                {
                    out.push((name.to_string(), meta.size));
                }
            }
            Ok(out)
        })
    }

    /// Ids of the artifacts on the remote, with the size of each pack.
    pub fn objects(&self) -> Result<BTreeMap<ArtifactId, u64>> {
        Ok(self
            .list_named("objects", ".pack")?
            .into_iter()
            .filter_map(|(name, size)| Some((name.parse::<ArtifactId>().ok()?, size)))
            .collect())
    }

    /// Keys of the action records on the remote.
    pub fn action_keys(&self) -> Result<HashSet<String>> {
        Ok(self
            .list_named("actions", ".json")?
            .into_iter()
            .map(|(key, _)| key)
            .filter(|k| valid_key(k))
            .collect())
    }

    /// Uploads the artifacts `ids` that the remote lacks (read from `store`), then the
    /// `records` it lacks whose outputs are all on the remote. A record uploaded carries
    /// `meta.origin.pushed_from` = the local store.
    pub fn push(
        &self,
        store: &ArtifactStore,
        ids: &[ArtifactId],
        records: &[ActionRecord],
        progress: &dyn Progress,
    ) -> Result<SyncReport> {
        let there = self.objects()?;
        let keys_there = self.action_keys()?;
        let mut report = SyncReport::default();
        let mut want: Vec<ArtifactId> = Vec::new();
        let mut seen = HashSet::new();
        for id in ids {
            if !seen.insert(*id) {
                continue;
            }
            if there.contains_key(id) {
                report.objects_present += 1;
            } else {
                if !store.contains(id) {
                    return Err(CacheError::Invalid {
                        path: store.object_path(id),
                        message: "artifact to push is not in the local cache".into(),
                    }
                    .into());
                }
                want.push(*id);
            }
        }
        let sizes: Vec<u64> = want
            .iter()
            .map(|id| fpipe_cache::tree_size(&store.object_path(id)))
            .collect();
        progress.start("push", want.len() as u64, sizes.iter().sum());
        let large = tokio::sync::Semaphore::new(LARGE_AT_ONCE);
        let results: Vec<(ArtifactId, Result<u64>)> = self.rt.block_on(async {
            futures::stream::iter(want.iter().copied().zip(sizes))
                .map(|(id, size)| {
                    let large = &large;
                    async move {
                        let _turn = match size >= PART as u64 {
                            true => large.acquire().await.ok(),
                            false => None,
                        };
                        (id, self.upload(store, id, progress).await)
                    }
                })
                .buffer_unordered(JOBS)
                .collect()
                .await
        });
        let mut problems = Vec::new();
        let mut on_remote: HashSet<ArtifactId> = there.keys().copied().collect();
        for (id, r) in results {
            match r {
                Ok(bytes) => {
                    report.objects_copied += 1;
                    report.bytes_copied += bytes;
                    on_remote.insert(id);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        let total = want.len();
        let at = fpipe_cache::iso8601(fpipe_cache::now_unix());
        let from = store.root().to_string_lossy().to_string();
        let send: Vec<&ActionRecord> = records
            .iter()
            .filter(|r| !keys_there.contains(&r.key))
            .filter(|r| r.outputs.values().all(|id| on_remote.contains(id)))
            .collect();
        let sent: Vec<(String, Result<()>)> = self.rt.block_on(async {
            futures::stream::iter(send)
                .map(|rec| {
                    let rec = rec.clone().with_origin("pushed_from", &from, &at);
                    async move {
                        let key = rec.key.clone();
                        (key, self.put_record(&rec).await)
                    }
                })
                .buffer_unordered(JOBS)
                .collect()
                .await
        });
        for (key, r) in sent {
            match r {
                Ok(()) => {
                    report.actions_copied += 1;
                    report.actions_added.push(key);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        report.actions_added.sort();
        finish(report, problems, total)
    }

    async fn put_record(&self, rec: &ActionRecord) -> Result<()> {
        let path = self.action_path(&rec.key);
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| RemoteError::Store {
            url: self.show(&path),
            message: e.to_string(),
        })?;
        self.store
            .put(&path, Bytes::from(bytes).into())
            .await
            .map_err(self.store_err(&path))?;
        Ok(())
    }

    /// Sends one artifact as a pack: read on a blocking thread, a few pieces ahead at most,
    /// uploaded in one PUT when small and as a multipart upload (completed only after its
    /// last part) when large.
    async fn upload(
        &self,
        store: &ArtifactStore,
        id: ArtifactId,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let path = self.object_path(&id);
        let dir = store.object_path(&id);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::result::Result<Vec<u8>, PackError>>(1);
        let reader = tokio::task::spawn_blocking(move || {
            let sent = pack::pack_tree::<PackError>(&dir, &id, PART, |chunk| {
                // A closed channel means the upload failed; stop reading.
                tx.blocking_send(Ok(chunk))
                    .map_err(|_| PackError::Malformed("upload stopped".into()))
            });
            if let Err(e) = sent {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let mut w = object_store::buffered::BufWriter::with_capacity(
            Arc::clone(&self.store),
            path.clone(),
            PART,
        )
        .with_max_concurrency(PARTS_IN_FLIGHT);
        let mut bytes = 0u64;
        let mut failed: Option<RemoteError> = None;
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Ok(chunk) => {
                    let n = chunk.len() as u64;
                    if let Err(e) = w.put(Bytes::from(chunk)).await {
                        failed = Some(self.store_err(&path)(e));
                        break;
                    }
                    bytes += n;
                    progress.bytes(n);
                }
                Err(e) => {
                    failed = Some(RemoteError::Cache(CacheError::Invalid {
                        path: store.object_path(&id),
                        message: format!("cannot read the artifact to push: {e}"),
                    }));
                    break;
                }
            }
        }
        drop(rx);
        let _ = reader.await;
        if let Some(e) = failed {
            let _ = w.abort().await;
            return Err(e);
        }
        use tokio::io::AsyncWriteExt;
        if let Err(e) = w.shutdown().await {
            return Err(RemoteError::Store {
                url: self.show(&path),
                message: e.to_string(),
            });
        }
        progress.object();
        Ok(bytes)
    }

    /// Downloads the artifacts `ids` that `store` lacks. Each is unpacked into a staging
    /// folder as it arrives and published only when it hashes to its id; a corrupt or
    /// truncated object is named and nothing of it is kept.
    pub fn fetch_artifacts(
        &self,
        store: &ArtifactStore,
        ids: &[ArtifactId],
        progress: &dyn Progress,
    ) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let mut want = Vec::new();
        let mut seen = HashSet::new();
        for id in ids {
            if !seen.insert(*id) {
                continue;
            }
            if store.contains(id) {
                report.objects_present += 1;
            } else {
                want.push(*id);
            }
        }
        progress.start("pull", want.len() as u64, 0);
        let results: Vec<Result<u64>> = self.rt.block_on(async {
            futures::stream::iter(want.iter().copied())
                .map(|id| self.download(store, id, progress))
                .buffer_unordered(JOBS)
                .collect()
                .await
        });
        let mut problems = Vec::new();
        for r in results {
            match r {
                Ok(bytes) => {
                    report.objects_copied += 1;
                    report.bytes_copied += bytes;
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        finish(report, problems, want.len())
    }

    async fn download(
        &self,
        store: &ArtifactStore,
        id: ArtifactId,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let path = self.object_path(&id);
        let url = self.show(&path);
        let corrupt = |problem: String| RemoteError::Corrupt {
            url: url.clone(),
            problem,
        };
        let got = self.store.get(&path).await.map_err(self.store_err(&path))?;
        let staging = store.staging()?;
        let mut un = pack::Unpacker::new(staging.path());
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.try_next().await.map_err(self.store_err(&path))? {
            un.feed(&chunk).map_err(|e| match e {
                PackError::Malformed(m) => corrupt(m),
                e @ PackError::Io { .. } => RemoteError::Cache(CacheError::Invalid {
                    path: store.root().join("staging"),
                    message: e.to_string(),
                }),
            })?;
            progress.bytes(chunk.len() as u64);
        }
        let bytes = un.bytes();
        let named = un.finish().map_err(|e| corrupt(e.to_string()))?;
        if named != id {
            return Err(corrupt(format!(
                "it holds artifact {}, not the one it is named by",
                named.short()
            )));
        }
        let s = store.clone();
        let published = tokio::task::spawn_blocking(move || s.commit_as(staging, &id))
            .await
            .map_err(|e| RemoteError::Runtime(std::io::Error::other(e.to_string())))?;
        match published {
            Ok(()) => {}
            Err(CacheError::HashMismatch { actual, .. }) => {
                return Err(corrupt(format!(
                    "its files hash to {}, not to the artifact id it is named by; not stored",
                    &actual[..12.min(actual.len())]
                )))
            }
            Err(e) => return Err(e.into()),
        }
        progress.object();
        Ok(bytes)
    }

    /// The remote's records for `keys` (those it has; a key it lacks is skipped). A record
    /// that is not valid JSON for its key is corruption, named.
    pub fn fetch_records(&self, keys: &[String]) -> Result<Vec<ActionRecord>> {
        let (out, problems) = self.fetch_records_partial(keys);
        finish(SyncReport::default(), problems, keys.len()).map(|_| out)
    }

    /// The records of `keys` that could be read, and what went wrong with the others.
    fn fetch_records_partial(&self, keys: &[String]) -> (Vec<ActionRecord>, Vec<String>) {
        let keys: Vec<&String> = keys.iter().filter(|k| valid_key(k)).collect();
        let results: Vec<Result<Option<ActionRecord>>> = self.rt.block_on(async {
            futures::stream::iter(keys)
                .map(|key| self.get_record(key))
                .buffer_unordered(JOBS)
                .collect()
                .await
        });
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for r in results {
            match r {
                Ok(Some(rec)) => out.push(rec),
                Ok(None) => {}
                Err(e) => problems.push(e.to_string()),
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        (out, problems)
    }

    async fn get_record(&self, key: &str) -> Result<Option<ActionRecord>> {
        let path = self.action_path(key);
        let bytes = match self.store.get(&path).await {
            Ok(g) => g.bytes().await.map_err(self.store_err(&path))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err(&path)(e)),
        };
        let rec: ActionRecord =
            serde_json::from_slice(&bytes).map_err(|e| RemoteError::Corrupt {
                url: self.show(&path),
                problem: format!("not an action record: {e}"),
            })?;
        if rec.key != key {
            return Err(RemoteError::Corrupt {
                url: self.show(&path),
                problem: format!("it is the record of key {}", rec.key),
            });
        }
        Ok(Some(rec))
    }

    /// Pulls the records of `keys` (all the remote has, when `None`) that `store` lacks, with
    /// the artifacts they name, and adds each record whose outputs all arrived intact, stamped
    /// `meta.origin = {"pulled_from": URL, "at": TIME}`.
    pub fn pull(
        &self,
        store: &ArtifactStore,
        keys: Option<&[String]>,
        progress: &dyn Progress,
    ) -> Result<SyncReport> {
        let keys: Vec<String> = match keys {
            Some(k) => k.to_vec(),
            None => {
                let mut k: Vec<String> = self.action_keys()?.into_iter().collect();
                k.sort();
                k
            }
        };
        let missing: Vec<String> = keys
            .into_iter()
            .filter(|k| matches!(store.action(k), Ok(None)))
            .collect();
        let (records, mut problems) = self.fetch_records_partial(&missing);
        let mut total = problems.len() + records.len();
        let ids: Vec<ArtifactId> = records
            .iter()
            .flat_map(|r| r.outputs.values().copied())
            .collect();
        let mut report = match self.fetch_artifacts(store, &ids, progress) {
            Ok(r) => r,
            Err(RemoteError::Incomplete {
                problems: p,
                total: t,
                report,
                ..
            }) => {
                problems.extend(p);
                total += t;
                *report
            }
            Err(e) => return Err(e),
        };
        let at = fpipe_cache::iso8601(fpipe_cache::now_unix());
        for rec in records {
            if rec.outputs.values().all(|id| store.contains(id))
                && store.action(&rec.key)?.is_none()
            {
                let key = rec.key.clone();
                store.put_action(&rec.with_origin("pulled_from", &self.url, &at))?;
                report.actions_copied += 1;
                report.actions_added.push(key);
            }
        }
        finish(report, problems, total)
    }

    /// Removes the remote objects not in `keep` and the records naming an artifact removed or
    /// missing (with `dry_run`, only says what it would remove).
    pub fn gc(&self, keep: &HashSet<ArtifactId>, dry_run: bool) -> Result<RemoteGcReport> {
        let objects = self.objects()?;
        let mut report = RemoteGcReport::default();
        let mut gone = HashSet::new();
        for (id, size) in &objects {
            if keep.contains(id) {
                report.objects_kept += 1;
            } else {
                gone.insert(*id);
                report.objects_removed.push(*id);
                report.bytes_freed += size;
            }
        }
        let mut keys: Vec<String> = self.action_keys()?.into_iter().collect();
        keys.sort();
        // Records first: a record never names an artifact already removed.
        let records = self.rt.block_on(async {
            futures::stream::iter(keys.iter())
                .map(|k| async move { (k.clone(), self.get_record(k).await) })
                .buffer_unordered(JOBS)
                .collect::<Vec<_>>()
                .await
        });
        for (key, rec) in records {
            let dead = match rec {
                Ok(Some(r)) => r
                    .outputs
                    .values()
                    .any(|id| gone.contains(id) || !objects.contains_key(id)),
                Ok(None) => false,
                Err(RemoteError::Corrupt { .. }) => true,
                Err(e) => return Err(e),
            };
            if dead {
                report.actions_removed.push(key);
            }
        }
        report.actions_removed.sort();
        if dry_run {
            return Ok(report);
        }
        let paths: Vec<ObjPath> = report
            .actions_removed
            .iter()
            .map(|k| self.action_path(k))
            .collect();
        self.delete_all(paths)?;
        let paths: Vec<ObjPath> = report
            .objects_removed
            .iter()
            .map(|id| self.object_path(id))
            .collect();
        self.delete_all(paths)?;
        Ok(report)
    }

    fn delete_all(&self, paths: Vec<ObjPath>) -> Result<()> {
        self.rt.block_on(async {
            let results: Vec<Result<()>> = futures::stream::iter(paths)
                .map(|p| async move {
                    match self.store.delete(&p).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(self.store_err(&p)(e)),
                    }
                })
                .buffer_unordered(JOBS)
                .collect()
                .await;
            results.into_iter().collect::<Result<Vec<()>>>().map(|_| ())
        })
    }
}

/// The report, or an [`RemoteError::Incomplete`] carrying it when some transfers failed.
fn finish(report: SyncReport, mut problems: Vec<String>, total: usize) -> Result<SyncReport> {
    if problems.is_empty() {
        return Ok(report);
    }
    problems.sort();
    Err(RemoteError::Incomplete {
        failed: problems.len(),
        total: total.max(problems.len()),
        problems,
        report: Box::new(report),
    })
}

/// An action key as the store writes them: letters, digits, `-` and `_`.
fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 200
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An object_store error on one line, without the request's full debug dump.
fn short_store_error(e: &object_store::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}
