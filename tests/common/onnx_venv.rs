//! The Python environment of the ONNX Runtime checks: a venv under the target folder
//! (`<target>/tmp/onnx-venv`), created on first use with `numpy`, `onnx` and `onnxruntime`
//! from PyPI and reused after. The interpreter that creates it is `FPIPE_TEST_PYTHON` or
//! `python3`. Without one (or without PyPI) the tests fail and say why, unless
//! `FPIPE_SKIP_ONNX_TESTS=1` (then they are skipped, saying so).

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGES: &[&str] = &["numpy", "onnx>=1.15", "onnxruntime>=1.17"];

fn works(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import numpy, onnx, onnxruntime"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The venv's python with ONNX Runtime, or `None` when skipped (`FPIPE_SKIP_ONNX_TESTS=1`).
pub fn python(target_tmp: &str) -> Option<PathBuf> {
    let dir = Path::new(target_tmp).join("onnx-venv");
    let python = dir.join("bin").join("python");
    std::fs::create_dir_all(target_tmp).expect("target tmp folder");
    // One creator at a time across test processes.
    let lock = std::fs::File::create(Path::new(target_tmp).join("onnx-venv.lock")).expect("lock");
    lock.lock().expect("lock the venv");
    if works(&python) {
        return Some(python);
    }
    let fail = |why: String| -> Option<PathBuf> {
        if std::env::var("FPIPE_SKIP_ONNX_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: {why} (FPIPE_SKIP_ONNX_TESTS=1)");
            return None;
        }
        panic!(
            "the ONNX Runtime checks need Python 3 with venv and PyPI: {why}. Set \
             FPIPE_TEST_PYTHON to an interpreter, or FPIPE_SKIP_ONNX_TESTS=1 to skip them"
        );
    };
    let base = std::env::var("FPIPE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let made = Command::new(&base)
        .args(["-m", "venv", "--clear"])
        .arg(&dir)
        .output();
    match made {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return fail(format!(
                "`{base} -m venv {}` failed: {}",
                dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return fail(format!("cannot run `{base}`: {e}")),
    }
    let pip = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(PACKAGES)
        .output();
    match pip {
        Ok(o) if o.status.success() && works(&python) => Some(python),
        Ok(o) => fail(format!(
            "pip install {} failed: {}",
            PACKAGES.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => fail(format!("cannot run pip: {e}")),
    }
}

/// ONNX Runtime's output for input `x` (NCHW) and the script's JSON line (versions, checker),
/// through `scripts/onnx_check.py` (files in `tmp`); with `checker`, `onnx.checker`'s full
/// check must pass too.
#[allow(dead_code)] // not every including target calls it
pub fn run_onnx_runtime(
    python: &Path,
    onnx: &Path,
    x: &candle_core::Tensor,
    tmp: &Path,
    checker: bool,
) -> (Vec<f32>, String) {
    let (n, c, h, w) = x.dims4().unwrap();
    let inp = tmp.join("input.f32");
    let out = tmp.join("output.f32");
    let data: Vec<u8> = x
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&inp, data).unwrap();
    // Included by the root crate's tests and by fpipe-stages' (one folder down).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = ["scripts/onnx_check.py", "../scripts/onnx_check.py"]
        .map(|r| root.join(r))
        .into_iter()
        .find(|s| s.exists())
        .expect("scripts/onnx_check.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(onnx).arg(&inp);
    cmd.args([n, c, h, w].map(|v| v.to_string())).arg(&out);
    if checker {
        cmd.arg("--checker");
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "onnx_check.py failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    if checker {
        assert!(String::from_utf8_lossy(&o.stdout).contains("\"checker\": \"passed\""));
    }
    let output = std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (
        output,
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
    )
}
