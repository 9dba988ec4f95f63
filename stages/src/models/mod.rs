//! Face-recognition backbones on candle: `iresnet`, `mobilefacenet`, `vargfacenet`.
//!
//! One file per model, in candle-transformers' shape: a `Config` with serde defaults, a
//! `Model::new(&cfg, vb)` and `forward(&x, train)`. Every convolution goes through
//! [`fpipe_kernels::conv2d`]. Parameters live in a [`ParamStore`], a seeded variable store (candle's
//! CPU generator cannot be seeded) whose names match the PyTorch state dicts of the
//! reference definitions, so insightface `.pth` checkpoints load directly.

pub mod probe;

use crate::util::rng::SplitMix;
use candle_core::{DType, Device, Module, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Errors of model construction and (de)serialisation.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration value is out of range.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A checkpoint lacks a tensor or has one of another shape.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// File system error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Model card (JSON) error.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

// ---------------------------------------------------------------------------------------------
// Seeded parameter store.

/// FNV-1a of a name: per-variable seeds independent of construction order.
fn name_hash(s: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// True for BatchNorm running statistics: state, not parameters (never optimised, not
/// counted as parameters).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// The named variables of a model (and head), created with seeded initialisation.
#[derive(Clone)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
    /// Models built from it get plain tensors sharing the variables' storage (loading into
    /// the variables still reaches them): their forward records no autograd graph, so an
    /// inference pass frees each activation as soon as the next layer has used it.
    inference: bool,
}

impl ParamStore {
    /// Empty store; variables are created (seeded by `seed` and their name) as a model is built.
    pub fn new(seed: u64) -> Self {
        ParamStore {
            vars: Arc::new(Mutex::new(BTreeMap::new())),
            seed,
            inference: false,
        }
    }

    /// Empty store for inference only: see the `inference` field.
    pub fn for_inference(seed: u64) -> Self {
        ParamStore {
            inference: true,
            ..ParamStore::new(seed)
        }
    }

    /// What a model built from this store holds for variable `name`. Running statistics stay
    /// the variable itself even for inference: BatchNorm wraps them with `Var::from_tensor`,
    /// which would copy a plain tensor, and weights loaded later would then not reach them.
    /// They never enter the graph (BatchNorm reads them detached).
    fn handed_out(&self, name: &str, var: &Var) -> Tensor {
        if self.inference && !is_buffer(name) {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        }
    }

    /// A `VarBuilder` that creates variables in this store.
    pub fn vb(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// All variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Variables whose name starts with `prefix`.
    pub fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, Var)> {
        self.vars()
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect()
    }

    /// Number of parameter elements (running statistics excluded), as PyTorch's
    /// `sum(p.numel() for p in model.parameters())`.
    pub fn num_params(&self, prefix: &str) -> usize {
        self.vars_with_prefix(prefix)
            .iter()
            .filter(|(k, _)| !is_buffer(k))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Tensors under `prefix` (prefix stripped), for saving.
    pub fn tensors(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.vars_with_prefix(prefix)
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v.as_tensor().clone()))
            .collect()
    }

    /// Saves the variables under `prefix` (prefix stripped) as safetensors.
    pub fn save(&self, prefix: &str, path: &Path) -> std::result::Result<(), ModelError> {
        candle_core::safetensors::save(&self.tensors(prefix), path)?;
        Ok(())
    }

    /// Sets every variable under `prefix` from `tensors` (keyed without the prefix). Every
    /// variable must be present with its shape unless `allow_missing`; extra tensors are ignored
    /// (e.g. PyTorch's `num_batches_tracked`).
    pub fn assign(
        &self,
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
        allow_missing: bool,
    ) -> std::result::Result<(), ModelError> {
        for (name, var) in self.vars_with_prefix(prefix) {
            let key = &name[prefix.len()..];
            let Some(t) = tensors.get(key) else {
                if allow_missing {
                    continue;
                }
                return Err(ModelError::Checkpoint {
                    path: origin.into(),
                    msg: format!("missing tensor `{key}`"),
                });
            };
            if t.dims() != var.dims() {
                return Err(ModelError::Checkpoint {
                    path: origin.into(),
                    msg: format!(
                        "tensor `{key}` has shape {:?}, the model expects {:?}",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Loads safetensors written by [`ParamStore::save`] into the variables under `prefix`.
    pub fn load(&self, prefix: &str, path: &Path) -> std::result::Result<(), ModelError> {
        let dev = self
            .vars()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let t = candle_core::safetensors::load(path, &dev)?;
        self.assign(prefix, &t, &path.display().to_string(), false)
    }

    /// Loads a zip-format PyTorch state dict (`torch.save(model.state_dict())`, optionally
    /// wrapped in `{'state_dict': ...}` and/or with DataParallel's `module.` prefix).
    pub fn load_pth(&self, prefix: &str, path: &Path) -> std::result::Result<(), ModelError> {
        let origin = path.display().to_string();
        let mut raw = candle_core::pickle::read_all(path);
        if raw.as_ref().map(|v| v.is_empty()).unwrap_or(true) {
            raw = candle_core::pickle::read_all_with_key(path, Some("state_dict"));
        }
        let raw = raw.map_err(|e| ModelError::Checkpoint {
            path: origin.clone(),
            msg: format!(
                "not a readable zip-format PyTorch state dict ({e}); save it with \
                 torch.save(model.state_dict(), path) from PyTorch >= 1.6"
            ),
        })?;
        let tensors: HashMap<String, Tensor> = raw
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
            .collect();
        self.assign(prefix, &tensors, &origin, false)
    }
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(v) = self.lock().get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable {name} exists with shape {:?}, not {s:?}",
                    v.shape()
                );
            }
            return Ok(self.handed_out(name, v));
        }
        let n = s.elem_count();
        let mut rng = SplitMix::new(self.seed ^ name_hash(name));
        let data: Vec<f32> = match h {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * rng.normal()) as f32)
                .collect(),
            Init::Uniform { lo, up } => (0..n)
                .map(|_| (lo + (up - lo) * rng.uniform()) as f32)
                .collect(),
            Init::Kaiming { .. } => {
                // Not used by our layers (they pass explicit standard deviations); fan-in normal.
                let fan_in = if s.rank() > 1 { n / s.dims()[0] } else { n };
                let std = (2.0 / fan_in.max(1) as f64).sqrt();
                (0..n).map(|_| (std * rng.normal()) as f32).collect()
            }
        };
        let t = Tensor::from_vec(data, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = self.handed_out(name, &var);
        self.lock().insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.lock().get(name) {
            Some(v) => Ok(self.handed_out(name, v)),
            None => candle_core::bail!("no variable {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Layers shared by the backbones.

/// A convolution through [`fpipe_kernels::conv2d`], PyTorch weight layout `[out, in/groups, k, k]`.
#[derive(Clone, Debug)]
pub struct Conv {
    w: Tensor,
    b: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
}

/// Shape of a convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    pub bias: bool,
}

impl ConvSpec {
    /// `k`×`k` convolution, no bias, one group.
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Self {
        ConvSpec {
            cin,
            cout,
            k,
            stride,
            padding,
            groups: 1,
            bias: false,
        }
    }
    /// With `groups` groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    /// With a bias.
    pub fn bias(mut self) -> Self {
        self.bias = true;
        self
    }
    /// Output spatial size for input size `h`.
    pub fn out_size(&self, h: usize) -> usize {
        (h + 2 * self.padding).saturating_sub(self.k) / self.stride + 1
    }
    /// Multiply-accumulates for an `h`×`w` input (one image).
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        (oh * ow * self.cout * (self.cin / self.groups) * self.k * self.k) as u64
    }
    /// Parameter count.
    pub fn params(&self) -> usize {
        self.cout * (self.cin / self.groups) * self.k * self.k
            + if self.bias { self.cout } else { 0 }
    }
}

impl Conv {
    /// Builds the layer; weights N(0, `std`), bias zero.
    pub fn new(spec: ConvSpec, std: f64, vb: VarBuilder) -> Result<Self> {
        if spec.groups == 0
            || !spec.cin.is_multiple_of(spec.groups)
            || !spec.cout.is_multiple_of(spec.groups)
        {
            candle_core::bail!(
                "conv {}->{}: {} groups do not divide the channels",
                spec.cin,
                spec.cout,
                spec.groups
            );
        }
        let w = vb.get_with_hints(
            (spec.cout, spec.cin / spec.groups, spec.k, spec.k),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let b = if spec.bias {
            Some(vb.get_with_hints(spec.cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Conv {
            w,
            b,
            stride: spec.stride,
            padding: spec.padding,
            groups: spec.groups,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = fpipe_kernels::conv2d(x, &self.w, self.stride, self.padding, self.groups)?;
        match &self.b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Fully connected layer, weight `[out, in]` as PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// PyTorch's default initialisation: U(±1/sqrt(in)).
    pub fn new(cin: usize, cout: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (cin as f64).sqrt();
        let u = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let w = vb.get_with_hints((cout, cin), "weight", u)?;
        let b = if bias {
            Some(vb.get_with_hints(cout, "bias", u)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    /// Weight N(0, `std`), bias zero.
    pub fn with_std(cin: usize, cout: usize, bias: bool, std: f64, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints(
            (cout, cin),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let b = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// BatchNorm over the channel axis of NCHW (or `[B, C]`) input with PyTorch semantics, built
/// on the fused CPU ops in [`fpipe_kernels`]. Variable names match `nn.BatchNorm1d/2d`'s state
/// dict (`weight`, `bias`, `running_mean`, `running_var`), so `.pth` checkpoints and saved
/// safetensors load unchanged.
///
/// Training mode normalises with the batch statistics and updates the running ones
/// (`running = 0.9·running + 0.1·batch`, unbiased batch variance); it also works on detached
/// input under no gradient (BN fine-tuning). Eval mode uses the running statistics.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// Running-statistics momentum (PyTorch's default).
    pub const MOMENTUM: f64 = 0.1;

    /// Builds the layer over `c` channels: γ = 1, β = 0, running mean 0 and variance 1.
    pub fn new(c: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if eps < 0.0 {
            candle_core::bail!("batch norm eps {eps} is negative");
        }
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        Ok(BatchNorm {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps,
            momentum: Self::MOMENTUM,
        })
    }

    /// Running mean (state, not a parameter).
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// Running variance (state, not a parameter).
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Normalises `x` (`[B, C, H, W]` or `[B, C]`): batch statistics and a running-statistics
    /// update when `train`, running statistics otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act_t(x, None, train)
    }

    /// `conv` then [`Self::forward_act_t`]; in training, on the CPU, the three are one
    /// autograd node ([`fpipe_kernels::conv_batch_norm_train`]).
    pub fn forward_conv_t(
        &self,
        conv: &Conv,
        x: &Tensor,
        act: Option<&PRelu>,
        train: bool,
    ) -> Result<Tensor> {
        if !train || conv.b.is_some() {
            return self.forward_act_t(&conv.forward(x)?, act, train);
        }
        let out = fpipe_kernels::conv_batch_norm_train(
            x,
            &conv.w,
            (conv.stride, conv.padding, conv.groups),
            &self.weight,
            &self.bias,
            act.map(|a| &a.weight),
            self.eps,
        )?;
        // Quality features (QAA) read every BatchNorm's input, in forward order.
        probe::observe(&out.z)?;
        fpipe_kernels::update_running(&self.running_mean, &out.mean, self.momentum)?;
        fpipe_kernels::update_running(&self.running_var, &out.var, self.momentum)?;
        Ok(out.y)
    }

    /// [`Self::forward_t`] followed by `act` when given; in training one fused op
    /// ([`fpipe_kernels::batch_norm_prelu_train`]).
    pub fn forward_act_t(&self, x: &Tensor, act: Option<&PRelu>, train: bool) -> Result<Tensor> {
        // Quality features (QAA) read every BatchNorm's input, in forward order.
        probe::observe(x)?;
        let dims = x.dims().to_vec();
        let c = self.weight.dim(0)?;
        let x4 = match dims.as_slice() {
            [_, ch, _, _] if *ch == c => x.clone(),
            [b, ch] if *ch == c => x.reshape((*b, c, 1, 1))?,
            d => candle_core::bail!("batch norm over {c} channels: input of shape {d:?}"),
        };
        if train {
            let (y, mean, var) = match act {
                Some(a) => fpipe_kernels::batch_norm_prelu_train(
                    &x4,
                    &self.weight,
                    &self.bias,
                    &a.weight,
                    self.eps,
                )?,
                None => fpipe_kernels::batch_norm_train(&x4, &self.weight, &self.bias, self.eps)?,
            };
            fpipe_kernels::update_running(&self.running_mean, &mean, self.momentum)?;
            fpipe_kernels::update_running(&self.running_var, &var, self.momentum)?;
            return y.reshape(dims);
        }
        let stats = (
            &self.running_mean.as_detached_tensor(),
            &self.running_var.as_detached_tensor(),
        );
        let params = (&self.weight, &self.bias);
        let slopes = act.map(|a| &a.weight);
        if let Some(y) = fpipe_kernels::batch_norm_prelu_eval(&x4, params, stats, slopes, self.eps)?
        {
            return y.reshape(dims);
        }
        // y = x·scale + shift with scale = γ/sqrt(var + eps), shift = β − mean·scale.
        let rv = self.running_var.as_detached_tensor().to_dtype(x.dtype())?;
        let rm = self.running_mean.as_detached_tensor().to_dtype(x.dtype())?;
        let scale = self
            .weight
            .to_dtype(x.dtype())?
            .div(&(rv + self.eps)?.sqrt()?)?;
        let shift = (self.bias.to_dtype(x.dtype())? - rm.mul(&scale)?)?;
        let y = x4
            .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
        match act {
            Some(a) => a.forward(&y.reshape(dims)?),
            None => y.reshape(dims),
        }
    }
}

/// BatchNorm with PyTorch semantics (momentum 0.1, unbiased running variance).
pub fn bn(c: usize, eps: f64, vb: VarBuilder) -> Result<BatchNorm> {
    BatchNorm::new(c, eps, vb)
}

/// Per-channel PReLU on the fused op [`fpipe_kernels::prelu`]; slopes stored as `weight`, as
/// PyTorch's `nn.PReLU(c)`.
#[derive(Clone, Debug)]
pub struct PRelu {
    weight: Tensor,
}

impl PRelu {
    /// `c` slopes, initially 0.25 (PyTorch and MXNet).
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(PRelu {
            weight: vb.get_with_hints(c, "weight", Init::Const(0.25))?,
        })
    }
}

impl Module for PRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match x.dims() {
            [_, _, _, _] => fpipe_kernels::prelu(x, &self.weight),
            [b, c] => {
                fpipe_kernels::prelu(&x.reshape((*b, *c, 1, 1))?, &self.weight)?.reshape((*b, *c))
            }
            d => candle_core::bail!("prelu: input of shape {d:?}, expected [B, C(, H, W)]"),
        }
    }
}

/// Per-channel PReLU (initial slope 0.25, as PyTorch and MXNet).
pub fn prelu(c: usize, vb: VarBuilder) -> Result<PRelu> {
    PRelu::new(c, vb)
}

/// Conv → BN → optional PReLU, the unit all three backbones are made of. Parameter names
/// follow the caller's (`conv`, `bn`, `act` sub-paths are chosen by each model).
#[derive(Clone, Debug)]
pub struct ConvBnAct {
    pub conv: Conv,
    pub bn: BatchNorm,
    pub act: Option<PRelu>,
}

impl ConvBnAct {
    /// Applies conv, BN (train or eval) and the activation.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn
            .forward_conv_t(&self.conv, x, self.act.as_ref(), train)
    }
}

/// Scales `n` channels by the width multiplier `w`, keeping a multiple of `multiple` (at least
/// `multiple`).
pub fn scaled(n: usize, w: f64, multiple: usize) -> usize {
    let m = multiple.max(1);
    let v = ((n as f64 * w) / m as f64).round() as usize * m;
    v.max(m)
}

// ---------------------------------------------------------------------------------------------
// Any backbone.

/// Input normalisation `(x - mean) / std` on RGB values in 0..255.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Normalisation {
    pub mean: f64,
    pub std: f64,
}

/// The options every backbone takes (the `train` kind's `width`, `input_size`,
/// `embedding_size` and `se` parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct BackboneOptions {
    /// Channel multiplier (1 = reference size).
    pub width: f64,
    /// Square input size in pixels.
    pub input_size: usize,
    /// Embedding dimension.
    pub num_features: usize,
    /// Squeeze-and-excitation where the backbone has it as an option.
    pub se: bool,
}

/// What one backbone file provides; [`backbones!`] lists each implementation in one line and
/// derives [`BackboneConfig`], [`Backbone`] and [`BACKBONES`] from the list.
pub trait Architecture: Sized {
    /// The built model.
    type Model;
    /// The names [`BackboneConfig::from_name`] accepts for it (e.g. `iresnet50`).
    const NAMES: &'static [&'static str];
    /// Its configuration for `name` (one of [`Self::NAMES`]) with `options`, or `None` when
    /// the name is not this backbone's.
    fn from_name(name: &str, options: &BackboneOptions) -> Option<Self>;
    /// Short name, e.g. `iresnet50`.
    fn name(&self) -> String;
    /// Square input size in pixels.
    fn input_size(&self) -> usize;
    /// Embedding dimension.
    fn embedding_size(&self) -> usize;
    /// Multiply-accumulates of convolutions and fully connected layers for one image (the
    /// "FLOPs" that arcface_torch's tables quote).
    fn macs(&self) -> u64;
    /// Input normalisation the reference training used.
    fn normalisation(&self) -> Normalisation {
        Normalisation {
            mean: 127.5,
            std: 127.5,
        }
    }
    /// True for variables that are parameters but must not be trained.
    fn frozen(&self, _name: &str) -> bool {
        false
    }
    /// Builds the model with variables from `vb`.
    fn build(&self, vb: VarBuilder) -> Result<Self::Model>;
    /// Embeddings `[B, num_features]` of normalised NCHW input.
    fn forward(model: &Self::Model, x: &Tensor, train: bool) -> Result<Tensor>;
}

/// Declares every backbone: `Variant => module` declares the module `module` (its file in this
/// folder), whose `Config` implements [`Architecture`]. The variant's lowercase name is the
/// `arch` tag of model cards.
macro_rules! backbones {
    ($($variant:ident => $module:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// Architecture and hyper-parameters of a backbone, tagged by `arch` (as in the model card).
        #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
        #[serde(tag = "arch", rename_all = "lowercase")]
        pub enum BackboneConfig {
            $($variant($module::Config),)*
        }

        /// A built backbone (built once per run: variant sizes do not matter).
        #[allow(clippy::large_enum_variant)]
        pub enum Backbone {
            $($variant(<$module::Config as Architecture>::Model),)*
        }

        /// Every backbone name [`BackboneConfig::from_name`] accepts, in declaration order.
        pub static BACKBONES: std::sync::LazyLock<Vec<&'static str>> =
            std::sync::LazyLock::new(|| {
                [$(<$module::Config as Architecture>::NAMES),*].concat()
            });

        impl BackboneConfig {
            /// The configuration of backbone `name` (one of [`BACKBONES`]) with `options`.
            pub fn from_name(
                name: &str,
                options: &BackboneOptions,
            ) -> std::result::Result<Self, ModelError> {
                $(
                    if let Some(c) = <$module::Config as Architecture>::from_name(name, options) {
                        return Ok(BackboneConfig::$variant(c));
                    }
                )*
                Err(ModelError::Config(format!(
                    "unknown backbone `{name}` (known: {})",
                    BACKBONES.join(", ")
                )))
            }
            /// Short name, e.g. `iresnet50`.
            pub fn name(&self) -> String {
                match self { $(BackboneConfig::$variant(c) => c.name(),)* }
            }
            /// Square input size in pixels.
            pub fn input_size(&self) -> usize {
                match self { $(BackboneConfig::$variant(c) => c.input_size(),)* }
            }
            /// Embedding dimension.
            pub fn embedding_size(&self) -> usize {
                match self { $(BackboneConfig::$variant(c) => c.embedding_size(),)* }
            }
            /// Input normalisation the reference training used.
            pub fn normalisation(&self) -> Normalisation {
                match self { $(BackboneConfig::$variant(c) => c.normalisation(),)* }
            }
            /// Multiply-accumulates for one image.
            pub fn macs(&self) -> u64 {
                match self { $(BackboneConfig::$variant(c) => c.macs(),)* }
            }
            /// Names of variables that are parameters but must not be trained.
            pub fn frozen(&self, name: &str) -> bool {
                match self { $(BackboneConfig::$variant(c) => c.frozen(name),)* }
            }
        }

        impl Backbone {
            /// Builds the backbone described by `cfg` with variables from `vb`.
            pub fn new(cfg: &BackboneConfig, vb: VarBuilder) -> Result<Self> {
                Ok(match cfg { $(BackboneConfig::$variant(c) => Backbone::$variant(c.build(vb)?),)* })
            }
            /// Embeddings `[B, num_features]` of normalised NCHW input.
            pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
                match self {
                    $(Backbone::$variant(m) => <$module::Config as Architecture>::forward(m, x, train),)*
                }
            }
        }
    };
}

// A new backbone: its file in this folder implementing `Architecture`, and one line here
// (docs/architecture.md, "Adding a backbone").
backbones! {
    Iresnet => iresnet,
    Mobilefacenet => mobilefacenet,
    Vargfacenet => vargfacenet,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normal samples from a fixed seed: candle's CPU `randn` cannot be seeded, and with 6
    /// samples per channel an unlucky draw can leave the running variance within 0.1 of 1.
    fn seeded_normal(shape: &[usize], mean: f64, std: f64, seed: u64, dev: &Device) -> Tensor {
        let mut rng = SplitMix::new(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (mean + std * rng.normal()) as f32).collect();
        Tensor::from_vec(v, shape, dev).unwrap()
    }

    /// Our BatchNorm against candle_nn's (which follows PyTorch) over two train steps and
    /// eval, on NCHW and `[B, C]` input: outputs and running statistics.
    #[test]
    fn batch_norm_matches_candle_nn_train_and_eval() {
        let dev = Device::Cpu;
        for shape in [vec![4usize, 3, 5, 2], vec![6, 3]] {
            let ours = ParamStore::new(1);
            let bn_ours = BatchNorm::new(3, 1e-5, ours.vb(&dev)).unwrap();
            let theirs = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&theirs, DType::F32, &dev);
            let bn_ref = candle_nn::batch_norm(3, 1e-5, vb).unwrap();
            for step in 0..2 {
                let x = seeded_normal(&shape, step as f64, 2.0, step as u64, &dev);
                let a = bn_ours.forward_t(&x, true).unwrap();
                let b = candle_nn::ModuleT::forward_t(&bn_ref, &x, true).unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
            }
            let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
            let close =
                |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4);
            assert!(close(v(bn_ours.running_mean()), v(bn_ref.running_mean())));
            assert!(close(v(bn_ours.running_var()), v(bn_ref.running_var())));
            assert!(v(bn_ours.running_var())
                .iter()
                .any(|r| (r - 1.0).abs() > 0.1));
            let x = seeded_normal(&shape, 1.0, 2.0, 7, &dev);
            let a = bn_ours.forward_t(&x, false).unwrap();
            let b = candle_nn::ModuleT::forward_t(&bn_ref, &x, false).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        }
    }

    /// The stored names are PyTorch's, and running statistics are buffers.
    #[test]
    fn batch_norm_and_prelu_variable_names() {
        let store = ParamStore::new(0);
        let vb = store.vb(&Device::Cpu);
        BatchNorm::new(4, 1e-5, vb.pp("bn")).unwrap();
        PRelu::new(4, vb.pp("act")).unwrap();
        let names: Vec<String> = store.vars().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "act.weight",
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
                "bn.weight"
            ]
        );
        assert_eq!(store.num_params(""), 12);
    }

    /// A model built from an inference store records no autograd graph, and weights loaded
    /// into the store after building reach it; a trainable one records the graph.
    #[test]
    fn an_inference_store_hands_out_weights_without_a_graph() {
        let dev = Device::Cpu;
        let opts = BackboneOptions {
            width: 0.125,
            input_size: 32,
            num_features: 16,
            se: false,
        };
        let cfg = BackboneConfig::from_name("mobilefacenet", &opts).unwrap();
        let x = seeded_normal(&[2, 3, 32, 32], 0.0, 1.0, 3, &dev);
        let trained = ParamStore::new(5);
        let tb = Backbone::new(&cfg, trained.vb(&dev).pp("backbone")).unwrap();
        // Running statistics away from their initial 0 and 1, as a trained model has them.
        for (name, var) in trained.vars() {
            if is_buffer(&name) {
                let shifted = (var.as_tensor() * 0.5).unwrap() + 0.25;
                var.set(&shifted.unwrap()).unwrap();
            }
        }
        let frozen = ParamStore::for_inference(0);
        let fb = Backbone::new(&cfg, frozen.vb(&dev).pp("backbone")).unwrap();
        let weights = trained.tensors("backbone.");
        frozen.assign("backbone.", &weights, "test", false).unwrap();
        let a = tb.forward(&x, false).unwrap();
        let b = fb.forward(&x, false).unwrap();
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            d.to_scalar::<f32>().unwrap(),
            0.0,
            "loaded weights reach the model"
        );
        let grads = |out: &Tensor, store: &ParamStore| {
            let g = out.sum_all().unwrap().backward().unwrap();
            store
                .vars()
                .iter()
                .filter(|(_, v)| g.get(v.as_tensor()).is_some())
                .count()
        };
        assert!(grads(&a, &trained) > 10, "the trainable forward is a graph");
        assert_eq!(grads(&b, &frozen), 0, "the inference forward is none");
    }

    /// Train-mode forward on detached input under no gradient still updates running stats.
    #[test]
    fn batch_norm_train_mode_without_gradient_updates_running_stats() {
        let dev = Device::Cpu;
        let store = ParamStore::new(0);
        let bn = BatchNorm::new(2, 1e-5, store.vb(&dev)).unwrap();
        let x = Tensor::randn(3f32, 1.0, (8, 2, 3, 3), &dev)
            .unwrap()
            .detach();
        let y = bn.forward_t(&x, true).unwrap().detach();
        assert_eq!(y.dims(), x.dims());
        let rm = bn.running_mean().to_vec1::<f32>().unwrap();
        assert!(rm.iter().all(|m| (m - 0.3).abs() < 0.1), "{rm:?}");
    }
}
