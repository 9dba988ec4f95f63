//! ONNX through the `fpipe` binary: a trained model goes out through `export-onnx` and comes
//! back through `import-model` (`format: onnx`) with the same embeddings; the imported model
//! feeds `embed`, `evaluate`, `identify`, `filter` and `distil` (as the teacher); a graph with
//! an operator fpipe does not run fails at import, naming the operator and the node, and
//! leaves no artifact.
#![cfg(feature = "faces")]

mod common;
use candle_core::Device;
use common::Project;
use std::path::PathBuf;

const BASE: &str = r#"stages:
  faces:
    uses: synthetic-faces
    with: {identities: 20, images_per_identity: 5, image_size: 32, test_identities: 10, test_images_per_identity: 4, pairs: 20}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 16, epochs: 1, batch_size: 16}
  export:
    uses: export-onnx
    inputs: {model: train.model}
"#;

const BACK: &str = r#"  imported:
    uses: import-model
    with: {format: onnx, weights: exported.onnx, name: roundtrip, input_size: 32, mean: 127.5, scale: 0.0078125}
  emb_native:
    uses: embed
    inputs: {model: train.model, dataset: faces.dataset}
    with: {flip: false}
  emb_onnx:
    uses: embed
    inputs: {model: imported.model, dataset: faces.dataset}
    with: {flip: false}
  eval_native:
    uses: evaluate
    inputs: {model: train.model, pairs: faces.pairs}
  eval_onnx:
    uses: evaluate
    inputs: {model: imported.model, pairs: faces.pairs}
  heldout:
    uses: identify
    inputs: {model: imported.model, pairs: faces.pairs}
    with: {gallery_per_identity: 1, k: 3}
  cleaned:
    uses: filter
    inputs: {dataset: faces.dataset, embeddings: emb_onnx.embeddings}
  student:
    uses: distil
    inputs: {dataset: faces.dataset, teacher: imported.model}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 16, steps: 2, batch_size: 16}
"#;

fn out(p: &Project, file: &str, port: &str) -> PathBuf {
    PathBuf::from(p.fpipe(&["out", port, "-f", file]).ok().stdout.trim())
}

fn embeddings(dir: &std::path::Path) -> Vec<f32> {
    let t =
        candle_core::safetensors::load(dir.join("embeddings.safetensors"), &Device::Cpu).unwrap();
    t["embeddings"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn export_then_import_round_trips_and_feeds_every_consumer() {
    let p = Project::new();
    p.write("a.yaml", BASE);
    assert_eq!(p.fpipe(&["run", "a.yaml"]).ok().counts(), (3, 0, 0));
    let exported = out(&p, "a.yaml", "export.onnx");
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("onnx.json")).unwrap())
            .unwrap();
    assert_eq!(card["input_size"], 32);
    assert_eq!(card["embedding_size"], 16);
    assert_eq!(card["opset"], 17);
    assert_eq!(card["colour_order"], "RGB");
    assert_eq!(card["normalisation"]["mean"], 127.5);
    std::fs::copy(exported.join("model.onnx"), p.path().join("exported.onnx")).unwrap();

    p.write("b.yaml", &format!("{BASE}{BACK}"));
    let run = p.fpipe(&["run", "b.yaml"]).ok();
    assert_eq!(run.counts(), (8, 3, 0), "{}", run.stderr);

    let native = embeddings(&out(&p, "b.yaml", "emb_native.embeddings"));
    let onnx = embeddings(&out(&p, "b.yaml", "emb_onnx.embeddings"));
    assert_eq!(native.len(), 100 * 16);
    let d = native
        .iter()
        .zip(&onnx)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-4, "round trip: max abs {d}");

    let m = |stage: &str| -> serde_json::Value {
        let dir = out(&p, "b.yaml", &format!("{stage}.metrics"));
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap()
    };
    let (a, b) = (m("eval_native"), m("eval_onnx"));
    let auc = |v: &serde_json::Value| v["auc"].as_f64().unwrap();
    // Embeddings agree within 1e-4, but this barely trained model's scores lie close together:
    // one genuine/impostor pair of the 10 x 10 may swap order (0.01 of AUC), no more.
    assert!((auc(&a) - auc(&b)).abs() <= 0.0101, "{a}\n{b}");
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out(&p, "b.yaml", "imported.model").join("model.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(card["architecture"]["arch"], "onnx");
    assert_eq!(card["name"], "roundtrip");
    assert_eq!(card["embedding_size"], 16);
}

#[test]
fn an_unsupported_operator_fails_the_import_naming_the_node() {
    use fpipe_stages::models::onnx::export::{encode, GraphWriter, INPUT};
    let p = Project::new();
    let mut g = GraphWriter::new();
    let y = g.node("Relu", vec![INPUT.into()], vec![]);
    let y = g.node("Softmax", vec![y], vec![GraphWriter::int("axis", 1)]);
    let proto = g.finish(&y, 32, 3, vec![]);
    std::fs::write(p.path().join("bad.onnx"), encode(&proto)).unwrap();
    p.write(
        "p.yaml",
        "stages:\n  imported:\n    uses: import-model\n    with: {format: onnx, weights: bad.onnx}\n",
    );
    let run = p.fpipe(&["run", "p.yaml"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr
            .contains("unsupported operator `Softmax` at node `Softmax_1` (#1)"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("bad.onnx"), "{}", run.stderr);
    let o = p.fpipe(&["out", "imported.model", "-f", "p.yaml"]);
    assert_ne!(o.code, 0, "an artifact was left: {}", o.stdout);
}
