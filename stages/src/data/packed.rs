//! The packed data set: the one artifact format every data stage writes and every training and
//! evaluation stage reads.
//!
//! A packed data set is a directory (see `docs/formats.md` for the byte layout):
//!
//! - `images.u8`: all images as raw HWC RGB `u8`, fixed stride `h*w*3`, memory-mapped, so image
//!   `i` is a slice at `i * stride` with no decoding and no whole-file read;
//! - `records.bin`: one 64-byte little-endian record per image (label, true label, 5 landmarks,
//!   ground-truth flags), memory-mapped;
//! - `pairs.bin` (verification sets only): `u32 a, u32 b, u32 same` per pair;
//! - `dataset.json`: counts, image shape, class count, skipped inputs with reasons and
//!   provenance. It is written last: a directory without it is not a data set.

use memmap2::Mmap;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Version of the on-disk layout written into `dataset.json` as `format`.
pub const FORMAT: &str = "fpipe-packed-1";
/// Bytes per entry of `records.bin`.
pub const RECORD_BYTES: usize = 64;

/// Largest image side a packed data set may have (the largest a JPEG can have).
pub const MAX_SIDE: usize = 65_535;
/// How many more classes than images a data set may have. Labels are `0..num_classes`, and
/// every consumer keeps per-class tables, so a class count far above the image count (from
/// a stray label such as 2^62) would make each of them allocate without bound.
pub const MAX_EMPTY_CLASSES: usize = 1 << 20;

const F_LANDMARKS: u32 = 1;
const F_LABEL_NOISE: u32 = 2;
const F_LOW_QUALITY: u32 = 4;
const F_OUT_OF_DOMAIN: u32 = 8;
const F_TRUE_LABEL: u32 = 16;

/// Ground truth about one image, where the source knows it (synthetic data does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageTruth {
    /// The identity the image really shows, when it differs from or confirms the label.
    pub true_label: Option<i64>,
    /// The label was deliberately replaced by another identity's.
    pub label_noise: bool,
    /// The image was deliberately degraded (blur, dark, noise, occlusion).
    pub low_quality: bool,
    /// The image is not a face.
    pub out_of_domain: bool,
}

/// Errors of the data formats. Every variant names the file and, where it applies, the
/// position (byte offset, record, line) so the user can find the bad input.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not what the format requires.
    #[error("{path}: {position}: {message}")]
    Format {
        path: PathBuf,
        /// Where in the file, e.g. `byte offset 1234`, `record 7`, `line 3`.
        position: String,
        message: String,
    },
    /// A caller passed an argument that cannot work (wrong buffer size, index out of range).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    /// A format error at `position` of `path`.
    pub fn format(path: &Path, position: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.to_path_buf(),
            position: position.into(),
            message: message.into(),
        }
    }

    /// The message with paths under `base` written relative to it (`alice/1.jpg` rather
    /// than `/home/me/faces/alice/1.jpg`), for messages kept in an artifact, which must not
    /// depend on where the input lies on a machine.
    pub fn to_string_relative_to(&self, base: &Path) -> String {
        let rel = |p: &Path| match p.strip_prefix(base) {
            Ok(r) if !r.as_os_str().is_empty() => r.display().to_string(),
            _ => p.display().to_string(),
        };
        match self {
            DataError::Io { path, source } => format!("{}: {source}", rel(path)),
            DataError::Format {
                path,
                position,
                message,
            } => format!("{}: {position}: {message}", rel(path)),
            DataError::Invalid(m) => {
                let prefix = base.join("");
                let prefix = prefix.to_string_lossy();
                if prefix.is_empty() {
                    m.clone()
                } else {
                    m.replace(prefix.as_ref(), "")
                }
            }
        }
    }
}

/// Maps a file read-only; an empty file gives `None` (an empty map is not portable).
fn map_file(path: &Path) -> Result<Option<Mmap>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: artifacts are immutable once committed; nothing writes the file while mapped.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
    Ok(Some(map))
}

/// A packed data set opened for reading: images and records are memory-mapped, so opening is
/// cheap and reads are random access.
pub struct PackedDataset {
    dir: PathBuf,
    meta: Value,
    len: usize,
    height: usize,
    width: usize,
    num_classes: usize,
    images: Option<Mmap>,
    records: Option<Mmap>,
    pairs: Option<Vec<(u32, u32, bool)>>,
}

impl std::fmt::Debug for PackedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedDataset")
            .field("dir", &self.dir)
            .field("len", &self.len)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("num_classes", &self.num_classes)
            .finish()
    }
}

fn meta_usize(meta: &Value, key: &str, path: &Path) -> Result<usize, DataError> {
    meta.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| DataError::format(path, format!("field `{key}`"), "missing or not a count"))
}

impl PackedDataset {
    /// Opens the packed data set in `dir` (memory-mapped with `memmap2`).
    pub fn open(dir: &Path) -> Result<PackedDataset, DataError> {
        let meta_path = dir.join("dataset.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| DataError::io(&meta_path, e))?;
        let meta: Value = serde_json::from_str(&text).map_err(|e| {
            DataError::format(
                &meta_path,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })?;
        if meta.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(DataError::format(
                &meta_path,
                "field `format`",
                format!("not a packed data set (expected format `{FORMAT}`)"),
            ));
        }
        let len = meta_usize(&meta, "images", &meta_path)?;
        let height = meta_usize(&meta, "height", &meta_path)?;
        let width = meta_usize(&meta, "width", &meta_path)?;
        let num_classes = meta_usize(&meta, "num_classes", &meta_path)?;
        for (key, side) in [("height", height), ("width", width)] {
            if !(1..=MAX_SIDE).contains(&side) {
                return Err(DataError::format(
                    &meta_path,
                    format!("field `{key}`"),
                    format!("{side} is not an image side in 1..={MAX_SIDE}"),
                ));
            }
        }
        if num_classes > len.saturating_add(MAX_EMPTY_CLASSES) {
            return Err(DataError::format(
                &meta_path,
                "field `num_classes`",
                format!(
                    "{num_classes} classes for {len} images: more than {MAX_EMPTY_CLASSES} \
                     classes would have no image; the file is corrupt"
                ),
            ));
        }
        let img_path = dir.join("images.u8");
        let images = map_file(&img_path)?;
        let have = images.as_ref().map_or(0, |m| m.len());
        let stride = height * width * 3; // <= 3 * MAX_SIDE^2: no overflow
        if len.checked_mul(stride) != Some(have) {
            return Err(DataError::format(
                &img_path,
                format!("byte {have}"),
                format!(
                    "size {have} bytes, expected {} ({len} images of {height}x{width}x3)",
                    len as u128 * stride as u128
                ),
            ));
        }
        let rec_path = dir.join("records.bin");
        let records = map_file(&rec_path)?;
        let have = records.as_ref().map_or(0, |m| m.len());
        if len.checked_mul(RECORD_BYTES) != Some(have) {
            return Err(DataError::format(
                &rec_path,
                format!("byte {have}"),
                format!(
                    "size {have} bytes, expected {} ({len} records of {RECORD_BYTES} bytes)",
                    len as u128 * RECORD_BYTES as u128
                ),
            ));
        }
        // Every consumer indexes per-class tables by label: check them all once here.
        if let Some(m) = &records {
            for (i, r) in m.chunks_exact(RECORD_BYTES).enumerate() {
                let l = i64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                if !(0..num_classes as i64).contains(&l) {
                    return Err(DataError::format(
                        &rec_path,
                        format!("record {i}"),
                        format!(
                            "label {l} is not a class id in 0..{num_classes} (`num_classes` \
                             of dataset.json); the data set is corrupt"
                        ),
                    ));
                }
            }
        }
        let pairs_path = dir.join("pairs.bin");
        let pairs = if let Some(n_pairs) = meta.get("pairs").and_then(Value::as_u64) {
            let bytes = std::fs::read(&pairs_path).map_err(|e| DataError::io(&pairs_path, e))?;
            if bytes.len() % 12 != 0 {
                return Err(DataError::format(
                    &pairs_path,
                    format!("byte {}", bytes.len()),
                    "size is not a multiple of 12",
                ));
            }
            let mut v = Vec::with_capacity(bytes.len() / 12);
            for (k, c) in bytes.chunks_exact(12).enumerate() {
                let a = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let b = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
                let s = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
                if a as usize >= len || b as usize >= len {
                    return Err(DataError::format(
                        &pairs_path,
                        format!("pair {k}"),
                        format!("image index out of range ({a}, {b}) for {len} images"),
                    ));
                }
                v.push((a, b, s != 0));
            }
            if v.len() as u64 != n_pairs {
                return Err(DataError::format(
                    &pairs_path,
                    format!("byte {}", bytes.len()),
                    format!(
                        "{} pairs, but dataset.json says {n_pairs}; the data set is corrupt",
                        v.len()
                    ),
                ));
            }
            Some(v)
        } else {
            None
        };
        Ok(PackedDataset {
            dir: dir.to_path_buf(),
            meta,
            len,
            height,
            width,
            num_classes,
            images,
            records,
            pairs,
        })
    }

    /// Directory the data set was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Number of classes; labels are `0..num_classes`.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }
    /// `(height, width, 3)`: every image has this shape.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        (self.height, self.width, 3)
    }
    /// The whole `dataset.json` (counts, skipped inputs, provenance).
    pub fn metadata(&self) -> &Value {
        &self.meta
    }

    /// A short name for chart titles: the file or folder it was made from, else the kind of
    /// stage that made it and its split (`synthetic-faces pairs`), else `data`.
    pub fn display_name(&self) -> String {
        let prov = &self.meta["provenance"];
        let from_path = ["path", "source", "file", "folder"].iter().find_map(|k| {
            prov["params"][k]
                .as_str()
                .or_else(|| prov[k].as_str())
                .and_then(|p| Path::new(p).file_stem())
                .map(|s| s.to_string_lossy().into_owned())
        });
        if let Some(p) = from_path {
            return p;
        }
        match (prov["kind"].as_str(), prov["split"].as_str()) {
            (Some(k), Some(s)) => format!("{k} {s}"),
            (Some(k), None) => k.to_string(),
            _ => "data".to_string(),
        }
    }

    fn record(&self, i: usize) -> &[u8] {
        assert!(
            i < self.len,
            "image index {i} out of range ({} images)",
            self.len
        );
        match &self.records {
            Some(m) => &m[i * RECORD_BYTES..(i + 1) * RECORD_BYTES],
            None => &[],
        }
    }

    /// Label of image `i` (panics if `i >= len()`, like slice indexing).
    pub fn label(&self, i: usize) -> i64 {
        let r = self.record(i);
        i64::from_le_bytes(r[0..8].try_into().expect("8 bytes"))
    }

    /// Image `i` as a borrowed HWC RGB slice of the mapped file (zero copy).
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(
            i < self.len,
            "image index {i} out of range ({} images)",
            self.len
        );
        let stride = self.height * self.width * 3;
        match &self.images {
            Some(m) => &m[i * stride..(i + 1) * stride],
            None => &[],
        }
    }

    /// Copies image `i` (HWC RGB `u8`) into `out`, which must hold `h*w*3` bytes.
    pub fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), DataError> {
        if i >= self.len {
            return Err(DataError::Invalid(format!(
                "{}: image index {i} out of range ({} images)",
                self.dir.display(),
                self.len
            )));
        }
        let stride = self.height * self.width * 3;
        if out.len() != stride {
            return Err(DataError::Invalid(format!(
                "read_image: buffer of {} bytes, image needs {stride}",
                out.len()
            )));
        }
        out.copy_from_slice(self.image(i));
        Ok(())
    }

    fn flags(&self, i: usize) -> u32 {
        let r = self.record(i);
        u32::from_le_bytes(r[56..60].try_into().expect("4 bytes"))
    }

    /// The 5 landmarks of image `i` in pixels of the stored image (left eye, right eye,
    /// nose, left mouth corner, right mouth corner), if known.
    pub fn landmarks(&self, i: usize) -> Option<[[f32; 2]; 5]> {
        if self.flags(i) & F_LANDMARKS == 0 {
            return None;
        }
        let r = self.record(i);
        let mut out = [[0f32; 2]; 5];
        for (k, p) in out.iter_mut().enumerate() {
            for (j, v) in p.iter_mut().enumerate() {
                let o = 16 + (k * 2 + j) * 4;
                *v = f32::from_le_bytes(r[o..o + 4].try_into().expect("4 bytes"));
            }
        }
        Some(out)
    }

    /// Ground truth of image `i` (all false / `None` where the source does not know).
    pub fn truth(&self, i: usize) -> ImageTruth {
        let f = self.flags(i);
        let r = self.record(i);
        ImageTruth {
            true_label: (f & F_TRUE_LABEL != 0)
                .then(|| i64::from_le_bytes(r[8..16].try_into().expect("8 bytes"))),
            label_noise: f & F_LABEL_NOISE != 0,
            low_quality: f & F_LOW_QUALITY != 0,
            out_of_domain: f & F_OUT_OF_DOMAIN != 0,
        }
    }

    /// Verification pairs `(image a, image b, same identity)` when this is a verification set.
    pub fn pairs(&self) -> Option<&[(u32, u32, bool)]> {
        self.pairs.as_deref()
    }

    /// Images per label, indexed by label (`num_classes()` entries).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0usize; self.num_classes];
        for i in 0..self.len {
            let l = self.label(i);
            if l >= 0 && (l as usize) < c.len() {
                c[l as usize] += 1;
            }
        }
        c
    }
}

/// Writes a packed data set into a directory, one image at a time. Nothing is a data set
/// until [`PackedWriter::finish`] writes `dataset.json`.
pub struct PackedWriter {
    dir: PathBuf,
    height: usize,
    width: usize,
    images: BufWriter<File>,
    records: BufWriter<File>,
    count: usize,
    max_label: i64,
    pairs: Option<Vec<(u32, u32, bool)>>,
    skipped: BTreeMap<String, u64>,
    class_names: Option<Vec<String>>,
    extra: serde_json::Map<String, Value>,
}

fn create_file(path: &Path) -> Result<BufWriter<File>, DataError> {
    let f = File::create(path).map_err(|e| DataError::io(path, e))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

impl PackedWriter {
    /// Starts a data set of `height` x `width` RGB images in `dir` (created if missing).
    pub fn create(dir: &Path, height: usize, width: usize) -> Result<PackedWriter, DataError> {
        if !(1..=MAX_SIDE).contains(&height) || !(1..=MAX_SIDE).contains(&width) {
            return Err(DataError::Invalid(format!(
                "image size {height}x{width}: both sides must be in 1..={MAX_SIDE}"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        Ok(PackedWriter {
            dir: dir.to_path_buf(),
            height,
            width,
            images: create_file(&dir.join("images.u8"))?,
            records: create_file(&dir.join("records.bin"))?,
            count: 0,
            max_label: -1,
            pairs: None,
            skipped: BTreeMap::new(),
            class_names: None,
            extra: serde_json::Map::new(),
        })
    }

    /// Images pushed so far.
    pub fn len(&self) -> usize {
        self.count
    }
    /// True before the first push.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// `(height, width)` of the images this writer takes.
    pub fn size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Appends one image (HWC RGB, `h*w*3` bytes) with its label (`>= 0`), landmarks and
    /// ground truth.
    pub fn push(
        &mut self,
        image: &[u8],
        label: i64,
        landmarks: Option<[[f32; 2]; 5]>,
        truth: ImageTruth,
    ) -> Result<(), DataError> {
        let stride = self.height * self.width * 3;
        if image.len() != stride {
            return Err(DataError::Invalid(format!(
                "image {}: {} bytes, expected {stride} ({}x{}x3)",
                self.count,
                image.len(),
                self.height,
                self.width
            )));
        }
        if label < 0 {
            return Err(DataError::Invalid(format!(
                "image {}: label {label} is negative",
                self.count
            )));
        }
        let mut rec = [0u8; RECORD_BYTES];
        rec[0..8].copy_from_slice(&label.to_le_bytes());
        let mut flags = 0u32;
        if let Some(t) = truth.true_label {
            rec[8..16].copy_from_slice(&t.to_le_bytes());
            flags |= F_TRUE_LABEL;
        }
        if let Some(lm) = landmarks {
            for (k, p) in lm.iter().enumerate() {
                for (j, v) in p.iter().enumerate() {
                    let o = 16 + (k * 2 + j) * 4;
                    rec[o..o + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            flags |= F_LANDMARKS;
        }
        if truth.label_noise {
            flags |= F_LABEL_NOISE;
        }
        if truth.low_quality {
            flags |= F_LOW_QUALITY;
        }
        if truth.out_of_domain {
            flags |= F_OUT_OF_DOMAIN;
        }
        rec[56..60].copy_from_slice(&flags.to_le_bytes());
        let img_path = self.dir.join("images.u8");
        self.images
            .write_all(image)
            .map_err(|e| DataError::io(&img_path, e))?;
        let rec_path = self.dir.join("records.bin");
        self.records
            .write_all(&rec)
            .map_err(|e| DataError::io(&rec_path, e))?;
        self.count += 1;
        self.max_label = self.max_label.max(label);
        Ok(())
    }

    /// Marks the data set as a verification set with these pairs (indices into the images).
    pub fn set_pairs(&mut self, pairs: Vec<(u32, u32, bool)>) {
        self.pairs = Some(pairs);
    }

    /// Counts `count` inputs skipped for `reason` (reported by `fpipe inspect`).
    pub fn add_skipped(&mut self, reason: &str, count: u64) {
        *self.skipped.entry(reason.to_string()).or_insert(0) += count;
    }

    /// Names of the classes, indexed by label (e.g. identity folder names).
    pub fn set_class_names(&mut self, names: Vec<String>) {
        self.class_names = Some(names);
    }

    /// Adds a top-level field to `dataset.json` (e.g. corruption fractions).
    pub fn set_meta(&mut self, key: &str, value: Value) {
        self.extra.insert(key.to_string(), value);
    }

    /// Flushes the images and records, writes `pairs.bin` if any, and writes `dataset.json`
    /// last with `provenance` (where the data came from: stage kind, parameters, source file).
    pub fn finish(mut self, provenance: Value) -> Result<(), DataError> {
        let img_path = self.dir.join("images.u8");
        self.images
            .flush()
            .map_err(|e| DataError::io(&img_path, e))?;
        let rec_path = self.dir.join("records.bin");
        self.records
            .flush()
            .map_err(|e| DataError::io(&rec_path, e))?;
        // Labels are >= 0 (checked by `push`), so this is the largest label plus one.
        let num_classes = (self.max_label as u64).wrapping_add(1);
        if num_classes > self.count.saturating_add(MAX_EMPTY_CLASSES) as u64 {
            return Err(DataError::Invalid(format!(
                "{}: labels go up to {}, for {} images: more than {MAX_EMPTY_CLASSES} classes \
                 would have no image; number the identities 0, 1, 2, ...",
                self.dir.display(),
                self.max_label,
                self.count
            )));
        }
        let mut meta = json!({
            "format": FORMAT,
            "images": self.count,
            "height": self.height,
            "width": self.width,
            "channels": 3,
            "num_classes": num_classes,
            "encoding": "raw-hwc-rgb-u8",
        });
        if let Some(pairs) = &self.pairs {
            let path = self.dir.join("pairs.bin");
            let mut bytes = Vec::with_capacity(pairs.len() * 12);
            for (k, &(a, b, s)) in pairs.iter().enumerate() {
                if a as usize >= self.count || b as usize >= self.count {
                    return Err(DataError::Invalid(format!(
                        "pair {k}: image index ({a}, {b}) out of range ({} images)",
                        self.count
                    )));
                }
                bytes.extend_from_slice(&a.to_le_bytes());
                bytes.extend_from_slice(&b.to_le_bytes());
                bytes.extend_from_slice(&(s as u32).to_le_bytes());
            }
            std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
            meta["pairs"] = json!(pairs.len());
            meta["same_pairs"] = json!(pairs.iter().filter(|p| p.2).count());
        }
        meta["skipped"] = json!(self.skipped);
        if let Some(names) = self.class_names.take() {
            meta["class_names"] = json!(names);
        }
        for (k, v) in std::mem::take(&mut self.extra) {
            meta[k] = v;
        }
        meta["provenance"] = provenance;
        let path = self.dir.join("dataset.json");
        let text = serde_json::to_string_pretty(&meta)
            .map_err(|e| DataError::Invalid(format!("dataset.json: {e}")))?;
        std::fs::write(&path, text).map_err(|e| DataError::io(&path, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_images_labels_landmarks_truth_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::create(dir.path(), 4, 3).unwrap();
        let lm = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.5, 10.25]];
        for i in 0..5u8 {
            let img: Vec<u8> = (0..36).map(|k| k as u8 ^ i).collect();
            let truth = ImageTruth {
                true_label: (i == 2).then_some(7),
                label_noise: i == 2,
                low_quality: i == 3,
                out_of_domain: i == 4,
            };
            w.push(&img, i as i64 % 3, (i % 2 == 0).then_some(lm), truth)
                .unwrap();
        }
        w.set_pairs(vec![(0, 3, true), (1, 2, false)]);
        w.add_skipped("undecodable image", 2);
        w.finish(json!({"kind": "test"})).unwrap();

        let d = PackedDataset::open(dir.path()).unwrap();
        assert_eq!(d.len(), 5);
        assert_eq!(d.num_classes(), 3);
        assert_eq!(d.image_shape(), (4, 3, 3));
        let mut buf = vec![0u8; 36];
        for i in 0..5 {
            d.read_image(i, &mut buf).unwrap();
            let want: Vec<u8> = (0..36).map(|k| k as u8 ^ i as u8).collect();
            assert_eq!(buf, want);
            assert_eq!(d.label(i), i as i64 % 3);
            assert_eq!(d.landmarks(i), (i % 2 == 0).then_some(lm));
        }
        assert_eq!(d.truth(0), ImageTruth::default());
        assert_eq!(d.truth(2).true_label, Some(7));
        assert!(d.truth(2).label_noise && d.truth(3).low_quality && d.truth(4).out_of_domain);
        assert_eq!(d.pairs().unwrap(), &[(0, 3, true), (1, 2, false)]);
        assert_eq!(d.class_counts(), vec![2, 2, 1]);
        assert_eq!(d.metadata()["skipped"]["undecodable image"], 2);
        assert!(d.read_image(5, &mut buf).is_err());
        assert!(d.read_image(0, &mut buf[..10]).is_err());
    }

    #[test]
    fn unfinished_or_truncated_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::create(dir.path(), 2, 2).unwrap();
        w.push(&[0u8; 12], 0, None, ImageTruth::default()).unwrap();
        assert!(w.push(&[0u8; 11], 0, None, ImageTruth::default()).is_err());
        assert!(w.push(&[0u8; 12], -1, None, ImageTruth::default()).is_err());
        w.finish(json!(null)).unwrap();
        assert!(PackedDataset::open(dir.path()).unwrap().pairs().is_none());
        // Truncate the image file: open reports the file and the size mismatch.
        let img = dir.path().join("images.u8");
        std::fs::write(&img, [0u8; 5]).unwrap();
        let e = PackedDataset::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("images.u8") && e.contains("expected 12"), "{e}");
        std::fs::remove_file(dir.path().join("dataset.json")).unwrap();
        let e = PackedDataset::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("dataset.json"), "{e}");
    }

    #[test]
    fn empty_dataset_opens() {
        let dir = tempfile::tempdir().unwrap();
        PackedWriter::create(dir.path(), 8, 8)
            .unwrap()
            .finish(json!({}))
            .unwrap();
        let d = PackedDataset::open(dir.path()).unwrap();
        assert!(d.is_empty());
        assert_eq!(d.num_classes(), 0);
    }
}
