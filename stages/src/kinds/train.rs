//! The `train`, `distil`, `import-model`, `embed` and `evaluate` stage kinds.

use super::params::kind_params;
use super::with_threads;
use crate::data::PackedDataset;
use crate::loss::objective::ObjectiveConfig;
use crate::loss::triplet::Mining;
use crate::loss::{LambdaSchedule, MarginConfig, MarginVariant};
use crate::models::onnx::import::ImportOptions;
use crate::models::{Backbone, BackboneConfig, BackboneOptions, ParamStore, BACKBONES};
use crate::train::artifact::{load_model_for_inference, save_model, write_curve_with};
use crate::train::embed::embed_all;
use crate::train::optim::OptimizerKind;
use crate::train::reactivation::{ReactivationConfig, ReactivationMode};
use crate::train::trainer::{train, RunEnv, Teacher, TrainConfig};
use crate::train::{load_model_weights, TrainError};
use candle_core::{Device, Tensor};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

kind_params! {
    /// The backbone parameters of `train`, `distil` and `import-model`.
    pub struct BackboneParams {
        backbone: String = Enum(BACKBONES.as_slice()), default "mobilefacenet",
            "backbone architecture";
        width: f64 = Float, default 1.0, "channel multiplier (1 = reference size)";
        input_size: i64 = Int, default 112, "square input size; images are resized to it";
        embedding_size: i64 = Int, default 512, "embedding dimension";
        se: bool = Bool, default true, "vargfacenet: squeeze-and-excitation in normal blocks";
    }
}

impl BackboneParams {
    fn config(&self) -> Result<BackboneConfig, String> {
        if !(self.width > 0.0 && self.width <= 4.0) {
            return Err("width must lie in (0, 4]".into());
        }
        if !(16..=1024).contains(&self.input_size) {
            return Err("input_size must lie in 16..=1024".into());
        }
        if !(2..=8192).contains(&self.embedding_size) {
            return Err("embedding_size must lie in 2..=8192".into());
        }
        let options = BackboneOptions {
            width: self.width,
            input_size: self.input_size as usize,
            num_features: self.embedding_size as usize,
            se: self.se,
        };
        BackboneConfig::from_name(&self.backbone, &options).map_err(|e| e.to_string())
    }
}

kind_params! {
    /// Parameters of `train` (and the first ones of `distil`).
    pub struct TrainParams {
        ..arch: BackboneParams;
        loss: String = Enum(LOSSES), default "arcface",
            "arcface (1,0.5,0), cosface (1,0,0.4), combined (1,0.3,0.2), sphereface (4,0,0), norm-softmax (1,0,0), custom (m1/m2/m3); softmax, center, triplet (see docs/training.md)";
        m1: f64 = Float, default 1.0,
            "custom: multiplicative angular margin (SphereFace; real, (0, 8])";
        m2: f64 = Float, default 0.5, "custom: additive angular margin";
        m3: f64 = Float, default 0.0, "custom: additive cosine margin";
        margin_variant: String =
            Enum(&["straight-through", "differentiable", "easy-margin"]),
            default "straight-through",
            "how the angular margin enters the gradient (see docs/training.md)";
        scale: f64 = Float, default 64.0, "logit scale s";
        sphere_lambda_base: f64 = Float, default 1000.0,
            "SphereFace (m1 ≠ 1): λ = max(min, base·(1+gamma·iter)^-power) blends cos θ into ψ(θ)";
        sphere_lambda_gamma: f64 = Float, default 0.12, "SphereFace: λ decay rate";
        sphere_lambda_power: f64 = Float, default 1.0, "SphereFace: λ decay power";
        sphere_lambda_min: f64 = Float, default 5.0, "SphereFace: λ floor";
        center_lambda: f64 = Float, default 0.003, "center: weight λ of λ/2·‖x − c_y‖²";
        center_alpha: f64 = Float, default 0.5, "center: centre update rate α";
        triplet_margin: f64 = Float, default 0.2,
            "triplet: hinge margin on squared distances of normalised embeddings";
        triplet_mining: String = Enum(&["semi-hard", "batch-hard"]), default "semi-hard",
            "triplet: online selection (FaceNet semi-hard, or batch-hard)";
        triplet_k: i64 = Int, default 4,
            "triplet: images per identity K in a batch (P = batch_size / K)";
        interclass_threshold: f64 = Float, default 0.0,
            "zero non-target cosines above this (0 = off)";
        sample_rate: f64 = Float, default 1.0, "PartialFC: fraction of class centres per step";
        optimizer: String = Enum(&["sgd", "adamw"]), default "sgd", "optimiser";
        lr: f64 = Float, default 0.1, "peak learning rate";
        momentum: f64 = Float, default 0.9, "SGD momentum";
        weight_decay: f64 = Float, default 5e-4, "weight decay";
        no_decay_bn: bool = Bool, default false, "no weight decay on BN/PReLU/bias";
        epochs: f64 = Float, default 20.0, "training length in epochs (unless steps > 0)";
        steps: i64 = Int, default 0, "training length in steps (overrides epochs)";
        warmup_epochs: f64 = Float, default 0.0, "linear warm-up, in epochs";
        batch_size: i64 = Int, default 128, "images per step";
        grad_clip: f64 = Float, default 5.0, "backbone gradient-norm clip (0 = off)";
        flip: bool = Bool, default true, "random horizontal flip";
        seed: i64 = Int, default 0, "seed of initialisation, order, flips and sampling";
        checkpoint_every: i64 = Int, default 200, volatile, "checkpoint every N steps";
        reactivation: String = Enum(&["none", "scaled-random", "craft"]), default "none",
            "re-initialise inactive first-layer filters (CRAFT; see docs/training.md)";
        reactivation_tau: f64 = Float, default 0.1,
            "inactive when ||W_i|| < tau * max_j ||W_j||";
        reactivation_threshold: f64 = Float, default 0.0,
            "absolute activity threshold; > 0 replaces tau";
        reactivation_every: i64 = Int, default 1, "check at the end of every N epochs";
        reactivation_quiet: f64 = Float, default 0.2,
            "no reactivation in this last fraction of training";
        reactivation_same_cos: f64 = Float, default 0.9,
            "|cos| at or above which filters are the same pattern";
        reactivation_perturb: f64 = Float, default 0.05,
            "relative noise on repeated CRAFT complements";
    }
}

kind_params! {
    /// Parameters of `distil`: those of `train`, and the weight of the distillation loss.
    pub struct DistilParams {
        ..train: TrainParams;
        alpha: f64 = Float, default 7.0, "weight of the angular distillation loss";
    }
}

kind_params! {
    /// Parameters of `import-model`.
    pub struct ImportModelParams {
        ..arch: BackboneParams;
        weights: String = Path { companions: &[] }, required,
            "the .pth (or .safetensors) file, or the .onnx file with format onnx";
        format: String = Enum(&["pth", "onnx"]), default "pth", keyed_if_changed,
            "pth: a state dict for `backbone`; onnx: a face-embedding ONNX graph (docs/onnx.md)";
        name: String = String, default "", keyed_if_changed,
            "onnx: the model's name (default: the file name without extension)";
        colour: String = Enum(&["rgb", "bgr"]), default "rgb", keyed_if_changed,
            "onnx: channel order the graph takes";
        mean: f64 = Float, default 127.5, keyed_if_changed,
            "onnx: subtracted from 0..255 pixel values";
        scale: f64 = Float, default 0.0078125, keyed_if_changed,
            "onnx: multiplies the pixel values after the mean (input = (x - mean) * scale)";
    }
}

kind_params! {
    /// Parameters of `embed`.
    pub struct EmbedParams {
        batch_size: i64 = Int, default 64, volatile, "images per forward pass";
        flip: bool = Bool, default true, "add the embedding of the flipped image";
    }
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

impl TrainParams {
    fn reactivation(&self) -> Result<ReactivationConfig, String> {
        let mode = match self.reactivation.as_str() {
            "scaled-random" => ReactivationMode::ScaledRandom,
            "craft" => ReactivationMode::Craft,
            _ => ReactivationMode::None,
        };
        let cfg = ReactivationConfig {
            mode,
            tau: self.reactivation_tau,
            threshold: self.reactivation_threshold,
            every: self.reactivation_every.max(0) as u64,
            quiet: self.reactivation_quiet,
            same_cos: self.reactivation_same_cos,
            perturb: self.reactivation_perturb,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn margin(&self) -> Result<MarginConfig, String> {
        let (m1, m2, m3) = match self.loss.as_str() {
            "arcface" => (1.0, 0.5, 0.0),
            "cosface" => (1.0, 0.0, 0.4),
            "combined" => (1.0, 0.3, 0.2),
            "sphereface" => (4.0, 0.0, 0.0),
            "custom" => (self.m1, self.m2, self.m3),
            // norm-softmax; softmax, center and triplet do not use the margin head.
            _ => (1.0, 0.0, 0.0),
        };
        let sphere_lambda = (m1 != 1.0).then_some(LambdaSchedule {
            base: self.sphere_lambda_base,
            gamma: self.sphere_lambda_gamma,
            power: self.sphere_lambda_power,
            min: self.sphere_lambda_min,
        });
        let variant = match self.margin_variant.as_str() {
            "differentiable" => MarginVariant::Differentiable,
            "easy-margin" => MarginVariant::EasyMargin,
            _ => MarginVariant::StraightThrough,
        };
        let cfg = MarginConfig {
            s: self.scale,
            m1,
            m2,
            m3,
            variant,
            interclass_threshold: self.interclass_threshold,
            sphere_lambda,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    fn objective(&self) -> Result<ObjectiveConfig, String> {
        let cfg = match self.loss.as_str() {
            "softmax" => ObjectiveConfig::Softmax,
            "center" => ObjectiveConfig::Center {
                lambda: self.center_lambda,
                alpha: self.center_alpha,
            },
            "triplet" => ObjectiveConfig::Triplet {
                margin: self.triplet_margin,
                mining: match self.triplet_mining.as_str() {
                    "batch-hard" => Mining::BatchHard,
                    _ => Mining::SemiHard,
                },
                per_identity: self.triplet_k.clamp(0, 1 << 20) as usize,
            },
            _ => ObjectiveConfig::Margin,
        };
        let bs = self.batch_size.clamp(0, 1 << 30) as usize;
        cfg.validate(bs, self.sample_rate)
            .map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        self.arch.config()?;
        self.margin()?;
        self.reactivation()?;
        self.objective()?;
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err("sample_rate must lie in (0, 1]".into());
        }
        if self.lr <= 0.0 {
            return Err("lr must be > 0".into());
        }
        if self.batch_size < 2 {
            return Err("batch_size must be at least 2".into());
        }
        if self.epochs <= 0.0 && self.steps <= 0 {
            return Err("give epochs > 0 or steps > 0".into());
        }
        Ok(())
    }

    /// The training configuration for `n_images` images and the distillation weight `alpha`,
    /// with the checkpoint interval.
    fn config(&self, n_images: usize, alpha: f64) -> Result<(TrainConfig, u64), String> {
        let bs = self.batch_size.max(2) as usize;
        let steps_per_epoch = (n_images as f64 / bs as f64).max(1.0);
        let steps = match self.steps {
            s if s > 0 => s as u64,
            _ => (self.epochs * steps_per_epoch).ceil() as u64,
        };
        let warmup = (self.warmup_epochs * steps_per_epoch).round() as u64;
        let cfg = TrainConfig {
            backbone: self.arch.config()?,
            margin: self.margin()?,
            objective: self.objective()?,
            sample_rate: self.sample_rate,
            optimizer: if self.optimizer == "adamw" {
                OptimizerKind::Adamw
            } else {
                OptimizerKind::Sgd
            },
            lr: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            no_decay_bn: self.no_decay_bn,
            steps,
            warmup_steps: warmup.min(steps),
            batch_size: bs,
            grad_clip: self.grad_clip,
            flip: self.flip,
            seed: self.seed as u64,
            distil_alpha: alpha,
            reactivation: self.reactivation()?,
        };
        Ok((cfg, self.checkpoint_every.max(0) as u64))
    }
}

pub(crate) fn data_id(dir: &Path, n: usize, classes: usize) -> Value {
    json!({
        "id": dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(),
        "images": n,
        "classes": classes,
    })
}

/// Shared body of `train` and `distil` (`alpha`: weight of the distillation loss).
fn run_training(
    ctx: &mut StageContext,
    params: &TrainParams,
    alpha: f64,
    teacher_port: Option<&str>,
) -> Result<(), StageError> {
    let data_dir = ctx.input("dataset")?.to_path_buf();
    let data = PackedDataset::open(&data_dir).map_err(TrainError::from)?;
    let (cfg, every) = params.config(data.len(), alpha).map_err(StageError::msg)?;
    let device = super::device(ctx)?;
    let teacher = match teacher_port {
        Some(port) => {
            let m = load_model_for_inference(ctx.input(port)?, &device)?;
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
    let title = format!("{} on {}", card.name, data.display_name());
    write_curve_with(&report, &out.curve, extra, &title)?;
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
            params: TrainParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        TrainParams::from_params(p)?.check()
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = TrainParams::from_params(&ctx.params).map_err(StageError::msg)?;
        run_training(ctx, &p, 0.0, None)
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
            params: DistilParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        let p = DistilParams::from_params(p)?;
        p.train.check()?;
        if p.alpha < 0.0 {
            return Err("alpha must be >= 0".into());
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = DistilParams::from_params(&ctx.params).map_err(StageError::msg)?;
        run_training(ctx, &p.train, p.alpha, Some("teacher"))
    }
}

/// The import options of `import-model` parameters with `format: onnx`.
fn onnx_import_options(p: &ImportModelParams) -> Result<ImportOptions, String> {
    if !(p.scale.is_finite() && p.scale > 0.0) {
        return Err(format!("scale must be a positive number, not {}", p.scale));
    }
    if !p.mean.is_finite() {
        return Err("mean must be a number".into());
    }
    if !(16..=1024).contains(&p.arch.input_size) {
        return Err("input_size must lie in 16..=1024".into());
    }
    let name = if p.name.is_empty() {
        Path::new(&p.weights)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "onnx".into())
    } else {
        p.name.clone()
    };
    Ok(ImportOptions {
        name,
        input_size: Some(p.arch.input_size as usize),
        mean: p.mean,
        scale: p.scale,
        bgr: p.colour == "bgr",
    })
}

/// `import-model`: a PyTorch state dict (insightface model zoo), or an ONNX graph
/// ([`super::onnx`]), as an fpipe model.
pub struct ImportModelStage;

impl Stage for ImportModelStage {
    fn kind(&self) -> &'static str {
        "import-model"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "import an insightface PyTorch .pth state dict (iresnet, mobilefacenet), or a face-embedding ONNX graph (format: onnx), as a model"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new("model", "model", "weights and model card")],
            params: ImportModelParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        let p = ImportModelParams::from_params(p)?;
        if p.format == "onnx" {
            return onnx_import_options(&p).map(|_| ());
        }
        p.arch.config().map(|_| ())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = ImportModelParams::from_params(&ctx.params).map_err(StageError::msg)?;
        if p.format == "onnx" {
            let opts = onnx_import_options(&p).map_err(StageError::msg)?;
            return super::onnx::import_onnx(ctx, Path::new(&p.weights), &opts);
        }
        let cfg = p.arch.config().map_err(StageError::msg)?;
        let path = p.weights;
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
            params: EmbedParams::specs(),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let dev = super::device(ctx)?;
        let model = load_model_for_inference(ctx.input("model")?, &dev)?;
        let data = PackedDataset::open(ctx.input("dataset")?).map_err(TrainError::from)?;
        let p = EmbedParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let bs = p.batch_size.max(1) as usize;
        let flip = p.flip;
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
