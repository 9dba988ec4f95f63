//! Reading an ONNX face-embedding model into a [`Graph`] and its weights.
//!
//! Constant sub-graphs are folded here, once: `Constant`, `Identity`/`Dropout` of constants,
//! `Reshape` of constants and `DequantizeLinear` of constant weights (per-tensor, per-axis and
//! blocked, opset 21's `block_size`, as OpenCV Zoo's int8 block-quantised files use), so those
//! models run in f32. Every remaining node must be one of [`SUPPORTED`](super::graph::SUPPORTED)
//! with attribute values the interpreter handles; the first that is not fails the import with
//! its operator, node name and index. The graph then runs once on a batch of two blank images,
//! so shape errors surface at import too, and gives the embedding size.

use super::graph::{Graph, Node, Op};
use super::{Config, OnnxError};
use crate::models::Normalisation;
use candle_core::{Device, Tensor};
use super::proto::{
    tensor_proto::DataType, tensor_shape_proto::dimension,
    type_proto, AttributeProto, ModelProto, NodeProto, TensorProto,
};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Preprocessing and naming of an import (the `import-model` parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct ImportOptions {
    /// Name of the model (card `name`).
    pub name: String,
    /// Square input size; `None` takes it from the graph's input shape.
    pub input_size: Option<usize>,
    /// Subtracted from 0..255 pixel values.
    pub mean: f64,
    /// Multiplies the pixel values after the mean is subtracted.
    pub scale: f64,
    /// The graph wants BGR channel order.
    pub bgr: bool,
}

/// An imported model: configuration (with the graph) and float weights by name.
pub struct Imported {
    /// The `onnx` backbone configuration.
    pub config: Config,
    /// Weights by name (the graph's `weights`).
    pub weights: HashMap<String, Tensor>,
}

/// A constant value during import.
#[derive(Clone, Debug)]
enum Const {
    F32(Vec<usize>, Vec<f32>),
    /// Any integer type, widened.
    Int(Vec<usize>, Vec<i64>),
}

impl Const {
    fn dims(&self) -> &[usize] {
        match self {
            Const::F32(d, _) | Const::Int(d, _) => d,
        }
    }
    fn floats(&self) -> Vec<f32> {
        match self {
            Const::F32(_, v) => v.clone(),
            Const::Int(_, v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
    fn with_dims(self, d: Vec<usize>) -> Const {
        match self {
            Const::F32(_, v) => Const::F32(d, v),
            Const::Int(_, v) => Const::Int(d, v),
        }
    }
}

/// Reads and imports `path`.
pub fn import_file(path: &Path, opts: &ImportOptions) -> Result<Imported, OnnxError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| OnnxError::Invalid {
        file: file.clone(),
        msg: format!("cannot read: {e}"),
    })?;
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| OnnxError::Decode {
        file: file.clone(),
        msg: e.to_string(),
    })?;
    import_model(&model, &file, opts)
}

fn parse_tensor(t: &TensorProto, file: &str) -> Result<Const, OnnxError> {
    let invalid = |msg: String| OnnxError::Invalid {
        file: file.to_string(),
        msg,
    };
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(invalid(format!(
            "tensor `{}` is stored in an external file; save the model as one file \
             (onnx.save(model, path, save_as_external_data=False))",
            t.name
        )));
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let n: usize = dims.iter().product();
    let raw = &t.raw_data;
    let dt = t.data_type;
    let c = if dt == DataType::Float as i32 {
        let v: Vec<f32> = if !raw.is_empty() {
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            t.float_data.clone()
        };
        Const::F32(dims, v)
    } else if dt == DataType::Double as i32 {
        let v: Vec<f32> = if !raw.is_empty() {
            raw.chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    f64::from_le_bytes(a) as f32
                })
                .collect()
        } else {
            t.double_data.iter().map(|&x| x as f32).collect()
        };
        Const::F32(dims, v)
    } else if dt == DataType::Int8 as i32 {
        let v = if !raw.is_empty() {
            raw.iter().map(|&b| b as i8 as i64).collect()
        } else {
            t.int32_data.iter().map(|&x| x as i64).collect()
        };
        Const::Int(dims, v)
    } else if dt == DataType::Uint8 as i32 {
        let v = if !raw.is_empty() {
            raw.iter().map(|&b| b as i64).collect()
        } else {
            t.int32_data.iter().map(|&x| x as i64).collect()
        };
        Const::Int(dims, v)
    } else if dt == DataType::Int32 as i32 {
        let v = if !raw.is_empty() {
            raw.chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect()
        } else {
            t.int32_data.iter().map(|&x| x as i64).collect()
        };
        Const::Int(dims, v)
    } else if dt == DataType::Int64 as i32 {
        let v = if !raw.is_empty() {
            raw.chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    i64::from_le_bytes(a)
                })
                .collect()
        } else {
            t.int64_data.clone()
        };
        Const::Int(dims, v)
    } else {
        let name = DataType::try_from(dt)
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| dt.to_string());
        return Err(invalid(format!(
            "tensor `{}` has data type {name}; fpipe reads FLOAT, DOUBLE and integer tensors \
             (convert the model to float32 first)",
            t.name
        )));
    };
    let len = match &c {
        Const::F32(_, v) => v.len(),
        Const::Int(_, v) => v.len(),
    };
    if len != n {
        return Err(invalid(format!(
            "tensor `{}` holds {len} values for shape {:?}",
            t.name,
            c.dims()
        )));
    }
    Ok(c)
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map(|a| a.i).unwrap_or(default)
}

fn attr_f(n: &NodeProto, name: &str, default: f64) -> f64 {
    attr(n, name).map(|a| a.f as f64).unwrap_or(default)
}

fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

/// Dequantises constant `x` with `scale` and optional `zero` point along `axis`, blocked by
/// `block` (0: per tensor or per axis).
fn dequantize(
    x: &Const,
    scale: &Const,
    zero: Option<&Const>,
    axis: i64,
    block: usize,
) -> Result<Const, String> {
    let dims = x.dims().to_vec();
    let r = dims.len() as i64;
    let axis = if axis < 0 { axis + r } else { axis };
    if r > 0 && !(0..r).contains(&axis) {
        return Err(format!("axis {axis} out of range for rank {r}"));
    }
    let axis = axis as usize;
    let xv: Vec<i64> = match x {
        Const::Int(_, v) => v.clone(),
        Const::F32(..) => return Err("the quantised input is not an integer tensor".into()),
    };
    let sv = scale.floats();
    let zv: Option<Vec<f32>> = zero.map(|z| z.floats());
    let sd = scale.dims().to_vec();
    // Strides of x and of the scale tensor.
    let strides = |d: &[usize]| {
        let mut s = vec![1usize; d.len()];
        for k in (0..d.len().saturating_sub(1)).rev() {
            s[k] = s[k + 1] * d[k + 1];
        }
        s
    };
    let xs = strides(&dims);
    let ss = strides(&sd);
    let per_tensor = sv.len() == 1;
    let mut out = Vec::with_capacity(xv.len());
    for (i, &q) in xv.iter().enumerate() {
        let si = if per_tensor {
            0
        } else if block == 0 {
            (i / xs[axis]) % dims[axis]
        } else {
            let mut idx = 0;
            for k in 0..dims.len() {
                let c = (i / xs[k]) % dims[k];
                let c = if k == axis { c / block.max(1) } else { c };
                if c >= *sd.get(k).unwrap_or(&0) {
                    return Err(format!("scale shape {sd:?} does not cover {dims:?}"));
                }
                idx += c * ss[k];
            }
            idx
        };
        let s = *sv.get(si).ok_or("scale tensor too small")?;
        let z = match &zv {
            Some(z) => *z.get(si).ok_or("zero-point tensor too small")?,
            None => 0.0,
        };
        out.push((q as f32 - z) * s);
    }
    Ok(Const::F32(dims, out))
}

/// Imports a decoded model; `file` names it in errors.
pub fn import_model(
    model: &ModelProto,
    file: &str,
    opts: &ImportOptions,
) -> Result<Imported, OnnxError> {
    let invalid = |msg: String| OnnxError::Invalid {
        file: file.to_string(),
        msg,
    };
    let Some(g) = &model.graph else {
        return Err(invalid("the model has no graph".into()));
    };
    let mut consts: HashMap<String, Const> = HashMap::new();
    for t in &g.initializer {
        consts.insert(t.name.clone(), parse_tensor(t, file)?);
    }
    // Inputs that are not weights and that some node reads (OpenCV Zoo's quantised files
    // still declare their former float weights as inputs, read by nothing).
    let read: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let real_inputs: Vec<_> = g
        .input
        .iter()
        .filter(|i| !consts.contains_key(&i.name) && read.contains(i.name.as_str()))
        .collect();
    let [input] = real_inputs.as_slice() else {
        return Err(invalid(format!(
            "a face-embedding graph has one input (images); this one has {}: {}",
            real_inputs.len(),
            real_inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let Some(output) = g.output.first().map(|o| o.name.clone()) else {
        return Err(invalid("the graph has no output".into()));
    };
    // Input shape [N, 3, H, W]: the static H = W is the default input size.
    let dims: Vec<Option<i64>> = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(dimension::Value::DimValue(v)) if v > 0 => Some(v),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => vec![],
    };
    if dims.len() == 4 && dims[1].is_some_and(|c| c != 3) {
        return Err(invalid(format!(
            "input `{}` has {:?} channels; fpipe feeds 3 (RGB or BGR)",
            input.name,
            dims[1].unwrap_or(0)
        )));
    }
    let graph_size = match (dims.get(2).copied().flatten(), dims.get(3).copied().flatten()) {
        (Some(h), Some(w)) if h == w => Some(h as usize),
        _ => None,
    };
    let mut nodes: Vec<Node> = Vec::new();
    let mut used: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (index, n) in g.node.iter().enumerate() {
        let node = if n.name.is_empty() {
            format!("#{index}")
        } else {
            n.name.clone()
        };
        let unsupported = |detail: String| OnnxError::Unsupported {
            file: file.to_string(),
            op: n.op_type.clone(),
            node: node.clone(),
            index,
            detail,
        };
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            return Err(unsupported(format!(" (operator domain `{}`)", n.domain)));
        }
        let ins: Vec<&String> = n.input.iter().filter(|s| !s.is_empty()).collect();
        let Some(out) = n.output.first().cloned() else {
            return Err(invalid(format!("node `{node}` has no output")));
        };
        let all_const = ins.iter().all(|i| consts.contains_key(*i));
        let op = n.op_type.as_str();
        // Folding of constant sub-graphs.
        match op {
            "Constant" => {
                let c = match attr(n, "value").and_then(|a| a.t.as_ref()) {
                    Some(t) => parse_tensor(t, file)?,
                    None => match (attr(n, "value_float"), attr(n, "value_floats"), attr(n, "value_int"), attr(n, "value_ints")) {
                        (Some(a), ..) => Const::F32(vec![], vec![a.f]),
                        (_, Some(a), ..) => Const::F32(vec![a.floats.len()], a.floats.clone()),
                        (_, _, Some(a), _) => Const::Int(vec![], vec![a.i]),
                        (.., Some(a)) => Const::Int(vec![a.ints.len()], a.ints.clone()),
                        _ => return Err(unsupported(" (a Constant without a tensor, float or int value)".into())),
                    },
                };
                consts.insert(out, c);
                continue;
            }
            "Identity" | "Dropout" if all_const => {
                if let Some(c) = ins.first().and_then(|i| consts.get(*i)).cloned() {
                    consts.insert(out, c);
                }
                continue;
            }
            "Reshape" if all_const && ins.len() == 2 => {
                let (x, s) = (consts[ins[0]].clone(), consts[ins[1]].clone());
                let Const::Int(_, shape) = s else {
                    return Err(unsupported(" (a non-integer shape)".into()));
                };
                let d = super::graph::resolve_shape(x.dims(), &shape)
                    .map_err(|e| unsupported(format!(" ({e})")))?;
                consts.insert(out, x.with_dims(d));
                continue;
            }
            "DequantizeLinear" => {
                if !all_const || ins.len() < 2 {
                    return Err(unsupported(
                        " (only weights can be dequantised: quantised activations are not run)"
                            .into(),
                    ));
                }
                let c = dequantize(
                    &consts[ins[0]],
                    &consts[ins[1]],
                    ins.get(2).map(|i| &consts[*i]),
                    attr_i(n, "axis", 1),
                    attr_i(n, "block_size", 0).max(0) as usize,
                )
                .map_err(|e| unsupported(format!(" ({e})")))?;
                consts.insert(out, c);
                continue;
            }
            _ => {}
        }
        let op = parse_op(n, &consts).map_err(unsupported)?;
        let mut inputs = Vec::new();
        for (k, i) in ins.iter().enumerate() {
            if matches!(op, Op::Reshape { .. } | Op::Identity) && k == 1 {
                break; // the shape is in the op; Dropout's ratio and mask do nothing here
            }
            match consts.get(*i) {
                Some(Const::F32(d, _)) => {
                    used.insert((*i).clone(), d.clone());
                }
                Some(Const::Int(..)) => {
                    return Err(unsupported(format!(
                        " (integer tensor `{i}` as input {k} at run time)"
                    )))
                }
                None => {}
            }
            inputs.push((*i).clone());
        }
        nodes.push(Node {
            name: node,
            op,
            inputs,
            output: out,
        });
    }
    if !nodes.iter().any(|n| n.output == output) {
        return Err(invalid(format!(
            "the graph output `{output}` is not computed from the input"
        )));
    }
    // The size is checked after the operators: an operator fpipe cannot run is the more
    // fundamental error, and the one a user should read first.
    let size = match (opts.input_size, graph_size) {
        (Some(s), Some(gs)) if s != gs => {
            return Err(invalid(format!(
                "input_size {s} given, but the graph's input `{}` is {gs}x{gs}",
                input.name
            )))
        }
        (Some(s), _) => s,
        (None, Some(gs)) => gs,
        (None, None) => {
            return Err(invalid(format!(
                "the graph's input `{}` has no fixed square size: give input_size",
                input.name
            )))
        }
    };
    let mut weights = HashMap::new();
    for (name, d) in &used {
        let v = consts[name].floats();
        weights.insert(name.clone(), Tensor::from_vec(v, d.as_slice(), &Device::Cpu)?);
    }
    let graph = Graph {
        input: input.name.clone(),
        output,
        nodes,
        weights: used,
    };
    let mut config = Config {
        name: opts.name.clone(),
        input_size: size,
        embedding_size: 0,
        normalisation: Normalisation {
            mean: opts.mean,
            std: 1.0 / opts.scale,
        },
        bgr: opts.bgr,
        macs: 0,
        graph,
    };
    // One run on two blank images: shape errors now, not at the first batch; the width of
    // the output is the embedding size.
    let vb = candle_nn::VarBuilder::from_tensors(
        weights.clone(),
        candle_core::DType::F32,
        &Device::Cpu,
    );
    let m = super::graph::Model::new(&config.graph, opts.bgr, vb)?;
    let x = Tensor::zeros((2, 3, size, size), candle_core::DType::F32, &Device::Cpu)?;
    let y = m.forward(&x).map_err(|e| {
        invalid(format!(
            "the graph fails on a batch of 2 images of {size}x{size}: {e}"
        ))
    })?;
    match y.dims() {
        [2, d] => config.embedding_size = *d,
        d => {
            return Err(invalid(format!(
                "the graph output `{}` has shape {d:?} for 2 images; a face-embedding model \
                 gives [batch, D]",
                config.graph.output
            )))
        }
    }
    config.macs = macs(&config.graph, size);
    Ok(Imported { config, weights })
}

/// Multiply-accumulates of the convolutions and matrix products for one image (spatial sizes
/// followed through Conv strides; other operators keep them).
fn macs(graph: &Graph, size: usize) -> u64 {
    let mut side: HashMap<&str, usize> = HashMap::new();
    side.insert(graph.input.as_str(), size);
    let mut total = 0u64;
    for n in &graph.nodes {
        let h = n
            .inputs
            .first()
            .and_then(|i| side.get(i.as_str()))
            .copied()
            .unwrap_or(1);
        let w = n.inputs.get(1).and_then(|i| graph.weights.get(i));
        let oh = match (&n.op, w) {
            (Op::Conv { stride, padding, .. }, Some(w)) if w.len() == 4 => {
                let oh = (h + 2 * padding).saturating_sub(w[2]) / stride.max(&1) + 1;
                total += (oh * oh * w.iter().product::<usize>()) as u64;
                oh
            }
            (Op::Gemm { .. } | Op::MatMul, Some(w)) => {
                total += w.iter().product::<usize>() as u64;
                1
            }
            (Op::GlobalAveragePool | Op::Flatten { .. }, _) => 1,
            _ => h,
        };
        side.insert(n.output.as_str(), oh);
    }
    total
}

/// The typed operator of node `n`, or what about it is unsupported (starting with ` (`).
fn parse_op(n: &NodeProto, consts: &HashMap<String, Const>) -> Result<Op, String> {
    let weight = |k: usize| -> Option<&Const> {
        n.input
            .get(k)
            .filter(|s| !s.is_empty())
            .and_then(|s| consts.get(s))
    };
    Ok(match n.op_type.as_str() {
        "Conv" => {
            let Some(w) = weight(1) else {
                return Err(" (weights computed at run time)".into());
            };
            let wd = w.dims();
            if wd.len() != 4 || wd[2] != wd[3] {
                return Err(format!(" (weight shape {wd:?}: fpipe runs square 2-D kernels)"));
            }
            if let Some(a) = attr(n, "auto_pad") {
                let s = String::from_utf8_lossy(&a.s).to_string();
                if !(s.is_empty() || s == "NOTSET" || s == "VALID") {
                    return Err(format!(" (auto_pad {s}: give explicit pads)"));
                }
            }
            if let Some(d) = attr_ints(n, "dilations") {
                if d.iter().any(|&v| v != 1) {
                    return Err(format!(" (dilations {d:?})"));
                }
            }
            let strides = attr_ints(n, "strides").unwrap_or(vec![1, 1]);
            let pads = attr_ints(n, "pads").unwrap_or(vec![0, 0, 0, 0]);
            if strides.len() != 2 || strides[0] != strides[1] || strides[0] < 1 {
                return Err(format!(" (strides {strides:?}: fpipe runs equal strides)"));
            }
            if pads.iter().any(|&p| p != pads[0]) || pads[0] < 0 {
                return Err(format!(" (pads {pads:?}: fpipe runs equal padding on every side)"));
            }
            let groups = attr_i(n, "group", 1);
            if groups < 1 {
                return Err(format!(" (group {groups})"));
            }
            Op::Conv {
                stride: strides[0] as usize,
                padding: pads[0] as usize,
                groups: groups as usize,
            }
        }
        "BatchNormalization" => {
            if attr_i(n, "training_mode", 0) != 0 {
                return Err(" (training_mode 1)".into());
            }
            if (1..5).any(|k| weight(k).is_none()) {
                return Err(" (statistics computed at run time)".into());
            }
            Op::BatchNormalization {
                epsilon: attr_f(n, "epsilon", 1e-5),
            }
        }
        "PRelu" => {
            if weight(1).is_none() {
                return Err(" (slope computed at run time)".into());
            }
            Op::PRelu
        }
        "Relu" => Op::Relu,
        "LeakyRelu" => Op::LeakyRelu {
            alpha: attr_f(n, "alpha", 0.01),
        },
        "Sigmoid" => Op::Sigmoid,
        "Add" => Op::Add,
        "Sub" => Op::Sub,
        "Mul" => Op::Mul,
        "Div" => Op::Div,
        "MatMul" => Op::MatMul,
        "GlobalAveragePool" => Op::GlobalAveragePool,
        "Identity" | "Dropout" => Op::Identity,
        "Flatten" => {
            let axis = attr_i(n, "axis", 1);
            if axis < 0 {
                return Err(format!(" (negative axis {axis})"));
            }
            Op::Flatten {
                axis: axis as usize,
            }
        }
        "Reshape" => match weight(1) {
            Some(Const::Int(_, s)) => Op::Reshape { shape: s.clone() },
            _ => return Err(" (shape computed at run time)".into()),
        },
        "Gemm" => Op::Gemm {
            alpha: attr_f(n, "alpha", 1.0),
            beta: attr_f(n, "beta", 1.0),
            trans_a: attr_i(n, "transA", 0) != 0,
            trans_b: attr_i(n, "transB", 0) != 0,
        },
        _ => return Err(String::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocked dequantisation (opset 21 `block_size`) along axis 1, with a zero point; and
    /// per-axis dequantisation along axis 0.
    #[test]
    fn dequantize_blocked_and_per_axis() {
        let x = Const::Int(vec![2, 4], vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let s = Const::F32(vec![2, 2], vec![1.0, 10.0, 100.0, 1000.0]);
        let z = Const::Int(vec![2, 2], vec![1, 0, 0, 0]);
        let Const::F32(d, v) = dequantize(&x, &s, Some(&z), 1, 2).unwrap() else {
            panic!("not float")
        };
        assert_eq!(d, vec![2, 4]);
        assert_eq!(v, vec![0.0, 1.0, 30.0, 40.0, 500.0, 600.0, 7000.0, 8000.0]);
        let s = Const::F32(vec![2], vec![2.0, -1.0]);
        let Const::F32(_, v) = dequantize(&x, &s, None, 0, 0).unwrap() else {
            panic!("not float")
        };
        assert_eq!(v, vec![2.0, 4.0, 6.0, 8.0, -5.0, -6.0, -7.0, -8.0]);
    }
}
