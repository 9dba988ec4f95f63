//! The engine with stage kinds of its own making: typed ports, versions, in-process stages,
//! resumable scratch state, panics, path parameters.

use fpipe_cache::ArtifactStore;
use fpipe_engine::records::StageState;
use fpipe_engine::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Writes its `value` parameter into `out/<port>`; counts its runs.
struct Producer {
    version: u32,
    runs: Arc<AtomicUsize>,
}
impl Stage for Producer {
    fn kind(&self) -> &'static str {
        "produce"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![
                PortSpec::new("model", "model", "a model"),
                PortSpec::new("report", "report", "a report"),
            ],
            params: vec![
                ParamSpec::with_default("value", ParamType::Float, json!(1.0), "what to write"),
                ParamSpec::with_default("log_every", ParamType::Int, json!(10), "ignored")
                    .volatile(),
                ParamSpec::with_default(
                    "data",
                    ParamType::Path {
                        companions: &["idx"],
                    },
                    json!("data.rec"),
                    "a file",
                ),
            ],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let v = ctx.param_f64("value")?;
        std::fs::write(ctx.output("model")?.join("w"), format!("{v}"))?;
        std::fs::write(ctx.output("report")?.join("r"), "report")?;
        ctx.metric("value", v);
        Ok(())
    }
}

/// Consumes a dataset. Fails the first time (leaving a checkpoint), resumes the second.
struct Resumer;
impl Stage for Resumer {
    fn kind(&self) -> &'static str {
        "resume"
    }
    fn version(&self) -> u32 {
        1
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![PortSpec::new("model", "model", "a model")],
            outputs: vec![PortSpec::new("out", "report", "steps")],
            params: vec![],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let ckpt = ctx.scratch.join("step");
        let start: u32 = std::fs::read_to_string(&ckpt)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if start == 0 {
            std::fs::write(&ckpt, "5")?;
            return Err(StageError::msg("killed at step 5"));
        }
        std::fs::write(ctx.output("out")?.join("resumed_from"), start.to_string())?;
        Ok(())
    }
}

struct NeedsDataset;
impl Stage for NeedsDataset {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        1
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![PortSpec::new("data", "dataset", "training images")],
            outputs: vec![PortSpec::new("model", "model", "")],
            params: vec![],
        }
    }
    fn run(&self, _ctx: &mut StageContext) -> Result<(), StageError> {
        panic!("bug in the stage");
    }
}

fn setup(version: u32) -> (tempfile::TempDir, Engine, Arc<AtomicUsize>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.rec"), "records").unwrap();
    std::fs::write(dir.path().join("data.idx"), "index").unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut reg = Registry::with_builtins();
    reg.register(Arc::new(Producer {
        version,
        runs: runs.clone(),
    }));
    reg.register(Arc::new(Resumer));
    reg.register(Arc::new(NeedsDataset));
    let store = ArtifactStore::open(&dir.path().join(".fpipe")).unwrap();
    (
        dir,
        Engine {
            store,
            registry: reg,
        },
        runs,
    )
}

fn plan_of(
    engine: &Engine,
    dir: &std::path::Path,
    text: &str,
    pairs: &[&str],
) -> Result<Plan, EngineError> {
    let f = dir.join("p.yaml");
    std::fs::write(&f, text).unwrap();
    load_plan(
        &f,
        &Overrides {
            files: vec![],
            pairs: pairs.iter().map(|s| s.to_string()).collect(),
        },
        &engine.registry,
    )
}

fn run(engine: &Engine, plan: &Plan) -> RunSummary {
    let reporter: Arc<dyn Reporter> = Arc::new(Quiet);
    engine.run(plan, &RunOptions::default(), &reporter).unwrap()
}

#[test]
fn wrong_port_type_is_rejected() {
    let (dir, engine, _) = setup(1);
    let err = plan_of(
        &engine,
        dir.path(),
        "stages:\n  p: {uses: produce}\n  t:\n    uses: train\n    inputs:\n      data: p.model\n",
        &[],
    )
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("p.yaml:6: stage `t`: wrong port type: input `data` takes `dataset` but `p.model` is `model`"), "{msg}");
    assert!(err.is_bad_input());
    let err = plan_of(
        &engine,
        dir.path(),
        "stages:\n  p: {uses: produce}\n  t:\n    uses: train\n    inputs:\n      data: p\n",
        &[],
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("stage `p` has several outputs"),
        "{err}"
    );
    let err = plan_of(&engine, dir.path(), "stages:\n  t: {uses: train}\n", &[])
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("required input `data` (dataset) is not connected"),
        "{err}"
    );
}

#[test]
fn version_bump_reruns_and_says_why() {
    let text = "stages:\n  p: {uses: produce}\n";
    let (dir, engine, runs) = setup(1);
    let plan = plan_of(&engine, dir.path(), text, &[]).unwrap();
    assert_eq!(run(&engine, &plan).ran, 1);
    // Same store, new implementation version.
    let (_, mut engine2, runs2) = setup(2);
    engine2.store = engine.store.clone();
    let plan = plan_of(&engine2, dir.path(), text, &[]).unwrap();
    let st = engine2.status(&plan, &RunOptions::default()).unwrap();
    assert_eq!(st[0].reason, "implementation version changed: v1 -> v2");
    assert_eq!(run(&engine2, &plan).ran, 1);
    assert_eq!(
        (runs.load(Ordering::SeqCst), runs2.load(Ordering::SeqCst)),
        (1, 1)
    );
}

#[test]
fn keys_ignore_volatile_params_and_number_spelling_but_see_file_content() {
    let (dir, engine, runs) = setup(1);
    let p1 = plan_of(
        &engine,
        dir.path(),
        "stages:\n  p: {uses: produce, with: {value: 1, log_every: 5}}\n",
        &[],
    )
    .unwrap();
    let s = run(&engine, &p1);
    assert_eq!(s.ran, 1);
    assert_eq!(s.record.stages[0].metrics["value"], 1.0);
    let p2 = plan_of(
        &engine,
        dir.path(),
        "stages:\n  p: {uses: produce, with: {value: 1.0, log_every: 50}}\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        run(&engine, &p2).cached,
        1,
        "1 and 1.0 are one number; log_every is volatile"
    );
    // The companion .idx is part of the key.
    std::fs::write(dir.path().join("data.idx"), "other index").unwrap();
    let st = engine.status(&p2, &RunOptions::default()).unwrap();
    assert_eq!(st[0].reason, "file `data` changed");
    assert_eq!(run(&engine, &p2).ran, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let err = plan_of(
        &engine,
        dir.path(),
        "stages:\n  p: {uses: produce, with: {data: nope.rec}}\n",
        &[],
    )
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .contains("parameter `data`: `nope.rec` does not exist"),
        "{err}"
    );
}

#[test]
fn failed_stage_keeps_its_scratch_and_resumes() {
    let (dir, engine, _) = setup(1);
    let plan = plan_of(
        &engine,
        dir.path(),
        "stages:\n  p: {uses: produce}\n  r:\n    uses: resume\n    inputs: {model: p.model}\n",
        &[],
    )
    .unwrap();
    let s = run(&engine, &plan);
    assert_eq!((s.ran, s.failed), (1, 1));
    assert!(s.record.stages[1]
        .error
        .as_deref()
        .unwrap()
        .contains("killed at step 5"));
    let s = run(&engine, &plan);
    assert_eq!((s.ran, s.cached, s.failed), (1, 1, 0));
    let out = engine.store.object_path(&s.record.stages[1].outputs["out"]);
    assert_eq!(
        std::fs::read_to_string(out.join("resumed_from")).unwrap(),
        "5"
    );
    // Scratch is cleared after success.
    let key = s.record.stages[1].key.clone().unwrap();
    assert!(!engine.store.root().join("scratch").join(key).exists());
}

#[test]
fn a_panicking_stage_fails_alone() {
    let (dir, engine, _) = setup(1);
    struct DataSource;
    impl Stage for DataSource {
        fn kind(&self) -> &'static str {
            "data"
        }
        fn version(&self) -> u32 {
            1
        }
        fn signature(&self) -> StageSignature {
            StageSignature {
                inputs: vec![],
                outputs: vec![PortSpec::new("dataset", "dataset", "")],
                params: vec![],
            }
        }
        fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
            std::fs::write(ctx.output("dataset")?.join("x"), "x")?;
            Ok(())
        }
    }
    let mut engine = engine;
    engine.registry.register(Arc::new(DataSource));
    let plan = plan_of(&engine, dir.path(), "stages:\n  d: {uses: data}\n  t:\n    uses: train\n    inputs: {data: d}\n  p: {uses: produce}\n", &[]).unwrap();
    let s = run(&engine, &plan);
    assert_eq!((s.ran, s.failed), (2, 1));
    let t = s.record.stages.iter().find(|r| r.name == "t").unwrap();
    assert_eq!(t.state, StageState::Failed);
    assert!(t
        .error
        .as_deref()
        .unwrap()
        .contains("stage panicked (a bug in the stage kind): bug in the stage"));
}
