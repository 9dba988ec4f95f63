//! Writing a backbone as an ONNX inference graph with the prost types of [`super::proto`].
//!
//! Each backbone's [`Architecture::export`](crate::models::Architecture::export) walks its
//! layers as its `forward` does and calls the layer writers here. A convolution followed by
//! BatchNorm (and PReLU) becomes one `Conv` with the BatchNorm folded into its weights and bias
//! (`w·γ/√(var+ε)`, `(b − mean)·γ/√(var+ε) + β`: exact up to rounding), a fully connected layer
//! followed by BatchNorm1d one `Gemm` the same way; a BatchNorm that precedes a padded
//! convolution (IResNet's pre-activation `bn1`) cannot be folded exactly (the padding would
//! see the shift) and stays a `BatchNormalization` node.

use crate::models::{Backbone, BackboneConfig, BatchNorm, Conv, Linear, PRelu};
use candle_core::{DType, Device, Result, Tensor};
use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use prost::Message;

/// The ONNX opset of exported graphs (ONNX 1.12, 2022; every operator used is unchanged since
/// opset 13 or earlier).
pub const OPSET: i64 = 17;
/// The ONNX IR version written (the one that goes with opset 17).
pub const IR_VERSION: i64 = 8;
/// Name of the exported graph's input (`[batch, 3, H, W]`, dynamic batch).
pub const INPUT: &str = "input";
/// Name of the exported graph's output (`[batch, D]`, not L2-normalised).
pub const OUTPUT: &str = "embedding";

/// Collects nodes and initialisers of one graph.
#[derive(Default)]
pub struct GraphWriter {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counts: std::collections::HashMap<String, usize>,
}

fn f32_data(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl GraphWriter {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&mut self, base: &str) -> String {
        let n = self.counts.entry(base.to_string()).or_default();
        *n += 1;
        format!("{base}_{n}")
    }

    /// An integer attribute.
    pub fn int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i: v,
            ..Default::default()
        }
    }

    /// A float attribute.
    pub fn float(name: &str, v: f64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Float as i32,
            f: v as f32,
            ..Default::default()
        }
    }

    /// An integer-list attribute.
    pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    /// A float initialiser named after `hint`; returns its name.
    pub fn constant(&mut self, hint: &str, t: &Tensor) -> Result<String> {
        let name = self.fresh(hint);
        let raw: Vec<u8> = f32_data(t)?.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: raw,
            ..Default::default()
        });
        Ok(name)
    }

    /// An int64 initialiser named after `hint`; returns its name.
    pub fn int_constant(&mut self, hint: &str, t: &Tensor) -> Result<String> {
        let name = self.fresh(hint);
        let v = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: DataType::Int64 as i32,
            int64_data: v,
            ..Default::default()
        });
        Ok(name)
    }

    /// A node of operator `op`; returns its (one) output's name.
    pub fn node(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<AttributeProto>) -> String {
        let name = self.fresh(op);
        let out = format!("{name}_out");
        self.nodes.push(NodeProto {
            name,
            op_type: op.into(),
            input: inputs,
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// Per-channel scale γ/√(var+ε) and shift β − mean·scale of an eval-mode BatchNorm.
    fn bn_affine(bn: &BatchNorm) -> Result<(Tensor, Tensor)> {
        let f = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let var = f(&bn.running_var.as_detached_tensor())?;
        let mean = f(&bn.running_mean.as_detached_tensor())?;
        let scale = f(&bn.weight)?.div(&(var + bn.eps)?.sqrt()?)?;
        let shift = (f(&bn.bias)? - mean.mul(&scale)?)?;
        Ok((scale, shift))
    }

    /// `conv`, then `bn` folded into it, then `act`.
    pub fn conv(
        &mut self,
        x: &str,
        conv: &Conv,
        bn: Option<&BatchNorm>,
        act: Option<&PRelu>,
    ) -> Result<String> {
        let w = conv.w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let cout = w.dim(0)?;
        let b = match &conv.b {
            Some(b) => b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            None => Tensor::zeros(cout, DType::F32, &Device::Cpu)?,
        };
        let (w, b) = match bn {
            Some(bn) => {
                let (scale, shift) = Self::bn_affine(bn)?;
                let w = w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
                let b = (b.mul(&scale)? + shift)?;
                (w, b)
            }
            None => (w, b),
        };
        let ks = w.dim(2)? as i64;
        let (s, p) = (conv.stride as i64, conv.padding as i64);
        let wn = self.constant("conv_w", &w)?;
        let bn_ = self.constant("conv_b", &b)?;
        let y = self.node(
            "Conv",
            vec![x.to_string(), wn, bn_],
            vec![
                Self::ints("kernel_shape", &[ks, ks]),
                Self::ints("strides", &[s, s]),
                Self::ints("pads", &[p, p, p, p]),
                Self::int("group", conv.groups as i64),
            ],
        );
        match act {
            Some(a) => self.prelu(&y, a),
            None => Ok(y),
        }
    }

    /// A BatchNorm that cannot be folded (before a padded convolution, or alone).
    pub fn batch_norm(&mut self, x: &str, bn: &BatchNorm) -> Result<String> {
        let c = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let g = self.constant("bn_scale", &c(&bn.weight)?)?;
        let b = self.constant("bn_bias", &c(&bn.bias)?)?;
        let m = self.constant("bn_mean", &c(&bn.running_mean.as_detached_tensor())?)?;
        let v = self.constant("bn_var", &c(&bn.running_var.as_detached_tensor())?)?;
        Ok(self.node(
            "BatchNormalization",
            vec![x.to_string(), g, b, m, v],
            vec![Self::float("epsilon", bn.eps)],
        ))
    }

    /// Per-channel PReLU of NCHW input (slope `[C, 1, 1]`).
    pub fn prelu(&mut self, x: &str, p: &PRelu) -> Result<String> {
        let c = p.weight.elem_count();
        let s = p
            .weight
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((c, 1, 1))?;
        let s = self.constant("prelu_slope", &s)?;
        Ok(self.node("PRelu", vec![x.to_string(), s], vec![]))
    }

    /// `x · Wᵀ + b`, then `bn` (BatchNorm1d) folded into it.
    pub fn linear(&mut self, x: &str, l: &Linear, bn: Option<&BatchNorm>) -> Result<String> {
        let w = l.w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let cout = w.dim(0)?;
        let b = match &l.b {
            Some(b) => b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            None => Tensor::zeros(cout, DType::F32, &Device::Cpu)?,
        };
        let (w, b) = match bn {
            Some(bn) => {
                let (scale, shift) = Self::bn_affine(bn)?;
                (
                    w.broadcast_mul(&scale.reshape((cout, 1))?)?,
                    (b.mul(&scale)? + shift)?,
                )
            }
            None => (w, b),
        };
        let wn = self.constant("fc_w", &w)?;
        let bn_ = self.constant("fc_b", &b)?;
        Ok(self.node(
            "Gemm",
            vec![x.to_string(), wn, bn_],
            vec![Self::int("transB", 1)],
        ))
    }

    /// `a + b`.
    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.node("Add", vec![a.into(), b.into()], vec![])
    }

    /// `a · b` (broadcasting).
    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.node("Mul", vec![a.into(), b.into()], vec![])
    }

    /// Logistic sigmoid.
    pub fn sigmoid(&mut self, x: &str) -> String {
        self.node("Sigmoid", vec![x.into()], vec![])
    }

    /// `[B, C, H, W]` to `[B, C·H·W]`.
    pub fn flatten(&mut self, x: &str) -> String {
        self.node("Flatten", vec![x.into()], vec![Self::int("axis", 1)])
    }

    /// Mean over H and W, kept as 1×1.
    pub fn global_average_pool(&mut self, x: &str) -> String {
        self.node("GlobalAveragePool", vec![x.into()], vec![])
    }

    /// The model: input `[batch, 3, size, size]` float, output `out` renamed to [`OUTPUT`]
    /// `[batch, embedding]`.
    pub fn finish(
        mut self,
        out: &str,
        size: usize,
        embedding: usize,
        metadata: Vec<(String, String)>,
    ) -> ModelProto {
        for n in &mut self.nodes {
            for o in &mut n.output {
                if o == out {
                    *o = OUTPUT.into();
                }
            }
            for i in &mut n.input {
                if i == out {
                    *i = OUTPUT.into();
                }
            }
        }
        let dim = |d: dimension::Value| Dimension {
            value: Some(d),
            ..Default::default()
        };
        let value = |name: &str, dims: Vec<dimension::Value>| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto {
                        dim: dims.into_iter().map(dim).collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let batch = || dimension::Value::DimParam("batch".into());
        let s = size as i64;
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "fpipe".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(GraphProto {
                name: "fpipe".into(),
                node: self.nodes,
                initializer: self.initializers,
                input: vec![value(
                    INPUT,
                    vec![
                        batch(),
                        dimension::Value::DimValue(3),
                        dimension::Value::DimValue(s),
                        dimension::Value::DimValue(s),
                    ],
                )],
                output: vec![value(
                    OUTPUT,
                    vec![batch(), dimension::Value::DimValue(embedding as i64)],
                )],
                ..Default::default()
            }),
            metadata_props: metadata
                .into_iter()
                .map(|(key, value)| StringStringEntryProto { key, value })
                .collect(),
            ..Default::default()
        }
    }
}

/// The inference graph of `backbone` (configuration `cfg`) as an ONNX model.
pub fn export_model(backbone: &Backbone, cfg: &BackboneConfig) -> Result<ModelProto> {
    let mut g = GraphWriter::new();
    let out = backbone.export(&mut g, INPUT)?;
    let norm = cfg.normalisation();
    let meta = vec![
        ("fpipe.architecture".to_string(), cfg.name()),
        ("fpipe.colour_order".to_string(), "RGB".to_string()),
        ("fpipe.mean".to_string(), norm.mean.to_string()),
        ("fpipe.std".to_string(), norm.std.to_string()),
    ];
    Ok(g.finish(&out, cfg.input_size(), cfg.embedding_size(), meta))
}

/// The protobuf bytes of `model`.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}
