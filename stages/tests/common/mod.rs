//! Test helpers shared by the hostile-input tests and the fuzz loops: a small pickle writer
//! (the shapes Python's `pickle` writes for verification `.bin` files), tiny encoded images,
//! and small RecordIO and packed data sets made with the crate's own writers.
#![allow(dead_code)]

use fpipe_stages::data::recordio::{pack, write_indexed};
use fpipe_stages::data::{ImageTruth, PackedWriter};
use std::path::Path;

/// A Python value to pickle.
#[derive(Clone, Debug)]
pub enum P {
    None,
    Bool(bool),
    Int(i64),
    Bytes(Vec<u8>),
    Str(String),
    List(Vec<P>),
    Tuple(Vec<P>),
    Dict(Vec<(P, P)>),
    Global(&'static str, &'static str),
    Reduce(Box<P>, Box<P>),
    Build(Box<P>, Box<P>),
}

/// `pickle.dumps(v, protocol)` for protocols 2 (py2 `str` for bytes, memo `q`/`r`) and 4
/// (`bytes`, `STACK_GLOBAL`, `MEMOIZE`, one frame), memoizing containers as Python does.
pub fn dumps(v: &P, protocol: u8) -> Vec<u8> {
    let mut body = Vec::new();
    let mut memo = 0u32;
    emit(v, protocol, &mut body, &mut memo);
    body.push(b'.');
    let mut out = vec![0x80, protocol];
    if protocol >= 4 {
        out.push(0x95);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(&body);
    out
}

/// The opcodes of `v` alone (no PROTO, no STOP), memo keys from 0.
pub fn opcodes(v: &P, protocol: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut memo = 0u32;
    emit(v, protocol, &mut out, &mut memo);
    out
}

fn put(protocol: u8, out: &mut Vec<u8>, memo: &mut u32) {
    if protocol >= 4 {
        out.push(0x94);
    } else if *memo < 256 {
        out.extend_from_slice(&[b'q', *memo as u8]);
    } else {
        out.push(b'r');
        out.extend_from_slice(&memo.to_le_bytes());
    }
    *memo += 1;
}

fn emit_str(s: &str, protocol: u8, out: &mut Vec<u8>) {
    if protocol >= 4 && s.len() < 256 {
        out.extend_from_slice(&[0x8c, s.len() as u8]);
    } else {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

fn emit(v: &P, protocol: u8, out: &mut Vec<u8>, memo: &mut u32) {
    match v {
        P::None => out.push(b'N'),
        P::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        P::Int(i) => match *i {
            0..=255 => out.extend_from_slice(&[b'K', *i as u8]),
            256..=65535 => {
                out.push(b'M');
                out.extend_from_slice(&(*i as u16).to_le_bytes());
            }
            _ if *i >= i32::MIN as i64 && *i <= i32::MAX as i64 => {
                out.push(b'J');
                out.extend_from_slice(&(*i as i32).to_le_bytes());
            }
            _ => {
                out.extend_from_slice(&[0x8a, 8]);
                out.extend_from_slice(&i.to_le_bytes());
            }
        },
        P::Bytes(b) => {
            let (short, long) = if protocol >= 3 {
                (b'C', b'B')
            } else {
                (b'U', b'T')
            };
            if b.len() < 256 {
                out.extend_from_slice(&[short, b.len() as u8]);
            } else {
                out.push(long);
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            }
            out.extend_from_slice(b);
            put(protocol, out, memo);
        }
        P::Str(s) => {
            emit_str(s, protocol, out);
            put(protocol, out, memo);
        }
        P::List(items) => {
            out.push(b']');
            put(protocol, out, memo);
            if !items.is_empty() {
                out.push(b'(');
                for x in items {
                    emit(x, protocol, out, memo);
                }
                out.push(b'e');
            }
        }
        P::Tuple(items) => {
            if items.is_empty() {
                out.push(b')');
                return;
            }
            if items.len() <= 3 {
                for x in items {
                    emit(x, protocol, out, memo);
                }
                out.push(0x84 + items.len() as u8);
            } else {
                out.push(b'(');
                for x in items {
                    emit(x, protocol, out, memo);
                }
                out.push(b't');
            }
            put(protocol, out, memo);
        }
        P::Dict(kv) => {
            out.push(b'}');
            put(protocol, out, memo);
            if !kv.is_empty() {
                out.push(b'(');
                for (k, x) in kv {
                    emit(k, protocol, out, memo);
                    emit(x, protocol, out, memo);
                }
                out.push(b'u');
            }
        }
        P::Global(m, n) => {
            if protocol >= 4 {
                emit_str(m, protocol, out);
                put(protocol, out, memo);
                emit_str(n, protocol, out);
                put(protocol, out, memo);
                out.push(0x93);
            } else {
                out.push(b'c');
                out.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
            }
            put(protocol, out, memo);
        }
        P::Reduce(f, a) => {
            emit(f, protocol, out, memo);
            emit(a, protocol, out, memo);
            out.push(b'R');
            put(protocol, out, memo);
        }
        P::Build(o, s) => {
            emit(o, protocol, out, memo);
            emit(s, protocol, out, memo);
            out.push(b'b');
        }
    }
}

/// A numpy `uint8` array as `ndarray.__reduce__` pickles it.
pub fn np_u8(data: &[u8]) -> P {
    let dtype = P::Build(
        Box::new(P::Reduce(
            Box::new(P::Global("numpy", "dtype")),
            Box::new(P::Tuple(vec![
                P::Str("u1".into()),
                P::Bool(false),
                P::Bool(true),
            ])),
        )),
        Box::new(P::Tuple(vec![
            P::Int(3),
            P::Str("|".into()),
            P::None,
            P::None,
            P::None,
            P::Int(-1),
            P::Int(-1),
            P::Int(0),
        ])),
    );
    P::Build(
        Box::new(P::Reduce(
            Box::new(P::Global("numpy.core.multiarray", "_reconstruct")),
            Box::new(P::Tuple(vec![
                P::Global("numpy", "ndarray"),
                P::Tuple(vec![P::Int(0)]),
                P::Bytes(b"b".to_vec()),
            ])),
        )),
        Box::new(P::Tuple(vec![
            P::Int(1),
            P::Tuple(vec![P::Int(data.len() as i64)]),
            dtype,
            P::Bool(false),
            P::Bytes(data.to_vec()),
        ])),
    )
}

/// Python 3's protocol-2 spelling of `bytes`: `_codecs.encode(str, 'latin1')`.
pub fn codecs_bytes(data: &[u8]) -> P {
    P::Reduce(
        Box::new(P::Global("_codecs", "encode")),
        Box::new(P::Tuple(vec![
            P::Str(data.iter().map(|&b| b as char).collect()),
            P::Str("latin1".into()),
        ])),
    )
}

/// A `w`x`h` RGB test pattern.
pub fn pattern(w: u32, h: u32, seed: u8) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 37 + y * 11) as u8 ^ seed,
            (x * 5 + y * 53) as u8,
            seed.wrapping_mul(7),
        ])
    })
}

/// The image encoded as PNG.
pub fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The image encoded as JPEG.
pub fn jpeg(img: &image::RgbImage) -> Vec<u8> {
    fpipe_stages::data::recordio::encode_jpeg(
        img.as_raw(),
        img.height() as usize,
        img.width() as usize,
        90,
    )
    .unwrap()
}

/// A verification `.bin` pickle: `(bins, issame)` with `pairs` pairs of `side`-pixel images,
/// each image wrapped by `wrap` (bytes, numpy array, `_codecs.encode`).
pub fn bin_pickle(pairs: usize, side: u32, protocol: u8, wrap: fn(&[u8]) -> P) -> Vec<u8> {
    let bins = (0..2 * pairs)
        .map(|i| {
            let img = pattern(side, side, i as u8);
            wrap(&if i % 2 == 0 { png(&img) } else { jpeg(&img) })
        })
        .collect();
    let issame = (0..pairs).map(|i| P::Bool(i % 2 == 0)).collect();
    dumps(&P::Tuple(vec![P::List(bins), P::List(issame)]), protocol)
}

/// Writes an insightface-style RecordIO set (`train.rec` + `train.idx`) into `dir`: header
/// record 0, `n` image records with labels `i % classes`, one key range per class.
pub fn write_recordio(dir: &Path, n: usize, classes: usize, side: u32) -> std::path::PathBuf {
    let rec = dir.join("train.rec");
    let mut records = vec![(
        0u64,
        pack(&[(n + 1) as f32, (n + 1 + classes) as f32], 0, 0, &[]),
    )];
    for i in 0..n {
        let img = pattern(side, side, i as u8);
        let enc = if i % 2 == 0 { png(&img) } else { jpeg(&img) };
        records.push((
            i as u64 + 1,
            pack(&[(i % classes) as f32], i as u64 + 1, 0, &enc),
        ));
    }
    for c in 0..classes {
        let key = (n + 1 + c) as u64;
        records.push((key, pack(&[1.0, (n + 1) as f32], key, 0, &[])));
    }
    write_indexed(&rec, records).unwrap();
    rec
}

/// Writes a small packed data set into `dir`: `n` images of `side`x`side`, labels
/// `i % classes`, landmarks on even images, pairs when `pairs` is set.
pub fn write_packed(dir: &Path, n: usize, classes: usize, side: usize, pairs: bool) {
    let mut w = PackedWriter::create(dir, side, side).unwrap();
    for i in 0..n {
        let px: Vec<u8> = (0..side * side * 3).map(|k| (k * 7 + i) as u8).collect();
        let s = side as f32;
        let lm = [
            [0.3 * s, 0.4 * s],
            [0.7 * s, 0.4 * s],
            [0.5 * s, 0.55 * s],
            [0.35 * s, 0.75 * s],
            [0.65 * s, 0.75 * s],
        ];
        let truth = ImageTruth {
            true_label: (i % 3 == 0).then_some((i % classes) as i64),
            label_noise: i % 5 == 1,
            low_quality: i % 5 == 2,
            out_of_domain: false,
        };
        w.push(&px, (i % classes) as i64, (i % 2 == 0).then_some(lm), truth)
            .unwrap();
    }
    if pairs {
        w.set_pairs(
            (0..n as u32 / 2)
                .map(|k| (2 * k, 2 * k + 1, k % 2 == 0))
                .collect(),
        );
    }
    w.add_skipped("undecodable image", 1);
    w.finish(serde_json::json!({"kind": "test"})).unwrap();
}
