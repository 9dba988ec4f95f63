//! Benchmark of the data side against its peers (run by `bench_data.sh`, which also runs
//! `bench_data.py` on the same files): align throughput, RecordIO read + decode, ROC on
//! 15 million pairs. Prints one JSON line per measurement.
//!
//! `cargo run -p fpipe-stages --example bench_data -- DIR` (DIR: scratch folder)

use fpipe_stages::data::align::{align_dataset, norm_crop, OnMissing};
use fpipe_stages::data::recordio::{
    decode_image, export_recordio, import_recordio, unpack, OnError, RecReader,
};
use fpipe_stages::data::synth::{generate, SynthParams};
use fpipe_stages::eval::metrics;
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..n {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.expect("n > 0"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/fpipe-bench-data".into());
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    let threads = rayon::current_num_threads();
    // Inputs (made once; the Python peers read the same files).
    let faces = dir.join("faces");
    if !faces.join("dataset.json").exists() {
        let p = SynthParams {
            identities: 200,
            images_per_identity: 10,
            image_size: 160,
            pairs: 0,
            ..Default::default()
        };
        generate(&p, &faces, None, &())?;
    }
    let rec_src = dir.join("rec_src");
    if !rec_src.join("dataset.json").exists() {
        let p = SynthParams {
            identities: 500,
            images_per_identity: 10,
            image_size: 112,
            pairs: 0,
            seed: 1,
            ..Default::default()
        };
        generate(&p, &rec_src, None, &())?;
        export_recordio(&rec_src, &dir.join("rec"), 95)?;
    }
    let n_pairs = 15_000_000usize;
    let scores_path = dir.join("scores.f32");
    if !scores_path.exists() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut scores = Vec::with_capacity(n_pairs * 4);
        let mut labels = Vec::with_capacity(n_pairs);
        for i in 0..n_pairs {
            let same = i % 100 == 0; // 1 % genuine pairs, like IJB protocols
            let v = if same {
                0.35 + 0.35 * next() + 0.2 * next()
            } else {
                0.45 * next() + 0.1 * next() - 0.1
            };
            scores.extend_from_slice(&v.to_le_bytes());
            labels.push(same as u8);
        }
        std::fs::write(&scores_path, scores)?;
        std::fs::write(dir.join("labels.u8"), labels)?;
    }

    // Align in memory (what insightface's norm_crop loop does): estimate + warp per image.
    let ds = fpipe_stages::data::PackedDataset::open(&faces)?;
    let (h, w, _) = ds.image_shape();
    let (t, n) = best_of(3, || {
        (0..ds.len())
            .into_par_iter()
            .map_init(
                || vec![0u8; 112 * 112 * 3],
                |buf, i| {
                    let lm = ds.landmarks(i).expect("landmarks");
                    norm_crop(ds.image(i), h, w, &lm, 112, buf).map(|_| buf[0] as usize)
                },
            )
            .count()
    });
    println!(
        r#"{{"tool": "fpipe", "task": "align (in memory)", "images": {n}, "seconds": {t:.4}, "per_second": {:.0}, "threads": {threads}}}"#,
        n as f64 / t
    );

    // Align: 2000 images of 160x160 to 112x112, written as a packed data set.
    let (t, c) = best_of(3, || {
        let out = dir.join("aligned");
        let _ = std::fs::remove_dir_all(&out);
        align_dataset(&faces, &out, 112, OnMissing::Skip, &()).expect("align")
    });
    println!(
        r#"{{"tool": "fpipe", "task": "align stage (read packed, warp, write packed)", "images": {}, "seconds": {t:.4}, "per_second": {:.0}, "threads": {threads}}}"#,
        c.aligned,
        c.aligned as f64 / t
    );

    // RecordIO: read + decode every image (what a training loader does) and the full import.
    let rec = dir.join("rec/train.rec");
    let (t, n) = best_of(3, || {
        let r = RecReader::open(&rec).expect("open");
        let (keys, _) = r.image_keys().expect("keys");
        keys.par_iter()
            .map(|&k| {
                let payload = r.read_key(k).expect("read");
                let (_, img) = unpack(&payload).expect("unpack");
                decode_image(img).expect("decode").2.len()
            })
            .count()
    });
    println!(
        r#"{{"tool": "fpipe", "task": "recordio read+decode", "images": {n}, "seconds": {t:.4}, "per_second": {:.0}, "threads": {threads}}}"#,
        n as f64 / t
    );
    let (t, c) = best_of(3, || {
        let out = dir.join("imported");
        let _ = std::fs::remove_dir_all(&out);
        import_recordio(&rec, &out, OnError::Fail, &()).expect("import")
    });
    println!(
        r#"{{"tool": "fpipe", "task": "recordio import (read+decode+pack)", "images": {}, "seconds": {t:.4}, "per_second": {:.0}, "threads": {threads}}}"#,
        c.images,
        c.images as f64 / t
    );

    // ROC on 15 M pairs (read from the shared file).
    let bytes = std::fs::read(&scores_path)?;
    let scores: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let labels: Vec<bool> = std::fs::read(dir.join("labels.u8"))?
        .iter()
        .map(|&b| b != 0)
        .collect();
    let (t, roc) = best_of(3, || metrics::roc(&scores, &labels).expect("roc"));
    let tpr = metrics::tpr_at_fpr(&roc, &metrics::IJB_FPRS);
    println!(
        r#"{{"tool": "fpipe", "task": "roc 15M pairs", "pairs": {}, "seconds": {t:.4}, "points": {}, "auc": {:.6}, "tpr_at_1e-4": {:.6}, "threads": {threads}}}"#,
        scores.len(),
        roc.fpr.len(),
        metrics::auc(&roc),
        tpr[2]
    );
    Ok(())
}
