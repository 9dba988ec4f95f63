//! VarGFaceNet (official MXNet definition, `zma-c-137/VarGFaceNet/VarGFaceNet.py`): variable
//! group convolutions (8 channels per group), normal and branch-merge blocks, optional SE, and
//! an embedding setting of 1×1 → 7×7 group conv → 1×1 → FC → BN.
//!
//! The MXNet original has no PyTorch state dict; names here follow a PyTorch re-creation
//! (`scripts/make_model_fixtures.py`) that counts parameters and FLOPs.

use super::onnx::export::GraphWriter;
use super::{
    bn, prelu, scaled, Architecture, BackboneOptions, BatchNorm, Conv, ConvBnAct, ConvSpec, Linear,
    Normalisation, PRelu,
};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// VarGFaceNet configuration. Full size: multiplier 1.25, width 1.0, input 112, SE on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// The paper's channel multiplier on 32/64/128/256.
    pub multiplier: f64,
    /// Extra channel multiplier for CPU-sized runs (channels stay multiples of 8).
    pub width: f64,
    /// Square input size; the embedding's group conv covers the final `input_size / 16` map.
    pub input_size: usize,
    /// Embedding dimension.
    pub num_features: usize,
    /// Squeeze-and-excitation in normal blocks (official: on; insightface's copy: off).
    pub use_se: bool,
    /// Channels of the embedding setting (1024 in the reference).
    pub last_channels: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            multiplier: 1.25,
            width: 1.0,
            input_size: 112,
            num_features: 512,
            use_se: true,
            last_channels: 1024,
        }
    }
}

const EPS: f64 = 2e-5;
const GROUP: usize = 8;
const UNITS: [usize; 3] = [3, 7, 4];

fn std_out(cout: usize, k: usize) -> f64 {
    (2.0 / (cout * k * k) as f64).sqrt()
}

fn cba(spec: ConvSpec, act: bool, vb: VarBuilder) -> Result<ConvBnAct> {
    Ok(ConvBnAct {
        conv: Conv::new(spec, std_out(spec.cout, spec.k), vb.pp("conv"))?,
        bn: bn(spec.cout, EPS, vb.pp("bn"))?,
        act: if act {
            Some(prelu(spec.cout, vb.pp("act"))?)
        } else {
            None
        },
    })
}

/// Separable unit: 3×3 group conv cin→cin·factor (cin/8 groups) + BN + PRelu, then 1×1 →
/// cout + BN (+ PRelu when `act`).
struct Sep {
    dw: ConvBnAct,
    pw: ConvBnAct,
}

fn sep_specs(cin: usize, cout: usize, stride: usize, factor: usize) -> [ConvSpec; 2] {
    [
        ConvSpec::new(cin, cin * factor, 3, stride, 1).groups(cin / GROUP),
        ConvSpec::new(cin * factor, cout, 1, 1, 0),
    ]
}

impl Sep {
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        factor: usize,
        act: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let [a, b] = sep_specs(cin, cout, stride, factor);
        Ok(Sep {
            dw: cba(a, true, vb.pp("dw"))?,
            pw: cba(b, act, vb.pp("pw"))?,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.pw.forward_t(&self.dw.forward_t(x, train)?, train)
    }
    fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let y = cba_export(g, x, &self.dw)?;
        cba_export(g, &y, &self.pw)
    }
}

/// Conv + BN (folded) + PReLU as one `Conv` (and `PRelu`) node.
fn cba_export(g: &mut GraphWriter, x: &str, c: &ConvBnAct) -> Result<String> {
    g.conv(x, &c.conv, Some(&c.bn), c.act.as_ref())
}

struct Se {
    conv1: Conv,
    act: PRelu,
    conv2: Conv,
}

impl Se {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let r = (c / 4).max(1);
        Ok(Se {
            conv1: Conv::new(
                ConvSpec::new(c, r, 1, 1, 0).bias(),
                std_out(r, 1),
                vb.pp("conv1"),
            )?,
            act: prelu(r, vb.pp("act"))?,
            conv2: Conv::new(
                ConvSpec::new(r, c, 1, 1, 0).bias(),
                std_out(c, 1),
                vb.pp("conv2"),
            )?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let s = self
            .conv2
            .forward(&self.act.forward(&self.conv1.forward(&p)?)?)?;
        x.broadcast_mul(&candle_nn::ops::sigmoid(&s)?)
    }
    fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let p = g.global_average_pool(x);
        let s = g.conv(&p, &self.conv1, None, Some(&self.act))?;
        let s = g.conv(&s, &self.conv2, None, None)?;
        let s = g.sigmoid(&s);
        Ok(g.mul(x, &s))
    }
}

/// Normal block (`vargnet_block`): sep → sep(no act) → [SE] → + shortcut → PRelu.
struct NormalBlock {
    shortcut: Option<Sep>,
    sep1: Sep,
    sep2: Sep,
    se: Option<Se>,
    act: PRelu,
}

impl NormalBlock {
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        factor: usize,
        se: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shortcut = if stride != 1 || cin != cout {
            Some(Sep::new(
                cin,
                cout,
                stride,
                factor,
                false,
                vb.pp("shortcut"),
            )?)
        } else {
            None
        };
        Ok(NormalBlock {
            shortcut,
            sep1: Sep::new(cin, cout, stride, factor, true, vb.pp("sep1"))?,
            sep2: Sep::new(cout, cout, 1, factor, false, vb.pp("sep2"))?,
            se: if se {
                Some(Se::new(cout, vb.pp("se"))?)
            } else {
                None
            },
            act: prelu(cout, vb.pp("act"))?,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.sep2.forward(&self.sep1.forward(x, train)?, train)?;
        if let Some(se) = &self.se {
            y = se.forward(&y)?;
        }
        let s = match &self.shortcut {
            Some(s) => s.forward(x, train)?,
            None => x.clone(),
        };
        self.act.forward(&(y + s)?)
    }
    fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let y1 = self.sep1.export(g, x)?;
        let mut y = self.sep2.export(g, &y1)?;
        if let Some(se) = &self.se {
            y = se.export(g, &y)?;
        }
        let s = match &self.shortcut {
            Some(s) => s.export(g, x)?,
            None => x.to_string(),
        };
        let sum = g.add(&y, &s);
        g.prelu(&sum, &self.act)
    }
}

/// Down-sampling block (`vargnet_branch_merge_block`): two parallel stride-2 seps summed →
/// PRelu → sep → + shortcut sep → PRelu. No SE.
struct MergeBlock {
    shortcut: Sep,
    branch1: Sep,
    branch2: Sep,
    act1: PRelu,
    sep2: Sep,
    act: PRelu,
}

impl MergeBlock {
    fn new(cin: usize, cout: usize, factor: usize, vb: VarBuilder) -> Result<Self> {
        Ok(MergeBlock {
            shortcut: Sep::new(cin, cout, 2, factor, false, vb.pp("shortcut"))?,
            branch1: Sep::new(cin, cout, 2, factor, false, vb.pp("branch1"))?,
            branch2: Sep::new(cin, cout, 2, factor, false, vb.pp("branch2"))?,
            act1: prelu(cout, vb.pp("act1"))?,
            sep2: Sep::new(cout, cout, 1, factor, false, vb.pp("sep2"))?,
            act: prelu(cout, vb.pp("act"))?,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let b = (self.branch1.forward(x, train)? + self.branch2.forward(x, train)?)?;
        let y = self.sep2.forward(&self.act1.forward(&b)?, train)?;
        self.act.forward(&(y + self.shortcut.forward(x, train)?)?)
    }
    fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let b1 = self.branch1.export(g, x)?;
        let b2 = self.branch2.export(g, x)?;
        let b = g.add(&b1, &b2);
        let b = g.prelu(&b, &self.act1)?;
        let y = self.sep2.export(g, &b)?;
        let s = self.shortcut.export(g, x)?;
        let sum = g.add(&y, &s);
        g.prelu(&sum, &self.act)
    }
}

/// The VarGFaceNet backbone.
pub struct Model {
    head_conv: ConvBnAct,
    head_block: NormalBlock,
    stages: Vec<(MergeBlock, Vec<NormalBlock>)>,
    convx: ConvBnAct,
    dw: ConvBnAct,
    pw: ConvBnAct,
    fc: Linear,
    fc_bn: BatchNorm,
}

struct Dims {
    ch: [usize; 4],
    last: usize,
    k: usize,
}

fn dims(cfg: &Config) -> Dims {
    let c = |n: usize| scaled((n as f64 * cfg.multiplier) as usize, cfg.width, GROUP);
    let mut h = cfg.input_size;
    for _ in 0..4 {
        h = h.div_ceil(2);
    }
    Dims {
        ch: [c(32), c(64), c(128), c(256)],
        last: scaled(cfg.last_channels, cfg.width, 2 * GROUP),
        k: h,
    }
}

impl Model {
    /// Builds the network (weights N(0, sqrt(2/fan_out))).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if cfg.input_size < 16 {
            candle_core::bail!("vargfacenet input_size must be at least 16");
        }
        let d = dims(cfg);
        let c0 = d.ch[0];
        let vh = vb.pp("head");
        let head_conv = cba(ConvSpec::new(3, c0, 3, 1, 1), true, vh.pp("stem"))?;
        // The head's block is a normal block with stride 2 and factor 1 (SE as configured).
        let head_block = NormalBlock::new(c0, c0, 2, 1, cfg.use_se, vh.pp("block"))?;
        let mut stages = Vec::new();
        for (i, &units) in UNITS.iter().enumerate() {
            let v = vb.pp("stages").pp(i);
            let (cin, cout) = (d.ch[i], d.ch[i + 1]);
            let merge = MergeBlock::new(cin, cout, 2, v.pp("0"))?;
            let mut normal = Vec::new();
            for u in 1..units {
                normal.push(NormalBlock::new(cout, cout, 1, 2, cfg.use_se, v.pp(u))?);
            }
            stages.push((merge, normal));
        }
        let ve = vb.pp("embed");
        let c3 = d.ch[3];
        let convx = cba(ConvSpec::new(c3, d.last, 1, 1, 0), true, ve.pp("convx"))?;
        let dw = cba(
            ConvSpec::new(d.last, d.last, d.k, 1, 0).groups(d.last / GROUP),
            false,
            ve.pp("dw"),
        )?;
        let pw = cba(
            ConvSpec::new(d.last, d.last / 2, 1, 1, 0),
            true,
            ve.pp("pw"),
        )?;
        let fc = Linear::new(d.last / 2, cfg.num_features, true, ve.pp("fc"))?;
        let fc_bn = bn(cfg.num_features, EPS, ve.pp("bn"))?;
        Ok(Model {
            head_conv,
            head_block,
            stages,
            convx,
            dw,
            pw,
            fc,
            fc_bn,
        })
    }

    /// Embeddings `[B, num_features]` of normalised input `[B, 3, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.head_conv.forward_t(x, train)?;
        x = self.head_block.forward(&x, train)?;
        for (m, normal) in &self.stages {
            x = m.forward(&x, train)?;
            for b in normal {
                x = b.forward(&x, train)?;
            }
        }
        let x = self.convx.forward_t(&x, train)?;
        let x = self.dw.forward_t(&x, train)?;
        let x = self.pw.forward_t(&x, train)?.flatten_from(1)?;
        self.fc_bn.forward_t(&self.fc.forward(&x)?, train)
    }

    /// The inference graph of [`Self::forward`]; every BatchNorm folds into the convolution
    /// or linear layer before it.
    pub fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let mut x = cba_export(g, x, &self.head_conv)?;
        x = self.head_block.export(g, &x)?;
        for (m, normal) in &self.stages {
            x = m.export(g, &x)?;
            for b in normal {
                x = b.export(g, &x)?;
            }
        }
        let x = cba_export(g, &x, &self.convx)?;
        let x = cba_export(g, &x, &self.dw)?;
        let x = cba_export(g, &x, &self.pw)?;
        let x = g.flatten(&x);
        g.linear(&x, &self.fc, Some(&self.fc_bn))
    }
}

impl Architecture for Config {
    type Model = Model;
    const NAMES: &'static [&'static str] = &["vargfacenet"];
    fn from_name(name: &str, o: &BackboneOptions) -> Option<Self> {
        (name == "vargfacenet").then(|| Config {
            width: o.width,
            input_size: o.input_size,
            num_features: o.num_features,
            use_se: o.se,
            ..Default::default()
        })
    }
    fn name(&self) -> String {
        "vargfacenet".into()
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
    /// VarGFaceNet's MXNet symbol: (x - 127.5) * 0.0078125.
    fn normalisation(&self) -> Normalisation {
        Normalisation {
            mean: 127.5,
            std: 128.0,
        }
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

/// Multiply-accumulates of convolutions and the FC layer for one image.
pub fn macs(cfg: &Config) -> u64 {
    let d = dims(cfg);
    let mut h = cfg.input_size;
    let sep = |cin: usize, cout: usize, s: usize, f: usize, h: usize| -> (u64, usize) {
        let [a, b] = sep_specs(cin, cout, s, f);
        let oh = a.out_size(h);
        (a.macs(h, h) + b.macs(oh, oh), oh)
    };
    let se = |c: usize| -> u64 {
        if cfg.use_se {
            2 * (c * (c / 4).max(1)) as u64
        } else {
            0
        }
    };
    let c0 = d.ch[0];
    let mut total = ConvSpec::new(3, c0, 3, 1, 1).macs(h, h);
    // Head block: shortcut + sep1 at stride 2, sep2 at stride 1.
    let (m1, oh) = sep(c0, c0, 2, 1, h);
    let (m2, _) = sep(c0, c0, 2, 1, h);
    let (m3, _) = sep(c0, c0, 1, 1, oh);
    total += m1 + m2 + m3 + se(c0);
    h = oh;
    for (i, &units) in UNITS.iter().enumerate() {
        let (cin, cout) = (d.ch[i], d.ch[i + 1]);
        let (m, oh) = sep(cin, cout, 2, 2, h);
        let (m2, _) = sep(cout, cout, 1, 2, oh);
        total += 3 * m + m2;
        h = oh;
        for _ in 1..units {
            let (a, _) = sep(cout, cout, 1, 2, h);
            total += 2 * a + se(cout);
        }
    }
    total += ConvSpec::new(d.ch[3], d.last, 1, 1, 0).macs(h, h);
    let dw = ConvSpec::new(d.last, d.last, d.k, 1, 0).groups(d.last / GROUP);
    total += dw.macs(h, h);
    let oh = dw.out_size(h);
    total += ConvSpec::new(d.last, d.last / 2, 1, 1, 0).macs(oh, oh);
    total + (d.last / 2 * cfg.num_features) as u64
}
