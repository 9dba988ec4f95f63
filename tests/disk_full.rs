//! A full disk: a run whose cache fills up fails with a message that says so, trusts nothing
//! half-written, and a rerun with room completes. The cache sits on a small tmpfs, which needs
//! root (CI runs as root); elsewhere the test says why it did not run.

mod common;
use common::Project;
use std::path::Path;
use std::process::Command;

struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(at: &'a Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(at))
    }
    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

const PIPELINE: &str = r#"stages:
  small:
    uses: shell
    with: {run: echo ok > a, outputs: [a]}
  big:
    uses: shell
    inputs: {s: small}
    with: {run: "head -c 3000000 /dev/zero > b && cat in/s/a >> b", outputs: [b]}
  after:
    uses: shell
    inputs: {b: big}
    with: {run: "wc -c < in/b/b > n", outputs: [n]}
"#;

#[test]
fn a_full_cache_fails_clearly_and_a_rerun_with_room_completes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs for the cache needs root (CI runs as root)");
        return;
    }
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    let cache = p.path().join("cache");
    let Some(fs) = Tmpfs::mount(&cache, "1m") else {
        eprintln!("skipped: `mount -t tmpfs` failed here (a container without CAP_SYS_ADMIN?)");
        return;
    };
    let cache_s = cache.to_str().unwrap();
    let r = p.fpipe(&["--cache", cache_s, "run", "p.yaml", "-j", "1"]);
    assert_eq!(r.code, 1, "{}", r.all());
    eprintln!("the full-disk run said:\n{}", r.all());
    assert!(
        r.all().contains("No space left on device"),
        "says why:\n{}",
        r.all()
    );
    assert!(!r.all().contains("panicked"), "{}", r.all());
    assert!(
        r.stderr
            .contains("hint: the disk holding the cache is full"),
        "{}",
        r.stderr
    );
    // Nothing half-written is trusted: what was published verifies, and `big` is not cached.
    let v = p.fpipe(&["--cache", cache_s, "cache", "verify"]).ok();
    assert!(v.stdout.contains(": 0 problem(s)"), "{}", v.stdout);
    fs.resize("64m");
    let st = p.fpipe(&["--cache", cache_s, "status", "p.yaml"]).ok();
    assert!(
        st.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("big ") && l.contains("will run")),
        "{}",
        st.stdout
    );
    let r = p.fpipe(&["--cache", cache_s, "run", "p.yaml"]).ok();
    assert_eq!(r.counts().2, 0, "{}", r.all());
    let out = p
        .fpipe(&["--cache", cache_s, "out", "after", "-f", "p.yaml"])
        .ok();
    let n = std::fs::read_to_string(Path::new(out.stdout.trim()).join("n")).unwrap();
    assert_eq!(n.trim(), "3000003");
    let r = p.fpipe(&["--cache", cache_s, "run", "p.yaml"]).ok();
    assert_eq!(r.counts(), (0, 3, 0));
}
