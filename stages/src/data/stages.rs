//! The data stage kinds: thin wrappers that read parameters from the [`StageContext`], call
//! the format modules and write packed data sets into the output ports.

use super::synth::{self, SynthParams};
use super::{DATASET, PAIRS};
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
