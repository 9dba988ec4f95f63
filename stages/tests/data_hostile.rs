//! Hostile and careless data files: each gives an error that names the file and says what
//! is wrong, within bounded time and memory, and never a panic or a crashed process.

mod common;

/// Pickles that nest deeply or multiply memo references.
mod pickles {
    use fpipe_stages::data::pickle::{parse, Val, MAX_DEPTH};
    use fpipe_stages::data::vbin::read_bin_structure;
    use std::path::Path;
    use std::rc::Rc;

    /// `n`-deep nestings of each container kind, as pickle opcodes.
    fn deep_pickles(n: usize) -> Vec<(&'static str, Vec<u8>)> {
        let wrap = |body: Vec<u8>| {
            let mut p = vec![0x80, 2];
            p.extend(body);
            p.push(b'.');
            p
        };
        let list = [vec![b']'; n], vec![b'a'; n - 1]].concat();
        let tuple = [vec![b'N'], vec![0x85; n]].concat();
        let dict = [vec![b'}'], b"K\x00}".repeat(n - 1), vec![b's'; n - 1]].concat();
        let reduce = [vec![b'N'], b"NR".repeat(n)].concat();
        let mark_list = [b"(".repeat(n), b"l".repeat(n)].concat();
        vec![
            ("list", wrap(list)),
            ("tuple", wrap(tuple)),
            ("dict", wrap(dict)),
            ("reduce", wrap(reduce)),
            ("mark list", wrap(mark_list)),
        ]
    }

    #[test]
    fn pickle_nested_50000_deep_is_an_error_not_a_stack_overflow() {
        for (what, p) in deep_pickles(50_000) {
            let e = parse(&p).unwrap_err();
            assert!(e.message.contains("nested deeper"), "{what}: {e:?}");
            // Through the .bin reader the error names the file.
            let e = read_bin_structure(Path::new("deep.bin"), &p)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("deep.bin") && e.contains("nested deeper"),
                "{what}: {e}"
            );
        }
        // Nesting up to the limit parses.
        for (what, p) in deep_pickles(MAX_DEPTH as usize - 1) {
            assert!(parse(&p).is_ok(), "{what}");
        }
    }

    #[test]
    fn deep_values_drop_compare_and_print_without_recursion() {
        const N: usize = 200_000;
        let build = |kind: usize| {
            let mut v = Val::Int(1);
            for _ in 0..N {
                v = match kind {
                    0 => Val::List(Rc::new(vec![v])),
                    1 => Val::Tuple(Rc::new(vec![Val::None, v])),
                    2 => Val::Dict(Rc::new(vec![(Val::Int(0), v)])),
                    3 => Val::Reduce(Rc::new(v), Rc::new(Val::None)),
                    _ => Val::Build(Rc::new(Val::None), Rc::new(v)),
                };
            }
            v
        };
        for kind in 0..5 {
            let a = build(kind);
            let b = build(kind);
            assert!(a == b, "kind {kind}");
            assert!(a != Val::None);
            let text = format!("{a:?}");
            assert!(text.len() < 10_000 && text.contains('…'), "kind {kind}");
            let c = a.clone();
            drop(a);
            drop(c);
            drop(b);
        }
    }

    #[test]
    fn pickle_that_keeps_appending_to_memoized_lists_is_refused_quickly() {
        // `]` then (MEMOIZE, None, APPEND) 30000 times: every append copies the memoized list,
        // and the memo keeps every copy: 4.5e8 elements for a 90 KB file.
        let mut p = vec![0x80, 4, b']'];
        for _ in 0..30_000 {
            p.extend_from_slice(&[0x94, b'N', b'a']);
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        let e = parse(&p).unwrap_err();
        assert!(e.message.contains("memoized"), "{e:?}");
        assert!(t.elapsed().as_secs() < 5);
    }

    #[test]
    fn memo_references_to_a_long_string_share_it() {
        // A 100 KB string referenced 50000 times: the reader shares one copy (a copy per
        // reference would take 5 GB).
        let mut p = vec![0x80, 4, b'X'];
        p.extend_from_slice(&100_000u32.to_le_bytes());
        p.extend(std::iter::repeat_n(b'a', 100_000));
        p.extend_from_slice(&[0x94, b'(']);
        for _ in 0..50_000 {
            p.extend_from_slice(&[b'h', 0]);
        }
        p.extend_from_slice(b"l.");
        let v = parse(&p).unwrap();
        let Val::List(l) = &v else {
            panic!("not a list")
        };
        assert_eq!(l.len(), 50_000);
        let (Val::Str(a), Val::Str(b)) = (&l[0], &l[49_999]) else {
            panic!("not strings")
        };
        assert!(Rc::ptr_eq(a, b));
    }
}

/// Verification `.bin` files that refer to one image many times.
mod bins {
    use super::common::*;
    use fpipe_stages::data::recordio::OnError;
    use fpipe_stages::data::vbin::{import_bin, read_bin_structure, MAX_SAME_IMAGE};
    use std::path::Path;

    /// A `.bin` whose bins list refers to one small image `refs` times through the memo
    /// (`refs / 2` pairs).
    fn memo_bomb(refs: usize, protocol: u8, wrap: fn(&[u8]) -> P) -> Vec<u8> {
        let img = png(&pattern(8, 8, 3));
        let mut p = vec![0x80, protocol, b']', b'('];
        p.extend(opcodes(&wrap(&img), protocol));
        p.extend_from_slice(&[b'q', 200]);
        for _ in 1..refs {
            p.extend_from_slice(&[b'h', 200]);
        }
        p.extend_from_slice(b"e](");
        p.extend(std::iter::repeat_n(0x88, refs / 2));
        p.extend_from_slice(&[b'e', 0x86, b'.']);
        p
    }

    #[test]
    fn bin_referring_to_one_image_thousands_of_times_is_refused() {
        for (what, protocol, wrap) in [
            (
                "py2 str",
                2u8,
                (|b: &[u8]| P::Bytes(b.to_vec())) as fn(&[u8]) -> P,
            ),
            ("bytes", 4, |b: &[u8]| P::Bytes(b.to_vec())),
            ("_codecs.encode", 2, codecs_bytes),
        ] {
            let bomb = memo_bomb(5000, protocol, wrap);
            assert!(bomb.len() < 16_000, "{what}: {} bytes", bomb.len());
            let e = read_bin_structure(Path::new("bomb.bin"), &bomb)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("bomb.bin") && e.contains("bins[16]") && e.contains("memo references"),
                "{what}: {e}"
            );
            // The import stops before writing anything.
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("bomb.bin");
            std::fs::write(&file, &bomb).unwrap();
            let out = dir.path().join("out");
            let e = import_bin(&file, &out, OnError::Skip, &()).unwrap_err();
            assert!(e.to_string().contains("memo references"), "{what}: {e}");
            assert!(!out.join("images.u8").exists());
            // A few references (an image in several pairs) read; one more is refused.
            let ok = memo_bomb(MAX_SAME_IMAGE, protocol, wrap);
            let (bins, same) = read_bin_structure(Path::new("ok.bin"), &ok).unwrap();
            assert_eq!(bins.len(), MAX_SAME_IMAGE, "{what}");
            assert_eq!(same.len(), MAX_SAME_IMAGE / 2, "{what}");
            let e = read_bin_structure(
                Path::new("ok.bin"),
                &memo_bomb(MAX_SAME_IMAGE + 1, protocol, wrap),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("bins[{MAX_SAME_IMAGE}]")),
                "{what}: {e}"
            );
        }
    }
}

/// RecordIO files whose header or index claims what the files cannot hold.
mod recordio {
    use super::common::*;
    use fpipe_stages::data::recordio::{import_recordio, pack, write_indexed, OnError, RecReader};

    #[test]
    fn recordio_header_claiming_a_trillion_images_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("train.rec");
        // A 100-byte file: the header says keys 1..10^12 are images; the .idx lists two records.
        let img = png(&pattern(4, 4, 1));
        write_indexed(
            &rec,
            vec![
                (0, pack(&[1e12, 1e12 + 1.0], 0, 0, &[])),
                (1, pack(&[0.0], 1, 0, &img)),
            ],
        )
        .unwrap();
        let r = RecReader::open(&rec).unwrap();
        let e = r.image_keys().unwrap_err().to_string();
        assert!(
            e.contains("train.rec") && e.contains("claims") && e.contains("train.idx"),
            "{e}"
        );
        let e = import_recordio(&rec, &dir.path().join("out"), OnError::Skip, &())
            .unwrap_err()
            .to_string();
        assert!(e.contains("record 0") && e.contains("claims"), "{e}");
        // A label[0] of f32::MAX is refused the same way.
        write_indexed(&rec, vec![(0, pack(&[f32::MAX, 1.0], 0, 0, &[]))]).unwrap();
        let e = RecReader::open(&rec).unwrap().image_keys().unwrap_err();
        assert!(e.to_string().contains("claims"), "{e}");
        // A header that claims what the .idx lists is fine.
        write_recordio(dir.path(), 3, 2, 4);
        let (keys, _) = RecReader::open(&rec).unwrap().image_keys().unwrap();
        assert_eq!(keys, vec![1, 2, 3]);
    }

    #[test]
    fn recordio_read_at_an_offset_past_the_address_space_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let rec = write_recordio(dir.path(), 2, 1, 4);
        let r = RecReader::open(&rec).unwrap();
        for off in [u64::MAX, u64::MAX - 3, u64::MAX - 7, 1 << 40] {
            let e = r.read_at(off).unwrap_err().to_string();
            assert!(e.contains("train.rec") && e.contains("truncated"), "{e}");
        }
    }
}

/// Packed data sets with labels, counts or sizes that do not add up.
mod packed {
    use super::common::*;
    use fpipe_stages::data::{inspect, inspect_text, ImageTruth, PackedDataset, PackedWriter};
    use std::path::Path;

    fn patch_label(dir: &Path, image: usize, label: i64) {
        let p = dir.join("records.bin");
        let mut r = std::fs::read(&p).unwrap();
        r[image * 64..image * 64 + 8].copy_from_slice(&label.to_le_bytes());
        std::fs::write(p, r).unwrap();
    }

    fn patch_meta(dir: &Path, key: &str, v: serde_json::Value) {
        let p = dir.join("dataset.json");
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        m[key] = v;
        std::fs::write(p, serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn label_of_2_pow_62_is_an_error_naming_the_file_not_a_capacity_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_packed(d, 4, 2, 2, false);
        // As a writer that accepted the label would have written it.
        patch_label(d, 1, 1 << 62);
        patch_meta(d, "num_classes", serde_json::json!((1u64 << 62) + 1));
        let e = inspect(d).unwrap_err().to_string();
        assert!(
            e.contains("dataset.json") && e.contains("num_classes"),
            "{e}"
        );
        assert!(inspect_text(d).is_err());
        // With the class count left alone the label itself is out of range.
        patch_meta(d, "num_classes", serde_json::json!(2));
        let e = PackedDataset::open(d).unwrap_err().to_string();
        assert!(
            e.contains("records.bin")
                && e.contains("record 1")
                && e.contains("4611686018427387904"),
            "{e}"
        );
        patch_label(d, 1, -3);
        let e = PackedDataset::open(d).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("-3"), "{e}");
        patch_label(d, 1, 1);
        assert!(inspect(d).is_ok());
    }

    #[test]
    fn writer_refuses_labels_that_leave_most_classes_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::create(dir.path(), 2, 2).unwrap();
        w.push(&[0; 12], 1 << 62, None, ImageTruth::default())
            .unwrap();
        let e = w.finish(serde_json::json!({})).unwrap_err().to_string();
        assert!(e.contains("labels go up to 4611686018427387904"), "{e}");
        let mut w = PackedWriter::create(dir.path(), 2, 2).unwrap();
        w.push(&[0; 12], i64::MAX, None, ImageTruth::default())
            .unwrap();
        assert!(w.finish(serde_json::json!({})).is_err());
    }

    #[test]
    fn packed_sizes_that_overflow_or_disagree_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_packed(d, 4, 2, 2, true);
        for (key, v, want) in [
            ("images", serde_json::json!(u64::MAX), "images.u8"),
            ("images", serde_json::json!(1u64 << 60), "images.u8"),
            ("height", serde_json::json!(1u64 << 40), "height"),
            ("width", serde_json::json!(0), "width"),
            ("pairs", serde_json::json!(7), "pairs.bin"),
        ] {
            let saved = std::fs::read(d.join("dataset.json")).unwrap();
            patch_meta(d, key, v);
            let e = PackedDataset::open(d).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
            std::fs::write(d.join("dataset.json"), saved).unwrap();
        }
        assert!(PackedDataset::open(d).is_ok());
    }
}

/// Image folders: messages kept in the artifact, and how they read.
mod folders {
    use super::common::*;
    use fpipe_stages::data::folder::import_folder;
    use fpipe_stages::data::recordio::OnError;
    use std::path::Path;

    fn faces(root: &Path) {
        for (p, w) in [("alice/a.png", 20), ("alice/b.png", 10), ("bob/1.png", 20)] {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            pattern(w, 16, 5).save(&path).unwrap();
        }
        std::fs::write(root.join("bob/broken.jpg"), b"not a jpeg").unwrap();
        std::fs::create_dir_all(root.join("carol")).unwrap();
    }

    #[test]
    fn image_folder_artifact_does_not_depend_on_where_the_folder_lies() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut outputs = Vec::new();
        for t in [&a, &b] {
            let root = t.path().join("deep/er/faces");
            faces(&root);
            let out = t.path().join("out");
            let c = import_folder(&root, &out, OnError::Skip, &()).unwrap();
            assert_eq!((c.images, c.skipped), (2, 3), "{:?}", c.problems);
            let json = std::fs::read_to_string(out.join("dataset.json")).unwrap();
            let base = t.path().to_string_lossy().to_string();
            assert!(
                !json.contains(&base),
                "absolute path in dataset.json: {json}"
            );
            assert!(
                json.contains("bob/broken.jpg: whole file: undecodable"),
                "{json}"
            );
            assert!(json.contains("carol: identity folder"), "{json}");
            outputs.push(std::fs::read(out.join("dataset.json")).unwrap());
        }
        assert_eq!(outputs[0], outputs[1]);
    }

    #[test]
    fn image_size_mismatch_message_reads_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("faces");
        faces(&root);
        std::fs::remove_file(root.join("bob/broken.jpg")).unwrap();
        std::fs::remove_dir(root.join("carol")).unwrap();
        let c = import_folder(&root, &dir.path().join("s"), OnError::Skip, &()).unwrap();
        let p = c
            .problems
            .iter()
            .find(|p| p.contains("image is"))
            .expect("a size problem");
        assert_eq!(
            p,
            "alice/b.png: whole file: image is 10x16, the data set's first image is 20x16; \
             resize the images to one size"
        );
        let e = import_folder(&root, &dir.path().join("f"), OnError::Fail, &())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("alice/b.png: whole file: image is 10x16") && !e.contains(": :"),
            "{e}"
        );
        assert!(e.starts_with(&root.to_string_lossy().to_string()), "{e}");
    }
}

/// Encoded images whose header claims more than their bytes hold.
mod images {
    use super::common::*;
    use fpipe_stages::data::recordio::{decode_image, MAX_IMAGE_EXPANSION};

    #[test]
    fn image_header_claiming_far_more_pixels_than_its_bytes_hold_is_refused() {
        // A 6x6 JPEG whose frame header says 13879x10805 (450 MB of pixels, found by fuzzing).
        let mut j = jpeg(&pattern(6, 6, 1));
        let sof = j.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        j[sof + 5..sof + 9].copy_from_slice(&[0x2a, 0x35, 0x36, 0x37]);
        let e = decode_image(&j).unwrap_err();
        assert!(e.contains("claims 13879x10805"), "{e}");
        // The same for a PNG.
        let mut p = png(&pattern(6, 6, 1));
        p[16..24].copy_from_slice(&[0, 0, 0x40, 0, 0, 0, 0x40, 0]);
        let crc = crc32(&p[12..29]);
        p[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_image(&p).unwrap_err();
        assert!(e.contains("claims 16384x16384"), "{e}");
        // Large images that really are large still decode.
        let big = image::RgbImage::from_pixel(1200, 1000, image::Rgb([9, 9, 9]));
        let (h, w, _) = decode_image(&png(&big)).unwrap();
        assert_eq!((h, w), (1000, 1200));
        let (h, w, _) = decode_image(&jpeg(&big)).unwrap();
        assert_eq!((h, w), (1000, 1200));
        // A uniform grey PNG, compressed as far as deflate goes, expands three times more
        // than an RGB one (one byte per pixel) and still decodes.
        use image::codecs::png::{CompressionType, FilterType, PngEncoder};
        use image::ImageEncoder;
        let side = 3000u32;
        let grey = vec![200u8; (side * side) as usize];
        let mut enc = Vec::new();
        PngEncoder::new_with_quality(&mut enc, CompressionType::Best, FilterType::NoFilter)
            .write_image(&grey, side, side, image::ExtendedColorType::L8)
            .unwrap();
        let decoded = (side * side * 3) as usize;
        assert!(
            decoded > MAX_IMAGE_EXPANSION as usize * enc.len() + (1 << 20),
            "{} bytes",
            enc.len()
        );
        let (h, w, px) = decode_image(&enc).unwrap();
        assert_eq!((h, w, px[0]), (side as usize, side as usize, 200));
    }

    /// PNG's chunk CRC (CRC-32/ISO-HDLC).
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
}
