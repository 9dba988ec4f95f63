//! insightface / MXNet RecordIO (`train.rec` + `train.idx`), read and written (methods.md §10).
//!
//! Reading: the `.rec` is memory-mapped and records are found through the `.idx`, so any
//! record is read without scanning the file; split records (cflag 1/2/3, where the data
//! contained the magic number) are joined as dmlc-core does. Both the insightface convention
//! (record 0 is a header with `flag > 0` whose `label[0]` is one past the last image key) and
//! plain im2rec files (every key of the `.idx` is an image) are understood. Images are decoded
//! in parallel. Every problem names the file and the byte offset or `.idx` line.
//!
//! Writing: `train.rec`, `train.idx` and `property` in insightface's layout, readable by its
//! `MXFaceDataset` and MXNet's `MXIndexedRecordIO`; records whose payload contains the magic
//! at a 4-byte-aligned position are split exactly as dmlc-core's `RecordIOWriter` does.

use super::packed::{DataError, ImageTruth, PackedDataset, PackedWriter};
use super::synth::Monitor;
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The RecordIO frame magic.
pub const MAGIC: u32 = 0xCED7_230A;
/// Size of the image record header `<IfQQ`.
pub const IR_SIZE: usize = 24;

/// MXNet's `IRHeader`: `flag` extra labels follow the header when `flag > 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct IrHeader {
    /// Number of extra labels (0: the single label is in the header).
    pub flag: u32,
    /// `[label]` when `flag == 0`, else the `flag` labels that follow the header.
    pub label: Vec<f32>,
    /// Record id (im2rec: the image index).
    pub id: u64,
    /// Second id (unused by insightface).
    pub id2: u64,
}

/// Splits a record payload into its header and the rest (the encoded image).
pub fn unpack(payload: &[u8]) -> Result<(IrHeader, &[u8]), String> {
    if payload.len() < IR_SIZE {
        return Err(format!(
            "record of {} bytes is shorter than the {IR_SIZE}-byte IRHeader",
            payload.len()
        ));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([payload[o], payload[o + 1], payload[o + 2], payload[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let flag = u32_at(0);
    let label0 = f32::from_bits(u32_at(4));
    let (id, id2) = (u64_at(8), u64_at(16));
    let mut rest = &payload[IR_SIZE..];
    let label = if flag > 0 {
        let n = flag as usize;
        if rest.len() < n * 4 {
            return Err(format!(
                "IRHeader flag {flag} announces {n} labels but the record ends"
            ));
        }
        let l = rest[..n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        rest = &rest[n * 4..];
        l
    } else {
        vec![label0]
    };
    Ok((
        IrHeader {
            flag,
            label,
            id,
            id2,
        },
        rest,
    ))
}

/// MXNet's `recordio.pack`: header (with `flag` = number of labels when more than one label
/// is given, the header's own label then 0) followed by `data`.
pub fn pack(label: &[f32], id: u64, id2: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(IR_SIZE + label.len() * 4 + data.len());
    if label.len() == 1 {
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&label[0].to_le_bytes());
    } else {
        out.extend_from_slice(&(label.len() as u32).to_le_bytes());
        out.extend_from_slice(&0f32.to_le_bytes());
    }
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&id2.to_le_bytes());
    if label.len() != 1 {
        for l in label {
            out.extend_from_slice(&l.to_le_bytes());
        }
    }
    out.extend_from_slice(data);
    out
}

/// An indexed `.rec` file opened for random access.
pub struct RecReader {
    rec_path: PathBuf,
    idx_path: PathBuf,
    map: Option<Mmap>,
    /// `(key, offset, .idx line)` in `.idx` order.
    entries: Vec<(u64, u64, usize)>,
    by_key: HashMap<u64, usize>,
}

fn read_u32(map: &[u8], o: usize) -> Option<u32> {
    map.get(o..o.checked_add(4)?)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl RecReader {
    /// Opens `rec` and the `.idx` beside it (same name, extension `idx`).
    pub fn open(rec: &Path) -> Result<RecReader, DataError> {
        let idx_path = rec.with_extension("idx");
        let text = std::fs::read(&idx_path).map_err(|e| DataError::io(&idx_path, e))?;
        let text = String::from_utf8_lossy(&text);
        let mut entries = Vec::new();
        let mut by_key = HashMap::new();
        for (ln, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut it = line.split_whitespace();
            let parse = |s: Option<&str>| s.and_then(|v| v.parse::<u64>().ok());
            let (key, off) = match (parse(it.next()), parse(it.next())) {
                (Some(k), Some(o)) => (k, o),
                _ => {
                    return Err(DataError::format(
                        &idx_path,
                        format!("line {}", ln + 1),
                        format!("expected `key<TAB>offset`, found `{line}`"),
                    ))
                }
            };
            if by_key.insert(key, entries.len()).is_some() {
                return Err(DataError::format(
                    &idx_path,
                    format!("line {}", ln + 1),
                    format!("key {key} appears twice"),
                ));
            }
            entries.push((key, off, ln + 1));
        }
        let file = File::open(rec).map_err(|e| DataError::io(rec, e))?;
        let len = file.metadata().map_err(|e| DataError::io(rec, e))?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: input files are not modified while a stage reads them.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(rec, e))?)
        };
        Ok(RecReader {
            rec_path: rec.to_path_buf(),
            idx_path,
            map,
            entries,
            by_key,
        })
    }

    /// Path of the `.rec` file.
    pub fn rec_path(&self) -> &Path {
        &self.rec_path
    }
    /// Keys in `.idx` order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|e| e.0)
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The payload of the record starting at byte `offset`, split parts joined.
    pub fn read_at(&self, offset: u64) -> Result<Vec<u8>, DataError> {
        let map = self.bytes();
        let mut pos = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut part = 0;
        loop {
            let fail = |what: String| {
                DataError::format(&self.rec_path, format!("byte offset {pos}"), what)
            };
            let magic = read_u32(map, pos).ok_or_else(|| {
                fail(format!(
                    "truncated: the file ends ({} bytes) where a record header should be",
                    map.len()
                ))
            })?;
            if magic != MAGIC {
                return Err(fail(format!(
                    "no RecordIO magic here (found {magic:#010x}); the file is corrupt or the .idx disagrees with it"
                )));
            }
            let lrec = read_u32(map, pos.saturating_add(4))
                .ok_or_else(|| fail("truncated record header".into()))?;
            let cflag = (lrec >> 29) & 7;
            let len = (lrec & ((1 << 29) - 1)) as usize;
            let expect_start = part == 0;
            match (expect_start, cflag) {
                (true, 0) | (true, 1) | (false, 2) | (false, 3) => {}
                _ => {
                    return Err(fail(format!(
                        "part {part} of a record has continuation flag {cflag}; the .idx offset is not at a record start or the file is corrupt"
                    )))
                }
            }
            let start = pos + 8; // pos + 8 <= map.len(): the header was read
            let data = map.get(start..start + len).ok_or_else(|| {
                fail(format!(
                    "truncated: record of {len} bytes runs past the end of the file ({} bytes)",
                    map.len()
                ))
            })?;
            out.extend_from_slice(data);
            pos = start + len.div_ceil(4) * 4;
            if cflag == 0 || cflag == 3 {
                return Ok(out);
            }
            out.extend_from_slice(&MAGIC.to_le_bytes());
            part += 1;
        }
    }

    /// The payload of the record with `key`.
    pub fn read_key(&self, key: u64) -> Result<Vec<u8>, DataError> {
        let &i = self.by_key.get(&key).ok_or_else(|| {
            DataError::format(&self.idx_path, format!("key {key}"), "key not in the .idx")
        })?;
        let (_, off, line) = self.entries[i];
        if off as usize >= self.bytes().len() {
            return Err(DataError::format(
                &self.idx_path,
                format!("line {line}"),
                format!(
                    "offset {off} of key {key} is past the end of {} ({} bytes): the .idx disagrees with the .rec",
                    self.rec_path.display(),
                    self.bytes().len()
                ),
            ));
        }
        self.read_at(off)
    }

    /// The image keys: `1..label[0]` when record 0 is an insightface header (`flag > 0`),
    /// otherwise every key of the `.idx` in order. Also returns the header's labels.
    pub fn image_keys(&self) -> Result<(Vec<u64>, Option<Vec<f32>>), DataError> {
        if self.by_key.contains_key(&0) {
            let payload = self.read_key(0)?;
            let (h, _) =
                unpack(&payload).map_err(|m| DataError::format(&self.rec_path, "record 0", m))?;
            if h.flag > 0 {
                let end = h.label[0];
                if !(end >= 1.0 && end.is_finite()) {
                    return Err(DataError::format(
                        &self.rec_path,
                        "record 0",
                        format!("insightface header label[0] = {end} is not a key count"),
                    ));
                }
                // Keys 1..end must all be records of the .idx: a header claiming more
                // images than the .idx lists (or than the .rec can hold) is corrupt.
                let claimed = end as u64 - 1;
                let listed = self.entries.len().saturating_sub(1) as u64;
                let fit = (self.bytes().len() / 8) as u64;
                if claimed > listed || claimed > fit {
                    return Err(DataError::format(
                        &self.rec_path,
                        "record 0",
                        format!(
                            "the insightface header claims {claimed} images (label[0] = {end}) \
                             but {} lists {listed} records besides the header and the .rec has \
                             {} bytes: the header or the .idx is corrupt, or the two files do \
                             not belong together",
                            self.idx_path.display(),
                            self.bytes().len()
                        ),
                    ));
                }
                return Ok(((1..=claimed).collect(), Some(h.label)));
            }
        }
        Ok((self.keys().collect(), None))
    }
}

/// What to do with a bad record or image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Leave it out, count it, keep the first messages.
    Skip,
    /// Stop with the error.
    Fail,
}

/// Counts of an import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportCounts {
    /// Images imported.
    pub images: usize,
    /// Inputs left out (`on_error: skip`).
    pub skipped: usize,
    /// The first problems met (file and position), at most 20.
    pub problems: Vec<String>,
}

/// How many times its encoded size an image may take decoded (as RGB8), plus 1 MiB, for
/// JPEG and 24-bit PNG. Deflate expands at most about 1032:1 and JPEG at most about 770:1 (a
/// grey block in two bits), so a header claiming more pixels than this is corrupt or hostile
/// and would make the decoder allocate for nothing. A PNG of fewer bits per pixel may expand
/// by 24 / bits more (a 1-bit PNG by 24 times more).
pub const MAX_IMAGE_EXPANSION: u64 = 1100;

/// Bits per pixel of a PNG's raw stream, from its IHDR (`None` for anything else).
fn png_bits_per_pixel(bytes: &[u8]) -> Option<u64> {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.len() < 26 {
        return None;
    }
    let channels = match bytes[25] {
        0 | 3 => 1,
        4 => 2,
        2 => 3,
        6 => 4,
        _ => return None,
    };
    Some((bytes[24] as u64 * channels).max(1))
}

/// Decodes an encoded image (JPEG/PNG) to RGB8; `(h, w, pixels)`. The size in the header is
/// checked against the encoded size (see [`MAX_IMAGE_EXPANSION`]) before anything is
/// allocated for the pixels.
pub fn decode_image(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("undecodable image: {e}"))
    };
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| format!("undecodable image: {e}"))?;
    let claimed = w as u64 * h as u64 * 3;
    let factor = MAX_IMAGE_EXPANSION * png_bits_per_pixel(bytes).map_or(1, |b| (24 / b).max(1));
    if claimed > factor * bytes.len() as u64 + (1 << 20) {
        return Err(format!(
            "undecodable image: its header claims {w}x{h} pixels, more than {} encoded bytes \
             can hold; the image is corrupt",
            bytes.len()
        ));
    }
    let img = reader()?
        .decode()
        .map_err(|e| format!("undecodable image: {e}"))?;
    let rgb = img.into_rgb8();
    Ok((rgb.height() as usize, rgb.width() as usize, rgb.into_raw()))
}

/// Collects decoded images in order into a packed writer, enforcing one image size and the
/// `on_error` policy. Shared by the RecordIO, `.bin` and image-folder importers.
pub(crate) struct Sink {
    pub writer: Option<PackedWriter>,
    pub dir: PathBuf,
    pub on_error: OnError,
    pub counts: ImportCounts,
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Paths in the problems kept in `dataset.json` are written relative to this folder
    /// (the input's), so the artifact does not depend on where the input lies.
    pub base: PathBuf,
}

impl Sink {
    /// A sink writing into `dir`; problems name input files relative to `base`.
    pub fn new(dir: &Path, on_error: OnError, base: &Path) -> Sink {
        Sink {
            writer: None,
            dir: dir.to_path_buf(),
            on_error,
            counts: ImportCounts::default(),
            reasons: Default::default(),
            base: base.to_path_buf(),
        }
    }

    /// A problem of class `reason` described by `err`: fail, or count and continue.
    pub fn problem(&mut self, reason: &str, err: DataError) -> Result<(), DataError> {
        if self.on_error == OnError::Fail {
            return Err(err);
        }
        self.counts.skipped += 1;
        *self.reasons.entry(reason.to_string()).or_insert(0) += 1;
        if self.counts.problems.len() < 20 {
            self.counts
                .problems
                .push(err.to_string_relative_to(&self.base));
        }
        Ok(())
    }

    /// Adds one decoded image; a size different from the first image's is a problem,
    /// reported by `at`, which makes the error (naming the input) for a message.
    pub fn push(
        &mut self,
        h: usize,
        w: usize,
        pixels: &[u8],
        label: i64,
        landmarks: Option<[[f32; 2]; 5]>,
        at: impl FnOnce(String) -> DataError,
    ) -> Result<bool, DataError> {
        if self.writer.is_none() {
            self.writer = Some(PackedWriter::create(&self.dir, h, w)?);
        }
        let wr = self.writer.as_mut().expect("created above");
        if wr.size() != (h, w) {
            let (eh, ew) = wr.size();
            let e = at(format!(
                "image is {w}x{h}, the data set's first image is {ew}x{eh}; \
                 resize the images to one size"
            ));
            self.problem("image size differs", e)?;
            return Ok(false);
        }
        wr.push(pixels, label, landmarks, ImageTruth::default())?;
        self.counts.images += 1;
        Ok(true)
    }

    /// Writes `dataset.json`; an import that found no image is an error.
    pub fn finish(
        mut self,
        source: &Path,
        provenance: serde_json::Value,
        pairs: Option<Vec<(u32, u32, bool)>>,
        class_names: Option<Vec<String>>,
    ) -> Result<ImportCounts, DataError> {
        let mut wr = match self.writer.take() {
            Some(w) => w,
            None => {
                return Err(DataError::format(
                    source,
                    "whole file",
                    format!(
                        "no readable image ({} skipped{})",
                        self.counts.skipped,
                        self.counts
                            .problems
                            .first()
                            .map(|p| format!("; first problem: {p}"))
                            .unwrap_or_default()
                    ),
                ))
            }
        };
        for (r, n) in &self.reasons {
            wr.add_skipped(r, *n);
        }
        if !self.counts.problems.is_empty() {
            wr.set_meta("problems", json!(self.counts.problems));
        }
        if let Some(p) = pairs {
            wr.set_pairs(p);
        }
        if let Some(n) = class_names {
            wr.set_class_names(n);
        }
        wr.finish(provenance)?;
        Ok(self.counts)
    }
}

/// Imports the RecordIO data set `rec` (with its `.idx`) into a packed data set in `out`.
pub fn import_recordio(
    rec: &Path,
    out: &Path,
    on_error: OnError,
    monitor: &dyn Monitor,
) -> Result<ImportCounts, DataError> {
    let r = RecReader::open(rec)?;
    let (keys, header) = r.image_keys()?;
    let mut sink = Sink::new(out, on_error, rec.parent().unwrap_or(Path::new("")));
    const CHUNK: usize = 1024;
    type Decoded = Result<(usize, usize, Vec<u8>, i64), (&'static str, DataError)>;
    for (ci, chunk) in keys.chunks(CHUNK).enumerate() {
        if monitor.cancelled() {
            return Err(DataError::Invalid("interrupted".into()));
        }
        let decoded: Vec<Decoded> = chunk
            .par_iter()
            .map(|&key| {
                let payload = r.read_key(key).map_err(|e| ("unreadable record", e))?;
                let (h, img) = unpack(&payload).map_err(|m| {
                    (
                        "unreadable record",
                        DataError::format(rec, format!("record key {key}"), m),
                    )
                })?;
                let l = h.label[0];
                if !(l >= 0.0 && l.fract() == 0.0 && l < 2f32.powi(31)) {
                    return Err((
                        "bad label",
                        DataError::format(
                            rec,
                            format!("record key {key}"),
                            format!("label {l} is not a class id"),
                        ),
                    ));
                }
                let (ih, iw, px) = decode_image(img).map_err(|m| {
                    (
                        "undecodable image",
                        DataError::format(rec, format!("record key {key}"), m),
                    )
                })?;
                Ok((ih, iw, px, l as i64))
            })
            .collect();
        for (k, d) in decoded.into_iter().enumerate() {
            let key = chunk[k];
            match d {
                Ok((h, w, px, label)) => {
                    sink.push(h, w, &px, label, None, |m| {
                        DataError::format(rec, format!("record key {key}"), m)
                    })?;
                }
                Err((reason, e)) => sink.problem(reason, e)?,
            }
        }
        monitor.progress(((ci * CHUNK) + chunk.len()) as u64, keys.len() as u64);
    }
    sink.finish(
        rec,
        json!({
            "kind": "recordio",
            "source": rec.file_name().map(|s| s.to_string_lossy().to_string()),
            "insightface_header": header,
        }),
        None,
        None,
    )
}

/// Writes one dmlc-core RecordIO frame sequence for `payload` (split at aligned magics).
fn write_frames(w: &mut impl Write, payload: &[u8]) -> std::io::Result<u64> {
    let magic = MAGIC.to_le_bytes();
    let len = payload.len();
    let lower = len / 4 * 4;
    let mut dptr = 0usize;
    let mut written = 0u64;
    let lrec = |cflag: u32, n: usize| (cflag << 29) | n as u32;
    let mut i = 0;
    while i < lower {
        if payload[i..i + 4] == magic {
            w.write_all(&magic)?;
            w.write_all(&lrec(if dptr == 0 { 1 } else { 2 }, i - dptr).to_le_bytes())?;
            w.write_all(&payload[dptr..i])?;
            written += 8 + (i - dptr) as u64;
            dptr = i + 4;
        }
        i += 4;
    }
    w.write_all(&magic)?;
    w.write_all(&lrec(if dptr != 0 { 3 } else { 0 }, len - dptr).to_le_bytes())?;
    w.write_all(&payload[dptr..])?;
    written += 8 + (len - dptr) as u64;
    let pad = len.div_ceil(4) * 4 - len;
    w.write_all(&[0u8; 4][..pad])?;
    Ok(written + pad as u64)
}

/// Writes indexed RecordIO: `records` are `(key, payload)`; returns nothing but files
/// `rec` and `rec.with_extension("idx")` (`key\toffset` lines, as MXNet writes them).
pub fn write_indexed(
    rec: &Path,
    records: impl IntoIterator<Item = (u64, Vec<u8>)>,
) -> Result<(), DataError> {
    let idx = rec.with_extension("idx");
    let mut rw = BufWriter::new(File::create(rec).map_err(|e| DataError::io(rec, e))?);
    let mut iw = BufWriter::new(File::create(&idx).map_err(|e| DataError::io(&idx, e))?);
    let mut pos = 0u64;
    for (key, payload) in records {
        if payload.len() >= 1 << 29 {
            return Err(DataError::Invalid(format!(
                "record {key}: {} bytes, RecordIO allows < 2^29",
                payload.len()
            )));
        }
        writeln!(iw, "{key}\t{pos}").map_err(|e| DataError::io(&idx, e))?;
        pos += write_frames(&mut rw, &payload).map_err(|e| DataError::io(rec, e))?;
    }
    rw.flush().map_err(|e| DataError::io(rec, e))?;
    iw.flush().map_err(|e| DataError::io(&idx, e))?;
    Ok(())
}

/// Encodes HWC RGB as JPEG of the given quality.
pub fn encode_jpeg(pixels: &[u8], h: usize, w: usize, quality: u8) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(pixels, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| DataError::Invalid(format!("JPEG encoding failed: {e}")))?;
    Ok(out)
}

/// Writes the packed data set `dataset` as insightface RecordIO into `out_dir`:
/// `train.rec`, `train.idx` and `property` (`classes,height,width`). Record 0 is the header
/// (labels `[N+1, N+1+C]`), keys `1..=N` the JPEG images (label = class), keys
/// `N+1..=N+C` each class's key range `[start, end)`. Images are sorted by label (stable).
pub fn export_recordio(dataset: &Path, out_dir: &Path, quality: u8) -> Result<usize, DataError> {
    let d = PackedDataset::open(dataset)?;
    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    let (h, w, _) = d.image_shape();
    let n = d.len();
    let c = d.num_classes();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| d.label(i));
    let encoded: Vec<Result<Vec<u8>, DataError>> = order
        .par_iter()
        .map(|&i| encode_jpeg(d.image(i), h, w, quality))
        .collect();
    // Class ranges over keys 1..=N.
    let mut ranges = vec![(0u64, 0u64); c];
    for (k, &i) in order.iter().enumerate() {
        let l = d.label(i) as usize;
        let key = k as u64 + 1;
        if ranges[l].1 == 0 {
            ranges[l] = (key, key + 1);
        } else {
            ranges[l].1 = key + 1;
        }
    }
    let mut records: Vec<(u64, Vec<u8>)> = Vec::with_capacity(n + c + 1);
    let top = (n + 1) as f32;
    records.push((0, pack(&[top, top + c as f32], 0, 0, &[])));
    for (k, (enc, &i)) in encoded.into_iter().zip(&order).enumerate() {
        let key = k as u64 + 1;
        records.push((key, pack(&[d.label(i) as f32], key, 0, &enc?)));
    }
    for (l, &(s, e)) in ranges.iter().enumerate() {
        let key = (n + 1 + l) as u64;
        records.push((key, pack(&[s as f32, e as f32], key, 0, &[])));
    }
    write_indexed(&out_dir.join("train.rec"), records)?;
    let prop = out_dir.join("property");
    std::fs::write(&prop, format!("{c},{h},{w}\n")).map_err(|e| DataError::io(&prop, e))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_records_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("x.rec");
        let m = MAGIC.to_le_bytes();
        // Magic at aligned offsets 0 and 8, one unaligned (not split), odd length.
        let mut a = m.to_vec();
        a.extend_from_slice(&[1, 2, 3, 4]);
        a.extend_from_slice(&m);
        a.extend_from_slice(&[9, 9, 9]);
        let b = vec![5u8; 7];
        let mut c = vec![0u8; 2];
        c.extend_from_slice(&m);
        write_indexed(&rec, vec![(3, a.clone()), (7, b.clone()), (8, c.clone())]).unwrap();
        let r = RecReader::open(&rec).unwrap();
        assert_eq!(r.keys().collect::<Vec<_>>(), vec![3, 7, 8]);
        assert_eq!(r.read_key(3).unwrap(), a);
        assert_eq!(r.read_key(7).unwrap(), b);
        assert_eq!(r.read_key(8).unwrap(), c);
        // Truncate inside the last record: the error names the file and offset.
        let bytes = std::fs::read(&rec).unwrap();
        std::fs::write(&rec, &bytes[..bytes.len() - 6]).unwrap();
        let r = RecReader::open(&rec).unwrap();
        let e = r.read_key(8).unwrap_err().to_string();
        assert!(
            e.contains("x.rec") && e.contains("byte offset") && e.contains("truncated"),
            "{e}"
        );
        // An .idx offset that points into the middle of a record.
        std::fs::write(rec.with_extension("idx"), "3\t4\n").unwrap();
        let e = RecReader::open(&rec)
            .unwrap()
            .read_key(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("byte offset 4"), "{e}");
        std::fs::write(rec.with_extension("idx"), "3\t99999\n").unwrap();
        let e = RecReader::open(&rec)
            .unwrap()
            .read_key(3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.idx") && e.contains("line 1") && e.contains("disagrees"),
            "{e}"
        );
        std::fs::write(rec.with_extension("idx"), "3\tabc\n").unwrap();
        let e = RecReader::open(&rec).err().unwrap().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn pack_unpack() {
        let p = pack(&[3.0], 5, 6, b"img");
        let (h, rest) = unpack(&p).unwrap();
        assert_eq!(
            h,
            IrHeader {
                flag: 0,
                label: vec![3.0],
                id: 5,
                id2: 6
            }
        );
        assert_eq!(rest, b"img");
        let p = pack(&[1.0, 2.0], 0, 0, b"");
        let (h, rest) = unpack(&p).unwrap();
        assert_eq!((h.flag, h.label), (2, vec![1.0, 2.0]));
        assert!(rest.is_empty());
        assert!(unpack(&p[..10]).is_err());
        assert!(unpack(&p[..30]).is_err());
    }
}
