//! A damaged or untrusted cache never reaches a later stage silently: inputs are checked
//! before a stage computes, `cache verify --repair` removes what was computed from damage,
//! `cache pull --check` recomputes pulled results, and a read-only cache serves cached runs.
//! Only `shell` stages, so these run with and without the face stages.

mod common;
use common::{Project, Run};
use std::path::{Path, PathBuf};

/// make -> upper -> after. `tag` only changes `upper`, so changing it reruns `upper` (and
/// `after`) on the cached output of `make`.
const CHAIN: &str = r#"params: {tag: one}
stages:
  make:
    uses: shell
    with: {run: 'printf "hello\n" > msg.txt; printf "world\n" > b.txt', outputs: [msg.txt, b.txt]}
  upper:
    uses: shell
    inputs: {m: make}
    with: {run: 'tr a-z A-Z < in/m/msg.txt > up.txt; echo {{ params.tag }} >> up.txt', outputs: [up.txt]}
  after:
    uses: shell
    inputs: {u: upper}
    with: {run: 'cat in/u/up.txt > final.txt', outputs: [final.txt]}
"#;

fn chain() -> Project {
    let p = Project::new();
    p.write("p.yaml", CHAIN);
    assert_eq!(p.fpipe(&["run", "p.yaml"]).ok().counts(), (3, 0, 0));
    p
}

/// The directory of `stage`'s current output.
fn out(p: &Project, stage: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["out", stage, "-f", "p.yaml"];
    args.extend_from_slice(extra);
    PathBuf::from(p.fpipe(&args).ok().stdout.trim())
}

fn final_text(p: &Project, extra: &[&str]) -> String {
    std::fs::read_to_string(out(p, "after", extra).join("final.txt")).unwrap()
}

/// Stored files are read-only; damage needs write permission first.
fn writable(f: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Rewrites `f` with bytes of the same length, on a later mtime tick.
fn flip(f: &Path) {
    std::thread::sleep(std::time::Duration::from_millis(20));
    writable(f);
    let mut bytes = std::fs::read(f).unwrap();
    bytes[0] ^= 0x02; // "hello" -> "jello"
    std::fs::write(f, bytes).unwrap();
}

fn cache(p: &Project) -> String {
    p.path().join(".fpipe").to_string_lossy().to_string()
}

#[test]
fn a_damaged_input_is_refused_and_nothing_downstream_runs() {
    let p = chain();
    let msg = out(&p, "make", &[]).join("msg.txt");
    flip(&msg);
    let r = p.fpipe(&["run", "p.yaml", "-p", "tag=two"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.counts(), (0, 1, 1), "upper refused, make cached");
    assert!(
        r.stderr.contains("stage `upper` failed: input `m`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&msg.display().to_string()),
        "names the file: {}",
        r.stderr
    );
    assert!(r.stderr.contains("content changed"), "{}", r.stderr);
    assert!(
        r.stderr.contains("fpipe cache verify --repair"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("1 stage(s) not run because an input failed"),
        "`after` is skipped: {}",
        r.stderr
    );
    // Nothing was cached from the damaged bytes.
    let st = p.fpipe(&["status", "p.yaml", "-p", "tag=two"]).ok();
    assert!(
        st.stdout.contains("2 of 3 stages would run"),
        "{}",
        st.stdout
    );
    // Repair, rerun: the right answer.
    p.fpipe(&["--cache", &cache(&p), "cache", "verify", "--repair"])
        .ok();
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "-p", "tag=two"]).ok().counts(),
        (3, 0, 0)
    );
    assert_eq!(final_text(&p, &["-p", "tag=two"]), "HELLO\ntwo\n");
}

#[test]
fn a_deleted_or_truncated_input_file_is_named() {
    let p = chain();
    let c = cache(&p);
    // Deleted (artifact folders are writable by their owner; only files are read-only).
    let b = out(&p, "make", &[]).join("b.txt");
    std::fs::remove_file(&b).unwrap();
    let r = p.fpipe(&["run", "p.yaml", "-p", "tag=two"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&format!("{}: missing", b.display())),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("fpipe cache verify --repair"),
        "{}",
        r.stderr
    );
    p.fpipe(&["--cache", &c, "cache", "verify", "--repair"])
        .ok();
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "-p", "tag=two"]).ok().counts(),
        (3, 0, 0)
    );
    // Truncated.
    let msg = out(&p, "make", &[]).join("msg.txt");
    writable(&msg);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&msg)
        .unwrap()
        .set_len(2)
        .unwrap();
    let r = p.fpipe(&["run", "p.yaml", "-p", "tag=three"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains(&format!("{}: truncated: 2 bytes, was 6", msg.display())),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("fpipe cache verify --repair"),
        "{}",
        r.stderr
    );
}

/// Damages `make`'s output in a way the stat check cannot see (same size, same inode, the old
/// mtime put back), as a flipped bit on disk would.
fn silent_damage(p: &Project) {
    let msg = out(p, "make", &[]).join("msg.txt");
    let mtime = std::fs::metadata(&msg).unwrap().modified().unwrap();
    flip(&msg);
    std::fs::File::open(&msg)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

#[test]
fn a_full_input_check_finds_damage_the_stat_check_cannot() {
    let p = chain();
    silent_damage(&p);
    let r = p
        .cmd(&["run", "p.yaml", "-p", "tag=two"])
        .env("FPIPE_VERIFY_INPUTS", "full")
        .output()
        .unwrap();
    let r = common::Run::from(r);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.counts(), (0, 1, 1));
    let msg = out(&p, "make", &[]).join("msg.txt");
    assert!(
        r.stderr.contains(&format!(
            "{}: content changed (6 bytes, as before)",
            msg.display()
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn repair_removes_results_computed_from_damaged_data() {
    let p = chain();
    let c = cache(&p);
    silent_damage(&p);
    // The default check does not see it: a wrong result is computed and cached.
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "-p", "tag=two"]).ok().counts(),
        (2, 1, 0)
    );
    assert_eq!(final_text(&p, &["-p", "tag=two"]), "JELLO\ntwo\n");
    // verify finds the damage and everything computed from it: both `upper` results (one
    // computed before the damage, one after: no way to tell) and both `after` results.
    let v = p.fpipe(&["--cache", &c, "cache", "verify"]);
    assert_eq!(v.code, 1, "{}", v.all());
    assert!(
        v.stdout.contains("would invalidate 4 record(s)"),
        "{}",
        v.stdout
    );
    for stage in ["upper", "after"] {
        assert!(
            v.stdout
                .contains(&format!("record of stage `{stage}`: computed from")),
            "{}",
            v.stdout
        );
    }
    let v = p
        .fpipe(&["--cache", &c, "cache", "verify", "--repair"])
        .ok();
    assert!(v.stdout.contains("invalidated 4 record(s)"), "{}", v.stdout);
    // Nothing computed from the damaged bytes survives: every stage reruns, right this time.
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "-p", "tag=two"]).ok().counts(),
        (3, 0, 0)
    );
    assert_eq!(final_text(&p, &["-p", "tag=two"]), "HELLO\ntwo\n");
    assert!(p
        .fpipe(&["--cache", &c, "cache", "verify"])
        .ok()
        .stdout
        .contains(" 0 problem(s)"));
}

/// A second project with the same pipeline and its own (empty) cache.
fn other_project() -> Project {
    let q = Project::new();
    q.write("p.yaml", CHAIN);
    q
}

fn action_files(cache: &Path) -> usize {
    let mut n = 0;
    for pre in std::fs::read_dir(cache.join("actions")).unwrap() {
        n += std::fs::read_dir(pre.unwrap().path()).unwrap().count();
    }
    n
}

/// `q` pulls `p`'s cache, recomputing 2 of p.yaml's stages chosen with seed 7.
fn checked_pull(q: &Project, p: &Project) -> Run {
    q.fpipe(&[
        "cache",
        "pull",
        &cache(p),
        "--check",
        "2",
        "--pipeline",
        "p.yaml",
        "--seed",
        "7",
    ])
    .ok()
}

#[test]
fn a_checked_pull_of_an_honest_cache_is_accepted_and_says_where_results_came_from() {
    let p = chain();
    let q = other_project();
    let r = checked_pull(&q, &p);
    assert!(
        r.stdout
            .contains("checking 2 of the 3 stage(s) of p.yaml cached by this pull (seed 7)"),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stdout.matches("recomputed, same result").count(),
        2,
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("pull accepted"), "{}", r.stdout);
    // The same seed picks the same stages.
    let chosen = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("checking"))
            .unwrap()
            .to_string()
    };
    let q2 = other_project();
    let r2 = checked_pull(&q2, &p);
    assert_eq!(chosen(&r.stdout), chosen(&r2.stdout));
    // Pulled results are used, and say where they came from.
    assert_eq!(q.fpipe(&["run", "p.yaml"]).ok().counts(), (0, 3, 0));
    let st = q.fpipe(&["status", "p.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    let src = std::path::absolute(p.path().join(".fpipe")).unwrap();
    for s in v.as_array().unwrap() {
        assert_eq!(
            s["origin"]["pulled_from"],
            src.to_string_lossy().as_ref(),
            "{s}"
        );
        assert!(s["origin"]["at"].as_str().unwrap().ends_with('Z'));
    }
    let st = q.fpipe(&["status", "p.yaml"]).ok();
    assert!(
        st.stdout
            .contains(&format!("make   cached (pulled from {}", src.display())),
        "{}",
        st.stdout
    );
    let v = q.fpipe(&["--cache", &cache(&q), "cache", "verify"]).ok();
    assert!(
        v.stdout
            .contains(&format!("3 action record(s) pulled from {}", src.display())),
        "{}",
        v.stdout
    );
}

#[test]
fn a_checked_pull_refuses_a_tampered_record_and_keeps_none_of_it() {
    let p = chain();
    // Tamper: `upper`'s record now names `make`'s output, a valid artifact of the cache.
    let st = p.fpipe(&["status", "p.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    let by = |n: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .unwrap()
            .clone()
    };
    let key = by("upper")["key"].as_str().unwrap().to_string();
    let make_out = by("make")["outputs"]["files"].clone();
    let rec_path = p
        .path()
        .join(".fpipe/actions")
        .join(&key[..2])
        .join(format!("{key}.json"));
    let mut rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rec_path).unwrap()).unwrap();
    rec["outputs"]["files"] = make_out;
    std::fs::write(&rec_path, serde_json::to_string(&rec).unwrap()).unwrap();

    let q = other_project();
    let r = q.fpipe(&[
        "cache",
        "pull",
        &cache(&p),
        "--check",
        "3",
        "--pipeline",
        "p.yaml",
    ]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("pull refused"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("stage `upper`: the pulled record says files="),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("removed the 3 action record(s) this pull added"),
        "{}",
        r.stderr
    );
    assert_eq!(action_files(&q.path().join(".fpipe")), 0);
    let st = q.fpipe(&["status", "p.yaml"]).ok();
    assert!(
        st.stdout.contains("3 of 3 stages would run"),
        "{}",
        st.stdout
    );
    // The honest stage `make` was recomputed too, and matched.
    assert!(
        r.stdout.contains("make: recomputed, same result"),
        "{}",
        r.stdout
    );
}

#[test]
fn pull_check_needs_a_pipeline() {
    let p = chain();
    let q = other_project();
    let r = q.fpipe(&["cache", "pull", &cache(&p), "--check", "1"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("--pipeline"), "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------
// Read-only caches.
//
// Permissions do not stop root (CI often runs tests as root), so as root the cache is made
// read-only by permissions AND fpipe runs as the unprivileged user `nobody` (uid 65534),
// for whom the cache is someone else's read-only folder. If that user cannot be switched
// to, the test says so and checks nothing.
// ---------------------------------------------------------------------------------------

#[cfg(unix)]
fn chmod_tree(root: &Path, write: bool) {
    use std::os::unix::fs::PermissionsExt;
    fn rec(p: &Path, write: bool) {
        let meta = std::fs::symlink_metadata(p).unwrap();
        if meta.file_type().is_symlink() {
            return;
        }
        let mut mode = meta.permissions().mode() & 0o7777;
        mode = if write { mode | 0o200 } else { mode & !0o222 };
        if meta.is_dir() && write {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                rec(&e.unwrap().path(), write);
            }
        }
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    rec(root, write);
}

/// Runs fpipe as a user who cannot write the cache; `None` when that is impossible here.
#[cfg(unix)]
fn fpipe_read_only(p: &Project, args: &[&str]) -> Option<common::Run> {
    use std::os::unix::process::CommandExt;
    let mut cmd = p.cmd(args);
    if unsafe { libc::geteuid() } == 0 {
        // `nobody` must be able to read the project and the pipeline.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    match cmd.output() {
        Ok(o) => Some(common::Run::from(o)),
        Err(e) => {
            eprintln!("SKIPPED: cannot run fpipe as an unprivileged user here ({e})");
            None
        }
    }
}

#[cfg(unix)]
#[test]
fn a_fully_cached_run_works_on_a_read_only_cache() {
    let p = chain();
    let cache_dir = p.path().join(".fpipe");
    chmod_tree(&cache_dir, false);
    let result = std::panic::catch_unwind(|| {
        let Some(r) = fpipe_read_only(&p, &["run", "p.yaml"]) else {
            return;
        };
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(r.counts(), (0, 3, 0));
        assert_eq!(
            r.stderr.matches("warning:").count(),
            1,
            "warned once: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains("not writable") && r.stderr.contains("not recorded"),
            "{}",
            r.stderr
        );
        // Something must be computed: say which cache is not writable and what to do, and
        // say the OS error once.
        let r = fpipe_read_only(&p, &["run", "p.yaml", "-p", "tag=two"]).unwrap();
        assert_eq!(r.code, 1, "{}", r.all());
        assert!(
            r.stderr.contains(&format!(
                "stage `upper` failed: it must run, but the cache {} is not writable",
                cache_dir.display()
            )),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("--cache DIR"), "{}", r.stderr);
        assert!(
            !r.stderr.contains("log:"),
            "no log was written: {}",
            r.stderr
        );
        for line in r.stderr.lines() {
            assert!(line.matches("os error").count() <= 1, "{line}");
        }
        assert!(
            !r.stderr.contains("(os error 13): Permission denied"),
            "{}",
            r.stderr
        );
        // Reading commands work too.
        let st = fpipe_read_only(&p, &["status", "p.yaml"]).unwrap();
        assert_eq!(st.code, 0, "{}", st.all());
        assert!(
            st.stdout.contains("0 of 3 stages would run"),
            "{}",
            st.stdout
        );
    });
    chmod_tree(&cache_dir, true);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[cfg(unix)]
#[test]
fn errors_do_not_repeat_their_os_error() {
    let p = chain();
    // A cache that is a file: every command that opens it fails with one OS error.
    let f = p.write("not-a-cache", "x");
    let r = p.fpipe(&["--cache", f.to_str().unwrap(), "run", "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.stderr.matches("os error").count(), 1, "{}", r.stderr);
}
