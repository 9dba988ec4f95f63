//! A private one-node Slurm cluster for the tests of one test binary, started on first use by
//! `tests/slurm/cluster.sh` (its own munged, slurmctld and slurmd, on free ports, all files
//! in one folder) and stopped by pid when the test binary exits, by a watchdog that waits for
//! the test process to go.
//!
//! Without Slurm installed (or not as root) the tests that need it print that they skip,
//! unless `FPIPE_TEST_SLURM=require` (set by `.ci/run`), which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Cluster {
    /// `SLURM_CONF` for every client (sbatch, squeue, fpipe).
    pub conf: PathBuf,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The cluster, started if need be; `None` (after saying why) where Slurm is not installed.
pub fn cluster(test: &str) -> Option<&'static Cluster> {
    let c = CLUSTER.get_or_init(start).as_ref();
    if c.is_none() {
        let why = "Slurm (slurm-wlm, munge) is not installed or this is not root";
        if std::env::var("FPIPE_TEST_SLURM").as_deref() == Ok("require") {
            panic!("{test}: {why}, and FPIPE_TEST_SLURM=require");
        }
        eprintln!("skipping {test}: {why} (.ci/run installs it)");
    }
    c
}

fn start() -> Option<Cluster> {
    let root = unsafe { libc_geteuid() } == 0;
    if !root
        || !["sbatch", "slurmctld", "slurmd", "munged"]
            .iter()
            .all(|t| installed(t) || Path::new(&format!("/usr/sbin/{t}")).exists())
    {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("fpipe-slurm-{}", std::process::id()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm/cluster.sh");
    let out = Command::new("sh")
        .arg(&script)
        .arg(&dir)
        .arg("2")
        .output()
        .expect("run tests/slurm/cluster.sh");
    let pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
    let pids: Vec<&str> = pids.split_whitespace().collect();
    // Stop what was started, by pid, once this test process is gone.
    let watchdog = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {pids} 2>/dev/null; sleep 2; kill -9 {pids} 2>/dev/null; rm -rf '{dir}'",
        me = std::process::id(),
        pids = pids.join(" "),
        dir = dir.display()
    );
    if !pids.is_empty() {
        let _ = Command::new("sh")
            .args(["-c", &watchdog])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    assert!(
        out.status.success(),
        "the test Slurm cluster did not start:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(Cluster {
        conf: dir.join("slurm.conf"),
    })
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

impl Cluster {
    /// A Slurm client command against this cluster.
    pub fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `squeue` lines `ID|STATE|NAME` of the jobs whose name starts with `prefix`, finished
    /// ones included.
    pub fn jobs(&self, prefix: &str, all: bool) -> Vec<(String, String, String)> {
        let mut c = self.cmd("squeue");
        c.args(["-h", "-o", "%i|%T|%j"]);
        if all {
            c.args(["-t", "all"]);
        }
        let out = c.output().expect("squeue");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.trim().splitn(3, '|').collect();
                (f.len() == 3 && f[2].starts_with(prefix))
                    .then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
            })
            .collect()
    }
}
