//! IResNet (insightface arcface_torch `backbones/iresnet.py`): improved residual network with
//! pre-BN basic blocks and a BN → flatten → FC → BN1d embedding head.
//!
//! Variable names match the PyTorch state dict, so `.pth` checkpoints of the model zoo load.

use super::onnx::export::GraphWriter;
use super::{
    bn, prelu, scaled, Architecture, BackboneOptions, BatchNorm, Conv, ConvSpec, Linear, PRelu,
};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// IResNet configuration. Full size: `width` 1.0 and `input_size` 112.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// 18, 34, 50, 100 or 200.
    pub depth: usize,
    /// Channel multiplier on 64/128/256/512 (CPU-sized runs use e.g. 0.25).
    pub width: f64,
    /// Square input size; the feature map before the head is `input_size / 16`.
    pub input_size: usize,
    /// Embedding dimension.
    pub num_features: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            depth: 50,
            width: 1.0,
            input_size: 112,
            num_features: 512,
        }
    }
}

impl Config {
    /// Blocks per stage for the depth.
    pub fn layers(&self) -> Result<[usize; 4]> {
        Ok(match self.depth {
            18 => [2, 2, 2, 2],
            34 => [3, 4, 6, 3],
            50 => [3, 4, 14, 3],
            100 => [3, 13, 30, 3],
            200 => [6, 26, 60, 6],
            d => candle_core::bail!("iresnet depth {d} unknown: use 18, 34, 50, 100 or 200"),
        })
    }
    fn channels(&self) -> [usize; 5] {
        let c = |n| scaled(n, self.width, 1);
        [c(64), c(64), c(128), c(256), c(512)]
    }
}

const EPS: f64 = 1e-5;
const CONV_STD: f64 = 0.1;

struct Block {
    bn1: BatchNorm,
    conv1: Conv,
    bn2: BatchNorm,
    prelu: PRelu,
    conv2: Conv,
    bn3: BatchNorm,
    downsample: Option<(Conv, BatchNorm)>,
}

impl Block {
    fn new(cin: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || cin != planes {
            let vd = vb.pp("downsample");
            Some((
                Conv::new(
                    ConvSpec::new(cin, planes, 1, stride, 0),
                    CONV_STD,
                    vd.pp("0"),
                )?,
                bn(planes, EPS, vd.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Block {
            bn1: bn(cin, EPS, vb.pp("bn1"))?,
            conv1: Conv::new(
                ConvSpec::new(cin, planes, 3, 1, 1),
                CONV_STD,
                vb.pp("conv1"),
            )?,
            bn2: bn(planes, EPS, vb.pp("bn2"))?,
            prelu: prelu(planes, vb.pp("prelu"))?,
            conv2: Conv::new(
                ConvSpec::new(planes, planes, 3, stride, 1),
                CONV_STD,
                vb.pp("conv2"),
            )?,
            bn3: bn(planes, EPS, vb.pp("bn3"))?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn1.forward_t(x, train)?;
        let y = self
            .bn2
            .forward_conv_t(&self.conv1, &y, Some(&self.prelu), train)?;
        let y = self.bn3.forward_conv_t(&self.conv2, &y, None, train)?;
        let id = match &self.downsample {
            Some((c, b)) => b.forward_conv_t(c, x, None, train)?,
            None => x.clone(),
        };
        y + id
    }

    /// The inference graph of [`Self::forward`]: `bn1` stays a BatchNorm (it precedes a padded
    /// convolution), `bn2`, `bn3` and the downsample BN fold into their convolutions.
    fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let y = g.batch_norm(x, &self.bn1)?;
        let y = g.conv(&y, &self.conv1, Some(&self.bn2), Some(&self.prelu))?;
        let y = g.conv(&y, &self.conv2, Some(&self.bn3), None)?;
        let id = match &self.downsample {
            Some((c, b)) => g.conv(x, c, Some(b), None)?,
            None => x.to_string(),
        };
        Ok(g.add(&y, &id))
    }
}

/// The IResNet backbone.
pub struct Model {
    conv1: Conv,
    bn1: BatchNorm,
    prelu: PRelu,
    layers: Vec<Vec<Block>>,
    bn2: BatchNorm,
    fc: Linear,
    features: BatchNorm,
}

fn head_size(input: usize) -> usize {
    let mut h = input;
    for _ in 0..4 {
        h = h.div_ceil(2);
    }
    h
}

impl Model {
    /// Builds the network; conv weights N(0, 0.1), BN γ 1 β 0 as the reference.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let depths = cfg.layers()?;
        if cfg.input_size < 16 {
            candle_core::bail!("iresnet input_size must be at least 16");
        }
        let ch = cfg.channels();
        let conv1 = Conv::new(ConvSpec::new(3, ch[0], 3, 1, 1), CONV_STD, vb.pp("conv1"))?;
        let bn1 = bn(ch[0], EPS, vb.pp("bn1"))?;
        let prelu_ = prelu(ch[0], vb.pp("prelu"))?;
        let mut layers = Vec::new();
        let mut cin = ch[0];
        for (i, &n) in depths.iter().enumerate() {
            let planes = ch[i + 1];
            let vl = vb.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::new();
            for j in 0..n {
                let stride = if j == 0 { 2 } else { 1 };
                blocks.push(Block::new(cin, planes, stride, vl.pp(j))?);
                cin = planes;
            }
            layers.push(blocks);
        }
        let hs = head_size(cfg.input_size);
        let bn2 = bn(cin, EPS, vb.pp("bn2"))?;
        let fc = Linear::new(cin * hs * hs, cfg.num_features, true, vb.pp("fc"))?;
        // γ of `features` is fixed at 1 (requires_grad False in the reference): the trainer
        // leaves it out of the optimiser via `BackboneConfig::frozen`.
        let features = bn(cfg.num_features, EPS, vb.pp("features"))?;
        Ok(Model {
            conv1,
            bn1,
            prelu: prelu_,
            layers,
            bn2,
            fc,
            features,
        })
    }

    /// Embeddings `[B, num_features]` of normalised input `[B, 3, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self
            .bn1
            .forward_conv_t(&self.conv1, x, Some(&self.prelu), train)?;
        for blocks in &self.layers {
            for b in blocks {
                x = b.forward(&x, train)?;
            }
        }
        let x = self.bn2.forward_t(&x, train)?.flatten_from(1)?;
        // Dropout p = 0 in every reference config: omitted.
        let x = self.fc.forward(&x)?;
        self.features.forward_t(&x, train)
    }

    /// The inference graph of [`Self::forward`] (`features` folded into `fc`).
    pub fn export(&self, g: &mut GraphWriter, x: &str) -> Result<String> {
        let mut x = g.conv(x, &self.conv1, Some(&self.bn1), Some(&self.prelu))?;
        for blocks in &self.layers {
            for b in blocks {
                x = b.export(g, &x)?;
            }
        }
        let x = g.batch_norm(&x, &self.bn2)?;
        let x = g.flatten(&x);
        g.linear(&x, &self.fc, Some(&self.features))
    }
}

impl Architecture for Config {
    type Model = Model;
    const NAMES: &'static [&'static str] = &[
        "iresnet18",
        "iresnet34",
        "iresnet50",
        "iresnet100",
        "iresnet200",
    ];
    fn from_name(name: &str, o: &BackboneOptions) -> Option<Self> {
        if !Self::NAMES.contains(&name) {
            return None;
        }
        Some(Config {
            depth: name.strip_prefix("iresnet")?.parse().ok()?,
            width: o.width,
            input_size: o.input_size,
            num_features: o.num_features,
        })
    }
    fn name(&self) -> String {
        format!("iresnet{}", self.depth)
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
    /// The final BatchNorm1d's γ is fixed at 1 (`features.weight.requires_grad = False`).
    fn frozen(&self, name: &str) -> bool {
        name == "features.weight"
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
    let Ok(depths) = cfg.layers() else { return 0 };
    let ch = cfg.channels();
    let mut h = cfg.input_size;
    let mut total = ConvSpec::new(3, ch[0], 3, 1, 1).macs(h, h);
    let mut cin = ch[0];
    for (i, &n) in depths.iter().enumerate() {
        let planes = ch[i + 1];
        for j in 0..n {
            let stride = if j == 0 { 2 } else { 1 };
            total += ConvSpec::new(cin, planes, 3, 1, 1).macs(h, h);
            let c2 = ConvSpec::new(planes, planes, 3, stride, 1);
            if stride != 1 || cin != planes {
                total += ConvSpec::new(cin, planes, 1, stride, 0).macs(h, h);
            }
            total += c2.macs(h, h);
            h = c2.out_size(h);
            cin = planes;
        }
    }
    total + (cin * h * h * cfg.num_features) as u64
}
