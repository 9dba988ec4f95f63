//! Bounded fuzz loops over the readers of untrusted data files: the pickle reader, the
//! verification `.bin` reader, RecordIO (`.rec` + `.idx`), the packed data set reader and
//! image decoding.
//!
//! Each target starts from small valid inputs made here with the crate's own writers,
//! mutates them with a fixed-seed generator (bit flips, extreme bytes and integers, numbers
//! in text replaced by extreme ones, inserted, deleted, duplicated and spliced ranges, long
//! runs of one byte, truncation) and feeds every mutant to the reader, which must return
//! `Ok` or `Err`: a panic, or more than `FPIPE_FUZZ_MAX_MB` (default 64) of memory for one
//! input, is a failure, and the input is saved as files in `target/tmp/fuzz/<target>/
//! failure-N/`. The input being run is always in `target/tmp/fuzz/<target>/current.bin`, so
//! one that kills the process (stack overflow, abort) is kept too. Replay either with
//! `FPIPE_FUZZ_REPLAY=<that path> cargo test -p fpipe-stages --test fuzz_readers <test>`.
//!
//! `FPIPE_FUZZ_SECONDS` (default 2.5) is the time per target and `FPIPE_FUZZ_SEED` the
//! generator's seed (the same seed gives the same mutants); `scripts/fuzz.sh` runs the loops
//! for longer. An input found this way becomes a regression test in
//! `tests/data_hostile.rs` once its bug is fixed.

mod common;

use common::*;
use fpipe_stages::data::pickle::{bytes, ndarray, np_scalar, parse, Val};
use fpipe_stages::data::recordio::{decode_image, import_recordio, unpack, OnError, RecReader};
use fpipe_stages::data::vbin::{import_bin, read_bin_structure};
use fpipe_stages::data::{align, inspect, recordio, PackedDataset};
use fpipe_stages::util::rng::SplitMix;
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- memory accounting

/// The system allocator, counting the bytes live and the peak since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------- the harness

/// One target at a time, so that the memory peak of an input is its own.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The crate's SplitMix64, with the draws the mutator needs.
struct Rng(SplitMix);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    /// A position in `0..len`, biased to the first bytes (headers and lengths).
    fn pos(&mut self, len: usize) -> usize {
        if self.below(3) == 0 {
            self.below(len.min(32))
        } else {
            self.below(len)
        }
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const EXTREME_INTS: [u64; 10] = [
    0,
    1,
    0x7F,
    0xFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 62,
    u64::MAX,
];
const EXTREME_NUMBERS: [&str; 9] = [
    "0",
    "-1",
    "4294967296",
    "4611686018427387904",
    "18446744073709551615",
    "99999999999999999999999",
    "1e308",
    "-9223372036854775808",
    "3.5",
];

/// Applies one random mutation to `d`; `others` are the other parts and seeds to splice from.
fn mutate(rng: &mut Rng, d: &mut Vec<u8>, others: &[&[u8]]) {
    let len = d.len();
    match rng.below(12) {
        0 if len > 0 => {
            let p = rng.pos(len);
            d[p] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let p = rng.pos(len);
            d[p] = rng.next() as u8;
        }
        2 if len > 0 => {
            let p = rng.pos(len);
            d[p] = [0x00, 0xFF, 0x7F, 0x80][rng.below(4)];
        }
        3 if len > 0 => {
            // An extreme little-endian integer of 1, 2, 4 or 8 bytes.
            let v = EXTREME_INTS[rng.below(EXTREME_INTS.len())];
            let w = [1, 2, 4, 8][rng.below(4)];
            let p = rng.pos(len);
            for (k, b) in v.to_le_bytes().iter().take(w).enumerate() {
                if let Some(x) = d.get_mut(p + k) {
                    *x = *b;
                }
            }
        }
        4 => {
            let p = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            d.splice(p..p, ins);
        }
        5 if len > 0 => {
            let p = rng.pos(len);
            let n = (1 + rng.below(32)).min(len - p);
            d.drain(p..p + n);
        }
        6 if len > 0 => {
            // Duplicate a range elsewhere.
            let p = rng.below(len);
            let n = (1 + rng.below(64)).min(len - p);
            let chunk = d[p..p + n].to_vec();
            let q = rng.below(len + 1);
            d.splice(q..q, chunk);
        }
        7 if !others.is_empty() => {
            // Splice: keep a head, take another input's tail.
            let o = others[rng.below(others.len())];
            let p = rng.below(len + 1);
            let q = rng.below(o.len() + 1);
            d.truncate(p);
            d.extend_from_slice(&o[q..]);
        }
        8 if len > 0 => {
            d.truncate(rng.pos(len));
        }
        9 => {
            // Replace a run of ASCII digits (a number in text) with an extreme number.
            let starts: Vec<usize> = (0..len)
                .filter(|&i| d[i].is_ascii_digit() && (i == 0 || !d[i - 1].is_ascii_digit()))
                .collect();
            if starts.is_empty() {
                return;
            }
            let s = starts[rng.below(starts.len())];
            let e = (s..len).find(|&i| !d[i].is_ascii_digit()).unwrap_or(len);
            let n = EXTREME_NUMBERS[rng.below(EXTREME_NUMBERS.len())];
            d.splice(s..e, n.bytes());
        }
        10 if len > 1 => {
            // Copy a range over another place of the same input.
            let p = rng.below(len);
            let q = rng.below(len);
            let n = (1 + rng.below(16)).min(len - p).min(len - q);
            let chunk = d[p..p + n].to_vec();
            d[q..q + n].copy_from_slice(&chunk);
        }
        _ => {
            // Repeat a byte many times (long runs of one opcode, deep nesting, big counts).
            if len > 0 {
                let p = rng.below(len);
                let most = if rng.below(8) == 0 { 20_000 } else { 64 };
                let n = 1 + rng.below(most);
                let b = d[p];
                d.splice(p..p, std::iter::repeat_n(b, n));
            }
        }
    }
}

/// An input of a target: named parts (files); most targets have one.
type Input = Vec<(String, Vec<u8>)>;

fn one_part(name: &str, v: Vec<u8>) -> Input {
    vec![(name.to_string(), v)]
}

fn save(dir: &Path, input: &Input) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in input {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The parts of an input as files in a folder, written when a reader first asks for them.
struct Files<'a> {
    dir: &'a Path,
    input: &'a Input,
    written: std::cell::Cell<bool>,
}

impl Files<'_> {
    fn dir(&self) -> &Path {
        if !self.written.replace(true) {
            save(self.dir, self.input);
        }
        self.dir
    }
}

/// `current.bin`: the input being run, kept in a shared memory map so that recording it
/// costs no system call and it survives the process dying (stack overflow, abort). Layout:
/// `u64` part count, then per part `u64` name length, name, `u64` length, bytes.
struct Current {
    file: std::fs::File,
    map: memmap2::MmapMut,
}

impl Current {
    fn create(path: &Path) -> Current {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        // SAFETY: the file is this process's own scratch file; nothing else maps it.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
        Current { file, map }
    }

    fn record(&mut self, input: &Input) {
        let need = 8 + input
            .iter()
            .map(|(n, b)| 16 + n.len() + b.len())
            .sum::<usize>();
        if need > self.map.len() {
            self.file.set_len(need.next_power_of_two() as u64).unwrap();
            // SAFETY: as in `create`.
            self.map = unsafe { memmap2::MmapMut::map_mut(&self.file) }.unwrap();
        }
        let mut at = 0;
        let mut put = |bytes: &[u8], map: &mut [u8]| {
            map[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&(input.len() as u64).to_le_bytes(), &mut self.map);
        for (name, bytes) in input {
            put(&(name.len() as u64).to_le_bytes(), &mut self.map);
            put(name.as_bytes(), &mut self.map);
            put(&(bytes.len() as u64).to_le_bytes(), &mut self.map);
            put(bytes, &mut self.map);
        }
    }
}

/// An input to replay: a `current.bin` written by [`Current`], or a folder of part files.
fn load(path: &Path) -> Input {
    if path.is_dir() {
        let mut parts: Input = std::fs::read_dir(path)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        parts.sort();
        return parts;
    }
    let b = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut take = |n: usize| {
        at += n;
        &b[at - n..at]
    };
    let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap()) as usize;
    let count = u64_at(take(8));
    (0..count)
        .map(|_| {
            let n = u64_at(take(8));
            let name = String::from_utf8_lossy(take(n)).into_owned();
            let n = u64_at(take(8));
            (name, take(n).to_vec())
        })
        .collect()
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Runs `run` on every seed (each must be `Ok`) and then on mutants for the configured time;
/// with `FPIPE_FUZZ_REPLAY=<current.bin or failure folder>`, on that one input only.
/// `run` gets the input and its parts as files (written on first use).
fn fuzz(
    target: &str,
    seeds: Vec<Input>,
    mut run: impl FnMut(&Input, &Files) -> Result<(), String>,
) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let secs = env_f64("FPIPE_FUZZ_SECONDS", 2.5);
    let seed = env_f64("FPIPE_FUZZ_SEED", 20_240_611.0) as u64;
    let max_mb = env_f64("FPIPE_FUZZ_MAX_MB", 64.0);
    // Readers that need files get them in memory-backed storage where there is some.
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    if let Ok(replay) = std::env::var("FPIPE_FUZZ_REPLAY") {
        let input = load(Path::new(&replay));
        let files = Files {
            dir: &scratch.path().join("input"),
            input: &input,
            written: Default::default(),
        };
        eprintln!(
            "fuzz {target}: replaying {replay}: {:?}",
            run(&input, &files)
        );
        return;
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz")
        .join(target);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let mut current = Current::create(&root.join("current.bin"));
    let mut rng = Rng(SplitMix::new(
        seed ^ target
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(131) ^ b as u64),
    ));
    let mut failures: Vec<String> = Vec::new();
    let (mut runs, mut oks, mut peak_max) = (0usize, 0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut one =
        |input: &Input, label: String, failures: &mut Vec<String>| -> Result<(), String> {
            current.record(input);
            let files = Files {
                dir: &scratch.path().join("input"),
                input,
                written: Default::default(),
            };
            let base = LIVE.load(Relaxed);
            PEAK.store(base, Relaxed);
            let r = catch_unwind(AssertUnwindSafe(|| run(input, &files)));
            let used = PEAK.load(Relaxed).saturating_sub(base);
            peak_max = peak_max.max(used);
            let problem = match &r {
                Err(p) => Some(format!("panicked: {}", panic_text(p.as_ref()))),
                Ok(_) if used as f64 > max_mb * 1048576.0 => {
                    Some(format!("used {} MB for one input", used >> 20))
                }
                _ => None,
            };
            if let Some(why) = problem {
                let dir = root.join(format!("failure-{}", failures.len()));
                save(&dir, input);
                failures.push(format!("{label}: {why} (input saved in {})", dir.display()));
            }
            if files.written.get() {
                // Keep the input's files (overwritten next time), remove what the reader wrote.
                for e in std::fs::read_dir(files.dir).unwrap().flatten() {
                    if !input.iter().any(|(n, _)| e.file_name() == n.as_str()) {
                        let _ = std::fs::remove_dir_all(e.path());
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            match r {
                Ok(r) => r,
                Err(_) => Err("panicked".into()),
            }
        };
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = one(s, format!("seed {i}"), &mut failures) {
            panic!("{target}: seed {i} is not read: {e}");
        }
    }
    let pool: Vec<Vec<u8>> = seeds
        .iter()
        .flat_map(|s| s.iter().map(|p| p.1.clone()))
        .collect();
    let pool: Vec<&[u8]> = pool.iter().map(|v| v.as_slice()).collect();
    while Instant::now() < deadline && failures.len() < 10 {
        let mut input = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let k = rng.below(input.len());
            mutate(&mut rng, &mut input[k].1, &pool);
        }
        runs += 1;
        oks += one(&input, format!("mutant {runs}"), &mut failures).is_ok() as usize;
    }
    eprintln!(
        "fuzz {target}: {runs} mutants in {secs} s, {oks} read without error, \
         largest memory peak of one input {} KB",
        peak_max >> 10
    );
    assert!(failures.is_empty(), "{target}:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------- targets

fn raw(b: &[u8]) -> P {
    P::Bytes(b.to_vec())
}

#[test]
fn fuzz_pickle_reader() {
    let mut seeds = Vec::new();
    for proto in [2u8, 4] {
        seeds.push(one_part("p.pkl", bin_pickle(1, 4, proto, raw)));
        seeds.push(one_part("p.pkl", bin_pickle(1, 4, proto, np_u8)));
        seeds.push(one_part("p.pkl", bin_pickle(1, 4, proto, codecs_bytes)));
        let v = P::Dict(vec![
            (
                P::Str("a".into()),
                P::List(vec![P::Int(1), P::Int(300), P::Int(-5), P::Int(1 << 40)]),
            ),
            (
                P::Int(2),
                P::Tuple(vec![P::None, P::Bool(true), P::Str("x".repeat(300))]),
            ),
            (
                P::Str("t".into()),
                P::Tuple(vec![P::Int(1), P::Int(2), P::Int(3), P::Int(4)]),
            ),
        ]);
        seeds.push(one_part("p.pkl", dumps(&v, proto)));
    }
    // Text opcodes of protocol 0 (INT, LONG, PUT/GET by text).
    seeds.push(one_part("p.pkl", b"(I12\nL7L\np0\ng0\nI01\nt.".to_vec()));
    fuzz("pickle", seeds, |input, _| {
        let data = &input[0].1;
        let v = parse(data).map_err(|e| e.message)?;
        let items: Vec<Val> = match &v {
            Val::List(l) | Val::Tuple(l) => l.iter().take(64).cloned().collect(),
            other => vec![other.clone()],
        };
        for x in items.iter().chain([&v]) {
            let _ = ndarray(x);
            let _ = np_scalar(x);
            let _ = bytes(x, data);
            assert!(format!("{x:?}").len() < 1 << 20);
        }
        let _ = v == v.clone(); // NaN floats are unequal to themselves
        Ok(())
    });
}

#[test]
fn fuzz_verification_bin_reader() {
    let mut seeds = Vec::new();
    for (proto, wrap) in [
        (2u8, raw as fn(&[u8]) -> P),
        (4, raw),
        (2, np_u8),
        (4, np_u8),
        (2, codecs_bytes),
    ] {
        seeds.push(one_part("v.bin", bin_pickle(2, 6, proto, wrap)));
    }
    let mut n = 0usize;
    fuzz("verification-bin", seeds, |input, files| {
        n += 1;
        let data = &input[0].1;
        let (bins, _) = read_bin_structure(Path::new("v.bin"), data).map_err(|e| e.to_string())?;
        for b in bins.iter().take(8) {
            decode_image(b)?;
        }
        // Now and then the whole import, which writes a packed set.
        if n.is_multiple_of(16) {
            let dir = files.dir();
            let out = dir.join("out");
            import_bin(&dir.join("v.bin"), &out, OnError::Skip, &()).map_err(|e| e.to_string())?;
            PackedDataset::open(&out).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_recordio_reader() {
    let dir = tempfile::tempdir().unwrap();
    let rec = write_recordio(dir.path(), 4, 2, 6);
    let seed = vec![
        ("train.rec".to_string(), std::fs::read(&rec).unwrap()),
        (
            "train.idx".to_string(),
            std::fs::read(rec.with_extension("idx")).unwrap(),
        ),
    ];
    // A plain im2rec file (every key an image) with a record split at an aligned magic.
    let plain = dir.path().join("p/train.rec");
    std::fs::create_dir_all(plain.parent().unwrap()).unwrap();
    let mut payload = recordio::pack(&[1.0], 0, 0, &png(&pattern(6, 6, 9)));
    payload.extend_from_slice(&recordio::MAGIC.to_le_bytes());
    recordio::write_indexed(
        &plain,
        vec![
            (0, payload),
            (
                5,
                recordio::pack(&[2.0, 3.0], 5, 0, &jpeg(&pattern(6, 6, 2))),
            ),
        ],
    )
    .unwrap();
    let seed2 = vec![
        ("train.rec".to_string(), std::fs::read(&plain).unwrap()),
        (
            "train.idx".to_string(),
            std::fs::read(plain.with_extension("idx")).unwrap(),
        ),
    ];
    let mut n = 0usize;
    fuzz("recordio", vec![seed, seed2], |_, files| {
        n += 1;
        let dir = files.dir();
        let rec = dir.join("train.rec");
        let r = RecReader::open(&rec).map_err(|e| e.to_string())?;
        let (keys, _) = r.image_keys().map_err(|e| e.to_string())?;
        let mut result = Ok(());
        for &k in keys.iter().take(64) {
            let step = r.read_key(k).map_err(|e| e.to_string()).and_then(|p| {
                let (h, img) = unpack(&p)?;
                let _ = h.label.first();
                decode_image(img).map(|_| ())
            });
            result = result.and(step);
        }
        // Every record of the .idx (header, class ranges) is readable.
        for k in r.keys().take(64).collect::<Vec<_>>() {
            let step = r.read_key(k).map_err(|e| e.to_string());
            result = result.and(step.and_then(|p| unpack(&p).map(|_| ())));
        }
        if n.is_multiple_of(16) {
            let out = dir.join("out");
            import_recordio(&rec, &out, OnError::Skip, &()).map_err(|e| e.to_string())?;
            PackedDataset::open(&out).map_err(|e| e.to_string())?;
        }
        result
    });
}

#[test]
fn fuzz_packed_dataset_reader() {
    let dir = tempfile::tempdir().unwrap();
    write_packed(dir.path(), 6, 3, 4, true);
    let part = |n: &str| (n.to_string(), std::fs::read(dir.path().join(n)).unwrap());
    let seed = vec![
        part("dataset.json"),
        part("records.bin"),
        part("pairs.bin"),
        part("images.u8"),
    ];
    let mut n = 0usize;
    fuzz("packed", vec![seed], |_, files| {
        n += 1;
        let dir = files.dir();
        let d = PackedDataset::open(dir).map_err(|e| e.to_string())?;
        inspect(dir).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; d.image(0).len()];
        for i in 0..d.len().min(64) {
            let _ = (d.label(i), d.landmarks(i), d.truth(i), d.image(i).len());
            d.read_image(i, &mut buf).map_err(|e| e.to_string())?;
        }
        let _ = d.class_counts();
        if n.is_multiple_of(8) {
            let out = dir.join("aligned");
            align::align_dataset(dir, &out, 8, align::OnMissing::Skip, &())
                .map_err(|e| e.to_string())?;
            recordio::export_recordio(dir, &dir.join("rec"), 90).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_image_decoding() {
    let img = pattern(7, 5, 3);
    let mut seeds = vec![
        one_part("i.png", png(&img)),
        one_part("i.jpg", jpeg(&img)),
        one_part("i.jpg", jpeg(&pattern(17, 16, 8))),
    ];
    for dyn_img in [
        image::DynamicImage::ImageLuma8(image::DynamicImage::ImageRgb8(img.clone()).to_luma8()),
        image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(img.clone()).to_rgba8()),
        image::DynamicImage::ImageRgb16(image::DynamicImage::ImageRgb8(img.clone()).to_rgb16()),
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        dyn_img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        seeds.push(one_part("i.png", out.into_inner()));
    }
    fuzz("image", seeds, |input, _| {
        let (h, w, px) = decode_image(&input[0].1)?;
        assert_eq!(px.len(), h * w * 3);
        Ok(())
    });
}
