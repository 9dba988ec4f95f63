//! IJB-B/C template verification of `evaluate` (`fpipe_stages::eval::ijb`): protocol files
//! in insightface's layout and the numbers of insightface's `eval_ijbc.py` steps (golden
//! files of `tests/golden/ijb/make_ijb.py`); bad protocol lines are errors naming file and line.

use fpipe_stages::eval::ijb::{ijb_verify, read_protocol};
use fpipe_stages::eval::metrics::IJB_FPRS;
use std::path::Path;

fn golden() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ijb")
}

#[test]
fn template_scores_and_tpr_match_eval_ijbc() {
    let dir = golden();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let feats: Vec<f32> = std::fs::read(dir.join("feats.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let p = read_protocol(&dir).unwrap();
    assert_eq!(p.images.len(), 40);
    assert_eq!(p.pairs.len(), 66);
    // No `loose_crop/` in the folder: images are looked up beside the protocol.
    assert_eq!(p.image_dir, dir);
    let dim = want["dim"].as_u64().unwrap() as usize;
    let r = ijb_verify(&feats, dim, &p, &IJB_FPRS).unwrap();
    assert_eq!(r.templates as u64, want["templates"].as_u64().unwrap());
    let scores: Vec<f64> = want["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (k, (a, b)) in r.scores.iter().zip(&scores).enumerate() {
        assert!((*a as f64 - b).abs() < 1e-6, "pair {k}: {a} vs {b}");
    }
    let tprs: Vec<f64> = r.eval.tpr_at_fpr.iter().map(|t| t.1).collect();
    let want_tprs: Vec<f64> = want["tpr_at_fpr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(tprs, want_tprs);
    assert!((r.eval.auc - want["auc"].as_f64().unwrap()).abs() < 1e-12);
    // The detector score weighs images within a media mean and media within a template:
    // raising two images' scores moves the scores.
    let mut p2 = p.clone();
    p2.images[0].score *= 4.0;
    p2.images[12].score *= 4.0;
    let r2 = ijb_verify(&feats, dim, &p2, &IJB_FPRS).unwrap();
    assert_ne!(r2.scores, r.scores);
}

fn write_protocol(dir: &Path, tid: &str, lmk: &str, pairs: &str) {
    std::fs::create_dir_all(dir.join("meta")).unwrap();
    std::fs::write(dir.join("meta/x_face_tid_mid.txt"), tid).unwrap();
    std::fs::write(dir.join("meta/x_name_5pts_score.txt"), lmk).unwrap();
    std::fs::write(dir.join("meta/x_template_pair_label.txt"), pairs).unwrap();
}

#[test]
fn bad_protocol_lines_name_file_and_line() {
    let t = tempfile::tempdir().unwrap();
    let lm = "1 2 3 4 5 6 7 8 9 10";
    let ok_tid = "a.jpg 1 1\nb.jpg 2 2\n";
    let ok_lmk = format!("a.jpg {lm} 0.9\nb.jpg {lm} 0.8\n");
    write_protocol(t.path(), ok_tid, &ok_lmk, "1 2 0\n1 1 1\n");
    let p = read_protocol(t.path()).unwrap();
    assert_eq!(p.labels, vec![false, true]);
    assert_eq!(p.images[1].landmarks[4], [9.0, 10.0]);
    assert_eq!(p.images[1].score, 0.8);
    let cases = [
        (ok_tid.to_string(), ok_lmk.clone(), "1 2 2\n", "x_template_pair_label.txt: line 1: label `2` is not 0 or 1"),
        (ok_tid.to_string(), ok_lmk.clone(), "1 2 0\n1 q 1\n", "x_template_pair_label.txt: line 2: template id `q` is not a number"),
        (ok_tid.to_string(), format!("a.jpg {lm} 0.9\nc.jpg {lm} 0.8\n"), "1 2 0\n", "x_name_5pts_score.txt: line 2: image `c.jpg` where"),
        (ok_tid.to_string(), format!("a.jpg {lm}\nb.jpg {lm} 0.8\n"), "1 2 0\n", "x_name_5pts_score.txt: line 1: expected `image x1 y1 ... x5 y5 score` (12 fields), got 11"),
        ("a.jpg 1\nb.jpg 2 2\n".to_string(), ok_lmk.clone(), "1 2 0\n", "x_face_tid_mid.txt: line 1: expected `image template media`"),
        ("a.jpg 1 1\n".to_string(), ok_lmk.clone(), "1 2 0\n", "lists 1 images"),
    ];
    for (tid, lmk, pairs, msg) in cases {
        write_protocol(t.path(), &tid, &lmk, pairs);
        let e = read_protocol(t.path()).unwrap_err().to_string();
        assert!(e.contains(msg), "{e}\nwanted: {msg}");
    }
    std::fs::remove_file(t.path().join("meta/x_face_tid_mid.txt")).unwrap();
    let e = read_protocol(t.path()).unwrap_err().to_string();
    assert!(e.contains("no `*_face_tid_mid.txt`"), "{e}");
}
