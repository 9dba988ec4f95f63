//! One interface over every training objective of `train`, so the loop does not branch on the
//! loss: [`Objective::loss`] gives the batch loss and an optional per-step extra for the report
//! (SphereFace's λ, the centre distance, the active-triplet fraction); [`Objective::after_step`]
//! applies state updates that are not gradient steps (centre loss). Every variable, centres
//! included, lives in the training [`ParamStore`], so checkpoints hold them without extra code.

use super::softmax::{center_distance, center_term, center_update, SoftmaxHead};
use super::triplet::{triplet_loss, Mining};
use super::{LossError, MarginConfig, MarginHead};
use crate::models::ParamStore;
use crate::util::rng::SplitMix;
use candle_core::{Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Which objective trains the backbone (the margin head's settings are in [`MarginConfig`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ObjectiveConfig {
    /// Margin head on normalised features and weights: ArcFace, CosFace, combined, SphereFace,
    /// norm-softmax.
    #[default]
    Margin,
    /// Linear classifier with bias on the raw embedding, cross-entropy.
    Softmax,
    /// Softmax + centre loss (Wen et al. 2016).
    Center {
        /// Weight λ of the centre term (0.003).
        lambda: f64,
        /// Centre update rate α (0.5).
        alpha: f64,
    },
    /// Triplet loss on L2-normalised embeddings, P×K batches.
    Triplet {
        /// Hinge margin (FaceNet: 0.2).
        margin: f64,
        /// Online selection.
        mining: Mining,
        /// Images per identity K in a batch (P = batch size / K).
        per_identity: usize,
    },
}

impl ObjectiveConfig {
    /// Checks the settings; `batch_size` for the P×K layout, `sample_rate` (PartialFC) applies
    /// to the margin head only.
    pub fn validate(
        &self,
        batch_size: usize,
        sample_rate: f64,
    ) -> std::result::Result<(), LossError> {
        let err = |m: &str| Err(LossError::Config(m.into()));
        if sample_rate < 1.0 && *self != ObjectiveConfig::Margin {
            return err("sample_rate < 1 (PartialFC) applies to margin losses only");
        }
        match *self {
            ObjectiveConfig::Margin | ObjectiveConfig::Softmax => Ok(()),
            ObjectiveConfig::Center { lambda, alpha } => {
                if lambda.is_nan() || lambda < 0.0 {
                    return err("center_lambda must be >= 0");
                }
                if !(0.0..=1.0).contains(&alpha) {
                    return err("center_alpha must lie in [0, 1]");
                }
                Ok(())
            }
            ObjectiveConfig::Triplet {
                margin,
                per_identity,
                ..
            } => {
                if margin.is_nan() || margin <= 0.0 {
                    return err("triplet_margin must be > 0");
                }
                if per_identity < 2 {
                    return err("triplet_k must be at least 2 (an anchor needs a positive)");
                }
                if !batch_size.is_multiple_of(per_identity) || batch_size / per_identity < 2 {
                    return Err(LossError::Config(format!(
                        "triplet batches are P identities x K images: batch_size ({batch_size}) \
                         must be a multiple of triplet_k ({per_identity}) with P >= 2"
                    )));
                }
                Ok(())
            }
        }
    }

    /// Name of the per-step extra this objective reports, if any.
    pub fn extra_name(&self, margin: &MarginConfig) -> Option<&'static str> {
        match self {
            ObjectiveConfig::Margin if margin.m1 != 1.0 && margin.sphere_lambda.is_some() => {
                Some("lambda")
            }
            ObjectiveConfig::Margin | ObjectiveConfig::Softmax => None,
            ObjectiveConfig::Center { .. } => Some("center_distance"),
            ObjectiveConfig::Triplet { .. } => Some("active_triplets"),
        }
    }
}

/// Loss of one batch.
pub struct StepLoss {
    /// Scalar loss to back-propagate.
    pub loss: Tensor,
    /// The objective's per-step extra (see [`ObjectiveConfig::extra_name`]).
    pub extra: Option<f64>,
}

/// The objective of a run, with its variables.
pub enum Objective {
    /// Margin head.
    Margin(MarginHead),
    /// Softmax classifier.
    Softmax(SoftmaxHead),
    /// Softmax + centre loss; centres are the store variable `loss.centres`.
    Center {
        head: SoftmaxHead,
        centres: Var,
        lambda: f64,
        alpha: f64,
    },
    /// Triplet loss (no variables).
    Triplet { margin: f64, mining: Mining },
}

fn store_var(store: &ParamStore, name: &str) -> Result<Var> {
    store
        .vars()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .ok_or_else(|| candle_core::Error::Msg(format!("variable `{name}` was not created")))
}

impl Objective {
    /// Creates the objective's variables in `store`: `head.weight [classes, emb]` ~ N(0, 0.01)
    /// for the classifiers, `head.bias` = 0 for softmax, `loss.centres` = 0 for centre loss.
    pub fn build(
        cfg: &ObjectiveConfig,
        margin: &MarginConfig,
        sample_rate: f64,
        store: &ParamStore,
        classes: usize,
        emb: usize,
        dev: &Device,
    ) -> std::result::Result<Self, LossError> {
        let vb = store.vb(dev);
        let weight = |store: &ParamStore| -> Result<Var> {
            vb.pp("head").get_with_hints(
                (classes, emb),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            )?;
            store_var(store, "head.weight")
        };
        let softmax = |store: &ParamStore| -> Result<SoftmaxHead> {
            let weight = weight(store)?;
            vb.pp("head")
                .get_with_hints(classes, "bias", candle_nn::Init::Const(0.0))?;
            Ok(SoftmaxHead {
                weight,
                bias: store_var(store, "head.bias")?,
            })
        };
        Ok(match *cfg {
            ObjectiveConfig::Margin => Objective::Margin(MarginHead::new(
                weight(store)?,
                margin.clone(),
                sample_rate,
            )?),
            ObjectiveConfig::Softmax => Objective::Softmax(softmax(store)?),
            ObjectiveConfig::Center { lambda, alpha } => {
                let head = softmax(store)?;
                vb.pp("loss").get_with_hints(
                    (classes, emb),
                    "centres",
                    candle_nn::Init::Const(0.0),
                )?;
                Objective::Center {
                    head,
                    centres: store_var(store, "loss.centres")?,
                    lambda,
                    alpha,
                }
            }
            ObjectiveConfig::Triplet { margin, mining, .. } => {
                Objective::Triplet { margin, mining }
            }
        })
    }

    /// Loss of batch `iter` (0-based) with embeddings `emb` and `labels`; `rng` drives PartialFC.
    pub fn loss(
        &self,
        emb: &Tensor,
        labels: &[u32],
        iter: u64,
        rng: &mut SplitMix,
    ) -> Result<StepLoss> {
        Ok(match self {
            Objective::Margin(h) => StepLoss {
                loss: h.loss_at(emb, labels, rng, iter)?,
                extra: (h.cfg.m1 != 1.0 && h.cfg.sphere_lambda.is_some())
                    .then(|| h.cfg.lambda_at(iter)),
            },
            Objective::Softmax(h) => StepLoss {
                loss: h.loss(emb, labels)?,
                extra: None,
            },
            Objective::Center {
                head,
                centres,
                lambda,
                ..
            } => {
                let c = centres.as_tensor();
                StepLoss {
                    loss: (head.loss(emb, labels)? + center_term(emb, c, labels, *lambda)?)?,
                    extra: Some(center_distance(emb, c, labels)?),
                }
            }
            Objective::Triplet { margin, mining } => {
                let t = triplet_loss(emb, labels, *margin, *mining)?;
                StepLoss {
                    loss: t.loss,
                    extra: Some(t.active_fraction),
                }
            }
        })
    }

    /// State updates after the optimiser step of the batch (`emb` as computed in its forward):
    /// the centre-loss centres move towards their features.
    pub fn after_step(&self, emb: &Tensor, labels: &[u32]) -> Result<()> {
        if let Objective::Center { centres, alpha, .. } = self {
            let new = center_update(centres.as_tensor(), emb, labels, *alpha)?;
            centres.set(&new)?;
        }
        Ok(())
    }

    /// Names of store variables that the optimiser must not update (the centres).
    pub fn is_state(name: &str) -> bool {
        name.starts_with("loss.")
    }
}
