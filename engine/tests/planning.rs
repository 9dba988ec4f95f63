//! Planning and expansion tested in process, as `just` tests its analyzer: each case writes a
//! pipeline, loads and plans it against a registry of small test kinds, and compares the whole
//! rendered error (file:line, stage, message, hint) or the expanded stages and their wiring.

use fpipe_engine::{
    load, plan, Overrides, ParamSpec, ParamType, Plan, PortSpec, Registry, Stage, StageContext,
    StageError, StageSignature,
};
use serde_json::json;
use std::sync::Arc;

/// `prepare`: makes a dataset.
struct Prepare;
impl Stage for Prepare {
    fn kind(&self) -> &'static str {
        "prepare"
    }
    fn version(&self) -> u32 {
        1
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new("data", "dataset", "images")],
            params: vec![ParamSpec::with_default(
                "size",
                ParamType::Int,
                json!(10),
                "how many images",
            )],
        }
    }
    fn run(&self, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// `train`: a model (and a report) from a dataset.
struct Train;
impl Stage for Train {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        1
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new("data", "dataset", "training images"),
                PortSpec::optional("init", "model", "weights to start from"),
            ],
            outputs: vec![
                PortSpec::new("model", "model", "the weights"),
                PortSpec::new("report", "report", "the loss curve"),
            ],
            params: vec![
                ParamSpec::required("lr", ParamType::Float, "learning rate"),
                ParamSpec::with_default("epochs", ParamType::Int, json!(1), "passes"),
                ParamSpec::with_default(
                    "optimizer",
                    ParamType::Enum(&["sgd", "adam"]),
                    json!("sgd"),
                    "update rule",
                ),
            ],
        }
    }
    fn run(&self, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// `step`: files in, files out (for chains and cycles).
struct Step;
impl Stage for Step {
    fn kind(&self) -> &'static str {
        "step"
    }
    fn version(&self) -> u32 {
        1
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![PortSpec::optional("in", "files", "anything")],
            outputs: vec![PortSpec::new("out", "files", "anything")],
            params: vec![],
        }
    }
    fn run(&self, _: &mut StageContext) -> Result<(), StageError> {
        Ok(())
    }
}

fn registry() -> Registry {
    let mut r = Registry::with_builtins();
    r.register(Arc::new(Prepare));
    r.register(Arc::new(Train));
    r.register(Arc::new(Step));
    r
}

/// Writes `files` (name, text) into a fresh folder and loads and plans the first. Errors come
/// as rendered for the user, one after the other, with the folder shown as `DIR`.
fn front_end(files: &[(&str, &str)]) -> Result<Plan, String> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let file = dir.path().join(files[0].0);
    let folder = format!("{}/", dir.path().display());
    let shown = |errors: Vec<String>| errors.join("\n").replace(&folder, "DIR/");
    let pipeline = load(&file, &Overrides::default()).map_err(|e| shown(vec![e.to_string()]))?;
    plan(pipeline, &registry()).map_err(|es| shown(es.iter().map(|e| e.to_string()).collect()))
}

fn plan_error(yaml: &str) -> String {
    match front_end(&[("p.yaml", yaml)]) {
        Ok(_) => panic!("expected an error from:\n{yaml}"),
        Err(e) => e,
    }
}

/// Stage names in plan order, each with its inputs as `port<-stage.port`.
fn wiring(yaml: &str) -> Vec<String> {
    let plan = front_end(&[("p.yaml", yaml)]).unwrap_or_else(|e| panic!("{e}"));
    plan.stages
        .iter()
        .map(|s| {
            let mut line = s.name().to_string();
            for w in &s.wires {
                let from = plan.stages[w.from].name();
                line += &format!(" {}<-{from}.{}", w.port, w.from_port);
            }
            line
        })
        .collect()
}

#[test]
fn unknown_fields() {
    assert_eq!(
        plan_error("stage:\n  a: {uses: step}\n"),
        "DIR/p.yaml:1: unknown top-level key `stage`\n  \
         hint: did you mean `stages`? (expected one of: fpipe, name, description, params, include, stages, published)"
    );
    assert_eq!(
        plan_error("stages:\n  a:\n    uses: step\n    with: {}\n    inptus: {}\n"),
        "DIR/p.yaml:5: stage `a`: unknown stage field `inptus`\n  \
         hint: did you mean `inputs`? (expected one of: uses, with, inputs, foreach, matrix, resources, retries, desc, description)"
    );
    assert_eq!(
        plan_error("stages:\n  t:\n    uses: train\n    with:\n      lr: 0.1\n      epoch: 3\n"),
        "DIR/p.yaml:6: stage `t`: unknown parameter `epoch` for kind `train`\n  \
         hint: did you mean `epochs`? (expected one of: lr, epochs, optimizer)"
    );
    assert_eq!(
        plan_error("stages:\n  a:\n    uses: step\n    with:\n      x: 1\n"),
        "DIR/p.yaml:5: stage `a`: unknown parameter `x` for kind `step`\n  \
         hint: `step` takes no parameters"
    );
}

#[test]
fn unknown_stage_kinds() {
    assert_eq!(
        plan_error("stages:\n  a: {uses: step}\n  t:\n    uses: trian\n    with: {lr: 0.1}\n"),
        "DIR/p.yaml:4: stage `t`: unknown stage kind `trian`\n  hint: did you mean `train`?"
    );
    assert_eq!(
        plan_error("stages:\n  a:\n    uses: quantum\n"),
        "DIR/p.yaml:3: stage `a`: unknown stage kind `quantum`\n  \
         hint: known kinds: prepare, shell, step, train"
    );
}

#[test]
fn unknown_ports_and_stages() {
    let head = "stages:\n  prep: {uses: prepare}\n  t:\n    uses: train\n    with: {lr: 0.1}\n    inputs:\n";
    assert_eq!(
        plan_error(&format!("{head}      dat: prep\n")),
        "DIR/p.yaml:7: stage `t`: kind `train` has no input port `dat`\n  \
         hint: did you mean `data`? (expected one of: data, init)\n\
         DIR/p.yaml:3: stage `t`: required input `data` (dataset) is not connected\n  \
         hint: add `inputs: {data: STAGE.PORT}`: training images"
    );
    assert_eq!(
        plan_error(&format!("{head}      data: perp\n")),
        "DIR/p.yaml:7: stage `t`: input `data`: refers to missing stage `perp`\n  \
         hint: did you mean `prep`?"
    );
    assert_eq!(
        plan_error(&format!("{head}      data: prep.dat\n")),
        "DIR/p.yaml:7: stage `t`: input `data`: stage `prep` has no output port `dat`\n  \
         hint: did you mean `data`? (expected one of: data)"
    );
    assert_eq!(
        plan_error(&format!(
            "{head}      data: prep\n  e:\n    uses: step\n    inputs:\n      in: t\n"
        )),
        "DIR/p.yaml:11: stage `e`: input `in`: stage `t` has several outputs\n  \
         hint: name one: `t.model`, `t.report`"
    );
    assert_eq!(
        plan_error(&format!("{head}      data: prep\n      init: prep\n")),
        "DIR/p.yaml:8: stage `t`: wrong port type: input `init` takes `model` but `prep.data` is `dataset`\n  \
         hint: connect a `model` output here"
    );
    assert_eq!(
        plan_error(
            "stages:\n  gen:\n    foreach: [x, y]\n    uses: step\n  s:\n    uses: step\n    inputs:\n      in: gen\n"
        ),
        "DIR/p.yaml:8: stage `s`: input `in`: `gen` is a family of 2 stages\n  \
         hint: name one item (e.g. `gen@x`) or `gen@last`"
    );
}

#[test]
fn cycles() {
    assert_eq!(
        plan_error(
            "stages:\n  a:\n    uses: step\n    inputs: {in: c}\n  b:\n    uses: step\n    inputs: {in: a}\n  c:\n    uses: step\n    inputs: {in: b}\n"
        ),
        "DIR/p.yaml:8: stage `c`: the stages form a cycle: c -> a -> b -> c\n  \
         hint: a stage cannot depend on its own output, directly or through others"
    );
    assert_eq!(
        plan_error("stages:\n  a:\n    uses: step\n    inputs:\n      in: a.out\n"),
        "DIR/p.yaml:5: stage `a`: input `in` refers to the stage itself; the stages form a cycle: a -> a\n  \
         hint: a stage cannot depend on its own output"
    );
}

#[test]
fn families_expand_to_family_at_item() {
    assert_eq!(
        wiring(
            "stages:\n  prep:\n    foreach: [small, large]\n    uses: prepare\n  \
             t:\n    matrix: {lr: [0.1, 0.01], opt: [sgd, adam]}\n    uses: train\n    \
             with: {lr: \"${item.lr}\", optimizer: \"${item.opt}\"}\n    inputs: {data: prep@last}\n  \
             chain:\n    foreach: 3\n    uses: step\n    inputs: {in: \"${prev}\"}\n"
        ),
        [
            "prep@small",
            "prep@large",
            "t@0.1-sgd data<-prep@large.data",
            "t@0.1-adam data<-prep@large.data",
            "t@0.01-sgd data<-prep@large.data",
            "t@0.01-adam data<-prep@large.data",
            "chain@1",
            "chain@2 in<-chain@1.out",
            "chain@3 in<-chain@2.out",
        ]
    );
    // Items substitute typed values: a number stays a number.
    let plan = front_end(&[(
        "p.yaml",
        "stages:\n  p: {uses: prepare}\n  t:\n    foreach: [0.5, 2]\n    uses: train\n    with: {lr: \"${item}\"}\n    inputs: {data: p}\n",
    )])
    .unwrap();
    let lrs: Vec<_> = plan.stages[1..].iter().map(|s| &s.params["lr"]).collect();
    assert_eq!(lrs, [&json!(0.5), &json!(2.0)]);
    // An empty family has no stages, so `family@last` names none.
    assert_eq!(
        plan_error("stages:\n  f:\n    foreach: []\n    uses: step\n  s:\n    uses: step\n    inputs:\n      in: f@last\n"),
        "DIR/p.yaml:8: stage `s`: input `in`: refers to missing stage `f@last`\n  \
         hint: stages in this pipeline: s"
    );
}

#[test]
fn parameter_types() {
    assert_eq!(
        plan_error("stages:\n  t:\n    uses: train\n    with:\n      lr: fast\n"),
        "DIR/p.yaml:5: stage `t`: parameter `lr` must be a number, got \"fast\"\n  \
         hint: `lr`: learning rate"
    );
    assert_eq!(
        plan_error(
            "stages:\n  t:\n    uses: train\n    with:\n      lr: 0.1\n      optimizer: adamw\n"
        ),
        "DIR/p.yaml:6: stage `t`: parameter `optimizer`: `adamw` is not allowed\n  \
         hint: did you mean `adam`? (expected one of: sgd, adam)"
    );
    assert_eq!(
        plan_error("stages:\n  t:\n    uses: train\n    with: {lr: 0.1, epochs: 2.5}\n"),
        // Keys inside a flow mapping are not located: the stage's line stands in.
        "DIR/p.yaml:2: stage `t`: parameter `epochs` must be an integer, got 2.5\n  \
         hint: `epochs`: passes"
    );
    // In a family the error names the item and the line of the family's parameter.
    assert_eq!(
        plan_error("stages:\n  p: {uses: prepare}\n  t:\n    foreach: [0.1, fast]\n    uses: train\n    inputs: {data: p}\n    with:\n      lr: \"${item}\"\n"),
        "DIR/p.yaml:8: stage `t@fast`: parameter `lr` must be a number, got \"fast\"\n  \
         hint: `lr`: learning rate"
    );
}

#[test]
fn missing_required_parameter() {
    assert_eq!(
        plan_error("stages:\n  p: {uses: prepare}\n  t:\n    uses: train\n    inputs: {data: p}\n"),
        "DIR/p.yaml:3: stage `t`: missing required parameter `lr` (a number)\n  \
         hint: add it under `with:`: learning rate"
    );
}

#[test]
fn duplicate_names_after_expansion() {
    assert_eq!(
        plan_error("stages:\n  a:\n    foreach: [x, y, x]\n    uses: step\n"),
        "DIR/p.yaml:2: stage `a`: two items give the same stage name `a@x`"
    );
    assert_eq!(
        plan_error("stages:\n  a:\n    matrix: {n: [1, \"1\"]}\n    uses: step\n"),
        "DIR/p.yaml:2: stage `a`: two items give the same stage name `a@1`"
    );
    let err = front_end(&[
        (
            "p.yaml",
            "include: [more.yaml]\nstages:\n  a: {uses: step}\n",
        ),
        (
            "more.yaml",
            "stages:\n  b: {uses: step}\n  a: {uses: step}\n",
        ),
    ])
    .err();
    assert_eq!(
        err.as_deref(),
        Some(
            "DIR/p.yaml:3: stage `a`: duplicate stage name\n  \
             hint: also defined at DIR/more.yaml:3; give each stage a unique name"
        )
    );
}

#[test]
fn every_stage_error_is_reported_at_once() {
    assert_eq!(
        plan_error("stages:\n  a: {uses: nope}\n  b:\n    uses: train\n    with:\n      lr: x\n"),
        "DIR/p.yaml:2: stage `a`: unknown stage kind `nope`\n  \
         hint: did you mean `step`?\n\
         DIR/p.yaml:6: stage `b`: parameter `lr` must be a number, got \"x\"\n  \
         hint: `lr`: learning rate"
    );
}
