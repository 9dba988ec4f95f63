//! Which images make up batch `step`: a pure function of (seed, step), so a resumed run sees the
//! batches the uninterrupted run would have.
//!
//! - [`BatchSampler::Epochs`]: global positions `step·B .. step·B + B` over seeded per-epoch
//!   permutations of the data set (classification losses).
//! - [`BatchSampler::Identities`]: P identities × K images (triplet loss). Identity slots
//!   `step·P .. step·P + P` run over seeded per-epoch permutations of the identities that have at
//!   least two images; identity slot g takes K of its images from a permutation seeded by g
//!   (cycling when it has fewer than K). At an epoch boundary an identity may occur twice in a
//!   batch; its images then simply share a label.

use super::{FaceSource, TrainError};
use crate::util::rng::stream;

pub(crate) const ORDER: u64 = 1;
const IDENTITY_ORDER: u64 = 4;
const IDENTITY_IMAGES: u64 = 5;

/// Seeded permutation of `0..n` for `epoch` of stream `purpose`.
pub(crate) fn epoch_order(n: usize, seed: u64, purpose: u64, epoch: u64) -> Vec<usize> {
    let mut rng = stream(seed, purpose, epoch);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

/// Batch composition, with the current epoch's permutation cached.
pub enum BatchSampler {
    /// Seeded epochs over all images.
    Epochs {
        n: usize,
        batch: usize,
        seed: u64,
        cache: (u64, Vec<usize>),
    },
    /// P identities × K images.
    Identities {
        by_identity: Vec<Vec<usize>>,
        p: usize,
        k: usize,
        seed: u64,
        cache: (u64, Vec<usize>),
    },
}

impl BatchSampler {
    /// Epoch sampler over `n` images.
    pub fn epochs(n: usize, batch: usize, seed: u64) -> Self {
        BatchSampler::Epochs {
            n,
            batch,
            seed,
            cache: (u64::MAX, vec![]),
        }
    }

    /// P×K sampler over the identities of `data` that have at least two images.
    pub fn identities(
        data: &dyn FaceSource,
        p: usize,
        k: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let mut by_identity = vec![Vec::new(); data.num_classes()];
        for i in 0..data.len() {
            let l = data.label(i) as usize;
            if l < by_identity.len() {
                by_identity[l].push(i);
            }
        }
        by_identity.retain(|v| v.len() >= 2);
        if by_identity.len() < p {
            return Err(TrainError::Invalid(format!(
                "triplet batches need {p} identities with at least 2 images each (batch_size / \
                 triplet_k), the training set has {}",
                by_identity.len()
            )));
        }
        Ok(BatchSampler::Identities {
            by_identity,
            p,
            k,
            seed,
            cache: (u64::MAX, vec![]),
        })
    }

    /// Data set indices of batch `step`.
    pub fn batch(&mut self, step: u64) -> Vec<usize> {
        match self {
            BatchSampler::Epochs {
                n,
                batch,
                seed,
                cache,
            } => {
                let (n, bs) = (*n as u64, *batch as u64);
                (0..bs)
                    .map(|j| {
                        let g = step * bs + j;
                        let epoch = g / n;
                        if cache.0 != epoch {
                            *cache = (epoch, epoch_order(n as usize, *seed, ORDER, epoch));
                        }
                        cache.1[(g % n) as usize]
                    })
                    .collect()
            }
            BatchSampler::Identities {
                by_identity,
                p,
                k,
                seed,
                cache,
            } => {
                let ids = by_identity.len() as u64;
                let mut out = Vec::with_capacity(*p * *k);
                for j in 0..*p as u64 {
                    let g = step * *p as u64 + j;
                    let epoch = g / ids;
                    if cache.0 != epoch {
                        *cache = (
                            epoch,
                            epoch_order(ids as usize, *seed, IDENTITY_ORDER, epoch),
                        );
                    }
                    let images = &by_identity[cache.1[(g % ids) as usize]];
                    let perm = epoch_order(images.len(), *seed, IDENTITY_IMAGES, g);
                    out.extend((0..*k).map(|i| images[perm[i % perm.len()]]));
                }
                out
            }
        }
    }
}
