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
