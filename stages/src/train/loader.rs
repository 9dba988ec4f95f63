//! The background batch loader: the next batches are sampled, read (decoded), flipped,
//! resized, normalised and uploaded to the device on a thread of their own while the current
//! step computes, at most `ahead` ready at a time, and handed out in step order.
//!
//! What each step gets does not depend on timing: batch `s` is a function of `s` alone (the
//! sampler and the flip streams are indexed by step), computed by one thread in step order.
//! The loader thread reads and converts with a one-thread rayon pool of its own, so a stage
//! given `cpu: K` slots computes on K threads plus this one, mostly waiting on I/O.

use super::sampler::BatchSampler;
use super::{FaceSource, TrainError};
use crate::models::Normalisation;
use crate::util::rng::stream;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};

/// The stream purpose of the per-image flip decisions (stream 1 (epoch order) and 4, 5
/// (identity batches) are the sampler's, 3 the loss's sampling).
const FLIP: u64 = 2;

/// One step's batch, ready for the forward pass.
pub struct Batch {
    /// The step it is for.
    pub step: u64,
    /// Data set indices.
    pub indices: Vec<usize>,
    /// Their labels.
    pub labels: Vec<u32>,
    /// Which images are mirrored.
    pub flips: Vec<bool>,
    /// The images as read (HWC RGB u8), for a second input size (a distillation teacher).
    pub raw: Vec<Vec<u8>>,
    /// The network input `[B, 3, size, size]` on the device.
    pub x: Tensor,
}

/// How batches are made.
pub struct BatchPlan {
    /// Mirror images at random (per step and image).
    pub flip: bool,
    /// Seed of the flip streams.
    pub seed: u64,
    /// Network input size and normalisation.
    pub size: usize,
    pub norm: Normalisation,
    /// Images per batch (flip decisions are drawn for this many per step).
    pub batch_size: usize,
}

/// Makes batch `step` (what the loader thread does, also callable directly).
pub fn make_batch(
    data: &dyn FaceSource,
    sampler: &mut BatchSampler,
    plan: &BatchPlan,
    step: u64,
    dev: &Device,
) -> Result<Batch, TrainError> {
    let bs = plan.batch_size as u64;
    let indices = sampler.batch(step);
    let flips: Vec<bool> = (0..bs)
        .map(|j| plan.flip && stream(plan.seed, FLIP, step * bs + j).next_u64() & 1 == 1)
        .collect();
    let raw = data.read_images(&indices)?;
    let labels: Vec<u32> = indices.iter().map(|&i| data.label(i)).collect();
    let (h, w, _) = data.image_shape();
    let x = batch_tensor(&raw, (h, w), &flips, plan.size, plan.norm, dev)?;
    Ok(Batch {
        step,
        indices,
        labels,
        flips,
        raw,
        x,
    })
}

/// Runs `body` with a receiver of the batches of steps `first..end`, made on a background
/// thread at most `ahead` steps ahead. When `body` returns (done, failed or interrupted) the
/// loader stops at its next batch.
pub fn with_loader<T>(
    data: &dyn FaceSource,
    mut sampler: BatchSampler,
    plan: &BatchPlan,
    (first, end): (u64, u64),
    ahead: usize,
    dev: &Device,
    body: impl FnOnce(&Receiver<Result<Batch, TrainError>>) -> T,
) -> T {
    let (tx, rx) = sync_channel(ahead.max(1));
    std::thread::scope(|s| {
        s.spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build();
            let mut make = |step| make_batch(data, &mut sampler, plan, step, dev);
            for step in first..end {
                let batch = match &pool {
                    Ok(pool) => pool.install(|| make(step)),
                    Err(e) => Err(TrainError::Invalid(format!(
                        "cannot start the batch loader's thread pool: {e}"
                    ))),
                };
                let failed = batch.is_err();
                // A closed channel means training ended: stop.
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        let out = body(&rx);
        // Unblocks a loader waiting to send.
        drop(rx);
        out
    })
}

/// Images of one batch resized and normalised into an NCHW tensor.
pub fn batch_tensor(
    raw: &[Vec<u8>],
    (h, w): (usize, usize),
    flips: &[bool],
    size: usize,
    norm: Normalisation,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let per = 3 * size * size;
    let mut data = vec![0f32; raw.len() * per];
    data.par_chunks_mut(per)
        .zip(raw.par_iter().zip(flips.par_iter()))
        .for_each(|(out, (img, &flip))| {
            resize_normalise(img, h, w, size, flip, norm, out);
        });
    Tensor::from_vec(data, (raw.len(), 3, size, size), dev)
}

/// Bilinear resize (half-pixel centres, like OpenCV's `INTER_LINEAR`) of HWC RGB `img` to
/// `size`×`size`, optional horizontal flip, `(x − mean)/std`, written CHW.
fn resize_normalise(
    img: &[u8],
    h: usize,
    w: usize,
    size: usize,
    flip: bool,
    norm: Normalisation,
    out: &mut [f32],
) {
    let (sy, sx) = (h as f32 / size as f32, w as f32 / size as f32);
    let (mean, inv) = (norm.mean as f32, 1.0 / norm.std as f32);
    for oy in 0..size {
        let fy = ((oy as f32 + 0.5) * sy - 0.5).clamp(0.0, (h - 1) as f32);
        let y0 = fy.floor() as usize;
        let y1 = (y0 + 1).min(h - 1);
        let dy = fy - y0 as f32;
        for ox in 0..size {
            let sxo = if flip { size - 1 - ox } else { ox };
            let fx = ((sxo as f32 + 0.5) * sx - 0.5).clamp(0.0, (w - 1) as f32);
            let x0 = fx.floor() as usize;
            let x1 = (x0 + 1).min(w - 1);
            let dx = fx - x0 as f32;
            for c in 0..3 {
                let p = |y: usize, x: usize| img[(y * w + x) * 3 + c] as f32;
                let v = (p(y0, x0) * (1.0 - dx) + p(y0, x1) * dx) * (1.0 - dy)
                    + (p(y1, x0) * (1.0 - dx) + p(y1, x1) * dx) * dy;
                out[c * size * size + oy * size + ox] = (v - mean) * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data set of `n` 4x4 images whose pixels are their index.
    struct Numbered(usize);
    impl FaceSource for Numbered {
        fn len(&self) -> usize {
            self.0
        }
        fn num_classes(&self) -> usize {
            self.0 / 2
        }
        fn image_shape(&self) -> (usize, usize, usize) {
            (4, 4, 3)
        }
        fn label(&self, i: usize) -> u32 {
            (i / 2) as u32
        }
        fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), TrainError> {
            out.fill(i as u8);
            Ok(())
        }
    }

    fn plan() -> BatchPlan {
        BatchPlan {
            flip: true,
            seed: 9,
            size: 4,
            norm: Normalisation {
                mean: 127.5,
                std: 127.5,
            },
            batch_size: 6,
        }
    }

    #[test]
    fn the_loader_hands_out_the_direct_batches_in_step_order() {
        let data = Numbered(40);
        let dev = Device::Cpu;
        let mut direct_sampler = BatchSampler::epochs(40, 6, 9);
        let direct: Vec<Batch> = (3..20)
            .map(|s| make_batch(&data, &mut direct_sampler, &plan(), s, &dev).unwrap())
            .collect();
        for ahead in [1, 4] {
            let loaded: Vec<Batch> = with_loader(
                &data,
                BatchSampler::epochs(40, 6, 9),
                &plan(),
                (3, 20),
                ahead,
                &dev,
                |rx| rx.iter().map(|b| b.unwrap()).collect(),
            );
            assert_eq!(loaded.len(), direct.len());
            for (a, b) in loaded.iter().zip(&direct) {
                assert_eq!(
                    (a.step, &a.indices, &a.labels, &a.flips),
                    (b.step, &b.indices, &b.labels, &b.flips)
                );
                let d = (&a.x - &b.x).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            }
            // Both flips and plain images occur, and the pixels follow the indices.
            assert!(loaded.iter().any(|b| b.flips.iter().any(|&f| f)));
            assert!(loaded.iter().any(|b| b.flips.iter().any(|&f| !f)));
            assert_eq!(loaded[0].raw[0][0] as usize, loaded[0].indices[0]);
        }
    }

    #[test]
    fn ending_early_stops_the_loader() {
        let data = Numbered(40);
        let got = with_loader(
            &data,
            BatchSampler::epochs(40, 6, 9),
            &plan(),
            (0, 1_000_000),
            2,
            &Device::Cpu,
            |rx| {
                rx.iter()
                    .take(3)
                    .map(|b| b.unwrap().step)
                    .collect::<Vec<_>>()
            },
        );
        // Returning at all shows the loader stopped (the scope joins it).
        assert_eq!(got, [0, 1, 2]);
    }

    #[test]
    fn a_read_error_reaches_the_trainer_and_ends_the_loader() {
        struct Broken;
        impl FaceSource for Broken {
            fn len(&self) -> usize {
                10
            }
            fn num_classes(&self) -> usize {
                5
            }
            fn image_shape(&self) -> (usize, usize, usize) {
                (4, 4, 3)
            }
            fn label(&self, i: usize) -> u32 {
                (i / 2) as u32
            }
            fn read_image(&self, i: usize, _: &mut [u8]) -> Result<(), TrainError> {
                Err(TrainError::Invalid(format!("image {i} is damaged")))
            }
        }
        let got: Vec<Result<Batch, TrainError>> = with_loader(
            &Broken,
            BatchSampler::epochs(10, 6, 9),
            &plan(),
            (0, 100),
            2,
            &Device::Cpu,
            |rx| rx.iter().collect(),
        );
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0], Err(TrainError::Invalid(m)) if m.contains("damaged")));
    }
}
