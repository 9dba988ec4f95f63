//! Crashes, Ctrl-C and concurrent runs never corrupt the cache.

mod common;
use common::Project;
use std::time::{Duration, Instant};

fn wait_for(path: &std::path::Path, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn kill_9_during_a_stage_leaves_nothing_trusted() {
    let p = Project::new();
    let marker = p.path().join("started");
    p.write(
        "k.yaml",
        &format!(
            "stages:\n  slow:\n    uses: shell\n    with: {{run: 'echo partial > out; touch {}; sleep 30; echo done >> out', outputs: [out]}}\n  after:\n    uses: shell\n    inputs: {{s: slow}}\n    with: {{run: 'cat in/s/out > o', outputs: [o]}}\n",
            marker.display()
        ),
    );
    let mut child = p.cmd(&["run", "k.yaml"]).spawn().unwrap();
    assert!(wait_for(&marker, Duration::from_secs(20)), "stage started");
    // SIGKILL: no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    let cache = p.path().join(".fpipe");
    let c = cache.to_str().unwrap();
    let v = p.fpipe(&["--cache", c, "cache", "verify"]).ok();
    assert!(
        v.stdout
            .contains("checked 0 artifacts and 0 action records: 0 problem(s)"),
        "{}",
        v.stdout
    );
    // The next run recomputes the stage rather than trusting anything half-written.
    let st = p.fpipe(&["status", "k.yaml"]).ok();
    assert!(
        st.stdout.contains("2 of 2 stages would run"),
        "{}",
        st.stdout
    );
    // Make it quick this time and run to completion.
    let text = std::fs::read_to_string(p.path().join("k.yaml"))
        .unwrap()
        .replace("sleep 30", "true");
    p.write("k.yaml", &text);
    assert_eq!(p.fpipe(&["run", "k.yaml"]).ok().counts(), (2, 0, 0));
    let d = p.fpipe(&["out", "after"]).ok().stdout.trim().to_string();
    assert_eq!(
        std::fs::read_to_string(format!("{d}/o")).unwrap(),
        "partial\ndone\n"
    );
    // The killed run left a staging directory; gc removes it.
    let gc = p.fpipe(&["--cache", c, "gc"]).ok();
    assert!(gc.stdout.contains("removed 0 artifacts"), "{}", gc.stdout);
    assert!(std::fs::read_dir(cache.join("staging"))
        .unwrap()
        .next()
        .is_none());
    assert!(p
        .fpipe(&["--cache", c, "cache", "verify"])
        .ok()
        .stdout
        .contains("0 problem(s)"));
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_cleanly_and_kills_children() {
    let p = Project::new();
    let started = p.path().join("started");
    let late = p.path().join("late");
    p.write(
        "c.yaml",
        &format!(
            "stages:\n  quick:\n    uses: shell\n    with: {{run: 'echo q > q', outputs: [q]}}\n  slow:\n    uses: shell\n    inputs: {{x: quick}}\n    with: {{run: 'touch {}; sleep 3; touch {}', outputs: [x]}}\n",
            started.display(),
            late.display()
        ),
    );
    let child = p
        .cmd(&["run", "c.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for(&started, Duration::from_secs(20)));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = common::Run::from(child.wait_with_output().unwrap());
    assert_eq!(out.code, 130, "{}", out.all());
    assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
    assert_eq!(out.counts(), (1, 0, 0));
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !late.exists(),
        "the stage's command was killed with the run"
    );
    // The record says so.
    let runs = p.path().join(".fpipe/runs");
    let rec = std::fs::read_dir(&runs)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("record.json")).ok())
        .next()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(v["status"], "interrupted");
    assert_eq!(v["stages"][1]["state"], "interrupted");
    // Finished stages stay cached.
    let st = p.fpipe(&["status", "c.yaml"]).ok();
    assert!(
        st.stdout.contains("1 of 2 stages would run"),
        "{}",
        st.stdout
    );
}

#[test]
fn two_concurrent_runs_share_one_cache_safely() {
    let p = Project::new();
    let mut text = String::from("stages:\n");
    for i in 0..4 {
        text.push_str(&format!(
            "  s{i}:\n    uses: shell\n    with: {{run: 'sleep 0.3; echo {i} > o', outputs: [o]}}\n"
        ));
    }
    text.push_str("  join:\n    uses: shell\n    inputs: {a: s0, b: s1, c: s2, d: s3}\n    with: {run: 'cat in/*/o > all', outputs: [all]}\n");
    p.write("cc.yaml", &text);
    let a = p
        .cmd(&["run", "cc.yaml", "-j", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b = p
        .cmd(&["run", "cc.yaml", "-j", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ra = common::Run::from(a.wait_with_output().unwrap()).ok();
    let rb = common::Run::from(b.wait_with_output().unwrap()).ok();
    let (ran_a, cached_a, _) = ra.counts();
    let (ran_b, cached_b, _) = rb.counts();
    // Each stage was computed exactly once; the other run waited and reused it.
    assert_eq!(ran_a + ran_b, 5, "{}\n{}", ra.all(), rb.all());
    assert_eq!(cached_a + cached_b, 5);
    let c = p.path().join(".fpipe");
    let v = p
        .fpipe(&["--cache", c.to_str().unwrap(), "cache", "verify"])
        .ok();
    assert!(v.stdout.contains("0 problem(s)"), "{}", v.stdout);
    let d = p.fpipe(&["out", "join"]).ok().stdout.trim().to_string();
    assert_eq!(
        std::fs::read_to_string(format!("{d}/all")).unwrap(),
        "0\n1\n2\n3\n"
    );
}

#[test]
fn gc_refuses_while_a_run_is_active() {
    let p = Project::new();
    let started = p.path().join("started");
    p.write(
        "g.yaml",
        &format!("stages:\n  s:\n    uses: shell\n    with: {{run: 'touch {}; sleep 1.5; echo > o', outputs: [o]}}\n", started.display()),
    );
    let child = p
        .cmd(&["run", "g.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for(&started, Duration::from_secs(20)));
    let c = p.path().join(".fpipe");
    let gc = p.fpipe(&["--cache", c.to_str().unwrap(), "gc"]);
    assert_eq!(gc.code, 1);
    assert!(
        gc.stderr.contains("a run is using the cache"),
        "{}",
        gc.stderr
    );
    common::Run::from(child.wait_with_output().unwrap()).ok();
}
