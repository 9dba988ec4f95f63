//! `all-pairs`: a labelled data set as a verification set of all its genuine and impostor
//! pairs ([`crate::data::pairs`]), for `evaluate` on small real sets read by `image-folder`.

use super::params::kind_params;
use crate::data::{PackedDataset, DATASET, PAIRS};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::json;
use std::collections::BTreeMap;

kind_params! {
    /// Parameters of `all-pairs`.
    pub struct AllPairsParams {
        max_images: i64 = Int, default 2000,
            "refuse larger sets (n images make n(n-1)/2 pairs)";
    }
}

/// `all-pairs`.
pub struct AllPairsStage;

impl Stage for AllPairsStage {
    fn kind(&self) -> &'static str {
        "all-pairs"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "a labelled data set as a verification set: every pair of images, genuine and impostor"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![PortSpec::new("dataset", DATASET, "labelled images")],
            outputs: vec![PortSpec::new(
                "pairs",
                PAIRS,
                "the images with all their pairs",
            )],
            params: AllPairsParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, serde_json::Value>) -> Result<(), String> {
        if AllPairsParams::from_params(p)?.max_images < 2 {
            return Err("max_images must be at least 2".into());
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = AllPairsParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let src = PackedDataset::open(ctx.input("dataset")?)?;
        let out = ctx.output("pairs")?.to_path_buf();
        let c = crate::data::pairs::all_pairs(
            &src,
            &out,
            p.max_images.max(2) as usize,
            json!({"kind": "all-pairs", "images": src.len()}),
        )?;
        ctx.log(&format!(
            "{} images: {} genuine and {} impostor pairs",
            src.len(),
            c.genuine,
            c.impostor
        ));
        ctx.metric("genuine_pairs", c.genuine as f64);
        ctx.metric("impostor_pairs", c.impostor as f64);
        Ok(())
    }
}
