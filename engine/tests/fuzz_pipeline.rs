//! A bounded fuzz loop over the pipeline front end: YAML, templates, includes, `foreach` /
//! `matrix` expansion and planning. Mutants of valid pipelines must load or fail with a
//! `PipelineError`; a panic fails the test and leaves the input under the target folder.
//!
//! `FPIPE_FUZZ_SECONDS` sets the time spent (default 3 s); `scripts/fuzz.sh` runs it longer.
//! An input it finds becomes a regression test beside the others in this crate.

use fpipe_engine::{load, plan, Overrides, Registry};
use std::path::Path;
use std::time::{Duration, Instant};

const SEEDS: &[&str] = &[
    "fpipe: 1\nparams: {n: 3, greeting: hi}\nstages:\n  make:\n    uses: shell\n    with:\n      run: echo \"{{ params.greeting }}\" > out\n      outputs: [out]\n  each:\n    foreach: \"{{ params.n }}\"\n    uses: shell\n    inputs: {x: make}\n    with: {run: \"cat in/x/out > o${item}\", outputs: [\"o${item}\"]}\n",
    "params: {lrs: [0.1, 0.01]}\nstages:\n  grid:\n    matrix: {lr: [0.1, 0.2], arch: [a, b]}\n    uses: shell\n    with: {run: \"echo ${item.lr} ${item.arch}\", env: {A: \"${index}\"}}\n  last:\n    uses: shell\n    inputs: {g: grid@last}\n    with: {run: \"true\"}\n",
    "stages:\n{% for i in range(3) %}  s{{ i }}:\n    uses: shell\n    with: {run: \"echo {{ i }}\"}\n{% endfor %}",
    "params: {gens: 2}\nstages:\n  gen:\n    foreach: {a: 1, b: 2}\n    uses: shell\n    inputs: {prev: \"${prev}\"}\n    with: {run: \"echo ${key}\", outputs: [x], deps: [inc.yaml]}\n",
    "include: inc.yaml\nstages:\n  top:\n    uses: shell\n    inputs: {i: inner}\n    resources: {cpu: 2, gpu: 0}\n    with: {run: \"true\", shell: bash}\n",
];

const INCLUDED: &str = "params: {x: 1}\nstages:\n  inner:\n    uses: shell\n    with: {run: \"echo {{ params.x }}\"}\n";

const TOKENS: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    ":",
    "- ",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    "\n",
    "  ",
    ".",
    "..",
    "${item}",
    "${prev}",
    "${key}",
    "@last",
    "foreach: 100000000",
    "matrix: {a: [1,2]}",
    "range(100000)",
    "params.n",
    "~",
    "*",
    "\r",
    "\x1b",
    "\u{202e}",
    "&a",
    "*a",
    "!!binary",
    "<<: *a",
    "null",
    "1e400",
    "-1",
    "18446744073709551616",
    "uses: nope",
    "inputs: {x: x}",
    "include: inc.yaml",
    "../",
    "/etc/passwd",
    "\0",
];

/// SplitMix64: a seeded generator, so a run can be repeated.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                b.splice(at..at, t.bytes());
            }
            2 if !b.is_empty() => {
                let end = (at + 1 + rng.below(12)).min(b.len());
                b.drain(at.min(end)..end);
            }
            3 => {
                let other = SEEDS[rng.below(SEEDS.len())].as_bytes();
                let from = rng.below(other.len());
                let len = rng.below(other.len() - from + 1);
                b.splice(at..at, other[from..from + len].iter().copied());
            }
            _ => {
                let lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let l = lines[rng.below(lines.len())];
                    b.splice(at..at, format!("{l}\n").bytes());
                }
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn budget() -> Duration {
    let secs = std::env::var("FPIPE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn load_and_plan(file: &Path, overrides: &Overrides, registry: &Registry) {
    if let Ok(p) = load(file, overrides) {
        let _ = plan(p, registry);
    }
}

#[test]
fn mutated_pipelines_load_or_fail_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inc.yaml"), INCLUDED).unwrap();
    let registry = Registry::with_builtins();
    let file = dir.path().join("p.yaml");
    let mut rng = Rng(std::env::var("FPIPE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED));
    let (start, budget) = (Instant::now(), budget());
    let mut cases = 0u64;
    let mut failures = Vec::new();
    while start.elapsed() < budget || cases < 200 {
        let seed = SEEDS[rng.below(SEEDS.len())];
        let text = mutate(&mut rng, seed);
        let overrides = Overrides {
            files: vec![],
            pairs: match rng.below(4) {
                0 => vec![format!("n={}", mutate(&mut rng, "[1, {a: 2}]"))],
                1 => vec!["greeting=\"x\r\x1b\"".into()],
                _ => vec![],
            },
        };
        std::fs::write(&file, &text).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load_and_plan(&file, &overrides, &registry)
        }));
        if outcome.is_err() {
            let keep = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("fuzz-pipeline-panic-{cases}.yaml"));
            let _ = std::fs::write(&keep, &text);
            failures.push(format!(
                "{} (overrides {:?})",
                keep.display(),
                overrides.pairs
            ));
        }
        cases += 1;
    }
    eprintln!(
        "fuzzed {cases} pipelines in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "inputs that panicked: {failures:#?}");
}
