//! MobileFaceNet as in insightface arcface_torch (`backbones/mobilefacenet.py`, "mbf"):
//! depthwise-separable bottlenecks and a global depthwise (GDC) embedding head.
//!
//! Variable names match the PyTorch state dict (`layers.N.layers.M...`, `conv_sep`,
//! `features.layers.{0,2,3}`).

use super::onnx::export::GraphWriter;
use super::{
    bn, prelu, scaled, Architecture, BackboneOptions, BatchNorm, Conv, ConvBnAct, ConvSpec, Linear,
};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// MobileFaceNet configuration. Reference "mbf": `blocks` [1, 4, 6, 2], `scale` 2, `width`
/// 1.0, `input_size` 112; "mbf_large": blocks [2, 8, 12, 4], scale 4.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// Residual units per stage.
    pub blocks: [usize; 4],
    /// Channel scale of the body (64·scale channels).
    pub scale: usize,
    /// Multiplier on the base unit of 64 channels (and every group count), for CPU-sized runs.
    pub width: f64,
    /// Square input size; the GDC kernel covers the final `input_size / 16` map.
    pub input_size: usize,
    /// Embedding dimension.
    pub num_features: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            blocks: [1, 4, 6, 2],
            scale: 2,
            width: 1.0,
            input_size: 112,
            num_features: 512,
        }
    }
}

const EPS: f64 = 1e-5;

/// Kaiming normal, fan-out mode, ReLU gain (the reference `_initialize_weights`).
fn kaiming_out(cout: usize, k: usize) -> f64 {
    (2.0 / (cout * k * k) as f64).sqrt()
}

/// Conv (+BN, +PRelu when `act`) stored as `layers.{0,1,2}` like the reference's Sequential.
fn block(spec: ConvSpec, act: bool, vb: VarBuilder) -> Result<ConvBnAct> {
    let v = vb.pp("layers");
    Ok(ConvBnAct {
        conv: Conv::new(spec, kaiming_out(spec.cout, spec.k), v.pp("0"))?,
        bn: bn(spec.cout, EPS, v.pp("1"))?,
        act: if act {
            Some(prelu(spec.cout, v.pp("2"))?)
        } else {
            None
        },
    })
}

/// 1×1 expand → k×k depthwise (stride) → 1×1 linear project, optional identity residual.
struct DepthWise {
    expand: ConvBnAct,
    dw: ConvBnAct,
    project: ConvBnAct,
    residual: bool,
}

impl DepthWise {
    fn new(
        cin: usize,
        cout: usize,
        g: usize,
        stride: usize,
        residual: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let v = vb.pp("layers");
        Ok(DepthWise {
            expand: block(ConvSpec::new(cin, g, 1, 1, 0), true, v.pp("0"))?,
            dw: block(ConvSpec::new(g, g, 3, stride, 1).groups(g), true, v.pp("1"))?,
            project: block(ConvSpec::new(g, cout, 1, 1, 0), false, v.pp("2"))?,
            residual,
        })
    }
    fn specs(cin: usize, cout: usize, g: usize, stride: usize) -> [ConvSpec; 3] {
        [
            ConvSpec::new(cin, g, 1, 1, 0),
            ConvSpec::new(g, g, 3, stride, 1).groups(g),
            ConvSpec::new(g, cout, 1, 1, 0),
        ]
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.expand.forward_t(x, train)?;
        let y = self.dw.forward_t(&y, train)?;
        let y = self.project.forward_t(&y, train)?;
        if self.residual {
            y + x
        } else {
            Ok(y)
        }
    }
    fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let y = cba(g, x, &self.expand)?;
        let y = cba(g, &y, &self.dw)?;
        let y = cba(g, &y, &self.project)?;
        Ok(if self.residual { g.add(&y, x) } else { y })
    }
}

/// Conv + BN (folded) + PReLU as one `Conv` (and `PRelu`) node.
fn cba(g: &mut GraphWriter, x: &str, c: &ConvBnAct) -> Result<String> {
    g.conv(x, &c.conv, Some(&c.bn), c.act.as_ref())
}

#[allow(clippy::large_enum_variant)]
enum Layer {
    Conv(ConvBnAct),
    Dw(DepthWise),
    Residual(Vec<DepthWise>),
}

impl Layer {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward_t(x, train),
            Layer::Dw(d) => d.forward(x, train),
            Layer::Residual(v) => {
                let mut x = x.clone();
                for d in v {
                    x = d.forward(&x, train)?;
                }
                Ok(x)
            }
        }
    }
    fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        match self {
            Layer::Conv(c) => cba(g, x, c),
            Layer::Dw(d) => d.export(g, x),
            Layer::Residual(v) => {
                let mut x = x.to_string();
                for d in v {
                    x = d.export(g, &x)?;
                }
                Ok(x)
            }
        }
    }
}

/// One entry of the layer plan: (kind, cin, cout, groups, stride, repeats).
#[derive(Clone, Copy)]
enum Plan {
    Conv(ConvSpec),
    Dw(usize, usize, usize, usize),
    Residual(usize, usize, usize),
}

/// Channel widths: `u` is the scaled base unit of 64 channels.
fn plan(cfg: &Config) -> (Vec<Plan>, usize) {
    let u = scaled(64, cfg.width, 1);
    let a = u * cfg.scale;
    let b = 2 * u * cfg.scale;
    let mut p = vec![Plan::Conv(ConvSpec::new(3, a, 3, 2, 1))];
    if cfg.blocks[0] == 1 {
        p.push(Plan::Conv(ConvSpec::new(a, a, 3, 1, 1).groups(u)));
    } else {
        p.push(Plan::Residual(a, 2 * u, cfg.blocks[0]));
    }
    p.extend([
        Plan::Dw(a, a, 2 * u, 2),
        Plan::Residual(a, 2 * u, cfg.blocks[1]),
        Plan::Dw(a, b, 4 * u, 2),
        Plan::Residual(b, 4 * u, cfg.blocks[2]),
        Plan::Dw(b, b, 8 * u, 2),
        Plan::Residual(b, 4 * u, cfg.blocks[3]),
    ]);
    (p, u)
}

/// The MobileFaceNet backbone.
pub struct Model {
    layers: Vec<Layer>,
    conv_sep: ConvBnAct,
    gdc: ConvBnAct,
    linear: Linear,
    bn: BatchNorm,
}

fn final_size(input: usize) -> usize {
    let mut h = input;
    for _ in 0..4 {
        h = h.div_ceil(2);
    }
    h
}

impl Model {
    /// Builds the network with the reference's Kaiming fan-out initialisation.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if cfg.input_size < 16 || cfg.scale == 0 {
            candle_core::bail!("mobilefacenet needs input_size >= 16 and scale >= 1");
        }
        let (plan, u) = plan(cfg);
        let vl = vb.pp("layers");
        let mut layers = Vec::new();
        for (i, p) in plan.iter().enumerate() {
            let v = vl.pp(i);
            layers.push(match *p {
                Plan::Conv(s) => Layer::Conv(block(s, true, v)?),
                Plan::Dw(cin, cout, g, s) => Layer::Dw(DepthWise::new(cin, cout, g, s, false, v)?),
                Plan::Residual(c, g, n) => {
                    let v = v.pp("layers");
                    let mut r = Vec::new();
                    for j in 0..n {
                        r.push(DepthWise::new(c, c, g, 1, true, v.pp(j))?);
                    }
                    Layer::Residual(r)
                }
            });
        }
        let last = 2 * u * cfg.scale;
        let e = 8 * u;
        let conv_sep = block(ConvSpec::new(last, e, 1, 1, 0), true, vb.pp("conv_sep"))?;
        let k = final_size(cfg.input_size);
        let vf = vb.pp("features").pp("layers");
        let gdc = block(ConvSpec::new(e, e, k, 1, 0).groups(e), false, vf.pp("0"))?;
        let linear = Linear::with_std(
            e,
            cfg.num_features,
            false,
            (2.0 / cfg.num_features as f64).sqrt(),
            vf.pp("2"),
        )?;
        let bn1d = bn(cfg.num_features, EPS, vf.pp("3"))?;
        Ok(Model {
            layers,
            conv_sep,
            gdc,
            linear,
            bn: bn1d,
        })
    }

    /// Embeddings `[B, num_features]` of normalised input `[B, 3, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = l.forward(&x, train)?;
        }
        let x = self.conv_sep.forward_t(&x, train)?;
        let x = self.gdc.forward_t(&x, train)?.flatten_from(1)?;
        let x = candle_core::Module::forward(&self.linear, &x)?;
        self.bn.forward_t(&x, train)
    }

    /// The inference graph of [`Self::forward`]; every BatchNorm folds into the convolution
    /// or linear layer before it.
    pub fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let mut x = x.to_string();
        for l in &self.layers {
            x = l.export(g, &x)?;
        }
        let x = cba(g, &x, &self.conv_sep)?;
        let x = cba(g, &x, &self.gdc)?;
        let x = g.flatten(&x);
        g.linear(&x, &self.linear, Some(&self.bn))
    }
}

impl Architecture for Config {
    type Model = Model;
    const NAMES: &'static [&'static str] = &["mobilefacenet"];
    fn from_name(name: &str, o: &BackboneOptions) -> Option<Self> {
        (name == "mobilefacenet").then(|| Config {
            width: o.width,
            input_size: o.input_size,
            num_features: o.num_features,
            ..Default::default()
        })
    }
    fn name(&self) -> String {
        "mobilefacenet".into()
    }
    fn input_size(&self) -> usize {
        self.input_size
    }
    fn embedding_size(&self) -> usize {
        self.num_features
    }
    fn macs(&self) -> u64 {
        macs(self)
    }
    fn build(&self, vb: VarBuilder) -> Result<Model> {
        Model::new(self, vb)
    }
    fn forward(model: &Model, x: &Tensor, train: bool) -> Result<Tensor> {
        model.forward(x, train)
    }
    fn export(model: &Model, g: &mut GraphWriter, x: &str) -> Result<String> {
        model.export(g, x)
    }
}

/// Multiply-accumulates of convolutions and the linear layer for one image.
pub fn macs(cfg: &Config) -> u64 {
    let (plan, u) = plan(cfg);
    let mut h = cfg.input_size;
    let mut total = 0u64;
    let mut run = |s: ConvSpec, h: &mut usize| {
        total += s.macs(*h, *h);
        *h = s.out_size(*h);
    };
    for p in plan {
        match p {
            Plan::Conv(s) => run(s, &mut h),
            Plan::Dw(cin, cout, g, st) => {
                for s in DepthWise::specs(cin, cout, g, st) {
                    run(s, &mut h);
                }
            }
            Plan::Residual(c, g, n) => {
                for _ in 0..n {
                    for s in DepthWise::specs(c, c, g, 1) {
                        run(s, &mut h);
                    }
                }
            }
        }
    }
    let last = 2 * u * cfg.scale;
    let e = 8 * u;
    run(ConvSpec::new(last, e, 1, 1, 0), &mut h);
    let k = h;
    run(ConvSpec::new(e, e, k, 1, 0).groups(e), &mut h);
    total + (e * cfg.num_features) as u64
}
