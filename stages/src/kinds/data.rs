//! The data stage kinds: thin wrappers that read parameters from the [`StageContext`], call
//! the format modules and write packed data sets into the output ports.

use super::params::kind_params;
use crate::data::synth::{self, SynthParams};
use crate::data::{DATASET, PAIRS};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::Value;
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

kind_params! {
    /// Parameters of `synthetic-faces`; the defaults are [`SynthParams::default`]'s.
    pub struct SyntheticFacesParams {
        identities: usize = Int, default (SynthParams::default().identities),
            "training identities";
        images_per_identity: usize = Int, default (SynthParams::default().images_per_identity),
            "images per training identity";
        image_size: usize = Int, default (SynthParams::default().image_size),
            "square image side in pixels";
        seed: u64 = Int, default (SynthParams::default().seed), "random seed";
        label_noise: f64 = Float, default (SynthParams::default().label_noise),
            "fraction of training images labelled with another identity";
        low_quality: f64 = Float, default (SynthParams::default().low_quality),
            "fraction of training images heavily blurred / dark / noisy / occluded";
        out_of_domain: f64 = Float, default (SynthParams::default().out_of_domain),
            "fraction of training images that are not faces";
        test_identities: usize = Int, default (SynthParams::default().test_identities),
            "held-out identities in the verification set";
        test_images_per_identity: usize = Int,
            default (SynthParams::default().test_images_per_identity),
            "images per held-out identity";
        pairs: usize = Int, default (SynthParams::default().pairs),
            "verification pairs (half same identity)";
    }
}

/// `synthetic-faces`: the embedded procedurally rendered data set.
pub struct SyntheticFaces;

impl SyntheticFaces {
    fn params(params: &BTreeMap<String, Value>) -> Result<SynthParams, String> {
        let p = SyntheticFacesParams::from_params(params)?;
        let p = SynthParams {
            identities: p.identities,
            images_per_identity: p.images_per_identity,
            image_size: p.image_size,
            seed: p.seed,
            label_noise: p.label_noise,
            low_quality: p.low_quality,
            out_of_domain: p.out_of_domain,
            test_identities: p.test_identities,
            test_images_per_identity: p.test_images_per_identity,
            pairs: p.pairs,
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
            params: SyntheticFacesParams::specs(),
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

kind_params! {
    /// Parameters of `align` and `align-pairs`.
    pub struct AlignParams {
        image_size: usize = Int, default 112,
            "output side in pixels (112, 128, 224, ...: estimate_norm rules)";
        on_missing: String = Enum(&["skip", "fail"]), default "skip",
            "images without landmarks: leave out and count, or stop";
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
            params: AlignParams::specs(),
        }
    }
    fn check_params(&self, params: &BTreeMap<String, Value>) -> Result<(), String> {
        let s = AlignParams::from_params(params)?.image_size;
        if !(8..=2048).contains(&s) {
            return Err(format!("`image_size` {s} must be in 8..=2048"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let port = if self.pairs { "pairs" } else { "dataset" };
        let p = AlignParams::from_params(&ctx.params).map_err(StageError::Failed)?;
        let size = p.image_size;
        let on_missing = match p.on_missing.as_str() {
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

kind_params! {
    /// What the readers do with input they cannot read.
    pub struct OnErrorParams {
        on_error: String = Enum(&["skip", "fail"]), default "fail",
            "a corrupt record or undecodable image: stop, or leave it out and count it";
    }
}

impl OnErrorParams {
    fn mode(&self) -> crate::data::recordio::OnError {
        match self.on_error.as_str() {
            "fail" => crate::data::recordio::OnError::Fail,
            _ => crate::data::recordio::OnError::Skip,
        }
    }
}

fn report_import(ctx: &mut StageContext, c: &crate::data::recordio::ImportCounts) {
    for p in &c.problems {
        ctx.log(&format!("skipped: {p}"));
    }
    ctx.metric("images", c.images as f64);
    ctx.metric("skipped", c.skipped as f64);
}

kind_params! {
    /// Parameters of `recordio`.
    pub struct RecordIoParams {
        path: String = Path { companions: &["idx"] }, required,
            "the .rec file; its .idx must lie beside it";
        ..read: OnErrorParams;
    }
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
            params: RecordIoParams::specs(),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = RecordIoParams::from_params(&ctx.params).map_err(StageError::Failed)?;
        let rec = std::path::PathBuf::from(p.path);
        let out = ctx.output("dataset")?.to_path_buf();
        let c =
            crate::data::recordio::import_recordio(&rec, &out, p.read.mode(), &CtxMonitor(ctx))?;
        ctx.check_cancel()?;
        report_import(ctx, &c);
        Ok(())
    }
}

kind_params! {
    /// Parameters of `write-recordio`.
    pub struct WriteRecordIoParams {
        quality: usize = Int, default 95, "JPEG quality 1..100";
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
            params: WriteRecordIoParams::specs(),
        }
    }
    fn check_params(&self, params: &BTreeMap<String, Value>) -> Result<(), String> {
        let q = WriteRecordIoParams::from_params(params)?.quality;
        if !(1..=100).contains(&q) {
            return Err(format!("`quality` {q} must be in 1..=100"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let q = WriteRecordIoParams::from_params(&ctx.params)
            .map_err(StageError::Failed)?
            .quality;
        let input = ctx.input("dataset")?.to_path_buf();
        let out = ctx.output("files")?.to_path_buf();
        let n = crate::data::recordio::export_recordio(&input, &out, q.clamp(1, 100) as u8)?;
        ctx.metric("images", n as f64);
        Ok(())
    }
}

kind_params! {
    /// Parameters of `verification-bin`.
    pub struct VerificationBinParams {
        path: String = Path { companions: &[] }, required, "the .bin file";
        ..read: OnErrorParams;
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
            params: VerificationBinParams::specs(),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = VerificationBinParams::from_params(&ctx.params).map_err(StageError::Failed)?;
        let path = std::path::PathBuf::from(p.path);
        let out = ctx.output("pairs")?.to_path_buf();
        let c = crate::data::vbin::import_bin(&path, &out, p.read.mode(), &CtxMonitor(ctx))?;
        ctx.check_cancel()?;
        report_import(ctx, &c);
        Ok(())
    }
}

kind_params! {
    /// Parameters of `image-folder`.
    pub struct ImageFolderParams {
        path: String = Path { companions: &[] }, required,
            "the folder holding one sub-folder per identity";
        ..read: OnErrorParams;
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
            params: ImageFolderParams::specs(),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = ImageFolderParams::from_params(&ctx.params).map_err(StageError::Failed)?;
        let root = std::path::PathBuf::from(p.path);
        let out = ctx.output("dataset")?.to_path_buf();
        let c = crate::data::folder::import_folder(&root, &out, p.read.mode(), &CtxMonitor(ctx))?;
        ctx.check_cancel()?;
        report_import(ctx, &c);
        Ok(())
    }
}
