//! insightface verification `.bin` files (LFW, CFP-FP, AgeDB-30): a pickle of
//! `(bins, issame_list)` with `2N` encoded images and `N` booleans (methods.md §9).
//!
//! Read with [`super::pickle`], which executes nothing. Accepted shapes: protocol 2 with py2
//! strings, protocols 3-5 with `bytes`, images as numpy `uint8` arrays, `issame_list` as a
//! list of bools / ints / numpy bools or a numpy bool array. Anything else is an error that
//! says what was found. Images become a packed verification set with pairs `(2i, 2i+1)`;
//! labels are derived from the pairs (both images of a same pair share one), not identities.

use super::packed::DataError;
use super::pickle::{bytes, ndarray, np_scalar, parse, Val};
use super::recordio::{decode_image, ImportCounts, OnError, Sink};
use super::synth::Monitor;
use rayon::prelude::*;
use serde_json::json;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

fn describe(v: &Val) -> String {
    match v {
        Val::None => "None".into(),
        Val::Bool(_) => "a bool".into(),
        Val::Int(_) => "an int".into(),
        Val::Float(_) => "a float".into(),
        Val::Bytes(r) => format!("bytes of length {}", r.len()),
        Val::Str(_) => "a str".into(),
        Val::List(l) => format!("a list of {}", l.len()),
        Val::Tuple(t) => format!("a tuple of {}", t.len()),
        Val::Dict(_) => "a dict".into(),
        Val::Global(m, n) => format!("the global {m}.{n}"),
        Val::Reduce(..) | Val::Build(..) => match ndarray(v) {
            Some(a) => format!("a numpy array {} {:?}", a.dtype, a.shape),
            None => "an object".into(),
        },
    }
}

/// How many times a `.bin` may refer to the same image data (an image in several pairs).
pub const MAX_SAME_IMAGE: usize = 16;

/// Identity of the data behind an image value, to count repeated references: a byte range
/// of the file, or the (memo-shared) string of a `_codecs.encode` call.
fn data_key(v: &Val) -> Option<(u8, usize, usize)> {
    match v {
        Val::Bytes(r) => Some((0, r.start, r.end)),
        Val::Reduce(_, args) => match args.as_ref() {
            Val::Tuple(a) => match a.first() {
                Some(Val::Str(s)) => Some((1, s.as_ptr() as usize, s.len())),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

/// The encoded images of a `.bin` and its pair labels.
pub type BinContents<'a> = (Vec<Cow<'a, [u8]>>, Vec<bool>);

/// The encoded images (borrowed from `data` where possible) and pair labels of a `.bin`.
pub fn read_bin_structure<'a>(path: &Path, data: &'a [u8]) -> Result<BinContents<'a>, DataError> {
    let top = parse(data).map_err(|e| {
        DataError::format(
            path,
            format!("byte offset {}", e.offset),
            format!("pickle: {}", e.message),
        )
    })?;
    let bad = |what: String| {
        DataError::format(
            path,
            "pickle structure",
            format!("expected (bins, issame_list): {what}"),
        )
    };
    let items = match &top {
        Val::Tuple(t) | Val::List(t) if t.len() == 2 => t.clone(),
        other => return Err(bad(format!("found {}", describe(other)))),
    };
    let bins: Vec<Cow<'a, [u8]>> = match &items[0] {
        Val::List(l) | Val::Tuple(l) => {
            // A `.bin` stores each image once; memo references can make a tiny file refer
            // to one image any number of times, which would multiply it into an artifact
            // (and memory) of any size. A few references (an image in several pairs) are
            // fine; more are refused.
            let mut seen: HashMap<(u8, usize, usize), (usize, usize)> = HashMap::new();
            let mut out = Vec::with_capacity(l.len());
            for (i, v) in l.iter().enumerate() {
                let (b, src) = match ndarray(v) {
                    Some(a) if a.dtype.ends_with("u1") || a.dtype.ends_with("i1") => {
                        (bytes(&a.data, data), data_key(&a.data))
                    }
                    Some(_) => (None, None),
                    None => (bytes(v, data), data_key(v)),
                };
                if let Some(k) = src {
                    let e = seen.entry(k).or_insert((i, 0));
                    e.1 += 1;
                    if e.1 > MAX_SAME_IMAGE {
                        return Err(DataError::format(
                            path,
                            format!("bins[{i}]"),
                            format!(
                                "the pickle refers to the image data of bins[{}] more than \
                                 {MAX_SAME_IMAGE} times (memo references); a verification .bin \
                                 stores each image once, so the file is corrupt or hostile",
                                e.0
                            ),
                        ));
                    }
                }
                out.push(b.ok_or_else(|| {
                    bad(format!(
                        "bins[{i}] is {}, not encoded image bytes",
                        describe(v)
                    ))
                })?);
            }
            out
        }
        other => return Err(bad(format!("bins is {}", describe(other)))),
    };
    let issame: Vec<bool> = match &items[1] {
        Val::List(l) | Val::Tuple(l) => l
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Val::Bool(b) => Ok(*b),
                Val::Int(x) if *x == 0 || *x == 1 => Ok(*x == 1),
                other => match np_scalar(other) {
                    Some((d, b)) if d.ends_with("b1") => match bytes(&b, data) {
                        Some(b) if b.len() == 1 => Ok(b[0] != 0),
                        _ => Err(bad(format!("issame_list[{i}] is a malformed numpy bool"))),
                    },
                    _ => Err(bad(format!(
                        "issame_list[{i}] is {}, not a bool",
                        describe(other)
                    ))),
                },
            })
            .collect::<Result<_, _>>()?,
        other => match ndarray(other) {
            Some(a) if a.dtype.ends_with("b1") && a.shape.len() == 1 => {
                match bytes(&a.data, data) {
                    Some(b) if b.len() == a.shape[0] => b.iter().map(|&x| x != 0).collect(),
                    _ => return Err(bad("issame_list is a malformed numpy bool array".into())),
                }
            }
            _ => return Err(bad(format!("issame_list is {}", describe(other)))),
        },
    };
    if bins.len() != 2 * issame.len() {
        return Err(bad(format!(
            "{} images for {} pairs (need exactly 2 per pair)",
            bins.len(),
            issame.len()
        )));
    }
    Ok((bins, issame))
}

/// A decoded image: height, width, RGB pixels.
type Decoded = (usize, usize, Vec<u8>);

/// Imports the verification `.bin` at `path` into a packed verification set in `out`.
/// An undecodable image drops its pair (`on_error: skip`) or stops (`fail`).
pub fn import_bin(
    path: &Path,
    out: &Path,
    on_error: OnError,
    monitor: &dyn Monitor,
) -> Result<ImportCounts, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    // SAFETY: input files are not modified while a stage reads them.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
    let (bins, issame) = read_bin_structure(path, &map)?;
    let mut sink = Sink::new(out, on_error, path.parent().unwrap_or(Path::new("")));
    let mut pairs = Vec::with_capacity(issame.len());
    const CHUNK: usize = 512; // pairs per chunk
    for start in (0..issame.len()).step_by(CHUNK) {
        if monitor.cancelled() {
            return Err(DataError::Invalid("interrupted".into()));
        }
        let end = (start + CHUNK).min(issame.len());
        let decoded: Vec<Result<Decoded, DataError>> = (2 * start..2 * end)
            .into_par_iter()
            .map(|i| {
                decode_image(&bins[i]).map_err(|m| DataError::format(path, format!("image {i}"), m))
            })
            .collect();
        let mut it = decoded.into_iter();
        for (p, &same) in issame.iter().enumerate().take(end).skip(start) {
            let (a, b) = (it.next(), it.next());
            let (Some(a), Some(b)) = (a, b) else { break };
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    let la = 2 * p as i64;
                    let lb = if same { la } else { la + 1 };
                    let ia = sink.counts.images as u32;
                    let ok_a = sink.push(a.0, a.1, &a.2, la, None, |m| {
                        DataError::format(path, format!("image {}", 2 * p), m)
                    })?;
                    if !ok_a {
                        continue;
                    }
                    let ok_b = sink.push(b.0, b.1, &b.2, lb, None, |m| {
                        DataError::format(path, format!("image {}", 2 * p + 1), m)
                    })?;
                    if ok_b {
                        pairs.push((ia, ia + 1, same));
                    }
                }
                (Err(e), _) | (_, Err(e)) => sink.problem("undecodable image (pair dropped)", e)?,
            }
        }
        monitor.progress(end as u64, issame.len() as u64);
    }
    let n_pairs = issame.len();
    sink.finish(
        path,
        json!({
            "kind": "verification-bin",
            "source": path.file_name().map(|s| s.to_string_lossy().to_string()),
            "pairs_in_file": n_pairs,
        }),
        Some(pairs),
        None,
    )
}
