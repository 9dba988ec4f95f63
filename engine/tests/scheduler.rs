//! The scheduler in process: a test stage kind notes when each stage starts and ends and how
//! many run at once, under different job and GPU slots and with a stage that fails.

use fpipe_cache::ArtifactStore;
use fpipe_engine::records::RunStatus;
use fpipe_engine::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the probes saw.
#[derive(Default)]
struct Seen {
    /// `start NAME` and `end NAME`, in the order they happened.
    log: Mutex<Vec<String>>,
    /// GPU ids each stage was given, by stage.
    gpus: Mutex<Vec<(String, Vec<usize>)>>,
    running: AtomicUsize,
    /// The most stages that ran at once.
    most: AtomicUsize,
}

/// `probe`: takes any inputs, writes one output, notes itself in [`Seen`]. With `fail` it
/// fails; with `meet: N` it waits (up to 10 s) until N probes have been running at once.
struct Probe(Arc<Seen>);
impl Stage for Probe {
    fn kind(&self) -> &'static str {
        "probe"
    }
    fn version(&self) -> u32 {
        1
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new("out", ANY, "a file")],
            params: vec![
                // Stages with the same parameters and inputs share a key; the tag tells them
                // apart.
                ParamSpec::required("tag", ParamType::String, "the stage's name"),
                ParamSpec::with_default("fail", ParamType::Bool, json!(false), "fail"),
                ParamSpec::with_default("meet", ParamType::Int, json!(0), "rendezvous"),
            ],
        }
    }
    fn accepts_any_inputs(&self) -> bool {
        true
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let seen = &self.0;
        let name = ctx.name.clone();
        seen.log.lock().unwrap().push(format!("start {name}"));
        seen.gpus
            .lock()
            .unwrap()
            .push((name.clone(), ctx.gpus.clone()));
        let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
        seen.most.fetch_max(now, Ordering::SeqCst);
        let meet = ctx.param_i64("meet")? as usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.most.load(Ordering::SeqCst) < meet && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Long enough for a second stage to overlap, were the slots not respected.
        std::thread::sleep(Duration::from_millis(30));
        seen.running.fetch_sub(1, Ordering::SeqCst);
        seen.log.lock().unwrap().push(format!("end {name}"));
        std::fs::write(ctx.output("out")?.join("name"), &name)?;
        if ctx.param_bool("fail")? {
            return Err(StageError::msg("asked to fail"));
        }
        Ok(())
    }
}

/// Finish events as `name state error`.
#[derive(Default)]
struct Finishes(Mutex<Vec<String>>);
impl Reporter for Finishes {
    fn event(&self, e: Event<'_>) {
        if let Event::Finish {
            name, state, error, ..
        } = e
        {
            let line = format!("{name} {state:?} {}", error.unwrap_or("-"));
            self.0.lock().unwrap().push(line);
        }
    }
}

struct Setup {
    dir: tempfile::TempDir,
    engine: Engine,
    seen: Arc<Seen>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let mut registry = Registry::with_builtins();
    registry.register(Arc::new(Probe(seen.clone())));
    let store = ArtifactStore::open(&dir.path().join(".fpipe")).unwrap();
    Setup {
        dir,
        engine: Engine { store, registry },
        seen,
    }
}

/// A pipeline of probes: each `(name, inputs, more)` with `more` added to `with:` (and a
/// line `resources: ...` when it starts so).
fn pipeline(s: &Setup, stages: &[(&str, &[&str], &str)]) -> Plan {
    let mut text = String::from("stages:\n");
    for (name, inputs, more) in stages {
        text += &format!("  {name}:\n    uses: probe\n");
        match more.strip_prefix("resources: ") {
            Some(r) => text += &format!("    resources: {r}\n    with: {{tag: {name}}}\n"),
            None if more.is_empty() => text += &format!("    with: {{tag: {name}}}\n"),
            None => text += &format!("    with: {{tag: {name}, {more}}}\n"),
        }
        if !inputs.is_empty() {
            let wired: Vec<String> = inputs
                .iter()
                .enumerate()
                .map(|(k, from)| format!("i{k}: {from}"))
                .collect();
            text += &format!("    inputs: {{{}}}\n", wired.join(", "));
        }
    }
    let file = s.dir.path().join("p.yaml");
    std::fs::write(&file, text).unwrap();
    load_plan(&file, &Overrides::default(), &s.engine.registry).unwrap()
}

fn run(s: &Setup, plan: &Plan, jobs: usize, gpus: usize) -> (RunSummary, Vec<String>) {
    let finishes = Arc::new(Finishes::default());
    let reporter: Arc<dyn Reporter> = finishes.clone();
    let opts = RunOptions {
        jobs,
        gpus,
        ..RunOptions::default()
    };
    let summary = s.engine.run(plan, &opts, &reporter).unwrap();
    let events = finishes.0.lock().unwrap().clone();
    (summary, events)
}

fn log(s: &Setup) -> Vec<String> {
    s.seen.log.lock().unwrap().clone()
}

fn position(log: &[String], line: &str) -> usize {
    log.iter()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no `{line}` in {log:?}"))
}

fn states(summary: &RunSummary) -> Vec<String> {
    summary
        .record
        .stages
        .iter()
        .map(|r| format!("{} {:?}", r.name, r.state))
        .collect()
}

#[test]
fn one_job_runs_one_stage_at_a_time_after_its_inputs() {
    let s = setup();
    let stages: &[(&str, &[&str], &str)] = &[
        ("a", &[], ""),
        ("b", &["a"], ""),
        ("c", &[], ""),
        ("d", &["b", "c"], ""),
    ];
    let plan = pipeline(&s, stages);
    let (summary, _) = run(&s, &plan, 1, 0);
    assert_eq!((summary.ran, summary.cached, summary.failed), (4, 0, 0));
    assert_eq!(s.seen.most.load(Ordering::SeqCst), 1);
    let log = log(&s);
    // One at a time: every start is followed by its own end.
    for pair in log.chunks(2) {
        assert_eq!(pair[0].replace("start", "end"), pair[1], "{log:?}");
    }
    for (name, inputs, _) in stages {
        for from in *inputs {
            assert!(
                position(&log, &format!("end {from}")) < position(&log, &format!("start {name}"))
            );
        }
    }
    // Again: all cached, nothing starts.
    let (summary, events) = run(&s, &plan, 1, 0);
    assert_eq!((summary.ran, summary.cached), (0, 4));
    assert_eq!(self::log(&s).len(), 8);
    assert_eq!(events.len(), 4, "one finish event per stage: {events:?}");
}

#[test]
fn two_jobs_run_independent_stages_together() {
    let s = setup();
    let plan = pipeline(
        &s,
        &[
            ("a", &[], "meet: 2"),
            ("b", &[], "meet: 2"),
            ("c", &["a", "b"], ""),
        ],
    );
    let (summary, _) = run(&s, &plan, 2, 0);
    assert_eq!(summary.ran, 3);
    assert_eq!(s.seen.most.load(Ordering::SeqCst), 2);
    let log = log(&s);
    assert!(
        position(&log, "end a") < position(&log, "start c"),
        "{log:?}"
    );
    assert!(
        position(&log, "end b") < position(&log, "start c"),
        "{log:?}"
    );
}

#[test]
fn stages_wait_for_gpu_and_job_slots() {
    let s = setup();
    let plan = pipeline(
        &s,
        &[
            ("g1", &[], "resources: {gpu: 1}"),
            ("g2", &[], "resources: {gpu: 1}"),
        ],
    );
    let (summary, _) = run(&s, &plan, 2, 1);
    assert_eq!(summary.ran, 2);
    assert_eq!(s.seen.most.load(Ordering::SeqCst), 1, "{:?}", log(&s));
    let mut gpus = s.seen.gpus.lock().unwrap().clone();
    gpus.sort();
    let expected: Vec<(String, Vec<usize>)> = vec![("g1".into(), vec![0]), ("g2".into(), vec![0])];
    assert_eq!(gpus, expected);

    // A stage wanting both job slots runs alone.
    let s = setup();
    let plan = pipeline(
        &s,
        &[("wide", &[], "resources: {cpu: 2}"), ("narrow", &[], "")],
    );
    let (summary, _) = run(&s, &plan, 2, 0);
    assert_eq!(summary.ran, 2);
    assert_eq!(s.seen.most.load(Ordering::SeqCst), 1, "{:?}", log(&s));
}

#[test]
fn a_failure_skips_only_what_depends_on_it() {
    let s = setup();
    let plan = pipeline(
        &s,
        &[
            ("bad", &[], "fail: true"),
            ("after", &["bad"], ""),
            ("after2", &["after"], ""),
            ("sib", &[], ""),
            ("sib2", &["sib"], ""),
            ("both", &["bad", "sib"], ""),
        ],
    );
    let (summary, events) = run(&s, &plan, 2, 0);
    assert_eq!(
        (summary.ran, summary.cached, summary.failed, summary.skipped),
        (2, 0, 1, 3)
    );
    assert_eq!(summary.record.status, RunStatus::Failed);
    let mut events = events;
    events.sort();
    assert_eq!(
        events,
        [
            "after Skipped -",
            "after2 Skipped -",
            "bad Failed asked to fail",
            "both Skipped -",
            "sib Ran -",
            "sib2 Ran -",
        ]
    );
    let mut started: Vec<String> = log(&s)
        .into_iter()
        .filter(|l| l.starts_with("start"))
        .collect();
    started.sort();
    assert_eq!(started, ["start bad", "start sib", "start sib2"]);
    // The record lists every stage in run order; the failed one keeps its key, error and log.
    assert_eq!(summary.record.stages.len(), 6);
    let order: Vec<&str> = plan.order.iter().map(|i| plan.stages[*i].name()).collect();
    let recorded: Vec<&str> = summary
        .record
        .stages
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(recorded, order);
    let bad = &summary.record.stages[position(&states(&summary), "bad Failed")];
    assert!(bad.key.is_some() && bad.log.is_some());
    assert_eq!(bad.error.as_deref(), Some("asked to fail"));
    let after = &summary.record.stages[position(&states(&summary), "after Skipped")];
    assert!(after.key.is_none() && after.log.is_none() && after.error.is_none());

    // Again: the siblings are cached, the failure happens again.
    let (summary, _) = run(&s, &plan, 2, 0);
    assert_eq!(
        (summary.ran, summary.cached, summary.failed, summary.skipped),
        (0, 2, 1, 3)
    );
}

#[test]
fn a_cancelled_run_starts_nothing() {
    let s = setup();
    let plan = pipeline(&s, &[("a", &[], ""), ("b", &["a"], "")]);
    let finishes = Arc::new(Finishes::default());
    let reporter: Arc<dyn Reporter> = finishes.clone();
    let opts = RunOptions::default();
    opts.cancel.store(true, Ordering::SeqCst);
    let summary = s.engine.run(&plan, &opts, &reporter).unwrap();
    assert_eq!(summary.record.status, RunStatus::Interrupted);
    assert!(summary.interrupted);
    assert_eq!(states(&summary), ["a NotRun", "b NotRun"]);
    assert!(log(&s).is_empty());
    assert!(finishes.0.lock().unwrap().is_empty());
}
