//! The `export-onnx` kind, and `import-model`'s `format: onnx` (docs/onnx.md).

use crate::models::onnx::export::{encode, export_model, INPUT, IR_VERSION, OPSET, OUTPUT};
use crate::models::onnx::import::{import_file, ImportOptions};
use crate::models::{Backbone, BackboneConfig, ParamStore};
use crate::train::artifact::{load_model, save_model};
use crate::train::TrainError;
use candle_core::Device;
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::json;
use std::path::Path;

/// File name of the exported graph.
pub const ONNX_FILE: &str = "model.onnx";
/// File name of the exported graph's card (input size, colour order, normalisation, sizes).
pub const ONNX_CARD: &str = "onnx.json";

impl From<crate::models::onnx::OnnxError> for StageError {
    fn from(e: crate::models::onnx::OnnxError) -> Self {
        StageError::msg(e.to_string())
    }
}

/// `import-model` with `format: onnx`: reads, checks and runs the graph once, then writes it
/// as a model artifact of the `onnx` backbone.
pub(crate) fn import_onnx(
    ctx: &mut StageContext,
    path: &Path,
    opts: &ImportOptions,
) -> Result<(), StageError> {
    let imported = import_file(path, opts)?;
    let n_nodes = imported.config.graph.nodes.len();
    let cfg = BackboneConfig::Onnx(imported.config);
    let store = ParamStore::new(0);
    Backbone::new(&cfg, store.vb(&Device::Cpu).pp("backbone")).map_err(TrainError::from)?;
    let origin = path.display().to_string();
    store
        .assign("backbone.", &imported.weights, &origin, false)
        .map_err(TrainError::from)?;
    ctx.log(&format!(
        "{}: {n_nodes} nodes, input {}x{}, embedding {}",
        origin,
        cfg.input_size(),
        cfg.input_size(),
        cfg.embedding_size()
    ));
    save_model(
        ctx.output("model")?,
        &store,
        &cfg,
        0,
        json!(null),
        json!({"kind": "import", "format": "onnx", "file": path.file_name().map(|s| s.to_string_lossy().to_string())}),
    )?;
    Ok(())
}

/// Writes `model.onnx` and its card for the model artifact `model_dir` into `out`.
pub fn export_dir(model_dir: &Path, out: &Path) -> Result<serde_json::Value, StageError> {
    let m = load_model(model_dir, &Device::Cpu)?;
    let cfg = &m.card.architecture;
    let proto = export_model(&m.backbone, cfg).map_err(TrainError::from)?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(ONNX_FILE), encode(&proto))?;
    let norm = cfg.normalisation();
    let bgr = matches!(cfg, BackboneConfig::Onnx(c) if c.bgr);
    let card = json!({
        "format": "fpipe-onnx/1",
        "file": ONNX_FILE,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "model": m.card.name,
        "architecture": cfg.name(),
        "input": {
            "name": INPUT,
            "shape": ["batch", 3, cfg.input_size(), cfg.input_size()],
            "layout": "NCHW",
            "dtype": "float32",
        },
        "input_size": cfg.input_size(),
        "colour_order": "RGB",
        "graph_colour_order": if bgr { "BGR (the graph reorders RGB input itself)" } else { "RGB" },
        "normalisation": {
            "mean": norm.mean,
            "std": norm.std,
            "formula": "input = (pixel - mean) / std, pixel in 0..255",
        },
        "output": {"name": OUTPUT, "shape": ["batch", cfg.embedding_size()], "l2_normalised": false},
        "embedding_size": cfg.embedding_size(),
        "batchnorm": "folded into the preceding Conv/Gemm where exact; BatchNormalization otherwise",
    });
    std::fs::write(
        out.join(ONNX_CARD),
        serde_json::to_string_pretty(&card).map_err(TrainError::from)?,
    )?;
    Ok(card)
}

/// `export-onnx`: a model as an ONNX inference graph with its card.
pub struct ExportOnnxStage;

impl Stage for ExportOnnxStage {
    fn kind(&self) -> &'static str {
        "export-onnx"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "write a model as an ONNX inference graph (model.onnx, opset 17, dynamic batch, BatchNorm folded) with a JSON card (onnx.json)"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![PortSpec::new("model", "model", "the model to export")],
            outputs: vec![PortSpec::new(
                "onnx",
                "files",
                "model.onnx and onnx.json (input size, colour order, normalisation, embedding size)",
            )],
            params: vec![],
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let model_dir = ctx.input("model")?.to_path_buf();
        let out = ctx.output("onnx")?.to_path_buf();
        let card = export_dir(&model_dir, &out)?;
        ctx.log(&format!(
            "exported {} (opset {OPSET}, input {}, embedding {})",
            card["model"], card["input_size"], card["embedding_size"]
        ));
        Ok(())
    }
}
