//! The operators fpipe runs from an imported ONNX graph, and the interpreter over candle ops.
//!
//! A [`Graph`] is the imported graph after constant folding: nodes in topological order, each
//! one of the typed [`Op`]s (attributes checked at import), float weights by name and shape
//! (values in the model's safetensors), integer constants by value. [`Model`] runs it:
//! convolutions on [`fpipe_kernels::conv2d`], BatchNorm (with a following per-channel PReLU
//! fused) on [`fpipe_kernels::batch_norm_prelu_eval`], the rest on candle ops; each value is
//! dropped after its last use.

use super::export::GraphWriter;
use crate::models::probe;
use candle_core::{Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The ONNX operators fpipe runs (after import-time folding of `Constant`, `DequantizeLinear`
/// and `Reshape` of constants), as named in errors.
pub const SUPPORTED: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "PRelu",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Flatten",
    "Reshape",
    "Gemm",
    "MatMul",
    "GlobalAveragePool",
    "Identity",
    "Dropout",
    "Constant",
    "DequantizeLinear",
];

/// One operator with its checked attributes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op")]
pub enum Op {
    /// 2-D convolution, square stride, symmetric padding, no dilation; inputs x, w (, b).
    Conv {
        stride: usize,
        padding: usize,
        groups: usize,
    },
    /// Inference BatchNorm; inputs x, scale, bias, mean, var.
    BatchNormalization { epsilon: f64 },
    /// PReLU; inputs x, slope.
    PRelu,
    /// max(x, 0).
    Relu,
    /// x for x ≥ 0, alpha·x otherwise.
    LeakyRelu { alpha: f64 },
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// Broadcasting a + b.
    Add,
    /// Broadcasting a - b.
    Sub,
    /// Broadcasting a · b.
    Mul,
    /// Broadcasting a / b.
    Div,
    /// To 2-D at `axis`.
    Flatten { axis: usize },
    /// To `shape` (0 copies the input's dimension, -1 is inferred).
    Reshape { shape: Vec<i64> },
    /// alpha · A' · B' + beta · C; inputs A, B (, C).
    Gemm {
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    /// Matrix product (batched, broadcasting).
    MatMul,
    /// Mean over H and W, kept as 1×1.
    GlobalAveragePool,
    /// The input (also Dropout in inference).
    Identity,
}

impl Op {
    /// Writes this operator as a node of `g` (re-export of an imported graph).
    pub fn write(&self, g: &mut GraphWriter, inputs: Vec<String>) -> Result<String> {
        type W = GraphWriter;
        let attrs = match self {
            Op::Conv {
                stride,
                padding,
                groups,
            } => {
                let (s, p) = (*stride as i64, *padding as i64);
                vec![
                    W::ints("strides", &[s, s]),
                    W::ints("pads", &[p, p, p, p]),
                    W::int("group", *groups as i64),
                ]
            }
            Op::BatchNormalization { epsilon } => vec![W::float("epsilon", *epsilon)],
            Op::LeakyRelu { alpha } => vec![W::float("alpha", *alpha)],
            Op::Flatten { axis } => vec![W::int("axis", *axis as i64)],
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => vec![
                W::float("alpha", *alpha),
                W::float("beta", *beta),
                W::int("transA", *trans_a as i64),
                W::int("transB", *trans_b as i64),
            ],
            Op::Reshape { shape } => {
                let n = shape.len();
                let t = Tensor::from_vec(shape.clone(), n, &Device::Cpu)?;
                let s = g.int_constant("shape", &t)?;
                let mut ins = inputs;
                ins.truncate(1);
                ins.push(s);
                return Ok(g.node("Reshape", ins, vec![]));
            }
            _ => vec![],
        };
        Ok(g.node(self.onnx_name(), inputs, attrs))
    }


    /// The ONNX operator name.
    pub fn onnx_name(&self) -> &'static str {
        match self {
            Op::Conv { .. } => "Conv",
            Op::BatchNormalization { .. } => "BatchNormalization",
            Op::PRelu => "PRelu",
            Op::Relu => "Relu",
            Op::LeakyRelu { .. } => "LeakyRelu",
            Op::Sigmoid => "Sigmoid",
            Op::Add => "Add",
            Op::Sub => "Sub",
            Op::Mul => "Mul",
            Op::Div => "Div",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::Identity => "Identity",
        }
    }
}

/// One node: operator, input value names (graph input, weights or earlier outputs), output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Node {
    /// The ONNX node name (or `#index` when it had none).
    pub name: String,
    /// The operator.
    #[serde(flatten)]
    pub op: Op,
    /// Input value names.
    pub inputs: Vec<String>,
    /// Output value name.
    pub output: String,
}

/// A graph after import: one input (NCHW float), one output (`[B, D]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Graph {
    /// Name of the graph input.
    pub input: String,
    /// Name of the graph output.
    pub output: String,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Float weights: name -> shape (values in the model's safetensors).
    pub weights: BTreeMap<String, Vec<usize>>,
}

/// What a node does at run time, after fusing.
enum Step {
    /// Run node `i`.
    Node(usize),
    /// BatchNorm node `i` with the PReLU node `j` (per-channel slope) fused into it.
    BnPrelu(usize, usize),
}

/// A built graph: weights as tensors, the run plan and when each value dies.
pub struct Model {
    graph: Graph,
    weights: HashMap<String, Tensor>,
    bgr: bool,
    steps: Vec<Step>,
    /// Per step, the values last used there.
    frees: Vec<Vec<String>>,
}

impl Model {
    /// Builds the graph with weights from `vb` (created with their shapes, then loaded).
    pub fn new(graph: &Graph, bgr: bool, vb: VarBuilder) -> Result<Self> {
        let mut weights = HashMap::new();
        for (name, shape) in &graph.weights {
            let t = vb.get_with_hints(shape.as_slice(), name, Init::Const(0.0))?;
            weights.insert(name.clone(), t);
        }
        let steps = plan(graph, &weights);
        let frees = frees(graph, &steps);
        Ok(Model {
            graph: graph.clone(),
            weights,
            bgr,
            steps,
            frees,
        })
    }

    /// Embeddings `[B, D]` of normalised RGB NCHW input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.bgr {
            let idx = Tensor::new(&[2u32, 1, 0], x.device())?;
            x.index_select(&idx, 1)?
        } else {
            x.clone()
        };
        let mut vals: HashMap<&str, Tensor> = HashMap::new();
        vals.insert(self.graph.input.as_str(), x);
        for (step, free) in self.steps.iter().zip(&self.frees) {
            let (node, y) = match *step {
                Step::Node(i) => {
                    let n = &self.graph.nodes[i];
                    let ins = self.inputs(n, &vals)?;
                    (n, eval(n, &ins, None)?)
                }
                Step::BnPrelu(i, j) => {
                    let (n, p) = (&self.graph.nodes[i], &self.graph.nodes[j]);
                    let ins = self.inputs(n, &vals)?;
                    let slope = self.value(&p.inputs[1], &vals)?;
                    (p, eval(n, &ins, Some(&slope))?)
                }
            };
            vals.insert(node.output.as_str(), y);
            for f in free {
                vals.remove(f.as_str());
            }
        }
        match vals.remove(self.graph.output.as_str()) {
            Some(y) => Ok(y),
            None => candle_core::bail!("graph output `{}` was not computed", self.graph.output),
        }
    }

    fn value(&self, name: &str, vals: &HashMap<&str, Tensor>) -> Result<Tensor> {
        match vals.get(name).or_else(|| self.weights.get(name)) {
            Some(t) => Ok(t.clone()),
            None => candle_core::bail!("value `{name}` is used before it is computed"),
        }
    }

    fn inputs(&self, n: &Node, vals: &HashMap<&str, Tensor>) -> Result<Vec<Tensor>> {
        n.inputs.iter().map(|i| self.value(i, vals)).collect()
    }

    /// Writes this graph back as ONNX nodes after `x`; returns the output's name.
    pub fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let x = if self.bgr {
            let idx = Tensor::new(&[2i64, 1, 0], &candle_core::Device::Cpu)?;
            let idx = g.int_constant("bgr_order", &idx)?;
            g.node("Gather", vec![x.to_string(), idx], vec![GraphWriter::int("axis", 1)])
        } else {
            x.to_string()
        };
        let mut names: HashMap<String, String> = HashMap::new();
        names.insert(self.graph.input.clone(), x);
        for w in self.graph.weights.keys() {
            if let Some(t) = self.weights.get(w) {
                names.insert(w.clone(), g.constant(w, t)?);
            }
        }
        let mut out = String::new();
        for n in &self.graph.nodes {
            let mut ins = Vec::new();
            for i in &n.inputs {
                match names.get(i) {
                    Some(v) => ins.push(v.clone()),
                    None => candle_core::bail!("export: value `{i}` unknown"),
                }
            }
            out = n.op.write(g, ins)?;
            names.insert(n.output.clone(), out.clone());
        }
        Ok(out)
    }
}

/// The run order with BatchNorm → per-channel PReLU pairs fused where the BatchNorm's output
/// goes nowhere else.
fn plan(graph: &Graph, weights: &HashMap<String, Tensor>) -> Vec<Step> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.nodes {
        for i in &n.inputs {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    let nodes = &graph.nodes;
    let mut steps = Vec::new();
    let mut i = 0;
    while i < nodes.len() {
        let fused = matches!(nodes[i].op, Op::BatchNormalization { .. })
            && i + 1 < nodes.len()
            && nodes[i + 1].op == Op::PRelu
            && nodes[i + 1].inputs.first() == Some(&nodes[i].output)
            && uses.get(nodes[i].output.as_str()) == Some(&1)
            && nodes[i].output != graph.output
            && nodes[i + 1].inputs.get(1).and_then(|s| weights.get(s)).is_some_and(|s| {
                nodes[i].inputs.get(1).and_then(|g| weights.get(g)).map(|g| g.elem_count())
                    == Some(s.elem_count())
            });
        if fused {
            steps.push(Step::BnPrelu(i, i + 1));
            i += 2;
        } else {
            steps.push(Step::Node(i));
            i += 1;
        }
    }
    steps
}

/// Per step, the computed values (not weights, not the output) last used there.
fn frees(graph: &Graph, steps: &[Step]) -> Vec<Vec<String>> {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (s, step) in steps.iter().enumerate() {
        let ids: &[usize] = match step {
            Step::Node(i) => &[*i],
            Step::BnPrelu(i, j) => &[*i, *j],
        };
        for &i in ids {
            for inp in &graph.nodes[i].inputs {
                if !graph.weights.contains_key(inp) && *inp != graph.output {
                    last.insert(inp.as_str(), s);
                }
            }
        }
    }
    let mut out = vec![Vec::new(); steps.len()];
    for (name, s) in last {
        out[s].push(name.to_string());
    }
    out
}

fn rank4(x: &Tensor) -> Result<Tensor> {
    match x.dims() {
        [_, _, _, _] => Ok(x.clone()),
        [b, c] => x.reshape((*b, *c, 1, 1)),
        d => candle_core::bail!("expected [B, C] or [B, C, H, W], got {d:?}"),
    }
}

fn input(ins: &[Tensor], k: usize, n: &Node) -> Result<Tensor> {
    match ins.get(k) {
        Some(t) => Ok(t.clone()),
        None => candle_core::bail!("node `{}` lacks input {k}", n.name),
    }
}

/// Runs one node (with a fused PReLU slope for BatchNorm).
fn eval(n: &Node, ins: &[Tensor], slope: Option<&Tensor>) -> Result<Tensor> {
    let a = input(ins, 0, n)?;
    let y = match &n.op {
        Op::Conv {
            stride,
            padding,
            groups,
        } => {
            let w = input(ins, 1, n)?;
            let y = fpipe_kernels::conv2d(&a, &w, *stride, *padding, *groups)?;
            match ins.get(2) {
                Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
                None => y,
            }
        }
        Op::BatchNormalization { epsilon } => {
            probe::observe(&a)?;
            let dims = a.dims().to_vec();
            let x4 = rank4(&a)?;
            let (g, b, m, v) = (
                input(ins, 1, n)?,
                input(ins, 2, n)?,
                input(ins, 3, n)?,
                input(ins, 4, n)?,
            );
            let slope = slope.map(|s| s.flatten_all()).transpose()?;
            let y = match fpipe_kernels::batch_norm_prelu_eval(
                &x4,
                (&g, &b),
                (&m, &v),
                slope.as_ref(),
                *epsilon,
            )? {
                Some(y) => y,
                None => {
                    let c = g.elem_count();
                    let scale = g.div(&(v + *epsilon)?.sqrt()?)?;
                    let shift = (b - m.mul(&scale)?)?;
                    let y = x4
                        .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
                        .broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
                    match &slope {
                        Some(s) => fpipe_kernels::prelu(&y, s)?,
                        None => y,
                    }
                }
            };
            y.reshape(dims)?
        }
        Op::PRelu => {
            let s = input(ins, 1, n)?;
            let c = if a.rank() >= 2 { a.dim(1)? } else { 0 };
            if (a.rank() == 4 || a.rank() == 2) && s.elem_count() == c {
                let dims = a.dims().to_vec();
                fpipe_kernels::prelu(&rank4(&a)?, &s.flatten_all()?)?.reshape(dims)?
            } else {
                let z = a.zeros_like()?;
                (a.maximum(&z)? + a.minimum(&z)?.broadcast_mul(&s)?)?
            }
        }
        Op::Relu => a.relu()?,
        Op::LeakyRelu { alpha } => {
            let z = a.zeros_like()?;
            (a.maximum(&z)? + (a.minimum(&z)? * *alpha)?)?
        }
        Op::Sigmoid => candle_nn::ops::sigmoid(&a)?,
        Op::Add => a.broadcast_add(&input(ins, 1, n)?)?,
        Op::Sub => a.broadcast_sub(&input(ins, 1, n)?)?,
        Op::Mul => a.broadcast_mul(&input(ins, 1, n)?)?,
        Op::Div => a.broadcast_div(&input(ins, 1, n)?)?,
        Op::Flatten { axis } => {
            let d = a.dims();
            let lead: usize = d[..(*axis).min(d.len())].iter().product();
            a.reshape((lead, ()))?
        }
        Op::Reshape { shape } => a.reshape(resolve_shape(a.dims(), shape)?)?,
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let a = if *trans_a { a.t()? } else { a };
            let b = input(ins, 1, n)?;
            let b = if *trans_b { b.t()? } else { b };
            let mut y = a.matmul(&b)?;
            if *alpha != 1.0 {
                y = (y * *alpha)?;
            }
            match ins.get(2) {
                Some(c) if *beta != 0.0 => {
                    let c = if *beta != 1.0 { (c * *beta)? } else { c.clone() };
                    y.broadcast_add(&c)?
                }
                _ => y,
            }
        }
        Op::MatMul => a.broadcast_matmul(&input(ins, 1, n)?)?,
        Op::GlobalAveragePool => a.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?,
        Op::Identity => a,
    };
    Ok(y)
}

/// ONNX Reshape's target shape for input dimensions `dims` (0 copies, -1 infers).
pub fn resolve_shape(dims: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (k, &s) in shape.iter().enumerate() {
        match s {
            0 => match dims.get(k) {
                Some(&d) => out.push(d),
                None => candle_core::bail!("reshape to {shape:?}: no dimension {k} to copy"),
            },
            -1 if infer.is_none() => {
                infer = Some(k);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            _ => candle_core::bail!("reshape to {shape:?}: bad dimension {s}"),
        }
    }
    let known: usize = out.iter().product();
    if let Some(k) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            candle_core::bail!("reshape of {dims:?} to {shape:?}: sizes do not divide");
        }
        out[k] = total / known;
    }
    Ok(out)
}
