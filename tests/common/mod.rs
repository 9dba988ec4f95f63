//! Helpers for tests that drive the real `fpipe` binary on real files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
    pub fn fpipe(&self, args: &[&str]) -> Run {
        let out = self.cmd(args).output().expect("run fpipe");
        Run::from(out)
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fpipe"));
        c.args(args)
            .current_dir(self.path())
            .env_remove("FPIPE_CACHE")
            .env_remove("FPIPE_REMOTE");
        c
    }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        }
    }
}

impl Run {
    /// The `ran N, cached M, failed F` counts from the summary line, which must be the last
    /// line on stdout.
    pub fn counts(&self) -> (usize, usize, usize) {
        let last = self
            .stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no output; stderr:\n{}", self.stderr));
        let nums: Vec<usize> = last
            .split(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|s| !s.is_empty() && !s.contains('.'))
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(
            last.starts_with("ran "),
            "last line is not the summary: {last:?}\n{}",
            self.stderr
        );
        (nums[0], nums[1], nums[2])
    }
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "fpipe failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}
