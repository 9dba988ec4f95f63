//! The `train`, `distil`, `import-model`, `embed` and `evaluate` stage kinds.

use super::with_threads;
use crate::data::PackedDataset;
use crate::loss::objective::ObjectiveConfig;
use crate::loss::triplet::Mining;
use crate::loss::{LambdaSchedule, MarginConfig, MarginVariant};
use crate::models::{Backbone, BackboneConfig, BackboneOptions, ParamStore, BACKBONES};
use crate::train::artifact::{load_model, save_model, write_curve_with};
use crate::train::embed::embed_all;
use crate::train::optim::OptimizerKind;
use crate::train::reactivation::{ReactivationConfig, ReactivationMode};
use crate::train::trainer::{train, RunEnv, Teacher, TrainConfig};
use crate::train::{load_model_weights, TrainError};
use candle_core::{Device, Tensor};
use fpipe_engine::{
    ParamSpec, ParamType, PortSpec, Stage, StageContext, StageError, StageSignature,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

fn backbone_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::with_default(
            "backbone",
            ParamType::Enum(BACKBONES.as_slice()),
            json!("mobilefacenet"),
            "backbone architecture",
        ),
        ParamSpec::with_default(
            "width",
            ParamType::Float,
            json!(1.0),
            "channel multiplier (1 = reference size)",
        ),
        ParamSpec::with_default(
            "input_size",
            ParamType::Int,
            json!(112),
            "square input size; images are resized to it",
        ),
        ParamSpec::with_default(
            "embedding_size",
            ParamType::Int,
            json!(512),
            "embedding dimension",
        ),
        ParamSpec::with_default(
            "se",
            ParamType::Bool,
            json!(true),
            "vargfacenet: squeeze-and-excitation in normal blocks",
        ),
    ]
}

fn backbone_from(p: &BTreeMap<String, Value>) -> Result<BackboneConfig, String> {
    let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let f = |k: &str, d: f64| p.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let i = |k: &str, d: i64| p.get(k).and_then(|v| v.as_i64()).unwrap_or(d);
    let width = f("width", 1.0);
    if !(width > 0.0 && width <= 4.0) {
        return Err("width must lie in (0, 4]".into());
    }
    let input_size = i("input_size", 112);
    if !(16..=1024).contains(&input_size) {
        return Err("input_size must lie in 16..=1024".into());
    }
    let emb = i("embedding_size", 512);
    if !(2..=8192).contains(&emb) {
        return Err("embedding_size must lie in 2..=8192".into());
    }
    let options = BackboneOptions {
        width,
        input_size: input_size as usize,
        num_features: emb as usize,
        se: p.get("se").and_then(|v| v.as_bool()).unwrap_or(true),
    };
    BackboneConfig::from_name(s("backbone"), &options).map_err(|e| e.to_string())
}

fn train_params() -> Vec<ParamSpec> {
    let mut v = backbone_params();
    v.extend([
        ParamSpec::with_default("loss", ParamType::Enum(LOSSES), json!("arcface"),
            "arcface (1,0.5,0), cosface (1,0,0.4), combined (1,0.3,0.2), sphereface (4,0,0), norm-softmax (1,0,0), custom (m1/m2/m3); softmax, center, triplet (see docs/training.md)"),
        ParamSpec::with_default("m1", ParamType::Float, json!(1.0), "custom: multiplicative angular margin (SphereFace; real, (0, 8])"),
        ParamSpec::with_default("m2", ParamType::Float, json!(0.5), "custom: additive angular margin"),
        ParamSpec::with_default("m3", ParamType::Float, json!(0.0), "custom: additive cosine margin"),
        ParamSpec::with_default("margin_variant", ParamType::Enum(&["straight-through", "differentiable", "easy-margin"]), json!("straight-through"),
            "how the angular margin enters the gradient (see docs/training.md)"),
        ParamSpec::with_default("scale", ParamType::Float, json!(64.0), "logit scale s"),
        ParamSpec::with_default("sphere_lambda_base", ParamType::Float, json!(1000.0), "SphereFace (m1 ≠ 1): λ = max(min, base·(1+gamma·iter)^-power) blends cos θ into ψ(θ)"),
        ParamSpec::with_default("sphere_lambda_gamma", ParamType::Float, json!(0.12), "SphereFace: λ decay rate"),
        ParamSpec::with_default("sphere_lambda_power", ParamType::Float, json!(1.0), "SphereFace: λ decay power"),
        ParamSpec::with_default("sphere_lambda_min", ParamType::Float, json!(5.0), "SphereFace: λ floor"),
        ParamSpec::with_default("center_lambda", ParamType::Float, json!(0.003), "center: weight λ of λ/2·‖x − c_y‖²"),
        ParamSpec::with_default("center_alpha", ParamType::Float, json!(0.5), "center: centre update rate α"),
        ParamSpec::with_default("triplet_margin", ParamType::Float, json!(0.2), "triplet: hinge margin on squared distances of normalised embeddings"),
        ParamSpec::with_default("triplet_mining", ParamType::Enum(&["semi-hard", "batch-hard"]), json!("semi-hard"), "triplet: online selection (FaceNet semi-hard, or batch-hard)"),
        ParamSpec::with_default("triplet_k", ParamType::Int, json!(4), "triplet: images per identity K in a batch (P = batch_size / K)"),
        ParamSpec::with_default("interclass_threshold", ParamType::Float, json!(0.0), "zero non-target cosines above this (0 = off)"),
        ParamSpec::with_default("sample_rate", ParamType::Float, json!(1.0), "PartialFC: fraction of class centres per step"),
        ParamSpec::with_default("optimizer", ParamType::Enum(&["sgd", "adamw"]), json!("sgd"), "optimiser"),
        ParamSpec::with_default("lr", ParamType::Float, json!(0.1), "peak learning rate"),
        ParamSpec::with_default("momentum", ParamType::Float, json!(0.9), "SGD momentum"),
        ParamSpec::with_default("weight_decay", ParamType::Float, json!(5e-4), "weight decay"),
        ParamSpec::with_default("no_decay_bn", ParamType::Bool, json!(false), "no weight decay on BN/PReLU/bias"),
        ParamSpec::with_default("epochs", ParamType::Float, json!(20.0), "training length in epochs (unless steps > 0)"),
        ParamSpec::with_default("steps", ParamType::Int, json!(0), "training length in steps (overrides epochs)"),
        ParamSpec::with_default("warmup_epochs", ParamType::Float, json!(0.0), "linear warm-up, in epochs"),
        ParamSpec::with_default("batch_size", ParamType::Int, json!(128), "images per step"),
        ParamSpec::with_default("grad_clip", ParamType::Float, json!(5.0), "backbone gradient-norm clip (0 = off)"),
        ParamSpec::with_default("flip", ParamType::Bool, json!(true), "random horizontal flip"),
        ParamSpec::with_default("seed", ParamType::Int, json!(0), "seed of initialisation, order, flips and sampling"),
        ParamSpec::with_default("checkpoint_every", ParamType::Int, json!(200), "checkpoint every N steps").volatile(),
        ParamSpec::with_default("reactivation", ParamType::Enum(&["none", "scaled-random", "craft"]), json!("none"),
            "re-initialise inactive first-layer filters (CRAFT; see docs/training.md)"),
        ParamSpec::with_default("reactivation_tau", ParamType::Float, json!(0.1), "inactive when ||W_i|| < tau * max_j ||W_j||"),
        ParamSpec::with_default("reactivation_threshold", ParamType::Float, json!(0.0), "absolute activity threshold; > 0 replaces tau"),
        ParamSpec::with_default("reactivation_every", ParamType::Int, json!(1), "check at the end of every N epochs"),
        ParamSpec::with_default("reactivation_quiet", ParamType::Float, json!(0.2), "no reactivation in this last fraction of training"),
        ParamSpec::with_default("reactivation_same_cos", ParamType::Float, json!(0.9), "|cos| at or above which filters are the same pattern"),
        ParamSpec::with_default("reactivation_perturb", ParamType::Float, json!(0.05), "relative noise on repeated CRAFT complements"),
    ]);
    v
}

fn reactivation_from(p: &BTreeMap<String, Value>) -> Result<ReactivationConfig, String> {
    let d = ReactivationConfig::default();
    let f = |k: &str, v: f64| p.get(k).and_then(|x| x.as_f64()).unwrap_or(v);
    let mode = match p
        .get("reactivation")
        .and_then(|v| v.as_str())
        .unwrap_or("none")
    {
        "scaled-random" => ReactivationMode::ScaledRandom,
        "craft" => ReactivationMode::Craft,
        _ => ReactivationMode::None,
    };
    let every = p
        .get("reactivation_every")
        .and_then(|v| v.as_i64())
        .unwrap_or(1);
    let cfg = ReactivationConfig {
        mode,
        tau: f("reactivation_tau", d.tau),
        threshold: f("reactivation_threshold", d.threshold),
        every: every.max(0) as u64,
        quiet: f("reactivation_quiet", d.quiet),
        same_cos: f("reactivation_same_cos", d.same_cos),
        perturb: f("reactivation_perturb", d.perturb),
    };
    cfg.validate()?;
    Ok(cfg)
}

const LOSSES: &[&str] = &[
    "arcface",
    "cosface",
    "combined",
    "sphereface",
    "norm-softmax",
    "custom",
    "softmax",
    "center",
    "triplet",
];

fn margin_from(p: &BTreeMap<String, Value>) -> Result<MarginConfig, String> {
    let f = |k: &str, d: f64| p.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let (m1, m2, m3) = match p.get("loss").and_then(|v| v.as_str()).unwrap_or("arcface") {
        "arcface" => (1.0, 0.5, 0.0),
        "cosface" => (1.0, 0.0, 0.4),
        "combined" => (1.0, 0.3, 0.2),
        "sphereface" => (4.0, 0.0, 0.0),
        "custom" => (f("m1", 1.0), f("m2", 0.5), f("m3", 0.0)),
        // norm-softmax; softmax, center and triplet do not use the margin head.
        _ => (1.0, 0.0, 0.0),
    };
    let d = LambdaSchedule::default();
    let sphere_lambda = (m1 != 1.0).then(|| LambdaSchedule {
        base: f("sphere_lambda_base", d.base),
        gamma: f("sphere_lambda_gamma", d.gamma),
        power: f("sphere_lambda_power", d.power),
        min: f("sphere_lambda_min", d.min),
    });
    let variant = match p.get("margin_variant").and_then(|v| v.as_str()) {
        Some("differentiable") => MarginVariant::Differentiable,
        Some("easy-margin") => MarginVariant::EasyMargin,
        _ => MarginVariant::StraightThrough,
    };
    let cfg = MarginConfig {
        s: f("scale", 64.0),
        m1,
        m2,
        m3,
        variant,
        interclass_threshold: f("interclass_threshold", 0.0),
        sphere_lambda,
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn objective_from(p: &BTreeMap<String, Value>) -> Result<ObjectiveConfig, String> {
    let f = |k: &str, d: f64| p.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let cfg = match p.get("loss").and_then(|v| v.as_str()).unwrap_or("arcface") {
        "softmax" => ObjectiveConfig::Softmax,
        "center" => ObjectiveConfig::Center {
            lambda: f("center_lambda", 0.003),
            alpha: f("center_alpha", 0.5),
        },
        "triplet" => ObjectiveConfig::Triplet {
            margin: f("triplet_margin", 0.2),
            mining: match p.get("triplet_mining").and_then(|v| v.as_str()) {
                Some("batch-hard") => Mining::BatchHard,
                _ => Mining::SemiHard,
            },
            per_identity: p
                .get("triplet_k")
                .and_then(|v| v.as_i64())
                .unwrap_or(4)
                .clamp(0, 1 << 20) as usize,
        },
        _ => ObjectiveConfig::Margin,
    };
    let bs = p
        .get("batch_size")
        .and_then(|v| v.as_i64())
        .unwrap_or(128)
        .clamp(0, 1 << 30) as usize;
    cfg.validate(bs, f("sample_rate", 1.0))
        .map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn check_train_params(p: &BTreeMap<String, Value>) -> Result<(), String> {
    backbone_from(p)?;
    margin_from(p)?;
    reactivation_from(p)?;
    objective_from(p)?;
    let f = |k: &str| p.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    if !(f("sample_rate") > 0.0 && f("sample_rate") <= 1.0) {
        return Err("sample_rate must lie in (0, 1]".into());
    }
    if f("lr") <= 0.0 {
        return Err("lr must be > 0".into());
    }
    if p.get("batch_size").and_then(|v| v.as_i64()).unwrap_or(0) < 2 {
        return Err("batch_size must be at least 2".into());
    }
    if f("epochs") <= 0.0 && p.get("steps").and_then(|v| v.as_i64()).unwrap_or(0) <= 0 {
        return Err("give epochs > 0 or steps > 0".into());
    }
    Ok(())
}

fn config_from(ctx: &StageContext, n_images: usize) -> Result<(TrainConfig, u64), StageError> {
    let backbone = backbone_from(&ctx.params).map_err(StageError::msg)?;
    let margin = margin_from(&ctx.params).map_err(StageError::msg)?;
    let objective = objective_from(&ctx.params).map_err(StageError::msg)?;
    let bs = ctx.param_i64("batch_size")?.max(2) as usize;
    let steps_per_epoch = (n_images as f64 / bs as f64).max(1.0);
    let steps = match ctx.param_i64("steps")? {
        s if s > 0 => s as u64,
        _ => (ctx.param_f64("epochs")? * steps_per_epoch).ceil() as u64,
    };
    let warmup = (ctx.param_f64("warmup_epochs")? * steps_per_epoch).round() as u64;
    let cfg = TrainConfig {
        backbone,
        margin,
        objective,
        sample_rate: ctx.param_f64("sample_rate")?,
        optimizer: if ctx.param_str("optimizer")? == "adamw" {
            OptimizerKind::Adamw
        } else {
            OptimizerKind::Sgd
        },
        lr: ctx.param_f64("lr")?,
        momentum: ctx.param_f64("momentum")?,
        weight_decay: ctx.param_f64("weight_decay")?,
        no_decay_bn: ctx.param_bool("no_decay_bn")?,
        steps,
        warmup_steps: warmup.min(steps),
        batch_size: bs,
        grad_clip: ctx.param_f64("grad_clip")?,
        flip: ctx.param_bool("flip")?,
        seed: ctx.param_i64("seed")? as u64,
        distil_alpha: ctx
            .params
            .get("alpha")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
        reactivation: reactivation_from(&ctx.params).map_err(StageError::msg)?,
    };
    Ok((cfg, ctx.param_i64("checkpoint_every")?.max(0) as u64))
}

pub(crate) fn data_id(dir: &Path, n: usize, classes: usize) -> Value {
    json!({
        "id": dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(),
        "images": n,
        "classes": classes,
    })
}

/// Shared body of `train` and `distil`.
fn run_training(ctx: &mut StageContext, teacher_port: Option<&str>) -> Result<(), StageError> {
    let data_dir = ctx.input("dataset")?.to_path_buf();
    let data = PackedDataset::open(&data_dir).map_err(TrainError::from)?;
    let (cfg, every) = config_from(ctx, data.len())?;
    let device = super::device(ctx)?;
    let teacher = match teacher_port {
        Some(port) => {
            let m = load_model(ctx.input(port)?, &device)?;
            if m.card.embedding_size != cfg.backbone.embedding_size() {
                return Err(StageError::msg(format!(
                    "teacher embeds in {} dimensions, the student in {}: set embedding_size",
                    m.card.embedding_size,
                    cfg.backbone.embedding_size()
                )));
            }
            Some(Teacher {
                model: m.backbone,
                config: m.card.architecture,
            })
        }
        None => None,
    };
    let init = ctx.input_opt("init").map(|p| p.to_path_buf());
    let sink = &*ctx;
    let on_step = |step: u64, total: u64, loss: f64, lr: f64, ips: f64| {
        let eta = (total - step) as f64 * cfg.batch_size as f64 / ips.max(1e-9);
        let msg = format!("loss {loss:.4} lr {lr:.5} {ips:.1} img/s ETA {eta:.0}s");
        sink.progress(step, total, &msg);
        if step.is_multiple_of(50) || step == total {
            sink.log(&format!("step {step}/{total} {msg}"));
        }
    };
    let cancelled = || sink.cancelled();
    let env = RunEnv {
        device,
        scratch: ctx.scratch.clone(),
        checkpoint_every: every,
        init,
        teacher,
        on_step: &on_step,
        cancelled: &cancelled,
        stop_after: None,
    };
    let started = Instant::now();
    let out = with_threads(ctx.threads, || train(&cfg, &data, &env))??;
    let secs = started.elapsed().as_secs_f64();
    if out.resumed_at > 0 {
        ctx.log(&format!(
            "resumed from the checkpoint at step {}",
            out.resumed_at
        ));
    }
    let training = json!({
        "kind": if teacher_port.is_some() { "distil" } else { "train" },
        "config": serde_json::to_value(&cfg).map_err(TrainError::from)?,
        "steps": out.steps_done,
        "resumed_at": out.resumed_at,
        "reactivation_history": out.reactivation,
    });
    let model_dir = ctx.output("model")?.to_path_buf();
    let card = save_model(
        &model_dir,
        &out.store,
        &cfg.backbone,
        data.num_classes(),
        data_id(&data_dir, data.len(), data.num_classes()),
        training,
    )?;
    let report = ctx.output("report")?.to_path_buf();
    let extra = cfg.objective.extra_name(&cfg.margin);
    write_curve_with(&report, &out.curve, extra)?;
    let tail = |f: fn(&crate::train::trainer::CurvePoint) -> Option<f64>| {
        let last: Vec<f64> = out.curve.iter().rev().take(20).filter_map(f).collect();
        last.iter().sum::<f64>() / last.len().max(1) as f64
    };
    let final_loss = tail(|c| Some(c.loss));
    let mut summary = json!({
        "final_loss": final_loss,
        "steps": out.steps_done,
        "parameters": card.parameters,
        "macs": card.macs,
        "seconds_this_run": secs,
    });
    if let Some(name) = extra {
        // Mean of the last 20 steps, like final_loss.
        let v = tail(|c| c.extra);
        summary[format!("final_{name}")] = json!(v);
        ctx.metric(&format!("final_{name}"), v);
    }
    std::fs::write(
        report.join("summary.json"),
        serde_json::to_string_pretty(&summary).map_err(TrainError::from)?,
    )?;
    ctx.metric("final_loss", final_loss);
    if let Some(last) = out.reactivation.last() {
        ctx.metric("inactive_fraction", last.inactive_fraction);
        ctx.metric("unique_filters", last.unique_filters as f64);
        ctx.metric(
            "reactivated",
            out.reactivation
                .iter()
                .map(|h| h.reactivated)
                .sum::<usize>() as f64,
        );
    }
    ctx.metric("parameters", card.parameters as f64);
    Ok(())
}

/// `train`: backbone + margin head on a packed data set.
pub struct TrainStage;

impl Stage for TrainStage {
    fn kind(&self) -> &'static str {
        "train"
    }
    /// Training and inference use every core: hold all job slots so two such stages do not
    /// split the cores between them.
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    /// 2: SphereFace trains through ψ with the annealed λ; softmax, centre and triplet losses.
    fn version(&self) -> u32 {
        2
    }
    fn doc(&self) -> &'static str {
        "train a backbone: margin losses (ArcFace/CosFace/combined/SphereFace/norm-softmax, PartialFC), softmax, center or triplet loss"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new("dataset", "dataset", "packed training set"),
                PortSpec::optional("init", "model", "initial backbone weights"),
            ],
            outputs: vec![
                PortSpec::new("model", "model", "weights, model card and class centres"),
                PortSpec::new("report", "report", "loss/lr curve (CSV, PNG) and summary"),
            ],
            params: train_params(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        check_train_params(p)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        run_training(ctx, None)
    }
}

/// `distil`: margin loss + α · angular distillation against a fixed teacher.
pub struct DistilStage;

impl Stage for DistilStage {
    fn kind(&self) -> &'static str {
        "distil"
    }
    /// Training and inference use every core: hold all job slots so two such stages do not
    /// split the cores between them.
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    /// 2: as `train` version 2.
    fn version(&self) -> u32 {
        2
    }
    fn doc(&self) -> &'static str {
        "train a student with margin loss + alpha * angular distillation to a teacher"
    }
    fn signature(&self) -> StageSignature {
        let mut params = train_params();
        params.push(ParamSpec::with_default(
            "alpha",
            ParamType::Float,
            json!(7.0),
            "weight of the angular distillation loss",
        ));
        StageSignature {
            inputs: vec![
                PortSpec::new("dataset", "dataset", "packed training set"),
                PortSpec::new("teacher", "model", "fixed teacher model"),
                PortSpec::optional("init", "model", "previous student (recursive distillation)"),
            ],
            outputs: vec![
                PortSpec::new(
                    "model",
                    "model",
                    "student weights, model card and class centres",
                ),
                PortSpec::new("report", "report", "loss/lr curve (CSV, PNG) and summary"),
            ],
            params,
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        check_train_params(p)?;
        if p.get("alpha").and_then(|v| v.as_f64()).unwrap_or(0.0) < 0.0 {
            return Err("alpha must be >= 0".into());
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        run_training(ctx, Some("teacher"))
    }
}

/// `import-model`: a PyTorch state dict (insightface model zoo) as an fpipe model.
pub struct ImportModelStage;

impl Stage for ImportModelStage {
    fn kind(&self) -> &'static str {
        "import-model"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "import an insightface PyTorch .pth state dict (iresnet, mobilefacenet) as a model"
    }
    fn signature(&self) -> StageSignature {
        let mut params = backbone_params();
        params.push(ParamSpec::required(
            "weights",
            ParamType::Path { companions: &[] },
            "the .pth (or .safetensors) file",
        ));
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new("model", "model", "weights and model card")],
            params,
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        backbone_from(p).map(|_| ())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let cfg = backbone_from(&ctx.params).map_err(StageError::msg)?;
        let path = ctx.param_str("weights")?.to_string();
        let store = ParamStore::new(0);
        Backbone::new(&cfg, store.vb(&Device::Cpu).pp("backbone")).map_err(TrainError::from)?;
        load_model_weights(&store, "backbone.", Path::new(&path))?;
        save_model(
            ctx.output("model")?,
            &store,
            &cfg,
            0,
            json!(null),
            json!({"kind": "import", "file": Path::new(&path).file_name().map(|s| s.to_string_lossy().to_string())}),
        )?;
        Ok(())
    }
}

/// `embed`: embeddings of a data set.
pub struct EmbedStage;

impl Stage for EmbedStage {
    fn kind(&self) -> &'static str {
        "embed"
    }
    /// Training and inference use every core: hold all job slots so two such stages do not
    /// split the cores between them.
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "flip-sum, L2-normalised embeddings of a data set"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new("model", "model", "the model"),
                PortSpec::new("dataset", "dataset", "images to embed"),
            ],
            outputs: vec![PortSpec::new(
                "embeddings",
                "embeddings",
                "embeddings.safetensors (embeddings [N, D], labels [N])",
            )],
            params: vec![
                ParamSpec::with_default(
                    "batch_size",
                    ParamType::Int,
                    json!(64),
                    "images per forward pass",
                )
                .volatile(),
                ParamSpec::with_default(
                    "flip",
                    ParamType::Bool,
                    json!(true),
                    "add the embedding of the flipped image",
                ),
            ],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let dev = super::device(ctx)?;
        let model = load_model(ctx.input("model")?, &dev)?;
        let data = PackedDataset::open(ctx.input("dataset")?).map_err(TrainError::from)?;
        let bs = ctx.param_i64("batch_size")?.max(1) as usize;
        let flip = ctx.param_bool("flip")?;
        let sink = &*ctx;
        let emb = with_threads(ctx.threads, || {
            embed_all(&model, &data, bs, flip, &dev, &|d, t| {
                sink.progress(d, t, "embedding")
            })
        })??;
        let d = model.card.embedding_size;
        let n = data.len();
        let labels: Vec<i64> = (0..n).map(|i| data.label(i)).collect();
        let out = ctx.output("embeddings")?;
        let mut t = std::collections::HashMap::new();
        t.insert(
            "embeddings".to_string(),
            Tensor::from_vec(emb, (n, d), &Device::Cpu).map_err(TrainError::from)?,
        );
        t.insert(
            "labels".to_string(),
            Tensor::from_vec(labels, n, &Device::Cpu).map_err(TrainError::from)?,
        );
        candle_core::safetensors::save(&t, out.join("embeddings.safetensors"))
            .map_err(TrainError::from)?;
        std::fs::write(
            out.join("embeddings.json"),
            serde_json::to_string_pretty(&json!({"images": n, "dim": d, "flip_sum": flip, "normalised": true, "model": model.card.name}))
                .map_err(TrainError::from)?,
        )?;
        Ok(())
    }
}
