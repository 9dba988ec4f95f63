//! The data stage kinds: thin wrappers that read parameters from the [`StageContext`], call
//! the format modules and write packed data sets into the output ports.

use crate::data::synth::{self, SynthParams};
use crate::data::{DATASET, PAIRS};
use fpipe_engine::{
    ParamSpec, ParamType, PortSpec, Stage, StageContext, StageError, StageSignature,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Progress and cancellation of a running stage, for the format modules.
pub(crate) struct CtxMonitor<'a>(pub &'a StageContext);

impl synth::Monitor for CtxMonitor<'_> {
    fn progress(&self, done: u64, total: u64) {
        self.0.progress(done, total, "images");
    }
    fn cancelled(&self) -> bool {
        self.0.cancelled()
    }
}

fn get_usize(params: &BTreeMap<String, Value>, name: &str) -> Result<usize, String> {
    let v = params
        .get(name)
        .ok_or_else(|| format!("parameter `{name}` missing"))?;
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| format!("parameter `{name}` must be a non-negative integer, got {v}"))
}

fn get_f64(params: &BTreeMap<String, Value>, name: &str) -> Result<f64, String> {
    let v = params
        .get(name)
        .ok_or_else(|| format!("parameter `{name}` missing"))?;
    v.as_f64()
        .ok_or_else(|| format!("parameter `{name}` must be a number, got {v}"))
}

/// `synthetic-faces`: the embedded procedurally rendered data set.
pub struct SyntheticFaces;

impl SyntheticFaces {
    fn params(params: &BTreeMap<String, Value>) -> Result<SynthParams, String> {
        let p = SynthParams {
            identities: get_usize(params, "identities")?,
            images_per_identity: get_usize(params, "images_per_identity")?,
            image_size: get_usize(params, "image_size")?,
            seed: get_usize(params, "seed")? as u64,
            label_noise: get_f64(params, "label_noise")?,
            low_quality: get_f64(params, "low_quality")?,
            out_of_domain: get_f64(params, "out_of_domain")?,
            test_identities: get_usize(params, "test_identities")?,
            test_images_per_identity: get_usize(params, "test_images_per_identity")?,
            pairs: get_usize(params, "pairs")?,
        };
        p.check()?;
        Ok(p)
    }
}

impl Stage for SyntheticFaces {
    fn kind(&self) -> &'static str {
        "synthetic-faces"
    }
    fn version(&self) -> u32 {
        synth::VERSION
    }
    fn doc(&self) -> &'static str {
        "Procedurally rendered faces with identities, landmarks and corruption ground truth \
         (training set + held-out verification pairs); nothing to download"
    }
    fn signature(&self) -> StageSignature {
        let d = SynthParams::default();
        StageSignature {
            inputs: vec![],
            outputs: vec![
                PortSpec::new("dataset", DATASET, "training identities"),
                PortSpec::new(
                    "pairs",
                    PAIRS,
                    "verification set of held-out identities, 50/50 same/different pairs",
                ),
            ],
            params: vec![
                ParamSpec::with_default(
                    "identities",
                    ParamType::Int,
                    json!(d.identities),
                    "training identities",
                ),
                ParamSpec::with_default(
                    "images_per_identity",
                    ParamType::Int,
                    json!(d.images_per_identity),
                    "images per training identity",
                ),
                ParamSpec::with_default(
                    "image_size",
                    ParamType::Int,
                    json!(d.image_size),
                    "square image side in pixels",
                ),
                ParamSpec::with_default("seed", ParamType::Int, json!(d.seed), "random seed"),
                ParamSpec::with_default(
                    "label_noise",
                    ParamType::Float,
                    json!(d.label_noise),
                    "fraction of training images labelled with another identity",
                ),
                ParamSpec::with_default(
                    "low_quality",
                    ParamType::Float,
                    json!(d.low_quality),
                    "fraction of training images heavily blurred / dark / noisy / occluded",
                ),
                ParamSpec::with_default(
                    "out_of_domain",
                    ParamType::Float,
                    json!(d.out_of_domain),
                    "fraction of training images that are not faces",
                ),
                ParamSpec::with_default(
                    "test_identities",
                    ParamType::Int,
                    json!(d.test_identities),
                    "held-out identities in the verification set",
                ),
                ParamSpec::with_default(
                    "test_images_per_identity",
                    ParamType::Int,
                    json!(d.test_images_per_identity),
                    "images per held-out identity",
                ),
                ParamSpec::with_default(
                    "pairs",
                    ParamType::Int,
                    json!(d.pairs),
                    "verification pairs (half same identity)",
                ),
            ],
        }
    }
    fn check_params(&self, params: &BTreeMap<String, Value>) -> Result<(), String> {
        Self::params(params).map(|_| ())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = Self::params(&ctx.params).map_err(StageError::Failed)?;
        let train = ctx.output("dataset")?.to_path_buf();
        let pairs = ctx.output("pairs")?.to_path_buf();
        let counts =
            synth::generate(&p, &train, Some(&pairs), &CtxMonitor(ctx)).map_err(|e| match e {
                synth::GenerateError::Interrupted => StageError::Interrupted,
                synth::GenerateError::Data(d) => d.into(),
            })?;
        ctx.metric("images", counts.train_images as f64);
        ctx.metric("test_images", counts.test_images as f64);
        ctx.metric("pairs", counts.pairs as f64);
        Ok(())
    }
}

/// `align` / `align-pairs`: 5-point similarity alignment to the arcface template.
pub struct Align {
    /// True for `align-pairs` (verification sets: pairs in, pairs out).
    pub pairs: bool,
}

impl Stage for Align {
    fn kind(&self) -> &'static str {
        if self.pairs {
            "align-pairs"
        } else {
            "align"
        }
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        if self.pairs {
            "Aligns a verification set (pairs kept) to the arcface 5-point template"
        } else {
            "Aligns a data set to the arcface 5-point template (Umeyama + bilinear warp)"
        }
    }
    fn signature(&self) -> StageSignature {
        let (port, ty) = if self.pairs {
            ("pairs", PAIRS)
        } else {
            ("dataset", DATASET)
        };
        StageSignature {
            inputs: vec![PortSpec::new(port, ty, "images with 5-point landmarks")],
            outputs: vec![PortSpec::new(port, ty, "aligned images")],
            params: vec![
                ParamSpec::with_default(
                    "image_size",
                    ParamType::Int,
                    json!(112),
                    "output side in pixels (112, 128, 224, ...: estimate_norm rules)",
                ),
                ParamSpec::with_default(
                    "on_missing",
                    ParamType::Enum(&["skip", "fail"]),
                    json!("skip"),
                    "images without landmarks: leave out and count, or stop",
                ),
            ],
        }
    }
    fn check_params(&self, params: &BTreeMap<String, Value>) -> Result<(), String> {
        let s = get_usize(params, "image_size")?;
        if !(8..=2048).contains(&s) {
            return Err(format!("`image_size` {s} must be in 8..=2048"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let port = if self.pairs { "pairs" } else { "dataset" };
        let size = get_usize(&ctx.params, "image_size").map_err(StageError::Failed)?;
        let on_missing = match ctx.param_str("on_missing")? {
            "fail" => crate::data::align::OnMissing::Fail,
            _ => crate::data::align::OnMissing::Skip,
        };
        let input = ctx.input(port)?.to_path_buf();
        let output = ctx.output(port)?.to_path_buf();
        let c =
            crate::data::align::align_dataset(&input, &output, size, on_missing, &CtxMonitor(ctx))?;
        ctx.check_cancel()?;
        ctx.metric("aligned", c.aligned as f64);
        ctx.metric(
            "skipped",
            (c.skipped_no_landmarks + c.skipped_degenerate) as f64,
        );
        Ok(())
    }
}

fn on_error(ctx: &StageContext) -> Result<crate::data::recordio::OnError, StageError> {
    Ok(match ctx.param_str("on_error")? {
        "fail" => crate::data::recordio::OnError::Fail,
        _ => crate::data::recordio::OnError::Skip,
    })
}

fn on_error_param() -> ParamSpec {
    ParamSpec::with_default(
        "on_error",
        ParamType::Enum(&["skip", "fail"]),
        json!("fail"),
        "a corrupt record or undecodable image: stop, or leave it out and count it",
    )
}

fn report_import(ctx: &mut StageContext, c: &crate::data::recordio::ImportCounts) {
    for p in &c.problems {
        ctx.log(&format!("skipped: {p}"));
    }
    ctx.metric("images", c.images as f64);
    ctx.metric("skipped", c.skipped as f64);
}

/// `recordio`: imports insightface `train.rec` + `train.idx`.
pub struct RecordIo;

impl Stage for RecordIo {
    fn kind(&self) -> &'static str {
        "recordio"
    }
    fn version(&self) -> u32 {
        // 2: skipped-input messages in `dataset.json` name files relative to the input's
        // folder, and an image of another size is reported without a doubled `: `.
        2
    }
    fn doc(&self) -> &'static str {
        "Reads an insightface/MXNet train.rec (+ .idx beside it) into a packed data set"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new("dataset", DATASET, "the images and labels")],
            params: vec![
                ParamSpec::required(
                    "path",
                    ParamType::Path {
                        companions: &["idx"],
                    },
                    "the .rec file; its .idx must lie beside it",
                ),
                on_error_param(),
            ],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let rec = std::path::PathBuf::from(ctx.param_str("path")?);
        let out = ctx.output("dataset")?.to_path_buf();
        let c =
            crate::data::recordio::import_recordio(&rec, &out, on_error(ctx)?, &CtxMonitor(ctx))?;
        ctx.check_cancel()?;
        report_import(ctx, &c);
        Ok(())
    }
}

/// `write-recordio`: exports a packed data set as insightface RecordIO.
pub struct WriteRecordIo;

impl Stage for WriteRecordIo {
    fn kind(&self) -> &'static str {
        "write-recordio"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Writes a data set as insightface train.rec/train.idx/property (MXFaceDataset reads it)"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![PortSpec::new("dataset", DATASET, "images to write")],
            outputs: vec![PortSpec::new(
                "files",
                "files",
                "train.rec, train.idx, property",
            )],
            params: vec![ParamSpec::with_default(
                "quality",
                ParamType::Int,
                json!(95),
                "JPEG quality 1..100",
            )],
        }
    }
    fn check_params(&self, params: &BTreeMap<String, Value>) -> Result<(), String> {
        let q = get_usize(params, "quality")?;
        if !(1..=100).contains(&q) {
            return Err(format!("`quality` {q} must be in 1..=100"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let q = get_usize(&ctx.params, "quality").map_err(StageError::Failed)?;
        let input = ctx.input("dataset")?.to_path_buf();
        let out = ctx.output("files")?.to_path_buf();
        let n = crate::data::recordio::export_recordio(&input, &out, q.clamp(1, 100) as u8)?;
        ctx.metric("images", n as f64);
        Ok(())
    }
}

/// `verification-bin`: imports an LFW / CFP-FP / AgeDB-30 style `.bin`.
pub struct VerificationBin;

impl Stage for VerificationBin {
    fn kind(&self) -> &'static str {
        "verification-bin"
    }
    fn version(&self) -> u32 {
        // 2: skipped-input messages in `dataset.json` name files relative to the input's
        // folder, and an image of another size is reported without a doubled `: `.
        2
    }
    fn doc(&self) -> &'static str {
        "Reads an insightface verification .bin (LFW, CFP-FP, AgeDB-30) into a pairs set"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new(
                "pairs",
                PAIRS,
                "images and pairs (2i, 2i+1, same)",
            )],
            params: vec![
                ParamSpec::required("path", ParamType::Path { companions: &[] }, "the .bin file"),
                on_error_param(),
            ],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let path = std::path::PathBuf::from(ctx.param_str("path")?);
        let out = ctx.output("pairs")?.to_path_buf();
        let c = crate::data::vbin::import_bin(&path, &out, on_error(ctx)?, &CtxMonitor(ctx))?;
        ctx.check_cancel()?;
        report_import(ctx, &c);
        Ok(())
    }
}

/// `image-folder`: one sub-folder per identity, optional `landmarks.csv`/`landmarks.json`.
pub struct ImageFolder;

impl Stage for ImageFolder {
    fn kind(&self) -> &'static str {
        "image-folder"
    }
    fn version(&self) -> u32 {
        // 2: skipped-input messages in `dataset.json` name files relative to the input's
        // folder, and an image of another size is reported without a doubled `: `.
        2
    }
    fn doc(&self) -> &'static str {
        "Reads one folder per identity (JPEG/PNG, optional landmarks.csv/.json) into a data set"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new("dataset", DATASET, "the images and labels")],
            params: vec![
                ParamSpec::required(
                    "path",
                    ParamType::Path { companions: &[] },
                    "the folder holding one sub-folder per identity",
                ),
                on_error_param(),
            ],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let root = std::path::PathBuf::from(ctx.param_str("path")?);
        let out = ctx.output("dataset")?.to_path_buf();
        let c = crate::data::folder::import_folder(&root, &out, on_error(ctx)?, &CtxMonitor(ctx))?;
        ctx.check_cancel()?;
        report_import(ctx, &c);
        Ok(())
    }
}
