//! `fpipe run --executor slurm` on a real one-node Slurm cluster (tests/common/slurm.rs starts
//! one; without Slurm installed these tests say so and skip).

mod common;
#[path = "common/slurm.rs"]
mod slurm_cluster;

use common::{Project, Run};
use slurm_cluster::{cluster, Cluster};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `fpipe ARGS` in `p` against cluster `c`.
fn fpipe(p: &Project, c: &Cluster, args: &[&str]) -> Run {
    Run::from(
        p.cmd(args)
            .env("SLURM_CONF", &c.conf)
            .output()
            .expect("run fpipe"),
    )
}

fn spawn(p: &Project, c: &Cluster, args: &[&str]) -> Child {
    p.cmd(args)
        .env("SLURM_CONF", &c.conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fpipe")
}

/// Waits (up to two minutes: the cluster may be busy with other tests) until `n` jobs whose
/// names start with `prefix` are RUNNING.
fn wait_running(c: &Cluster, prefix: &str, n: usize) -> Vec<String> {
    let t = Instant::now();
    loop {
        let running: Vec<String> = c
            .jobs(prefix, false)
            .into_iter()
            .filter(|j| j.1 == "RUNNING")
            .map(|j| j.0)
            .collect();
        if running.len() >= n {
            return running;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{n} jobs `{prefix}*` never ran: {:?}",
            c.jobs(prefix, true)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finish(child: Child) -> Run {
    Run::from(child.wait_with_output().expect("wait for fpipe"))
}

fn record(p: &Project) -> serde_json::Value {
    let runs = p.path().join(".fpipe/runs");
    let mut recs: Vec<serde_json::Value> = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("record.json")).ok())
        .map(|b| serde_json::from_slice(&b).unwrap())
        .collect();
    recs.sort_by(|a, b| {
        a["started_unix"]
            .as_f64()
            .partial_cmp(&b["started_unix"].as_f64())
            .unwrap()
    });
    recs.pop().expect("a run record")
}

const DAG: &str = r#"name: sdag
stages:
  a:
    uses: shell
    with: {run: "echo a $SLURM_JOB_ID > out", outputs: [out]}
  b:
    uses: shell
    inputs: {x: a}
    with: {run: "cat in/x/out > out; echo b $SLURM_JOB_ID >> out", outputs: [out]}
  c:
    uses: shell
    inputs: {x: a}
    with: {run: "cat in/x/out > out; echo c $SLURM_JOB_ID >> out", outputs: [out]}
  d:
    uses: shell
    inputs: {b: b, c: c}
    with: {run: "cat in/b/out in/c/out > out; echo d $SLURM_JOB_ID >> out", outputs: [out]}
"#;

#[test]
fn shell_dag_runs_as_slurm_jobs_then_is_cached() {
    let Some(c) = cluster("shell_dag_runs_as_slurm_jobs_then_is_cached") else {
        return;
    };
    let p = Project::new();
    p.write("sdag.yaml", DAG);
    let r = fpipe(&p, c, &["run", "sdag.yaml", "--executor", "slurm"]).ok();
    assert_eq!(r.counts(), (4, 0, 0), "{}", r.all());
    // Every stage ran inside a Slurm job of its own, named after pipeline and stage.
    let out = fpipe(&p, c, &["out", "d"]).ok();
    let text = std::fs::read_to_string(format!("{}/out", out.stdout.trim())).unwrap();
    let ids: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(ids.len(), 5, "{text}");
    assert!(
        ids.iter()
            .all(|i| !i.is_empty() && i.parse::<u64>().is_ok()),
        "{text}"
    );
    let names: Vec<String> = c
        .jobs("fpipe:sdag:", true)
        .into_iter()
        .map(|j| j.2)
        .collect();
    for s in ["a", "b", "c", "d"] {
        assert!(names.contains(&format!("fpipe:sdag:{s}")), "{names:?}");
    }
    // The run record names each stage's job and node.
    let rec = record(&p);
    for st in rec["stages"].as_array().unwrap() {
        assert_eq!(st["job"]["executor"], "slurm", "{st}");
        assert!(
            st["job"]["id"].as_str().is_some_and(|i| !i.is_empty()),
            "{st}"
        );
        assert!(
            st["job"]["node"].as_str().is_some_and(|n| !n.is_empty()),
            "{st}"
        );
        assert_eq!(st["job"]["state"], "COMPLETED", "{st}");
    }
    // `fpipe show` lists each stage's job.
    let show = fpipe(&p, c, &["show", "sdag.yaml", "--json"]).ok();
    let rows: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let shown: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["job"]["id"].as_str())
        .collect();
    assert_eq!(shown.len(), 4, "{}", show.stdout);
    // A rerun submits nothing.
    let before = c.jobs("fpipe:sdag:", true).len();
    let r = fpipe(&p, c, &["run", "sdag.yaml", "--executor", "slurm"]).ok();
    assert_eq!(r.counts(), (0, 4, 0));
    assert_eq!(c.jobs("fpipe:sdag:", true).len(), before);
    // And a local run agrees: the same keys.
    assert_eq!(p.fpipe(&["run", "sdag.yaml"]).ok().counts(), (0, 4, 0));
}

#[test]
fn failing_job_reports_its_id_exit_status_and_log_tail() {
    let Some(c) = cluster("failing_job_reports_its_id_exit_status_and_log_tail") else {
        return;
    };
    let p = Project::new();
    p.write(
        "sfail.yaml",
        r#"name: sfail
stages:
  ok:
    uses: shell
    with: {run: "echo fine > out", outputs: [out]}
  bad:
    uses: shell
    inputs: {x: ok}
    with: {run: "echo last-words-before-failing; exit 3", outputs: [out]}
  after:
    uses: shell
    inputs: {x: bad}
    with: {run: "echo never > out", outputs: [out]}
"#,
    );
    let r = fpipe(&p, c, &["run", "sfail.yaml", "--executor", "slurm"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.counts(), (1, 0, 1), "{}", r.all());
    let err = &r.stderr;
    assert!(err.contains("stage `bad` failed: Slurm job "), "{err}");
    assert!(err.contains("FAILED"), "{err}");
    assert!(err.contains("exit status 3"), "{err}");
    assert!(err.contains("last-words-before-failing"), "{err}");
    assert!(
        err.contains("1 stage(s) not run because an input failed"),
        "{err}"
    );
    let rec = record(&p);
    let bad = &rec["stages"][1];
    assert_eq!(bad["state"], "failed");
    assert_eq!(bad["job"]["state"], "FAILED", "{bad}");
}

#[test]
fn job_cancelled_from_outside_fails_the_stage_with_cancelled() {
    let Some(c) = cluster("job_cancelled_from_outside_fails_the_stage_with_cancelled") else {
        return;
    };
    let p = Project::new();
    p.write(
        "scan.yaml",
        r#"name: scan
stages:
  long:
    uses: shell
    with: {run: "echo started; sleep 600; echo x > out", outputs: [out]}
"#,
    );
    let child = spawn(&p, c, &["run", "scan.yaml", "--executor", "slurm"]);
    let ids = wait_running(c, "fpipe:scan:long", 1);
    let st = c.cmd("scancel").arg(&ids[0]).status().unwrap();
    assert!(st.success());
    let r = finish(child);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&format!("Slurm job {}", ids[0])),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("CANCELLED"), "{}", r.stderr);
    assert!(r.stderr.contains("started"), "log tail: {}", r.stderr);
    // Nothing was published for it.
    let st = fpipe(&p, c, &["status", "scan.yaml"]).ok();
    assert!(st.stdout.contains("long  will run"), "{}", st.stdout);
}

#[cfg(unix)]
#[test]
fn interrupting_the_controller_cancels_its_jobs() {
    let Some(c) = cluster("interrupting_the_controller_cancels_its_jobs") else {
        return;
    };
    let p = Project::new();
    p.write(
        "sint.yaml",
        r#"name: sint
stages:
  one:
    uses: shell
    with: {run: "sleep 600; echo x > out", outputs: [out]}
  two:
    uses: shell
    with: {run: "sleep 600; echo y > out", outputs: [out]}
"#,
    );
    let child = spawn(&p, c, &["run", "sint.yaml", "--executor", "slurm"]);
    wait_running(c, "fpipe:sint:", 2);
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let r = finish(child);
    assert_eq!(r.code, 130, "{}", r.all());
    assert!(r.stderr.contains("run interrupted"), "{}", r.stderr);
    // No job of this run is left pending or running.
    assert_eq!(c.jobs("fpipe:sint:", false), vec![]);
    let rec = record(&p);
    assert_eq!(rec["status"], "interrupted");
    for st in rec["stages"].as_array().unwrap() {
        assert_eq!(st["state"], "interrupted", "{st}");
    }
}

#[test]
fn resources_and_a_gpu_reach_the_job() {
    let Some(c) = cluster("resources_and_a_gpu_reach_the_job") else {
        return;
    };
    let p = Project::new();
    p.write(
        "sres.yaml",
        r#"name: sres
stages:
  gpu:
    uses: shell
    resources: {gpu: 1, cpu: 2, mem: 100M, time: 10m}
    with:
      run: |
        echo "gpus_on_node=$SLURM_GPUS_ON_NODE" > out
        echo "cuda=$CUDA_VISIBLE_DEVICES" >> out
        echo "cpus=$SLURM_CPUS_PER_TASK" >> out
        echo "mem=$SLURM_MEM_PER_NODE" >> out
        echo "threads=$FPIPE_THREADS" >> out
        scontrol show job "$SLURM_JOB_ID" | tr ' ' '\n' | grep -E '^(TimeLimit|JOB_GRES|TresPerNode)=' >> out
      outputs: [out]
"#,
    );
    let r = fpipe(&p, c, &["run", "sres.yaml", "--executor", "slurm"]).ok();
    assert_eq!(r.counts(), (1, 0, 0));
    let out = fpipe(&p, c, &["out", "gpu"]).ok();
    let text = std::fs::read_to_string(format!("{}/out", out.stdout.trim())).unwrap();
    for want in [
        "gpus_on_node=1",
        "cpus=2",
        "mem=100",
        "threads=2",
        "TimeLimit=00:10:00",
        "TresPerNode=gres:gpu:1",
    ] {
        assert!(text.lines().any(|l| l == want), "{want} in:\n{text}");
    }
    // One GPU id, the one the job was given.
    let cuda = text
        .lines()
        .find_map(|l| l.strip_prefix("cuda="))
        .unwrap_or("");
    assert!(
        cuda == "0" || cuda == "1",
        "CUDA_VISIBLE_DEVICES in the job: {text}"
    );
}

const SHARED: &str = r#"name: stwo
stages:
  a:
    uses: shell
    with: {run: "echo a >> {{ params.dir }}/count-a; sleep 2; echo a > out", outputs: [out]}
  b:
    uses: shell
    inputs: {x: a}
    with: {run: "echo b >> {{ params.dir }}/count-b; sleep 1; cat in/x/out > out", outputs: [out]}
  c:
    uses: shell
    with: {run: "echo c >> {{ params.dir }}/count-c; sleep 2; echo c > out", outputs: [out]}
"#;

#[test]
fn two_controllers_on_one_cache_compute_each_stage_once() {
    let Some(c) = cluster("two_controllers_on_one_cache_compute_each_stage_once") else {
        return;
    };
    let p = Project::new();
    p.write("stwo.yaml", SHARED);
    let dir = format!("dir={}", p.path().display());
    let args = ["run", "stwo.yaml", "--executor", "slurm", "-p", &dir];
    let first = spawn(&p, c, &args);
    let second = spawn(&p, c, &args);
    let (r1, r2) = (finish(first).ok(), finish(second).ok());
    let (ran1, cached1, _) = r1.counts();
    let (ran2, cached2, _) = r2.counts();
    assert_eq!(ran1 + ran2, 3, "{}\n{}", r1.all(), r2.all());
    assert_eq!(cached1 + cached2, 3);
    for s in ["a", "b", "c"] {
        let n = std::fs::read_to_string(p.path().join(format!("count-{s}")))
            .unwrap()
            .lines()
            .count();
        assert_eq!(n, 1, "stage {s} computed {n} times");
    }
}

#[cfg(unix)]
#[test]
fn a_killed_controller_leaves_a_job_whose_result_the_rerun_waits_for() {
    let Some(c) = cluster("a_killed_controller_leaves_a_job_whose_result_the_rerun_waits_for")
    else {
        return;
    };
    let p = Project::new();
    p.write(
        "skill.yaml",
        r#"name: skill
params: {dir: "."}
stages:
  slow:
    uses: shell
    with: {run: "echo s >> {{ params.dir }}/count; sleep 8; echo done > out", outputs: [out]}
"#,
    );
    let dir = format!("dir={}", p.path().display());
    let mut child = spawn(
        &p,
        c,
        &["run", "skill.yaml", "--executor", "slurm", "-p", &dir],
    );
    let ids = wait_running(c, "fpipe:skill:slow", 1);
    child.kill().unwrap(); // SIGKILL: no chance to cancel anything
    child.wait().unwrap();
    // `fpipe status` names the job computing the stage now.
    let st = fpipe(&p, c, &["status", "skill.yaml", "-p", &dir]).ok();
    assert!(
        st.stdout
            .contains(&format!("slow  running on Slurm: job {} (on ", ids[0])),
        "{}",
        st.stdout
    );
    // The job goes on; a rerun now waits for it instead of submitting another.
    let r = fpipe(
        &p,
        c,
        &["run", "skill.yaml", "--executor", "slurm", "-p", &dir],
    )
    .ok();
    assert_eq!(r.counts(), (0, 1, 0), "{}", r.all());
    let n = std::fs::read_to_string(p.path().join("count"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n, 1, "computed once");
    let out = fpipe(&p, c, &["out", "slow"]).ok();
    assert_eq!(
        std::fs::read_to_string(format!("{}/out", out.stdout.trim())).unwrap(),
        "done\n"
    );
    assert_eq!(c.jobs("fpipe:skill:", true).len(), 1, "one job submitted");
}

#[cfg(feature = "faces")]
#[test]
fn a_training_stage_runs_as_a_slurm_job() {
    let Some(c) = cluster("a_training_stage_runs_as_a_slurm_job") else {
        return;
    };
    let p = Project::new();
    p.write(
        "strain.yaml",
        r#"name: strain
stages:
  faces:
    uses: synthetic-faces
    with: {identities: 8, images_per_identity: 4, image_size: 32, test_identities: 4, pairs: 20}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    resources: {cpu: 2}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 16, epochs: 1, batch_size: 16}
"#,
    );
    let r = fpipe(&p, c, &["run", "strain.yaml", "--executor", "slurm"]).ok();
    assert_eq!(r.counts(), (2, 0, 0), "{}", r.all());
    let rec = record(&p);
    let train = &rec["stages"][1];
    assert_eq!(train["name"], "train");
    assert_eq!(train["job"]["state"], "COMPLETED", "{train}");
    let out = fpipe(&p, c, &["out", "train.model"]).ok();
    assert!(std::path::Path::new(out.stdout.trim())
        .join("model.json")
        .exists());
    assert_eq!(
        fpipe(&p, c, &["run", "strain.yaml", "--executor", "slurm"])
            .ok()
            .counts(),
        (0, 2, 0)
    );
}

// Without a cluster: the checks before submitting.

#[test]
fn slurm_executor_without_sbatch_says_what_to_do() {
    let p = Project::new();
    p.write("n.yaml", DAG);
    let empty = p.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = p
        .cmd(&["run", "n.yaml", "--executor", "slurm"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("`sbatch` is not on the PATH") && r.stderr.contains("--executor local"),
        "{}",
        r.stderr
    );
    // Nothing ran, and the default executor is local.
    assert_eq!(p.fpipe(&["run", "n.yaml"]).ok().counts(), (4, 0, 0));
}

#[cfg(unix)]
#[test]
fn a_cache_on_tmpfs_is_warned_about_and_sbatch_errors_are_shown() {
    use std::os::unix::fs::PermissionsExt;
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipping: no /dev/shm here");
        return;
    }
    let p = Project::new();
    p.write("t.yaml", "name: t\nstages:\n  a:\n    uses: shell\n    with: {run: \"echo a > out\", outputs: [out]}\n");
    // Stand-in Slurm tools: sbatch refuses every job.
    let bin = p.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (tool, body) in [
        (
            "sbatch",
            "echo 'sbatch: error: Invalid partition name specified' >&2; exit 1",
        ),
        ("squeue", "exit 0"),
        ("scancel", "exit 0"),
    ] {
        let f = bin.join(tool);
        std::fs::write(&f, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let cache = tempfile::tempdir_in(shm).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = p
        .cmd(&[
            "run",
            "t.yaml",
            "--executor",
            "slurm",
            "--partition",
            "nope",
        ])
        .env("PATH", path)
        .env("FPIPE_CACHE", cache.path())
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains("is on tmpfs, which only this machine sees"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("Invalid partition name specified"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--partition=nope"), "{}", r.stderr);
}
