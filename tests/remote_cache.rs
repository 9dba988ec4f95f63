//! Remote caches on object storage: `cache push|pull URL`, `run --remote/--push`,
//! `gc --remote`, against a `file://` remote and a real S3 API on loopback (the moto server,
//! see common/s3.rs), with the faults that matter: a corrupted or truncated remote object, a
//! connection cut in the middle of a download or an upload, a push killed while it hangs, two
//! pushes of the same artifacts at once; and against Azure Blob Storage's emulator (Azurite,
//! common/azurite.rs). Only `shell` stages, so these run with and without
//! the face stages; `train_pipeline_*` (faces only) adds a training stage.

#[path = "common/azurite.rs"]
mod azurite;
mod common;
#[path = "common/s3.rs"]
mod s3;

use azurite::{Azurite, CONTAINER};
use common::{Project, Run};
use s3::{Fault, Proxy, BUCKET, S3};
use std::path::{Path, PathBuf};

/// make (many small files) and big (12 MB: a multipart upload) -> upper. `tag` only changes
/// `upper`.
const PIPE: &str = r#"params: {tag: one}
stages:
  make:
    uses: shell
    with: {run: 'printf "hello\n" > msg.txt; mkdir many; for i in $(seq 1 40); do echo $i > many/f$i; done', outputs: [msg.txt, many]}
  big:
    uses: shell
    with: {run: 'yes fpipe-remote-test | head -c 12000000 > big.bin', outputs: [big.bin]}
  upper:
    uses: shell
    inputs: {m: make, b: big}
    with: {run: 'tr a-z A-Z < in/m/msg.txt > up.txt; wc -c < in/b/big.bin >> up.txt; echo {{ params.tag }} >> up.txt', outputs: [up.txt]}
"#;

fn team(pipe: &str) -> Project {
    let p = Project::new();
    p.write("p.yaml", pipe);
    p
}

fn run_env(p: &Project, args: &[&str], env: &[(String, String)]) -> Run {
    let mut c = p.cmd(args);
    for (k, v) in env {
        c.env(k, v);
    }
    Run::from(c.output().expect("run fpipe"))
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Ids of the artifacts in a local cache.
fn local_objects(p: &Project) -> Vec<String> {
    let mut out: Vec<String> = files(&p.path().join(".fpipe/objects"))
        .into_iter()
        .filter_map(|f| f.split('/').nth(1).map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn up_text(p: &Project, env: &[(String, String)]) -> String {
    let out = run_env(p, &["out", "upper", "-f", "p.yaml"], env).ok();
    std::fs::read_to_string(PathBuf::from(out.stdout.trim()).join("up.txt")).unwrap()
}

#[test]
fn file_remote_shares_results_between_two_teams() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(&remote.path().join("shared"));
    let a = team(PIPE);
    assert_eq!(a.fpipe(&["run", "p.yaml"]).ok().counts(), (3, 0, 0));
    let r = a.fpipe(&["cache", "push", &url, "p.yaml"]).ok();
    assert!(
        r.stdout.contains("pushed 3 artifacts") && r.stdout.contains("3 action records"),
        "{}",
        r.stdout
    );
    // Content-addressed: nothing is sent again.
    let r = a.fpipe(&["cache", "push", &url, "p.yaml"]).ok();
    assert!(r.stdout.contains("pushed 0 artifacts"), "{}", r.stdout);
    assert!(
        r.stdout.contains("3 artifacts already there"),
        "{}",
        r.stdout
    );
    let packs = files(&remote.path().join("shared/objects"));
    assert_eq!(packs.len(), 3, "one object per artifact: {packs:?}");

    // The second team computes nothing: every stage is fetched, checked and cached.
    let b = team(PIPE);
    let r = b.fpipe(&["run", "p.yaml", "--remote", &url]).ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
    assert!(
        r.stderr.contains("fetched the results of 3 stage(s)"),
        "{}",
        r.stderr
    );
    assert_eq!(local_objects(&a), local_objects(&b));
    assert_eq!(up_text(&b, &[]), "HELLO\n12000000\none\n");
    let st = b.fpipe(&["status", "p.yaml"]).ok();
    assert!(
        st.stdout
            .contains(&format!("cached (pulled from {url} at ")),
        "each pulled record says where it came from: {}",
        st.stdout
    );
    let v = b.fpipe(&["cache", "verify"]).ok();
    assert!(
        v.stdout
            .contains(&format!("3 action record(s) pulled from {url}")),
        "{}",
        v.stdout
    );

    // FPIPE_REMOTE is the default remote; --push uploads what the run computed.
    let r = run_env(
        &b,
        &["run", "p.yaml", "-p", "tag=two", "--push"],
        &[("FPIPE_REMOTE".into(), url.clone())],
    )
    .ok();
    assert_eq!(r.counts(), (1, 2, 0));
    assert!(r.stderr.contains("pushed 1 artifacts"), "{}", r.stderr);
    let c = team(PIPE);
    let r = c
        .fpipe(&["cache", "pull", &url, "p.yaml", "-p", "tag=two"])
        .ok();
    assert!(r.stdout.contains("pulled 3 artifacts"), "{}", r.stdout);
    assert_eq!(
        c.fpipe(&["run", "p.yaml", "-p", "tag=two"]).ok().counts(),
        (0, 3, 0)
    );
    // validate names the remote a run would use, and rejects one that is not a remote.
    let v = run_env(
        &c,
        &["validate", "p.yaml"],
        &[("FPIPE_REMOTE".into(), url.clone())],
    )
    .ok();
    assert!(
        v.stdout.contains(&format!(
            "remote cache a run would use: {url} (a local folder)"
        )),
        "{}",
        v.stdout
    );
    let v = c.fpipe(&["validate", "p.yaml", "--remote", "ftp://x/y"]);
    assert_eq!(v.code, 1);
    assert!(
        v.stderr.contains("unknown kind of remote") && v.stderr.contains("s3://BUCKET"),
        "{}",
        v.stderr
    );
}

/// `note` changes `prep`'s key but not its bytes, so `slow`'s key is only known once `prep`
/// has run: the remote is asked for it when `slow` comes up, not only before the run.
const DOWNSTREAM: &str = r#"params: {note: a}
stages:
  prep:
    uses: shell
    with: {run: 'echo same > data.txt # {{ params.note }}', outputs: [data.txt]}
  slow:
    uses: shell
    inputs: {d: prep}
    with: {run: 'cat in/d/data.txt > out.txt; echo computed >> out.txt', outputs: [out.txt]}
"#;

#[test]
fn a_stage_whose_key_is_known_only_during_the_run_is_still_fetched() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = team(DOWNSTREAM);
    let r = a.fpipe(&["run", "p.yaml", "--remote", &url, "--push"]).ok();
    assert_eq!(r.counts(), (2, 0, 0), "{}", r.stderr);
    let b = team(DOWNSTREAM);
    let r = b
        .fpipe(&["run", "p.yaml", "-p", "note=b", "--remote", &url])
        .ok();
    assert_eq!(
        r.counts(),
        (1, 1, 0),
        "prep runs, slow is fetched: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("fetched a stage's result"),
        "{}",
        r.stderr
    );
    let status = b.fpipe(&["status", "p.yaml", "-p", "note=b"]).ok();
    assert!(status.stdout.contains("0 of 2"), "{}", status.stdout);
    let out = b.fpipe(&["out", "slow", "-p", "note=b"]).ok();
    let text = std::fs::read_to_string(Path::new(out.stdout.trim()).join("out.txt")).unwrap();
    assert_eq!(text, "same\ncomputed\n");
    // Without the remote the same run computes both.
    let c = team(DOWNSTREAM);
    let r = c.fpipe(&["run", "p.yaml", "-p", "note=b"]).ok();
    assert_eq!(r.counts(), (2, 0, 0));
}

#[test]
fn pull_of_everything_and_push_of_everything() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = team(PIPE);
    a.fpipe(&["run", "p.yaml"]).ok();
    a.fpipe(&["run", "p.yaml", "-p", "tag=two"]).ok();
    let r = a.fpipe(&["cache", "push", &url, "--all"]).ok();
    assert!(
        r.stdout.contains("pushed 4 artifacts") && r.stdout.contains("4 action records"),
        "{}",
        r.stdout
    );
    let b = team(PIPE);
    let r = b.fpipe(&["--cache", ".fpipe", "cache", "pull", &url]).ok();
    assert!(
        r.stdout.contains("pulled 4 artifacts") && r.stdout.contains("4 action records"),
        "{}",
        r.stdout
    );
    assert_eq!(
        b.fpipe(&["run", "p.yaml", "-p", "tag=two"]).ok().counts(),
        (0, 3, 0)
    );
    assert_eq!(b.fpipe(&["run", "p.yaml"]).ok().counts(), (0, 3, 0));
}

/// Flips one byte in the middle of a file (stored objects are read-only).
fn damage(f: &Path, at: usize) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = std::fs::read(f).unwrap();
    b[at] ^= 0x20;
    std::fs::write(f, b).unwrap();
}

#[test]
fn a_corrupted_or_truncated_remote_object_is_named_and_nothing_of_it_is_kept() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = team(PIPE);
    a.fpipe(&["run", "p.yaml"]).ok();
    a.fpipe(&["cache", "push", &url, "p.yaml"]).ok();
    // The largest pack is big's; flip a byte in its content.
    let mut packs: Vec<(u64, PathBuf)> = files(&remote.path().join("objects"))
        .into_iter()
        .map(|f| remote.path().join("objects").join(f))
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    packs.sort();
    let (size, big) = packs.last().unwrap().clone();
    damage(&big, size as usize / 2);
    let b = team(PIPE);
    let r = b.fpipe(&["cache", "pull", &url, "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let rel = big
        .strip_prefix(remote.path())
        .unwrap()
        .display()
        .to_string();
    assert!(
        r.stderr
            .contains(&format!("remote object {url}/{rel} is corrupt")),
        "names the object: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("not to the artifact id it is named by"),
        "{}",
        r.stderr
    );
    // The intact artifact arrived; the damaged one and every record needing it did not.
    assert_eq!(local_objects(&b).len(), 1);
    assert!(
        files(&b.path().join(".fpipe/staging")).is_empty(),
        "no leftovers"
    );
    let st = b.fpipe(&["status", "p.yaml"]).ok();
    let line = |name: &str| {
        st.stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("make").contains("cached (pulled from"),
        "{}",
        st.stdout
    );
    assert!(line("big").contains("will run"), "{}", st.stdout);
    // A run with the remote warns and computes what the remote could not supply.
    let r = b.fpipe(&["run", "p.yaml", "--remote", &url]).ok();
    assert!(
        r.stderr.contains("is corrupt") && r.stderr.contains("computed here"),
        "{}",
        r.stderr
    );
    assert_eq!(r.counts(), (2, 1, 0));

    // A truncated object (a torn copy) is named as such.
    std::fs::write(&big, &std::fs::read(&big).unwrap()[..1000]).unwrap();
    let c = team(PIPE);
    let r = c.fpipe(&["cache", "pull", &url, "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("is corrupt: the pack ends early (truncated)"),
        "{}",
        r.stderr
    );
    assert_eq!(local_objects(&c).len(), 1);
}

#[test]
fn a_cache_folder_stays_a_cache_folder() {
    let a = team(PIPE);
    a.fpipe(&["run", "p.yaml"]).ok();
    let r = a.fpipe(&["cache", "push", "other", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is a cache folder") && r.stderr.contains("s3://"),
        "{}",
        r.stderr
    );
    let r = a.fpipe(&["cache", "pull", "s3://", "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("remote \"s3://\""), "{}", r.stderr);
}

#[test]
fn remote_gc_is_a_dry_run_until_told() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = team(PIPE);
    a.fpipe(&["run", "p.yaml", "-p", "tag=old", "--remote", &url, "--push"])
        .ok();
    a.fpipe(&["run", "p.yaml", "--remote", &url, "--push"]).ok();
    assert_eq!(files(&remote.path().join("objects")).len(), 4);
    // Only the newest run is kept: the old `upper` output goes.
    let r = a.fpipe(&["gc", "--keep-runs", "1", "--remote", &url]).ok();
    assert!(
        r.stdout.contains("would remove 1 artifacts") && r.stdout.contains("1 action records"),
        "{}",
        r.stdout
    );
    assert_eq!(files(&remote.path().join("objects")).len(), 4, "dry run");
    let r = a
        .fpipe(&["gc", "--keep-runs", "1", "--remote", &url, "--yes"])
        .ok();
    assert!(r.stdout.contains("removed 1 artifacts"), "{}", r.stdout);
    assert_eq!(files(&remote.path().join("objects")).len(), 3);
    assert_eq!(files(&remote.path().join("actions")).len(), 3);
    let b = team(PIPE);
    assert_eq!(
        b.fpipe(&["run", "p.yaml", "--remote", &url]).ok().counts(),
        (0, 3, 0)
    );
}

// ---- against Azure Blob Storage (Azurite) -------------------------------------------------

#[test]
fn azure_push_pull_run_with_remote_and_gc() {
    let Some(az) = Azurite::start() else { return };
    let env = az.env();
    let url = format!("az://{CONTAINER}/teams");
    let a = team(PIPE);
    let r = run_env(&a, &["run", "p.yaml", "--remote", &url, "--push"], &env).ok();
    assert!(r.stderr.contains("pushed 3 artifacts"), "{}", r.stderr);
    // A second team computes nothing; a third pulls, then changes `tag` and pushes.
    let b = team(PIPE);
    let r = run_env(&b, &["run", "p.yaml", "--remote", &url], &env).ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
    assert_eq!(local_objects(&a), local_objects(&b));
    assert_eq!(up_text(&a, &[]), up_text(&b, &[]));
    let r = run_env(&b, &["cache", "push", &url, "p.yaml"], &env).ok();
    assert!(r.stdout.contains("pushed 0 artifacts"), "{}", r.stdout);
    let c = team(PIPE);
    run_env(&c, &["cache", "pull", &url, "p.yaml"], &env).ok();
    let r = run_env(
        &c,
        &["run", "p.yaml", "-p", "tag=two", "--remote", &url, "--push"],
        &env,
    )
    .ok();
    assert_eq!(r.counts(), (1, 2, 0), "{}", r.stderr);
    // gc from c (which ran only tag=two last) keeps its run; the old `upper` goes.
    let r = run_env(
        &c,
        &["gc", "--keep-runs", "1", "--remote", &url, "--yes"],
        &env,
    )
    .ok();
    assert!(r.stdout.contains("removed 1 artifacts"), "{}", r.stdout);
}

// ---- against the S3 API -------------------------------------------------------------------

fn s3_url(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}")
}

#[test]
fn s3_push_pull_and_run_with_remote() {
    let Some(s3) = S3::start() else { return };
    let env = s3.env(None);
    let url = s3_url("teams");
    let a = team(PIPE);
    let r = run_env(&a, &["run", "p.yaml", "--remote", &url, "--push"], &env).ok();
    assert_eq!(r.counts(), (3, 0, 0));
    assert!(
        r.stderr.contains("pushed 3 artifacts") && r.stderr.contains("3 action records"),
        "{}",
        r.stderr
    );
    let keys = s3.keys("teams/");
    assert_eq!(
        keys.iter()
            .filter(|k| k.starts_with("teams/objects/"))
            .count(),
        3,
        "{keys:?}"
    );
    assert_eq!(
        keys.iter()
            .filter(|k| k.starts_with("teams/actions/"))
            .count(),
        3,
        "{keys:?}"
    );
    // Nothing is sent twice.
    let r = run_env(&a, &["cache", "push", &url, "--all"], &env).ok();
    assert!(
        r.stdout.contains("pushed 0 artifacts") && r.stdout.contains("3 artifacts already there"),
        "{}",
        r.stdout
    );

    let b = team(PIPE);
    let r = run_env(&b, &["run", "p.yaml", "--remote", &url], &env).ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
    assert_eq!(up_text(&b, &env), "HELLO\n12000000\none\n");
    assert_eq!(local_objects(&a), local_objects(&b));
    let v = run_env(&b, &["validate", "p.yaml", "--remote", &url], &env).ok();
    assert!(
        v.stdout.contains(&format!(
            "remote cache a run would use: {url} (S3 API at {}, from AWS_ENDPOINT_URL)",
            s3.endpoint()
        )),
        "{}",
        v.stdout
    );
    let c = team(PIPE);
    let r = run_env(&c, &["cache", "pull", &url], &env).ok();
    assert!(
        r.stdout.contains("pulled 3 artifacts") && r.stdout.contains("3 action records"),
        "{}",
        r.stdout
    );
    assert_eq!(
        run_env(&c, &["run", "p.yaml"], &env).ok().counts(),
        (0, 3, 0)
    );
}

#[test]
fn s3_corrupted_object_is_named_and_replacing_it_repairs_the_remote() {
    let Some(s3) = S3::start() else { return };
    let env = s3.env(None);
    let url = s3_url("c");
    let a = team(PIPE);
    run_env(&a, &["run", "p.yaml", "--remote", &url, "--push"], &env).ok();
    let obj = s3
        .keys("c/objects/")
        .into_iter()
        .find(|k| {
            let (_, body) = s3.get(&format!("/{BUCKET}/{k}"));
            body.len() > 1_000_000
        })
        .expect("big's pack");
    let (_, mut body) = s3.get(&format!("/{BUCKET}/{obj}"));
    let n = body.len();
    body[n / 2] ^= 1;
    assert_eq!(s3.request("PUT", &format!("/{BUCKET}/{obj}"), &body), 200);
    let b = team(PIPE);
    let r = run_env(&b, &["cache", "pull", &url, "p.yaml"], &env);
    assert_eq!(r.code, 1, "{}", r.all());
    let name = format!("remote object s3://{BUCKET}/{obj} is corrupt");
    assert!(r.stderr.contains(&name), "{}", r.stderr);
    assert_eq!(local_objects(&b).len(), 1, "only the intact artifact");
    // Removing the damaged object and pushing again from a good cache repairs the remote.
    s3.delete(&obj);
    run_env(&a, &["cache", "push", &url, "p.yaml"], &env).ok();
    let r = run_env(&b, &["run", "p.yaml", "--remote", &url], &env).ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
}

#[test]
fn s3_download_cut_mid_object_publishes_nothing_and_a_retry_completes() {
    let Some(s3) = S3::start() else { return };
    let url = s3_url("cut");
    let a = team(PIPE);
    run_env(
        &a,
        &["run", "p.yaml", "--remote", &url, "--push"],
        &s3.env(None),
    )
    .ok();
    // Each connection may bring back 1 MB: listings and small objects pass, big's 12 MB
    // pack is cut in the middle.
    let proxy = Proxy::start(s3.port, u64::MAX, 1 << 20, Fault::Cut);
    let b = team(PIPE);
    let r = run_env(
        &b,
        &["cache", "pull", &url, "p.yaml"],
        &s3.env(Some(proxy.port)),
    );
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        proxy.faults.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the proxy cut a transfer"
    );
    assert!(r.stderr.contains("1 of 4 transfers failed"), "{}", r.stderr);
    assert!(
        r.stderr.contains("nothing partial was stored"),
        "{}",
        r.stderr
    );
    assert_eq!(local_objects(&b).len(), 1, "make's artifact only");
    assert!(
        files(&b.path().join(".fpipe/staging")).is_empty(),
        "no leftovers"
    );
    let r = run_env(&b, &["cache", "pull", &url, "p.yaml"], &s3.env(None)).ok();
    // make's result arrived the first time; big's, then upper's (its key needs big's output).
    assert!(
        r.stdout.contains("pulled 2 artifacts") && r.stdout.contains("2 action records"),
        "{}",
        r.stdout
    );
    assert_eq!(
        run_env(&b, &["run", "p.yaml"], &[]).ok().counts(),
        (0, 3, 0)
    );
}

#[test]
fn s3_upload_cut_or_killed_mid_object_leaves_no_object_and_a_retry_completes() {
    let Some(s3) = S3::start() else { return };
    let url = s3_url("up");
    let a = team(PIPE);
    a.fpipe(&["run", "p.yaml"]).ok();
    // Each connection may carry 3 MB to the server: big's first 8 MB part is cut.
    let proxy = Proxy::start(s3.port, 3 << 20, u64::MAX, Fault::Cut);
    let r = run_env(
        &a,
        &["cache", "push", &url, "p.yaml"],
        &s3.env(Some(proxy.port)),
    );
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("1 of 3 transfers failed"), "{}", r.stderr);
    let objects = s3.keys("up/objects/");
    assert_eq!(objects.len(), 2, "no trace of the cut upload: {objects:?}");
    let actions = s3.keys("up/actions/");
    // make's and upper's records (their outputs arrived), not big's: no record names a
    // missing output.
    assert_eq!(actions.len(), 2, "{actions:?}");
    drop(proxy);

    // A push that hangs mid-upload, killed with SIGKILL.
    let b = team(PIPE);
    b.fpipe(&["run", "p.yaml", "-p", "tag=kill"]).ok();
    let stall = Proxy::start(s3.port, 3 << 20, u64::MAX, Fault::Stall);
    let url2 = s3_url("killed");
    let mut cmd = b.cmd(&["cache", "push", &url2, "p.yaml", "-p", "tag=kill"]);
    for (k, v) in s3.env(Some(stall.port)) {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while stall.faults.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push hangs at the stalled upload"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let objects = s3.keys("killed/objects/");
    assert!(objects.len() <= 2, "big's pack never appears: {objects:?}");
    assert!(s3.keys("killed/actions/").iter().all(|k| !k.is_empty()));
    let r = run_env(
        &b,
        &["cache", "push", &url2, "p.yaml", "-p", "tag=kill"],
        &s3.env(None),
    )
    .ok();
    assert!(r.stdout.contains("3 action records"), "{}", r.stdout);
    assert_eq!(s3.keys("killed/objects/").len(), 3);
    let c = team(PIPE);
    let r = run_env(
        &c,
        &["run", "p.yaml", "-p", "tag=kill", "--remote", &url2],
        &s3.env(None),
    )
    .ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
}

#[test]
fn s3_two_pushes_of_the_same_artifacts_at_once() {
    let Some(s3) = S3::start() else { return };
    let url = s3_url("twice");
    let a = team(PIPE);
    let b = team(PIPE);
    a.fpipe(&["run", "p.yaml"]).ok();
    b.fpipe(&["run", "p.yaml"]).ok();
    assert_eq!(local_objects(&a), local_objects(&b));
    let spawn = |p: &Project| {
        let mut c = p.cmd(&["cache", "push", &url, "p.yaml"]);
        for (k, v) in s3.env(None) {
            c.env(k, v);
        }
        // The test server (moto, threaded) may answer one of two simultaneous PUTs of one key
        // with a 500; S3 takes both. The client's retry, on for users, covers it.
        c.env("FPIPE_REMOTE_RETRIES", "3");
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a), spawn(&b));
    for c in [ca, cb] {
        Run::from(c.wait_with_output().unwrap()).ok();
    }
    assert_eq!(s3.keys("twice/objects/").len(), 3);
    assert_eq!(s3.keys("twice/actions/").len(), 3);
    let c = team(PIPE);
    let r = run_env(&c, &["run", "p.yaml", "--remote", &url], &s3.env(None)).ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
}

// ---- a face-recognition pipeline with a training stage ------------------------------------

/// synthetic faces -> train -> evaluate, small enough for a test.
#[cfg(feature = "faces")]
const FACES: &str = r#"stages:
  faces:
    uses: synthetic-faces
    with: {identities: 20, images_per_identity: 6, image_size: 32, test_identities: 6, pairs: 60}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 32, epochs: 1, batch_size: 32}
  evaluate:
    uses: evaluate
    inputs: {model: train.model, pairs: faces.pairs}
"#;

#[cfg(feature = "faces")]
#[test]
fn train_pipeline_through_s3_and_a_file_remote() {
    let remote = tempfile::tempdir().unwrap();
    let file = file_url(remote.path());
    let a = team(FACES);
    let r = a
        .fpipe(&["run", "p.yaml", "--remote", &file, "--push"])
        .ok();
    assert_eq!(r.counts(), (3, 0, 0));
    assert!(r.stderr.contains("3 action records"), "{}", r.stderr);
    // The second team trains nothing: the model and its evaluation come from the remote.
    let b = team(FACES);
    let r = b.fpipe(&["run", "p.yaml", "--remote", &file]).ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
    assert_eq!(local_objects(&a), local_objects(&b));
    let show = |p: &Project| p.fpipe(&["show", "p.yaml", "--json"]).ok().stdout;
    assert!(show(&b).contains("\"evaluate\""), "{}", show(&b));

    let Some(s3) = S3::start() else { return };
    let env = s3.env(None);
    let url = s3_url("faces");
    let r = run_env(&b, &["cache", "push", &url, "p.yaml"], &env).ok();
    assert!(r.stdout.contains("3 action records"), "{}", r.stdout);
    let c = team(FACES);
    // (No --check here: `train`'s report holds timings, so a recomputed train never
    // matches its record bit for bit.)
    let r = run_env(&c, &["cache", "pull", &url, "p.yaml"], &env).ok();
    assert!(r.stdout.contains("3 action records"), "{}", r.stdout);
    let r = run_env(&c, &["run", "p.yaml", "--remote", &url], &env).ok();
    assert_eq!(r.counts(), (0, 3, 0), "{}", r.stderr);
    assert_eq!(local_objects(&a), local_objects(&c));
}
