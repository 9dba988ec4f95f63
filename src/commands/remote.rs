//! Remote caches on object storage: `cache push|pull URL`, `run --remote/--push`,
//! `gc --remote`. The transfers are in the `fpipe-remote` crate; here the engine says which
//! keys and artifacts a pipeline's current state needs.

use super::*;
use fpipe_remote::{Progress, Remote, SyncReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Opens `url` as a remote, with the context a user needs.
pub(super) fn open_remote(url: &str) -> Result<Remote> {
    Remote::open(url).with_context(|| "opening the remote cache")
}

/// A progress bar on stderr (when it is a terminal): bytes, rate and objects.
pub(super) struct Bar {
    bar: ProgressBar,
    objects: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

impl Bar {
    pub(super) fn new() -> Self {
        use std::io::IsTerminal;
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Bar {
            bar,
            objects: 0.into(),
            total: 0.into(),
        }
    }

    pub(super) fn done(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, objects: u64, bytes: u64) {
        self.bar.set_prefix(what.to_string());
        self.total.store(objects, Ordering::Relaxed);
        self.objects.store(0, Ordering::Relaxed);
        self.bar.set_length(bytes);
        self.bar.set_position(0);
        self.bar.set_message(format!("0/{objects} objects"));
    }
    fn bytes(&self, n: u64) {
        if self
            .bar
            .length()
            .is_some_and(|l| self.bar.position() + n > l)
        {
            self.bar.inc_length(n);
        }
        self.bar.inc(n);
    }
    fn object(&self) {
        let done = self.objects.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.total.load(Ordering::Relaxed);
        self.bar.set_message(format!("{done}/{total} objects"));
    }
}

/// The action records and artifacts of the stages of `plan` whose results are cached now:
/// what a pipeline's current state needs.
pub(super) fn current_state(
    engine: &Engine,
    plan: &Plan,
    opts: &RunOptions,
) -> Result<(Vec<ActionRecord>, Vec<ArtifactId>)> {
    let mut records = Vec::new();
    let mut ids = Vec::new();
    for s in engine.status(plan, opts)? {
        let (false, Some(key)) = (s.will_run, &s.key) else {
            continue;
        };
        if let Some(rec) = engine.store.action(key)? {
            ids.extend(rec.outputs.values().copied());
            records.push(rec);
        }
    }
    Ok((records, ids))
}

/// Adds `r` into `total`.
fn merge(total: &mut SyncReport, r: SyncReport) {
    total.objects_copied += r.objects_copied;
    total.objects_present += r.objects_present;
    total.bytes_copied += r.bytes_copied;
    total.actions_copied += r.actions_copied;
    total.actions_added.extend(r.actions_added);
}

/// Pulls what `plan` needs from `remote`: the records of the stages whose keys are known and
/// not cached here, with their outputs, then again for the stages whose keys those outputs
/// make known, until the remote has nothing more. Stages forced by `opts` are not looked up.
/// A failed transfer ends it with the error (what completed is kept). `tried` collects the
/// keys asked of the remote.
pub(super) fn pull_for_plan(
    engine: &Engine,
    plan: &Plan,
    opts: &RunOptions,
    remote: &Remote,
    progress: &dyn Progress,
    tried: &mut HashSet<String>,
) -> Result<SyncReport> {
    let mut total = SyncReport::default();
    loop {
        let keys: Vec<String> = engine
            .status(plan, opts)?
            .into_iter()
            .filter(|s| s.will_run && !s.reason.starts_with("forced"))
            .filter_map(|s| s.key)
            .filter(|k| tried.insert(k.clone()))
            .collect();
        if keys.is_empty() {
            return Ok(total);
        }
        let r = remote.pull(&engine.store, Some(&keys), progress)?;
        let added = r.actions_copied;
        merge(&mut total, r);
        if added == 0 {
            return Ok(total);
        }
    }
}

/// `cache push URL [FILE|--all]`.
pub(super) fn push(
    store: ArtifactStore,
    registry: Registry,
    url: &str,
    pipeline: Option<PipelineArgs>,
) -> Result<ExitCode> {
    let remote = open_remote(url)?;
    let _lock = store.lock_shared()?;
    let engine = Engine { store, registry };
    let (records, ids, what) = match &pipeline {
        Some(p) => {
            let plan = load(p, &engine.registry)?;
            let (records, ids) = current_state(&engine, &plan, &RunOptions::default())?;
            (records, ids, p.file.display().to_string())
        }
        None => (
            engine.store.actions()?,
            engine.store.objects()?,
            "the whole cache".to_string(),
        ),
    };
    let bar = Bar::new();
    let r = remote.push(&engine.store, &ids, &records, &bar);
    bar.done();
    let r = r.with_context(|| format!("pushing {what} to {url}"))?;
    println!(
        "pushed {} artifacts ({:.1} MB) and {} action records of {what} to {}; {} artifacts already there",
        r.objects_copied,
        r.bytes_copied as f64 / 1e6,
        r.actions_copied,
        remote.url(),
        r.objects_present
    );
    Ok(ExitCode::SUCCESS)
}

/// `cache pull URL [FILE]`: what FILE's current state needs, or everything. Returns the
/// report for `--check`.
pub(super) fn pull(
    store: &ArtifactStore,
    registry: &Registry,
    url: &str,
    plan: Option<&Plan>,
) -> Result<SyncReport> {
    let remote = open_remote(url)?;
    let bar = Bar::new();
    let r = match plan {
        Some(plan) => {
            let engine = Engine {
                store: store.clone(),
                registry: registry.clone(),
            };
            let mut tried = HashSet::new();
            pull_for_plan(
                &engine,
                plan,
                &RunOptions::default(),
                &remote,
                &bar,
                &mut tried,
            )
        }
        None => remote.pull(store, None, &bar).map_err(anyhow::Error::from),
    };
    bar.done();
    let r = r.with_context(|| format!("pulling from {url}"))?;
    println!(
        "pulled {} artifacts ({:.1} MB) and {} action records from {}; {} artifacts already here",
        r.objects_copied,
        r.bytes_copied as f64 / 1e6,
        r.actions_copied,
        remote.url(),
        r.objects_present
    );
    Ok(r)
}

/// `gc --remote URL`: removes the remote objects that nothing this cache keeps references.
pub(super) fn gc(keep: &HashSet<ArtifactId>, url: &str, yes: bool) -> Result<ExitCode> {
    let remote = open_remote(url)?;
    let r = remote
        .gc(keep, !yes)
        .with_context(|| format!("collecting garbage on {url}"))?;
    let verb = if yes { "removed" } else { "would remove" };
    println!(
        "{verb} {} artifacts ({:.1} MB) and {} action records from {}; kept {} artifacts",
        r.objects_removed.len(),
        r.bytes_freed as f64 / 1e6,
        r.actions_removed.len(),
        remote.url(),
        r.objects_kept
    );
    if !yes {
        println!("dry run: nothing removed; run again with --yes to remove them");
    }
    Ok(ExitCode::SUCCESS)
}

/// `--remote` as the engine's substituter: the result of a stage whose key became known
/// during the run (its inputs were computed here) is pulled by key just before it would
/// compute. After one failed request it stops asking: the rest compute here rather than each
/// waiting for the same unreachable remote. Keys the pull before the run already asked for are
/// not asked again.
pub(super) struct RemoteSubstituter {
    remote: Arc<Remote>,
    asked: HashSet<String>,
    failed: AtomicBool,
}

impl RemoteSubstituter {
    pub(super) fn new(remote: Arc<Remote>, asked: HashSet<String>) -> Self {
        RemoteSubstituter {
            remote,
            asked,
            failed: AtomicBool::new(false),
        }
    }
}

impl fpipe_engine::Substituter for RemoteSubstituter {
    fn substitute(&self, store: &ArtifactStore, key: &str) -> std::result::Result<bool, String> {
        if self.failed.load(Ordering::Relaxed) || self.asked.contains(key) {
            return Ok(false);
        }
        let keys = [key.to_string()];
        match self
            .remote
            .pull(store, Some(&keys), &fpipe_remote::NoProgress)
        {
            Ok(r) => {
                if r.actions_copied > 0 {
                    say_err!(
                        "fetched a stage's result ({} artifacts, {:.1} MB) from {}",
                        r.objects_copied,
                        r.bytes_copied as f64 / 1e6,
                        self.remote.url()
                    );
                }
                Ok(r.actions_copied > 0)
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                Err(format!(
                    "{} (not asked again in this run)",
                    fpipe_engine::text::visible(&format!("{e:#}"), true)
                ))
            }
        }
    }
}
