//! Every pair of a labelled data set as a verification set: genuine (same label) and impostor
//! pairs of all images, for small real sets such as a folder of identities (`all-pairs`).

use super::packed::{DataError, PackedDataset, PackedWriter};
use serde_json::{json, Value};
use std::path::Path;

/// Counts of the pairs written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairCounts {
    /// Pairs of two images with the same label.
    pub genuine: usize,
    /// Pairs of two images with different labels.
    pub impostor: usize,
}

/// Writes `src`'s images (with labels, landmarks, ground truth and class names) to `out` as a
/// verification set whose pairs are all `(i, j)`, `i < j`. Refuses more than `max_images`
/// images (the pair count grows with the square).
pub fn all_pairs(
    src: &PackedDataset,
    out: &Path,
    max_images: usize,
    provenance: Value,
) -> Result<PairCounts, DataError> {
    let n = src.len();
    if n < 2 {
        return Err(DataError::Invalid(format!(
            "{}: {n} image(s); all-pairs needs at least 2",
            src.dir().display()
        )));
    }
    if n > max_images {
        return Err(DataError::Invalid(format!(
            "{}: {n} images make {} pairs; all-pairs takes at most {max_images} images \
             (raise max_images, or build a pairs list)",
            src.dir().display(),
            n * (n - 1) / 2
        )));
    }
    let (h, w, _) = src.image_shape();
    let mut wr = PackedWriter::create(out, h, w)?;
    let mut buf = vec![0u8; h * w * 3];
    for i in 0..n {
        src.read_image(i, &mut buf)?;
        wr.push(&buf, src.label(i), src.landmarks(i), src.truth(i))?;
    }
    let mut pairs = Vec::with_capacity(n * (n - 1) / 2);
    let mut c = PairCounts {
        genuine: 0,
        impostor: 0,
    };
    for i in 0..n {
        for j in i + 1..n {
            let same = src.label(i) == src.label(j);
            if same {
                c.genuine += 1;
            } else {
                c.impostor += 1;
            }
            pairs.push((i as u32, j as u32, same));
        }
    }
    wr.set_pairs(pairs);
    if let Some(names) = src.metadata().get("class_names").and_then(Value::as_array) {
        let names = names
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        wr.set_class_names(names);
    }
    wr.set_meta(
        "all_pairs",
        json!({"genuine": c.genuine, "impostor": c.impostor}),
    );
    wr.finish(provenance)?;
    Ok(c)
}
