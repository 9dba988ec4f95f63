//! Talking to Slurm: `sbatch`, `scancel`, and one bounded, backing-off `squeue` poll shared by
//! every job of a run (to notice jobs that ended without writing their outcome), with
//! `sacct` or `scontrol` asked for the reason when one did.

use super::SlurmError;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest and longest pause between two `squeue` calls of one run.
const POLL_MIN: Duration = Duration::from_millis(500);
const POLL_MAX: Duration = Duration::from_secs(10);

/// What the last `squeue` said of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `CANCELLED`, ...
    pub state: String,
    /// The node it runs or ran on (empty while pending).
    pub node: String,
}

impl Seen {
    /// Whether the job can still run (so its outcome may still come).
    pub fn alive(&self) -> bool {
        is_alive_state(&self.state)
    }
}

/// Slurm job states in which the job has not ended.
pub(super) fn is_alive_state(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_FED"
            | "REQUEUE_HOLD"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "STOPPED"
            | "RESV_DEL_HOLD"
    )
}

/// Where the last `squeue` left a watched job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Watch {
    /// Not asked about since it was submitted: no news.
    Unknown,
    Seen(Seen),
    /// Asked about after it was submitted, and Slurm no longer knows it.
    Vanished,
}

struct State {
    /// Job id -> when the run started watching it.
    watched: HashMap<String, Instant>,
    seen: HashMap<String, Seen>,
    /// When the last `squeue` was asked, and how long until the next may be.
    last: Option<Instant>,
    interval: Duration,
}

/// One `squeue` poll for all the jobs a run watches, at most once per `interval`, the interval
/// growing (to [`POLL_MAX`]) while nothing changes and shrinking back when something does.
pub(super) struct Tracker {
    state: Mutex<State>,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker {
            state: Mutex::new(State {
                watched: HashMap::new(),
                seen: HashMap::new(),
                last: None,
                interval: POLL_MIN,
            }),
        }
    }

    /// Starts watching job `id` (submitted now, or found running).
    pub fn watch(&self, id: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.watched.insert(id.to_string(), Instant::now());
            s.interval = POLL_MIN;
        }
    }

    /// Stops watching job `id`.
    pub fn forget(&self, id: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.watched.remove(id);
            s.seen.remove(id);
        }
    }

    /// What Slurm says of job `id`, polling `squeue` when the last poll is old enough
    /// (`now`: regardless of the interval, waiting for another thread's poll to end). Without
    /// `now`, another thread polling at the same moment is not waited for: its answer is read
    /// next time.
    pub fn state(&self, id: &str, now: bool) -> Watch {
        let guard = if now {
            self.state.lock().ok()
        } else {
            self.state.try_lock().ok()
        };
        let Some(mut s) = guard else {
            return Watch::Unknown;
        };
        let due = now || s.last.is_none_or(|t| t.elapsed() >= s.interval);
        if due {
            let ids: Vec<String> = s.watched.keys().cloned().collect();
            let asked = Instant::now();
            if let Some(found) = squeue(&ids) {
                let changed = ids.iter().any(|i| found.get(i) != s.seen.get(i));
                s.interval = if changed {
                    POLL_MIN
                } else {
                    (s.interval.mul_f64(1.5)).min(POLL_MAX)
                };
                let gone: HashSet<String> = ids
                    .iter()
                    .filter(|i| !found.contains_key(*i))
                    .cloned()
                    .collect();
                s.seen = found;
                for g in gone {
                    // Vanished only when asked about after it was submitted.
                    if s.watched.get(&g).is_some_and(|t| *t < asked) {
                        s.seen.insert(
                            g,
                            Seen {
                                state: String::new(),
                                node: String::new(),
                            },
                        );
                    }
                }
            }
            s.last = Some(Instant::now());
        }
        match s.seen.get(id) {
            Some(seen) if seen.state.is_empty() => Watch::Vanished,
            Some(seen) => Watch::Seen(seen.clone()),
            None => Watch::Unknown,
        }
    }
}

/// `squeue` of these jobs, finished ones included while Slurm remembers them (MinJobAge);
/// `None` when squeue could not be asked (the next poll tries again).
fn squeue(ids: &[String]) -> Option<HashMap<String, Seen>> {
    if ids.is_empty() {
        return Some(HashMap::new());
    }
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%i|%T|%N", "-j", &ids.join(",")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Every id unknown (purged) is an error to squeue; anything else is a failed poll.
        let err = String::from_utf8_lossy(&out.stderr);
        return err.contains("Invalid job id").then(HashMap::new);
    }
    Some(parse_squeue(&text))
}

/// Lines `ID|STATE|NODE` into a map; array and heterogeneous jobs keep their base id.
pub(super) fn parse_squeue(text: &str) -> HashMap<String, Seen> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let id = f.next()?.trim();
            let state = f.next()?.trim();
            let node = f.next().unwrap_or("").trim();
            (!id.is_empty() && !state.is_empty()).then(|| {
                (
                    id.to_string(),
                    Seen {
                        state: state.to_string(),
                        node: node.to_string(),
                    },
                )
            })
        })
        .collect()
}

/// Why a job ended as Slurm tells it: `sacct` where accounting runs, else `scontrol` while
/// Slurm still remembers the job; `(state, node, exit code)`.
pub(super) fn final_state(id: &str) -> Option<(String, String, String)> {
    if let Ok(out) = Command::new("sacct")
        .args(["-n", "-X", "-P", "-j", id, "-o", "State,NodeList,ExitCode"])
        .output()
    {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(line) = text.lines().find(|l| !l.trim().is_empty()) {
                let f: Vec<&str> = line.split('|').collect();
                if f.len() >= 3 {
                    // `CANCELLED by 0` -> `CANCELLED`
                    let state = f[0].split_whitespace().next().unwrap_or("").to_string();
                    return Some((state, f[1].to_string(), f[2].to_string()));
                }
            }
        }
    }
    let out = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    Some((
        field("JobState=")?,
        field("BatchHost=")
            .or_else(|| field("NodeList="))
            .unwrap_or_default(),
        field("ExitCode=").unwrap_or_default(),
    ))
}

/// Submits `script` with `args`; the job id.
pub(super) fn sbatch(args: &[String], script: &Path) -> Result<String, SlurmError> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .arg(script)
        .output()
        .map_err(|e| SlurmError::Submit {
            stage_script: script.to_path_buf(),
            message: format!("cannot start sbatch: {e}"),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .lines()
        .last()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if !out.status.success() || id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(SlurmError::Submit {
            stage_script: script.to_path_buf(),
            message: format!(
                "sbatch {} said: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                text.trim()
            ),
        });
    }
    Ok(id)
}

/// Cancels job `id` (signals its processes, then kills them after Slurm's KillWait).
pub(super) fn scancel(id: &str) {
    let _ = Command::new("scancel").arg(id).output();
}

/// The program `name` on the PATH, if any.
pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The file system type of the mount holding `path` (`tmpfs`, `nfs4`, `ext4`, ...), from
/// /proc/mounts; `None` where that cannot be read.
pub(super) fn fs_type(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[1].replace("\\040", " "), f[2].to_string()))
        })
        .filter(|(mnt, _)| path.starts_with(mnt))
        .max_by_key(|(mnt, _)| mnt.len())
        .map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_parse_and_states_classify() {
        let m = parse_squeue("12|RUNNING|node1\n13|PENDING|\n14|OUT_OF_MEMORY|n2\n\n");
        assert_eq!(m.len(), 3);
        assert!(m["12"].alive() && m["13"].alive());
        assert!(!m["14"].alive());
        assert_eq!(m["12"].node, "node1");
        assert!(!is_alive_state("NODE_FAIL") && !is_alive_state("COMPLETED"));
    }

    #[test]
    fn file_system_of_root_is_known() {
        assert!(fs_type(Path::new("/")).is_some());
    }
}
