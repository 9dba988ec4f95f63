//! What the check before a stage costs on a 10,000-file artifact, against the floor of one
//! `readdir` + `stat` of every file and a full rehash:
//! `cargo run --release -p fpipe-cache --example check_cost`.

use fpipe_cache::{ArtifactStore, CheckDepth};
use std::time::{Duration, Instant};

fn best(f: &dyn Fn()) -> Duration {
    (0..15)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = ArtifactStore::open(d.path()).expect("store");
    let s = store.staging().expect("staging");
    std::fs::create_dir(s.path().join("d")).expect("mkdir");
    for i in 0..10_000 {
        std::fs::write(s.path().join("d").join(format!("f{i}")), format!("{i}\n")).expect("write");
    }
    let id = store.commit(s).expect("commit");
    let dir = store.object_path(&id).join("d");
    let floor = best(&|| {
        for e in std::fs::read_dir(&dir).expect("readdir") {
            let _ = e.expect("entry").metadata();
        }
    });
    let stat = best(&|| store.check_artifact(&id, CheckDepth::Stat).expect("intact"));
    let full = best(&|| store.check_artifact(&id, CheckDepth::Full).expect("intact"));
    println!("10,000 files, best of 15:");
    println!("  readdir + stat of every file (floor) {floor:?}");
    println!("  check_artifact, stat (default)        {stat:?}");
    println!("  check_artifact, full rehash           {full:?}");
}
