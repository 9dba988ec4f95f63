//! Caches this process cannot write: a fully cached run works on a read-only cache, and an
//! error names its OS cause once. Only `shell` stages, so these run with and without the face
//! stages.

mod common;
use common::Project;
use std::path::Path;

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
