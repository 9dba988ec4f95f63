//! IJB-B/C 1:1 template verification for `evaluate` (insightface `eval_ijbc.py`, docs/methods.md
//! §9): the protocol files, loose crops aligned with their 5 landmarks (`norm_crop`),
//! per-image feature `f(x) + f(flip x)` (not normalised: its norm is kept, insightface's
//! `use_norm_score`) times the detector score, media-mean within a template, sum over media,
//! L2 normalisation, cosine score per template pair, ROC and TPR at FPR 1e-6 … 1e-1.
//!
//! Folder layout (insightface's `IJB_release/IJBC`): `meta/<t>_face_tid_mid.txt`
//! (`image template media` per line), `meta/<t>_template_pair_label.txt` (`t1 t2 label`),
//! `meta/<t>_name_5pts_score.txt` (`image x1 y1 … x5 y5 score`, same images in the same order
//! as `face_tid_mid`), and the images in `loose_crop/`. `meta/` and `loose_crop/` may also be
//! the folder itself.

use super::verify::EvalResult;
use super::EvalError;
use crate::data::align::norm_crop;
use crate::eval::metrics::{auc, eer, pair_scores_cosine, pool_templates, roc, tpr_at_fpr};
use crate::train::artifact::LoadedModel;
use crate::train::trainer::batch_tensor;
use crate::train::{FaceSource, TrainError};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// One image of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct IjbImage {
    /// File name under `loose_crop/`.
    pub name: String,
    /// 5 landmarks in pixels of the loose crop.
    pub landmarks: [[f32; 2]; 5],
    /// Detector (faceness) score.
    pub score: f32,
    /// Template id.
    pub template: i64,
    /// Media id.
    pub media: i64,
}

/// An IJB protocol read from its files.
#[derive(Clone, Debug, PartialEq)]
pub struct IjbProtocol {
    /// Folder of the images.
    pub image_dir: PathBuf,
    /// The images, in file order.
    pub images: Vec<IjbImage>,
    /// Template pairs.
    pub pairs: Vec<(i64, i64)>,
    /// Same identity per pair.
    pub labels: Vec<bool>,
}

fn bad(path: &Path, line: usize, msg: impl std::fmt::Display) -> EvalError {
    EvalError::Protocol {
        path: path.to_path_buf(),
        line,
        msg: msg.to_string(),
    }
}

fn lines(path: &Path) -> Result<Vec<(usize, Vec<String>)>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::file(path, e))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.split_whitespace().map(str::to_string).collect()))
        .collect())
}

fn num<T: std::str::FromStr>(
    path: &Path,
    line: usize,
    s: &str,
    what: &str,
) -> Result<T, EvalError> {
    s.parse()
        .map_err(|_| bad(path, line, format!("{what} `{s}` is not a number")))
}

/// The one file in `dir` whose name ends with `suffix`.
fn find(dir: &Path, suffix: &str) -> Result<PathBuf, EvalError> {
    let rd = std::fs::read_dir(dir).map_err(|e| EvalError::file(dir, e))?;
    let mut found: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(EvalError::file(
            dir,
            format!("no `*{suffix}` (IJB protocol files: *_face_tid_mid.txt, *_template_pair_label.txt, *_name_5pts_score.txt)"),
        )),
        _ => Err(EvalError::file(dir, format!("more than one `*{suffix}`"))),
    }
}

/// Reads the protocol of the IJB folder `root` (see the module doc).
pub fn read_protocol(root: &Path) -> Result<IjbProtocol, EvalError> {
    let meta = if root.join("meta").is_dir() {
        root.join("meta")
    } else {
        root.to_path_buf()
    };
    let image_dir = if root.join("loose_crop").is_dir() {
        root.join("loose_crop")
    } else {
        root.to_path_buf()
    };
    let tid_path = find(&meta, "_face_tid_mid.txt")?;
    let pair_path = find(&meta, "_template_pair_label.txt")?;
    let lmk_path = find(&meta, "_name_5pts_score.txt")?;
    let tid = lines(&tid_path)?;
    let lmk = lines(&lmk_path)?;
    if tid.len() != lmk.len() {
        return Err(EvalError::Mismatch(format!(
            "{} lists {} images, {} lists {}",
            tid_path.display(),
            tid.len(),
            lmk_path.display(),
            lmk.len()
        )));
    }
    let mut images = Vec::with_capacity(tid.len());
    for ((tl, t), (ll, l)) in tid.iter().zip(&lmk) {
        if t.len() != 3 {
            return Err(bad(&tid_path, *tl, "expected `image template media`"));
        }
        if l.len() != 12 {
            return Err(bad(
                &lmk_path,
                *ll,
                format!(
                    "expected `image x1 y1 ... x5 y5 score` (12 fields), got {}",
                    l.len()
                ),
            ));
        }
        if t[0] != l[0] {
            return Err(bad(
                &lmk_path,
                *ll,
                format!("image `{}` where {} has `{}` (the files must list the same images in the same order)", l[0], tid_path.display(), t[0]),
            ));
        }
        let mut landmarks = [[0f32; 2]; 5];
        for (k, p) in landmarks.iter_mut().enumerate() {
            for (j, v) in p.iter_mut().enumerate() {
                *v = num(&lmk_path, *ll, &l[1 + 2 * k + j], "landmark")?;
            }
        }
        let score: f32 = num(&lmk_path, *ll, &l[11], "score")?;
        if !score.is_finite() || landmarks.iter().flatten().any(|v| !v.is_finite()) {
            return Err(bad(&lmk_path, *ll, "landmarks and score must be finite"));
        }
        images.push(IjbImage {
            name: t[0].clone(),
            landmarks,
            score,
            template: num(&tid_path, *tl, &t[1], "template id")?,
            media: num(&tid_path, *tl, &t[2], "media id")?,
        });
    }
    let mut pairs = Vec::new();
    let mut labels = Vec::new();
    for (ln, f) in lines(&pair_path)? {
        if f.len() != 3 {
            return Err(bad(&pair_path, ln, "expected `template1 template2 label`"));
        }
        pairs.push((
            num(&pair_path, ln, &f[0], "template id")?,
            num(&pair_path, ln, &f[1], "template id")?,
        ));
        labels.push(match f[2].as_str() {
            "1" => true,
            "0" => false,
            s => return Err(bad(&pair_path, ln, format!("label `{s}` is not 0 or 1"))),
        });
    }
    if images.is_empty() || pairs.is_empty() {
        return Err(EvalError::Mismatch(format!(
            "{}: the protocol lists no images or no pairs",
            root.display()
        )));
    }
    Ok(IjbProtocol {
        image_dir,
        images,
        pairs,
        labels,
    })
}

/// Result of the template protocol: the verification numbers and the score of every pair.
#[derive(Clone, Debug)]
pub struct IjbResult {
    /// TPR@FPR, AUC, EER and the ROC (`accuracy` fields are NaN: not part of the protocol).
    pub eval: EvalResult,
    /// Cosine score per template pair.
    pub scores: Vec<f32>,
    /// Templates with images.
    pub templates: usize,
}

/// The protocol's numbers from per-image flip-sum features `feats` (`dim` columns, rows in
/// protocol order, not normalised).
pub fn ijb_verify(
    feats: &[f32],
    dim: usize,
    p: &IjbProtocol,
    fprs: &[f64],
) -> Result<IjbResult, EvalError> {
    let templates: Vec<i64> = p.images.iter().map(|i| i.template).collect();
    let medias: Vec<i64> = p.images.iter().map(|i| i.media).collect();
    let weights: Vec<f32> = p.images.iter().map(|i| i.score).collect();
    let pooled = pool_templates(feats, dim, &templates, &medias, Some(&weights))?;
    let scores = pair_scores_cosine(&pooled, &p.pairs)?;
    let r = roc(&scores, &p.labels)?;
    let tprs = tpr_at_fpr(&r, fprs);
    Ok(IjbResult {
        eval: EvalResult {
            accuracy: f64::NAN,
            accuracy_std: f64::NAN,
            auc: auc(&r),
            eer: eer(&r),
            tpr_at_fpr: fprs.iter().copied().zip(tprs).collect(),
            roc: r.fpr.iter().copied().zip(r.tpr.iter().copied()).collect(),
            pairs: p.pairs.len(),
        },
        scores,
        templates: pooled.ids.len(),
    })
}

/// The protocol's loose crops, decoded and aligned (`norm_crop`) to `size` on demand.
struct AlignedCrops<'a> {
    p: &'a IjbProtocol,
    size: usize,
}

impl FaceSource for AlignedCrops<'_> {
    fn len(&self) -> usize {
        self.p.images.len()
    }
    fn num_classes(&self) -> usize {
        0
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        (self.size, self.size, 3)
    }
    fn label(&self, _: usize) -> u32 {
        0
    }
    fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), TrainError> {
        let im = &self.p.images[i];
        let path = self.p.image_dir.join(&im.name);
        let img = image::open(&path)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?
            .into_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        norm_crop(img.as_raw(), h, w, &im.landmarks, self.size, out).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: degenerate landmarks (all points equal)",
                path.display()
            ))
        })?;
        Ok(())
    }
}

/// Per-image features `f(x) + f(flip x)` (or `f(x)`), not normalised, of every protocol
/// image aligned to the model's input size.
pub fn ijb_features(
    model: &LoadedModel,
    p: &IjbProtocol,
    batch: usize,
    flip: bool,
    dev: &Device,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<f32>, EvalError> {
    let cfg = &model.card.architecture;
    let (size, norm) = (cfg.input_size(), cfg.normalisation());
    let src = AlignedCrops { p, size };
    let n = src.len();
    let mut out = Vec::with_capacity(n * cfg.embedding_size());
    let mut i = 0;
    while i < n {
        let j = (i + batch.max(1)).min(n);
        let mut raw = Vec::with_capacity(j - i);
        for k in i..j {
            let mut buf = vec![0u8; size * size * 3];
            src.read_image(k, &mut buf)?;
            raw.push(buf);
        }
        let x = batch_tensor(&raw, (size, size), &vec![false; j - i], size, norm, dev)?;
        let mut e = model.backbone.forward(&x, false)?;
        if flip {
            let xf = batch_tensor(&raw, (size, size), &vec![true; j - i], size, norm, dev)?;
            e = (e + model.backbone.forward(&xf, false)?)?;
        }
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        i = j;
        progress(i as u64, n as u64);
    }
    Ok(out)
}
