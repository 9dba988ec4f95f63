//! `image-folder`: one sub-folder per identity holding JPEG/PNG images, and optionally a
//! landmarks file at the top of the folder, `landmarks.csv` or `landmarks.json`, one entry per
//! image with 5 points (left eye, right eye, nose, left mouth, right mouth) in pixels.
//!
//! - CSV: `path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5` per line (`path` relative to the folder, e.g.
//!   `Alice/001.jpg`); a first line starting with `path` is a header.
//! - JSON: an object `{"Alice/001.jpg": [[x, y], ...5], ...}` or a list of
//!   `{"path": "Alice/001.jpg", "landmarks": [[x, y], ...5]}`.
//!
//! Labels are the identity folders in name order (empty folders get none). Images that do not
//! decode, differ in size from the first, have landmarks outside the image, and empty identity
//! folders are skipped and counted or stop the import (`on_error`), with a message naming the
//! file and the line.

use super::packed::DataError;
use super::recordio::{decode_image, ImportCounts, OnError, Sink};
use super::synth::Monitor;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Landmarks by relative path, with where each entry came from (file, line/entry).
type LandmarkMap = HashMap<String, ([[f32; 2]; 5], String)>;

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("jpg" | "jpeg" | "png")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| DataError::io(dir, err)))
        .collect::<Result<_, _>>()?;
    v.sort();
    Ok(v)
}

fn points(vals: &[f64]) -> Option<[[f32; 2]; 5]> {
    if vals.len() != 10 {
        return None;
    }
    let mut p = [[0f32; 2]; 5];
    for k in 0..5 {
        p[k] = [vals[2 * k] as f32, vals[2 * k + 1] as f32];
    }
    Some(p)
}

/// Reads `landmarks.csv` or `landmarks.json` from `root`, if present.
pub fn read_landmarks(root: &Path) -> Result<Option<LandmarkMap>, DataError> {
    let csv = root.join("landmarks.csv");
    let js = root.join("landmarks.json");
    let mut map = LandmarkMap::new();
    if csv.is_file() {
        let text = std::fs::read_to_string(&csv).map_err(|e| DataError::io(&csv, e))?;
        for (ln, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (ln == 0 && line.to_ascii_lowercase().starts_with("path")) {
                continue;
            }
            let mut cols = line.split(',').map(str::trim);
            let path = cols.next().unwrap_or("").to_string();
            let vals: Result<Vec<f64>, _> = cols.map(str::parse::<f64>).collect();
            let p = vals.ok().as_deref().and_then(points).ok_or_else(|| {
                DataError::format(
                    &csv,
                    format!("line {}", ln + 1),
                    "expected `path,x1,y1,...,x5,y5` (10 numbers)",
                )
            })?;
            map.insert(
                path.replace('\\', "/"),
                (p, format!("{} line {}", csv.display(), ln + 1)),
            );
        }
        return Ok(Some(map));
    }
    if js.is_file() {
        let text = std::fs::read_to_string(&js).map_err(|e| DataError::io(&js, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            DataError::format(
                &js,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )
        })?;
        let parse_pts = |v: &Value| -> Option<[[f32; 2]; 5]> {
            let a = v.as_array()?;
            let flat: Vec<f64> = if a.len() == 5 {
                a.iter()
                    .flat_map(|p| {
                        p.as_array()
                            .map(|q| q.iter().filter_map(Value::as_f64).collect::<Vec<_>>())
                            .unwrap_or_default()
                    })
                    .collect()
            } else {
                a.iter().filter_map(Value::as_f64).collect()
            };
            points(&flat)
        };
        let bad = |at: String| DataError::format(&js, at, "expected 5 points `[[x, y], ...]`");
        match &v {
            Value::Object(o) => {
                for (k, pts) in o {
                    let p = parse_pts(pts).ok_or_else(|| bad(format!("key `{k}`")))?;
                    map.insert(
                        k.replace('\\', "/"),
                        (p, format!("{} key `{k}`", js.display())),
                    );
                }
            }
            Value::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let path = e.get("path").and_then(Value::as_str).ok_or_else(|| {
                        DataError::format(&js, format!("entry {i}"), "missing `path`")
                    })?;
                    let p = e
                        .get("landmarks")
                        .and_then(parse_pts)
                        .ok_or_else(|| bad(format!("entry {i}")))?;
                    map.insert(
                        path.replace('\\', "/"),
                        (p, format!("{} entry {i}", js.display())),
                    );
                }
            }
            _ => {
                return Err(DataError::format(
                    &js,
                    "top level",
                    "expected an object or a list",
                ));
            }
        }
        return Ok(Some(map));
    }
    Ok(None)
}

/// Imports the identity folders under `root` into a packed data set in `out`.
pub fn import_folder(
    root: &Path,
    out: &Path,
    on_error: OnError,
    monitor: &dyn Monitor,
) -> Result<ImportCounts, DataError> {
    if !root.is_dir() {
        return Err(DataError::format(root, "path", "not a folder"));
    }
    let landmarks = read_landmarks(root)?;
    let mut sink = Sink::new(out, on_error, root);
    // (label, relative path, absolute path)
    let mut files: Vec<(i64, String, PathBuf)> = Vec::new();
    let mut names = Vec::new();
    for dir in sorted_entries(root)? {
        if !dir.is_dir() {
            continue;
        }
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let imgs: Vec<PathBuf> = sorted_entries(&dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if imgs.is_empty() {
            sink.problem(
                "empty identity folder",
                DataError::format(&dir, "identity folder", "holds no .jpg/.jpeg/.png image"),
            )?;
            continue;
        }
        let label = names.len() as i64;
        names.push(name.clone());
        for p in imgs {
            let file = p
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((label, format!("{name}/{file}"), p));
        }
    }
    if let Some(map) = &landmarks {
        let known: std::collections::HashSet<&str> = files.iter().map(|f| f.1.as_str()).collect();
        let mut orphans: Vec<&(_, String)> = map
            .iter()
            .filter(|(k, _)| !known.contains(k.as_str()))
            .map(|(_, v)| v)
            .collect();
        orphans.sort_by(|a, b| a.1.cmp(&b.1));
        for (_, at) in orphans {
            sink.problem(
                "landmarks for an image that is not in the folder",
                DataError::Invalid(format!("{at}: no such image in the identity folders")),
            )?;
        }
    }
    const CHUNK: usize = 512;
    type Decoded = Result<(usize, usize, Vec<u8>), DataError>;
    for (ci, chunk) in files.chunks(CHUNK).enumerate() {
        if monitor.cancelled() {
            return Err(DataError::Invalid("interrupted".into()));
        }
        let decoded: Vec<Decoded> = chunk
            .par_iter()
            .map(|(_, _, p)| {
                let bytes = std::fs::read(p).map_err(|e| DataError::io(p, e))?;
                decode_image(&bytes).map_err(|m| DataError::format(p, "whole file", m))
            })
            .collect();
        for ((label, rel, path), d) in chunk.iter().zip(decoded) {
            let (h, w, px) = match d {
                Ok(x) => x,
                Err(e) => {
                    sink.problem("undecodable image", e)?;
                    continue;
                }
            };
            let lm = match landmarks.as_ref().map(|m| m.get(rel)) {
                None => None,
                Some(None) => {
                    sink.problem(
                        "no landmarks for the image",
                        DataError::format(
                            path,
                            "landmarks",
                            "the landmarks file has no entry for this image",
                        ),
                    )?;
                    continue;
                }
                Some(Some((p, at))) => {
                    let inside = p.iter().all(|q| {
                        q[0] >= 0.0 && q[1] >= 0.0 && q[0] <= w as f32 && q[1] <= h as f32
                    });
                    if !inside {
                        sink.problem(
                            "landmarks outside the image",
                            DataError::Invalid(format!(
                                "{at}: landmarks {p:?} lie outside the {w}x{h} image {rel}"
                            )),
                        )?;
                        continue;
                    }
                    Some(*p)
                }
            };
            sink.push(h, w, &px, *label, lm, |m| {
                DataError::format(path, "whole file", m)
            })?;
        }
        monitor.progress((ci * CHUNK + chunk.len()) as u64, files.len() as u64);
    }
    sink.finish(
        root,
        json!({
            "kind": "image-folder",
            "source": root.file_name().map(|s| s.to_string_lossy().to_string()),
            "landmarks": landmarks.is_some(),
        }),
        None,
        Some(names),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::PackedDataset;

    fn png(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn folders_labels_landmarks_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("faces");
        png(&root.join("bob/1.png"), 20, 16, 10);
        png(&root.join("bob/2.PNG"), 20, 16, 20);
        png(&root.join("alice/a.png"), 20, 16, 30);
        std::fs::create_dir_all(root.join("carol")).unwrap();
        std::fs::write(root.join("alice/broken.jpg"), b"not a jpeg").unwrap();
        std::fs::write(root.join("bob/notes.txt"), b"x").unwrap();
        let lm = [
            "path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5",
            "alice/a.png,5,5,15,5,10,8,6,12,14,12",
            "alice/broken.jpg,5,5,15,5,10,8,6,12,14,12",
            "bob/1.png,5,5,15,5,10,8,6,12,14,12",
            "bob/2.PNG,5,5,15,5,10,8,6,12,14,40",
        ]
        .join("\n");
        std::fs::write(root.join("landmarks.csv"), lm).unwrap();
        // Fail: the first problem (the empty folder `carol`) names the folder.
        let e = import_folder(&root, &dir.path().join("f"), OnError::Fail, &())
            .unwrap_err()
            .to_string();
        assert!(e.contains("carol") && e.contains("no .jpg"), "{e}");
        // Skip: counted with reasons.
        let c = import_folder(&root, &dir.path().join("s"), OnError::Skip, &()).unwrap();
        assert_eq!(c.images, 2, "{:?}", c.problems);
        let d = PackedDataset::open(&dir.path().join("s")).unwrap();
        assert_eq!(d.num_classes(), 2);
        assert_eq!((d.label(0), d.label(1)), (0, 1));
        assert_eq!(d.landmarks(0).unwrap()[4], [14.0, 12.0]);
        let m = d.metadata();
        assert_eq!(m["class_names"], json!(["alice", "bob"]));
        assert_eq!(m["skipped"]["empty identity folder"], 1);
        assert_eq!(m["skipped"]["undecodable image"], 1);
        assert_eq!(m["skipped"]["landmarks outside the image"], 1);
        assert!(
            c.problems
                .iter()
                .any(|p| p.contains("landmarks.csv line 5")),
            "{:?}",
            c.problems
        );
        let text = crate::data::inspect_text(&dir.path().join("s")).unwrap();
        assert!(
            text.contains("2 images, 2 identities") && text.contains("landmarks outside"),
            "{text}"
        );
    }
}
