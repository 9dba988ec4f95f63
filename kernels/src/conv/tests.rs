//! Convolution tests: forward against a naive reference, both gradients against a naive
//! reference and against central finite differences, for every algorithm variant.

use candle_core::{DType, Device, Tensor, Var};

use super::{conv2d, simd, taps, Geom};

/// A convolution entry point: `(x, w, stride, pad, groups) -> y`.
type ConvFn = fn(&Tensor, &Tensor, usize, usize, usize) -> candle_core::Result<Tensor>;

/// (n, c, h, w, o, k, stride, pad, groups).
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// Every path of `dense.rs`, `direct.rs`, `dw3.rs` and `blocked.rs`.
const CASES: &[Case] = &[
    (2, 3, 7, 6, 4, 3, 1, 1, 1), // dense 3x3, odd sizes, several images per chunk
    (2, 3, 17, 17, 4, 3, 1, 1, 1), // dense, one image per chunk (289 outputs)
    (1, 3, 40, 37, 8, 3, 2, 1, 1), // 3-channel stride-2 stem: the skinny kernels, both ways
    (1, 3, 40, 40, 8, 3, 1, 1, 1), // stride-1 stem: input gradient in two bands of rows
    (1, 2, 40, 40, 8, 4, 1, 1, 1), // 32 rows of columns, output 39x39: bands, not "same"
    (2, 4, 9, 8, 6, 3, 2, 1, 1), // dense stride 2
    (3, 8, 5, 5, 16, 1, 1, 0, 1), // 1x1 as plain GEMM, batched
    (2, 8, 17, 16, 4, 1, 1, 0, 1), // 1x1 as plain GEMM, one image per chunk
    (1, 8, 9, 7, 8, 1, 2, 0, 1), // 1x1 stride 2 (shortcut)
    (2, 4, 9, 38, 8, 1, 2, 0, 1), // the same, rows long enough for the vector take and spread
    (1, 4, 10, 37, 8, 1, 2, 0, 1), // the same, odd rows (a scalar tail), an even height
    (2, 16, 56, 56, 8, 1, 2, 0, 1), // the same at iresnet's 56x56: spread from registers
    (3, 8, 28, 28, 5, 1, 2, 0, 1), // spread, two output rows per tile, 3 images: uneven shares
    (2, 8, 12, 20, 4, 1, 2, 0, 1), // spread, rows of 10: two per tile
    (2, 8, 10, 8, 3, 1, 2, 0, 1), // spread, rows of 4: one tile of 5 rows (a partial tile)
    (1, 64, 8, 8, 16, 1, 2, 0, 2), // spread per group (32 channels each)
    (1, 8, 20, 8, 4, 1, 2, 0, 1), // spread, a tile of 8 rows of 4, then one of 2
    (1, 8, 6, 24, 4, 1, 2, 0, 1), // spread, rows of 12: a tile of 2, then one of 12 positions
    (1, 4, 11, 11, 8, 7, 2, 3, 1), // dense 7x7 stride 2
    (5, 3, 5, 5, 2, 3, 1, 2, 1), // padding larger than a tap reaches
    (2, 3, 6, 7, 4, 5, 1, 2, 1), // dense 5x5 "same": im2col's one-run copy, taps 2 rows off
    (1, 64, 43, 43, 4, 3, 1, 1, 1), // dense, columns over 2^20: bands of 10 rows, last of 3
    (1, 64, 46, 45, 4, 3, 1, 0, 1), // the same unpadded (row by row), bands of 10, last of 4
    (1, 32, 90, 91, 4, 5, 2, 2, 1), // the same 5x5 stride 2, bands of 7 rows, last of 3
    (1, 64, 48, 48, 8, 3, 1, 1, 2), // wide groups, input gradient in channel bands of 25 + 7
    (2, 64, 5, 5, 64, 3, 1, 1, 2), // wide groups (32 channels): GEMM per group
    (2, 64, 17, 16, 32, 1, 1, 0, 2), // wide groups pointwise
    (2, 16, 9, 9, 16, 3, 1, 1, 2), // groups = C/8 (VarGFaceNet), direct
    (2, 16, 8, 7, 32, 3, 2, 1, 2), // groups = C/8, factor 2, stride 2
    (2, 8, 6, 6, 8, 3, 1, 1, 4), // 2 channels per group (MobileFaceNet 128 g64)
    (3, 6, 7, 7, 6, 3, 1, 1, 6), // depthwise
    (2, 6, 9, 8, 6, 3, 2, 1, 6), // depthwise stride 2, odd/even sizes
    (2, 4, 6, 6, 8, 3, 1, 1, 4), // depthwise with channel multiplier 2
    (2, 4, 7, 7, 4, 7, 1, 0, 4), // GDC: 7x7 depthwise, no padding, 1x1 output
    (1, 16, 7, 7, 16, 7, 1, 0, 2), // 7x7 group conv, 8 channels per group (VarGFaceNet)
    (1, 3, 70, 9, 3, 3, 1, 1, 3), // depthwise with rows longer than a register block
    (3, 12, 9, 7, 12, 3, 2, 1, 12), // depthwise, a full and a partial channel block, stride 2
    (2, 10, 8, 9, 10, 5, 1, 2, 10), // depthwise 5x5: 25 taps, several weight-gradient passes
    (2, 9, 6, 5, 9, 3, 2, 0, 9), // depthwise stride 2 without padding
    (2, 16, 20, 19, 16, 3, 2, 1, 16), // depthwise stride 2, rows of 19 and 10: overlapping blocks
    (1, 8, 11, 10, 8, 5, 2, 2, 8), // depthwise 5x5 stride 2: 3x3, 3x2, 2x3, 2x2 taps per phase
    (1, 8, 9, 10, 8, 1, 2, 0, 8), // depthwise 1x1 stride 2: three phases no tap reaches
    (1, 8, 10, 11, 8, 3, 3, 0, 8), // depthwise stride 3 unpadded: rows past the last window
    (2, 16, 7, 7, 16, 3, 2, 0, 2), // groups = C/8, stride 2 without padding, odd size
    (1, 16, 11, 10, 16, 5, 2, 2, 2), // groups = C/8, 5x5 stride 2: sub-kernels 3x3 to 2x2
    (2, 16, 9, 9, 16, 1, 2, 0, 2), // grouped 1x1 stride 2: phases no tap reaches
    (2, 8, 10, 9, 8, 3, 3, 1, 4), // stride 3, 2 channels per group
    (2, 4, 9, 8, 8, 3, 2, 1, 4), // depthwise multiplier 2, stride 2 (not channel-blocked)
    (1, 16, 6, 37, 16, 3, 2, 1, 2), // stride 2, rows long enough for the vector (de)interleave
    (2, 32, 9, 10, 32, 3, 2, 1, 2), // 16 channels per group, stride 2: channel-vectorised
    (2, 32, 7, 7, 32, 3, 1, 1, 2), // the same at stride 1 on a 7x7 plane (49 pixels)
    (1, 16, 7, 9, 64, 3, 1, 1, 2), // 32 outputs per group: two 16-channel blocks
    (1, 16, 9, 8, 32, 5, 1, 2, 2), // 16 outputs per group, 5x5: 200 (channel, tap) pairs
    (1, 16, 9, 9, 32, 1, 2, 0, 2), // 16 outputs per group, 1x1 stride 2: 8 pairs
    (2, 5, 13, 14, 5, 3, 1, 1, 5), // depthwise 3x3 s1 in place: odd rows, overlapping vectors
    (1, 4, 8, 8, 4, 3, 1, 1, 4), // the same, rows of exactly one vector (both ends masked)
    (1, 3, 1, 17, 3, 3, 1, 1, 3), // the same, one row: both padding rows skipped
    (1, 2, 6, 16, 2, 3, 1, 1, 2), // the same, rows of exactly two vectors
    (1, 2, 3, 512, 2, 3, 2, 1, 1), // dense stride 2, the widest rows of the phase split
    (1, 2, 3, 513, 2, 3, 2, 1, 1), // one wider: the strided scalar loops
    (1, 3, 3, 3, 2, 5, 2, 2, 1), // dense stride 2, kernel larger than the input
    (1, 3, 4, 5, 2, 3, 2, 3, 1), // dense stride 2, padding beyond the kernel's reach
    (1, 8, 3, 3, 8, 5, 2, 2, 8), // blocked depthwise, kernel larger than the input
    (1, 8, 4, 5, 8, 3, 2, 3, 8), // blocked depthwise, padding beyond the kernel's reach
    (10, 16, 7, 7, 16, 7, 1, 0, 2), // whole-plane groups, 10 images: a short last task
    (9, 4, 7, 7, 4, 7, 1, 0, 4), // whole-plane depthwise (GDC), 9 images
];

/// Cases with a kernel wider or narrower than it is tall: a case as in [`CASES`] (its `k` is
/// the kernel's height) and the kernel's width.
const RECT_CASES: &[(Case, usize)] = &[
    ((1, 3, 9, 11, 4, 3, 2, 1, 1), 5),  // dense 3x5 stride 2
    ((2, 4, 9, 8, 6, 5, 2, 2, 1), 1),   // dense 5x1 stride 2
    ((1, 3, 7, 9, 4, 3, 1, 1, 1), 1),   // dense 3x1 stride 1
    ((1, 8, 9, 11, 8, 3, 2, 1, 8), 5),  // blocked depthwise 3x5 stride 2
    ((1, 8, 7, 13, 8, 1, 3, 1, 8), 4),  // blocked depthwise 1x4 stride 3
    ((2, 16, 9, 9, 16, 3, 1, 1, 2), 5), // groups = C/8, 3x5
];

/// Every case of [`CASES`] and [`RECT_CASES`] with a label for failure messages.
fn all_cases() -> Vec<(String, Geom)> {
    let square = CASES.iter().map(|c| (format!("{c:?}"), geom(c)));
    let rect = RECT_CASES
        .iter()
        .map(|(c, kw)| (format!("{c:?} kw {kw}"), geom_kw(c, *kw)));
    square.chain(rect).collect()
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn geom(case: &Case) -> Geom {
    geom_kw(case, case.5)
}

/// The geometry of `case` with a kernel `kw` wide (its `k` is the kernel's height).
fn geom_kw(case: &Case, kw: usize) -> Geom {
    let &(n, c, h, w, o, kh, s, p, groups) = case;
    Geom::new(&[n, c, h, w], &[o, c / groups, kh, kw], s, p, groups).expect("valid test case")
}

/// Naive forward: the definition, one output at a time.
fn naive_fwd(g: &Geom, x: &[f64], w: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; g.n * g.o * g.out_hw()];
    let (cg, og) = (g.cg(), g.og());
    for n in 0..g.n {
        for o in 0..g.o {
            for ho in 0..g.ho {
                for wo in 0..g.wo {
                    let mut acc = 0.0;
                    for ci in 0..cg {
                        let c = (o / og) * cg + ci;
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let hi = (ho * g.stride + i) as isize - g.pad as isize;
                                let wi = (wo * g.stride + j) as isize - g.pad as isize;
                                if hi < 0 || wi < 0 || hi >= g.h as isize || wi >= g.w as isize {
                                    continue;
                                }
                                let xv = x[((n * g.c + c) * g.h + hi as usize) * g.w + wi as usize];
                                acc += xv * w[((o * cg + ci) * g.kh + i) * g.kw + j];
                            }
                        }
                    }
                    y[((n * g.o + o) * g.ho + ho) * g.wo + wo] = acc;
                }
            }
        }
    }
    y
}

/// Naive gradients of `Σ y·r` with respect to x and w.
fn naive_grads(g: &Geom, x: &[f64], w: &[f64], r: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    let (cg, og) = (g.cg(), g.og());
    for n in 0..g.n {
        for o in 0..g.o {
            for ho in 0..g.ho {
                for wo in 0..g.wo {
                    let gy = r[((n * g.o + o) * g.ho + ho) * g.wo + wo];
                    for ci in 0..cg {
                        let c = (o / og) * cg + ci;
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let hi = (ho * g.stride + i) as isize - g.pad as isize;
                                let wi = (wo * g.stride + j) as isize - g.pad as isize;
                                if hi < 0 || wi < 0 || hi >= g.h as isize || wi >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * g.c + c) * g.h + hi as usize) * g.w + wi as usize;
                                let wk = ((o * cg + ci) * g.kh + i) * g.kw + j;
                                dx[xi] += gy * w[wk];
                                dw[wk] += gy * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw)
}

/// Largest absolute difference; infinite where either side is NaN (`f64::max` would skip
/// it, and a NaN is how an output element a kernel never wrote shows in debug builds).
fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .map(|d| if d.is_nan() { f64::INFINITY } else { d })
        .fold(0.0, f64::max)
}

fn inputs(g: &Geom, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let x = values(g.n * g.c * g.in_hw(), seed);
    let w = values(g.o * g.k(), seed + 1);
    let r = values(g.n * g.o * g.out_hw(), seed + 2);
    (x, w, r)
}

/// Whether this machine runs the AVX-512 kernels (which must say where they do not apply).
fn avx512_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd::level() == simd::Level::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs our op with autograd on `Σ y·r`; returns (y, dx, dw).
fn ours(g: &Geom, x: &[f64], w: &[f64], r: &[f64], dtype: DType) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    run_with(conv2d, g, x, w, r, dtype)
}

/// The input, weight and output-gradient tensors of `g` in `dtype` from their f64 values.
fn operands(g: &Geom, (x, w, r): (&[f64], &[f64], &[f64]), dtype: DType) -> [Tensor; 3] {
    let dev = Device::Cpu;
    let tensor = |v: &[f64], shape: &[usize]| {
        Tensor::from_slice(v, shape, &dev)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap()
    };
    [
        tensor(x, &[g.n, g.c, g.h, g.w]),
        tensor(w, &[g.o, g.cg(), g.kh, g.kw]),
        tensor(r, &[g.n, g.o, g.ho, g.wo]),
    ]
}

/// A tensor's elements as f64, flattened.
fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// [`ours`] for any convolution entry point.
fn run_with(
    conv: ConvFn,
    g: &Geom,
    x: &[f64],
    w: &[f64],
    r: &[f64],
    dtype: DType,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let [xt, wt, rt] = operands(g, (x, w, r), dtype);
    let (xt, wt) = (
        Var::from_tensor(&xt).unwrap(),
        Var::from_tensor(&wt).unwrap(),
    );
    let y = conv(xt.as_tensor(), wt.as_tensor(), g.stride, g.pad, g.groups).unwrap();
    assert_eq!(y.dims(), &[g.n, g.o, g.ho, g.wo]);
    let loss = (&y * &rt).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    (
        flat(&y),
        flat(grads.get(&xt).unwrap()),
        flat(grads.get(&wt).unwrap()),
    )
}

/// Every case through `conv` in `dtype`, forward and both gradients against the naive f64
/// reference, to `rel_tol` times the longest sum's length.
fn assert_matches_reference(conv: ConvFn, seed0: u64, dtype: DType, rel_tol: f64) {
    for (idx, (case, g)) in all_cases().iter().enumerate() {
        let (x, w, r) = inputs(g, seed0 + idx as u64 * 7);
        let (y, dx, dw) = run_with(conv, g, &x, &w, &r, dtype);
        let (rdx, rdw) = naive_grads(g, &x, &w, &r);
        let tol = rel_tol * g.k().max(g.n * g.out_hw()) as f64;
        assert!(
            max_abs_diff(&y, &naive_fwd(g, &x, &w)) < tol,
            "forward {case}"
        );
        assert!(max_abs_diff(&dx, &rdx) < tol, "input gradient {case}");
        assert!(max_abs_diff(&dw, &rdw) < tol, "weight gradient {case}");
    }
}

#[test]
fn matches_naive_reference_f64() {
    assert_matches_reference(conv2d, 0, DType::F64, 1e-12);
}

#[test]
fn matches_naive_reference_f32() {
    assert_matches_reference(conv2d, 1000, DType::F32, 1e-5);
}

/// The f32 reference test again in child processes capped at AVX2 and at the portable loops
/// (`FPIPE_SIMD`), so that a machine with AVX-512 also tests the kernel versions it would not
/// pick, and one with AVX2 the portable ones.
#[test]
fn every_simd_level_matches_naive_reference() {
    let exe = std::env::current_exe().expect("test binary path");
    for cap in ["avx2", "base"] {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "conv::tests::matches_naive_reference_f32"])
            .args(["--test-threads", "2"])
            .env(simd::SIMD_ENV, cap)
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{}={cap}: {stdout}{}",
            simd::SIMD_ENV,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The stride-2 row split, merge and one-phase take, vector blocks and scalar tails, on every
/// length from 0 to 40 and both element types' paths (f32 takes the AVX2 one where the CPU has it).
#[test]
fn interleave_round_trips() {
    for n in 0..40usize {
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let (mut e, mut o) = (vec![-1f32; n.div_ceil(2)], vec![-1f32; n / 2]);
        simd::deinterleave2(&src, &mut e, &mut o);
        assert!(
            e.iter().enumerate().all(|(k, &v)| v == (2 * k) as f32),
            "even {n}"
        );
        assert!(
            o.iter().enumerate().all(|(k, &v)| v == (2 * k + 1) as f32),
            "odd {n}"
        );
        let mut back = vec![-1f32; n];
        simd::interleave2(&e, &o, &mut back);
        assert_eq!(back, src, "merge {n}");
        let src64: Vec<f64> = src.iter().map(|&v| v as f64).collect();
        let (mut e64, mut o64) = (vec![0f64; e.len()], vec![0f64; o.len()]);
        simd::deinterleave2(&src64, &mut e64, &mut o64);
        let mut back64 = vec![0f64; n];
        simd::interleave2(&e64, &o64, &mut back64);
        assert_eq!(back64, src64, "f64 {n}");
        // One phase alone, from a row as long as it needs and from a longer one.
        for extra in [0, 1] {
            let long: Vec<f32> = (0..n + extra).map(|i| i as f32).collect();
            let mut even = vec![-1f32; n.div_ceil(2)];
            simd::take_even(&long, &mut even);
            assert_eq!(even, e, "take_even {n} + {extra}");
        }
        let mut even64 = vec![0f64; e.len()];
        simd::take_even(&src64, &mut even64);
        assert_eq!(even64, e64, "take_even f64 {n}");
    }
}

/// `simd::skinny_matmul` against a plain triple loop: tile rows of 8 and 9, full tiles,
/// single vectors and masked tails of columns, several bands and row passes (`from_memory`),
/// both operand layouts of `a`, streaming stores into aligned rows and ordinary ones into
/// unaligned rows. Elements of `c` between its rows must be left alone. Where the kernel
/// does not apply (no AVX-512) it must say so and write nothing.
#[test]
fn skinny_matmul_matches_definition() {
    for (m, n, k) in [
        (8, 1, 1),
        (8, 47, 27),
        (16, 48, 3),
        (9, 49, 64),
        (27, 100, 17),
        (24, 2100, 27),
        (27, 2900, 40),
        (64, 3000, 128),
    ] {
        for (transposed, from_memory, aligned) in [
            (false, false, true),
            (true, true, true),
            (false, true, false),
        ] {
            let av = values(m * k, 7)
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>();
            let bv = values(k * (n + 3), 8)
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>();
            let (a_rs, a_cs) = if transposed { (1, m) } else { (k, 1) };
            let pitch = n + 3;
            // Aligned: 64-byte row starts (streaming stores); otherwise one float off.
            let c_rs = if aligned {
                n.next_multiple_of(16) + 16
            } else {
                n + 1
            };
            let mut buf = vec![f32::NAN; m * c_rs + 32];
            let start = buf.as_ptr().align_offset(64) + usize::from(!aligned);
            let c = &mut buf[start..][..m * c_rs];
            let applied = simd::skinny_matmul(
                (m, n, k),
                (&av, a_rs, a_cs),
                (&bv, pitch),
                (c, c_rs),
                true,
                from_memory,
                &[],
            );
            if !avx512_here() {
                assert!(
                    !applied && c.iter().all(|v| v.is_nan()),
                    "wrote without applying"
                );
                continue;
            }
            assert!(applied, "{m}x{n}x{k} not taken");
            for r in 0..m {
                for p in 0..c_rs {
                    let got = c[r * c_rs + p];
                    if p >= n {
                        assert!(got.is_nan(), "{m}x{n}x{k}: wrote past row {r} at {p}");
                        continue;
                    }
                    let want: f64 = (0..k)
                        .map(|t| av[r * a_rs + t * a_cs] as f64 * bv[t * pitch + p] as f64)
                        .sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} transposed {transposed} at ({r}, {p}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// `simd::skinny_wgrad` + `simd::add_lanes` against `dW += dy·colᵀ` written out: whole
/// vectors and masked tails, two bands summed into the same lanes, output-gradient rows
/// with gaps between them. Where the kernel does not apply (no AVX-512, or not 27 rows) it
/// must say so and write nothing.
#[test]
fn skinny_wgrad_matches_definition() {
    let (kk, w) = (simd::SKINNY_WGRAD_ROWS, simd::WGRAD_BAND);
    for (og, n) in [(1, 1), (8, 15), (3, 16), (13, 17), (8, 200), (5, w)] {
        let dy_rs = 2 * n + 5;
        let dy = values(og * dy_rs, 11)
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>();
        // Two bands: positions 0..n and n..2n of each output-gradient row.
        let bands: Vec<Vec<f32>> = (0..2)
            .map(|i| values(kk * w, 12 + i).iter().map(|&v| v as f32).collect())
            .collect();
        let mut lanes = vec![0f32; og * kk * 16];
        let applied = simd::skinny_wgrad_applies::<f32>(kk);
        for (i, band) in bands.iter().enumerate() {
            let dyb = (&dy[i * n..], dy_rs);
            let took = simd::skinny_wgrad((og, kk, n), dyb, band, i == 0, &mut lanes);
            assert_eq!(took, applied, "{og}x{n}: band {i} taken {took}");
        }
        let mut other = vec![0f32; og * 26 * 16];
        let rows26 = simd::skinny_wgrad((og, 26, n), (&dy, dy_rs), &bands[0], false, &mut other);
        assert!(
            !rows26 && !simd::skinny_wgrad_applies::<f32>(26),
            "26 rows taken"
        );
        assert!(other.iter().all(|&v| v == 0.0), "26 rows written");
        let avx512 = avx512_here();
        assert_eq!(applied, avx512, "applies without AVX-512, or not with it");
        assert!(!simd::skinny_wgrad_applies::<f64>(kk), "applies to f64");
        if !applied {
            assert!(lanes.iter().all(|&v| v == 0.0), "wrote without applying");
            continue;
        }
        let mut dw = vec![1f32; og * kk];
        simd::add_lanes(&lanes, &mut dw);
        for o in 0..og {
            for t in 0..kk {
                let want: f64 = 1.0
                    + (0..2 * n)
                        .map(|p| {
                            let col = bands[p / n][t * w + p % n];
                            dy[o * dy_rs + p] as f64 * col as f64
                        })
                        .sum::<f64>();
                let got = dw[o * kk + t] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{og}x{n} at ({o}, {t}): {got} vs {want}"
                );
            }
        }
    }
}

/// `simd::stream_copy` on every length up to 100 from every offset within a cache line: the
/// ordinary head, the streamed aligned lines, the ordinary tail, nothing written around.
#[test]
fn stream_copy_copies_exactly() {
    let src: Vec<f32> = (0..100).map(|i| i as f32).collect();
    for len in 0..100 {
        for shift in 0..16 {
            let mut buf = vec![-1f32; 160];
            let start = buf.as_ptr().align_offset(64) + shift;
            simd::stream_copy(&src[..len], &mut buf[start..start + len]);
            assert!(
                buf[..start].iter().all(|&v| v == -1.0),
                "before, {len} at {shift}"
            );
            assert_eq!(&buf[start..start + len], &src[..len], "{len} at {shift}");
            assert!(
                buf[start + len..].iter().all(|&v| v == -1.0),
                "after, {len} at {shift}"
            );
        }
    }
}

/// `simd::add_assign` and each of its vector versions the CPU has, on every length to 100
/// from every offset in a line: the sums exactly, nothing written outside `dst`.
#[test]
fn add_assign_adds_exactly() {
    let src: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
    type AddFn = Box<dyn Fn(&mut [f32], &[f32])>;
    let mut versions: Vec<(&str, AddFn)> = vec![("dispatch", Box::new(simd::add_assign::<f32>))];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected; the lengths are equal below.
            versions.push((
                "avx2",
                Box::new(|d, s| unsafe { simd::avx2::add_assign_f32(d, s) }),
            ));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected; the lengths are equal below.
            versions.push((
                "avx512",
                Box::new(|d, s| unsafe { simd::avx512::add_assign_f32(d, s) }),
            ));
        }
    }
    for (name, add) in &versions {
        for len in 0..100 {
            for shift in 0..16 {
                let mut buf = vec![-1f32; 160];
                let start = buf.as_ptr().align_offset(64) + shift;
                add(&mut buf[start..start + len], &src[..len]);
                let want: Vec<f32> = src[..len].iter().map(|&v| v - 1.0).collect();
                assert_eq!(
                    &buf[start..start + len],
                    &want[..],
                    "{name}: {len} at {shift}"
                );
                assert!(
                    buf[..start]
                        .iter()
                        .chain(&buf[start + len..])
                        .all(|&v| v == -1.0),
                    "{name}: wrote outside, {len} at {shift}"
                );
            }
        }
    }
}

/// `simd::transpose` on every shape up to 19x19: the 8x8 register tiles (f32 with AVX2),
/// the scalar edges, and the portable loop (f64).
#[test]
fn transpose_matches_definition() {
    for rows in 0..20usize {
        for cols in 0..20usize {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![-1f32; rows * cols];
            simd::transpose(&src, rows, cols, &mut dst);
            let src64: Vec<f64> = src.iter().map(|&v| v as f64).collect();
            let mut dst64 = vec![-1f64; rows * cols];
            simd::transpose(&src64, rows, cols, &mut dst64);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * cols + c], "{rows}x{cols} f32");
                    assert_eq!(
                        dst64[c * rows + r],
                        src64[r * cols + c],
                        "{rows}x{cols} f64"
                    );
                }
            }
        }
    }
}

/// The device-generic path (what CUDA runs for grouped convolutions), forward and both
/// gradients through candle's autograd, on every case.
#[test]
fn tensor_op_path_matches_naive_reference() {
    assert_matches_reference(taps::conv2d, 2000, DType::F64, 1e-12);
}

/// Off the fast path (here f16 on the CPU; on CUDA every dtype) a grouped convolution runs
/// the tensor-op path: forward and both gradients in f16 agree with the f64 reference.
#[test]
fn grouped_conv_in_f16_matches_reference() {
    let g = geom(&(2, 16, 8, 7, 32, 3, 2, 1, 2));
    let (x, w, r) = inputs(&g, 77);
    let (y, dx, dw) = ours(&g, &x, &w, &r, DType::F16);
    let (rdx, rdw) = naive_grads(&g, &x, &w, &r);
    // f16 keeps 11 significant bits; sums of up to 72 (forward) or 98 (weight gradient)
    // products of values in [-1, 1).
    assert!(max_abs_diff(&y, &naive_fwd(&g, &x, &w)) < 0.1, "forward");
    assert!(max_abs_diff(&dx, &rdx) < 0.1, "input gradient");
    assert!(max_abs_diff(&dw, &rdw) < 0.3, "weight gradient");
}

/// Central differences of `Σ conv(x, w)·r` in f64, for every element of x and w.
#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    for (idx, (case, g)) in all_cases().iter().enumerate() {
        let g = *g;
        let (x, w, r) = inputs(&g, 500 + idx as u64);
        let (_, dx, dw) = ours(&g, &x, &w, &r, DType::F64);
        let rt = Tensor::from_slice(&r, (g.n, g.o, g.ho, g.wo), &dev).unwrap();
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            let xt = Tensor::from_slice(x, (g.n, g.c, g.h, g.w), &dev).unwrap();
            let wt = Tensor::from_slice(w, (g.o, g.cg(), g.kh, g.kw), &dev).unwrap();
            let y = conv2d(&xt, &wt, g.stride, g.pad, g.groups).unwrap();
            (y * &rt)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        // The loss is linear in x and in w, so central differences are exact up to rounding
        // for any step; a step of 1e-3 rather than 1e-6 keeps that rounding (sums of 10^6
        // products in the largest cases) well under the tolerance. Checking a strided subset
        // of elements keeps the test fast on the larger cases.
        let eps = 1e-3;
        let step = (x.len() / 200).max(1);
        for i in (0..x.len()).step_by(step) {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += eps;
            xm[i] -= eps;
            let fd = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * eps);
            assert!(
                (fd - dx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "dx[{i}] {case}: {fd} vs {}",
                dx[i]
            );
        }
        let step = (w.len() / 200).max(1);
        for i in (0..w.len()).step_by(step) {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[i] += eps;
            wm[i] -= eps;
            let fd = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * eps);
            assert!(
                (fd - dw[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "dw[{i}] {case}: {fd} vs {}",
                dw[i]
            );
        }
    }
}

#[test]
fn non_contiguous_input_is_accepted() {
    let dev = Device::Cpu;
    let g = geom(&(2, 3, 7, 6, 4, 3, 1, 1, 1));
    let (x, w, _) = inputs(&g, 3);
    // Build x transposed in memory, then transpose back: same values, strided layout.
    let xt = Tensor::from_slice(&x, (g.n, g.c, g.h, g.w), &dev).unwrap();
    let strided = xt
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    assert!(!strided.is_contiguous());
    let wt = Tensor::from_slice(&w, (g.o, g.cg(), g.kh, g.kw), &dev).unwrap();
    let y: Vec<f64> = conv2d(&strided, &wt, 1, 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(max_abs_diff(&y, &naive_fwd(&g, &x, &w)) < 1e-12);
}

#[test]
fn matches_candle_stock_conv_on_dense_case() {
    let dev = Device::Cpu;
    let g = geom(&(2, 4, 9, 8, 6, 3, 2, 1, 1));
    let (x, w, _) = inputs(&g, 11);
    let xt = Tensor::from_slice(&x, (g.n, g.c, g.h, g.w), &dev).unwrap();
    let wt = Tensor::from_slice(&w, (g.o, g.cg(), g.kh, g.kw), &dev).unwrap();
    let ours: Vec<f64> = conv2d(&xt, &wt, 2, 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let stock: Vec<f64> = xt
        .conv2d(&wt, 1, 2, 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(max_abs_diff(&ours, &stock) < 1e-12);
}

#[test]
fn rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 6, 5, 5), DType::F32, &dev).unwrap();
    // 6 channels do not split into 4 groups.
    let w = Tensor::zeros((4, 1, 3, 3), DType::F32, &dev).unwrap();
    assert!(conv2d(&x, &w, 1, 1, 4).is_err());
    // Kernel larger than the padded input.
    let w = Tensor::zeros((4, 6, 9, 9), DType::F32, &dev).unwrap();
    assert!(conv2d(&x, &w, 1, 1, 1).is_err());
    // Weight channel count does not match.
    let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
    assert!(conv2d(&x, &w, 1, 1, 1).is_err());
}

/// An input that is no variable and comes from none (the image a stem reads) gets no input
/// gradient computed: candle then records none for it, while the weight gradient is the one
/// a variable input gets.
#[test]
fn constant_input_gets_no_input_gradient() {
    let g = Geom::new(&[2, 3, 9, 9], &[8, 3, 3, 3], 2, 1, 1).unwrap();
    let (x, w, r) = inputs(&g, 77);
    let dev = Device::Cpu;
    let xt = Tensor::from_slice(&x, (g.n, g.c, g.h, g.w), &dev).unwrap();
    let wt = Var::from_tensor(&Tensor::from_slice(&w, (g.o, g.cg(), g.kh, g.kw), &dev).unwrap())
        .unwrap();
    let rt = Tensor::from_slice(&r, (g.n, g.o, g.ho, g.wo), &dev).unwrap();
    let y = conv2d(&xt, wt.as_tensor(), g.stride, g.pad, g.groups).unwrap();
    let grads = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&xt).is_none(), "a constant input got a gradient");
    let dw: Vec<f64> = grads
        .get(&wt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (_, _, dw_var) = ours(&g, &x, &w, &r, DType::F64);
    assert!(max_abs_diff(&dw, &dw_var) < 1e-12);
    let (_, rdw) = naive_grads(&g, &x, &w, &r);
    assert!(max_abs_diff(&dw, &rdw) < 1e-9);
}

/// The strided shortcut's geometry (`dense::backward_spread`, f32 on AVX-512): both
/// gradients in one op (what training runs) and each on its own must agree with the naive
/// reference, wherever the kernel applies or not.
#[test]
fn shortcut_gradients_together_and_apart_match_reference() {
    use super::{conv2d_backward, conv2d_backward_data, conv2d_backward_filter};
    for (i, case) in [
        (2, 16, 56, 56, 8, 1, 2, 0, 1),
        (3, 8, 28, 28, 5, 1, 2, 0, 1),
        (2, 8, 10, 8, 3, 1, 2, 0, 1),
        (1, 64, 8, 8, 16, 1, 2, 0, 2),
        (1, 8, 20, 8, 4, 1, 2, 0, 1),
        (1, 8, 6, 8, 4, 1, 2, 0, 1), // 12 positions: a tile under one vector
        (1, 8, 14, 14, 8, 1, 2, 0, 1), // 7x7 output: 49 positions, not taken
        (1, 12, 8, 8, 4, 1, 2, 0, 1), // 12 channels: not taken
    ]
    .iter()
    .enumerate()
    {
        let g = geom(case);
        let (x, w, r) = inputs(&g, 500 + i as u64);
        let [xt, wt, dyt] = operands(&g, (&x, &w, &r), DType::F32);
        let (rdx, rdw) = naive_grads(&g, &x, &w, &r);
        let tol = 1e-5 * g.k().max(g.n * g.out_hw()) as f64;
        let (dx, dw) = conv2d_backward(&xt, &wt, &dyt, g, true).unwrap();
        let dx = dx.expect("input gradient asked for");
        assert_eq!(dx.dims(), &[g.n, g.c, g.h, g.w], "{case:?}");
        assert_eq!(dw.dims(), &[g.o, g.cg(), g.kh, g.kw], "{case:?}");
        assert!(
            max_abs_diff(&flat(&dx), &rdx) < tol,
            "together: dx {case:?}"
        );
        assert!(
            max_abs_diff(&flat(&dw), &rdw) < tol,
            "together: dw {case:?}"
        );
        let dx = conv2d_backward_data(&dyt, &wt, g).unwrap();
        let dw = conv2d_backward_filter(&xt, &dyt, g).unwrap();
        assert!(max_abs_diff(&flat(&dx), &rdx) < tol, "apart: dx {case:?}");
        assert!(max_abs_diff(&flat(&dw), &rdw) < tol, "apart: dw {case:?}");
    }
}

/// `simd::spread_dgrad` against its definition, into a 64-byte aligned input gradient (the
/// non-temporal stores) and one a float off (ordinary stores), with a background list that
/// has an empty run, a zero stride and a real region: every element written, none outside,
/// the even rows and columns the product and the rest zero. Where the kernel does not apply
/// it must say so and write nothing.
#[test]
fn spread_dgrad_matches_definition() {
    for (cg, og, ho, wo) in [(8, 3, 5, 4), (16, 5, 4, 28), (8, 2, 3, 12), (8, 4, 3, 4)] {
        let w = values(og * cg, 11)
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>();
        let dy = values(og * ho * wo, 12)
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>();
        let (ih, iw) = (2 * ho, 2 * wo);
        let len = cg * ih * iw;
        let other = vec![0f32; 100];
        let background = [
            simd::Background {
                data: &other[..],
                run: 0,
                stride: 4,
            },
            simd::Background {
                data: &other[..],
                run: 10,
                stride: 0,
            },
            simd::Background {
                data: &dy[..],
                run: wo,
                stride: 2 * wo,
            },
        ];
        for aligned in [true, false] {
            let mut buf = vec![f32::NAN; len + 32];
            let start = buf.as_ptr().align_offset(64) + usize::from(!aligned);
            let applied = simd::spread_dgrad(
                (cg, og, ho, wo),
                (&w, cg),
                &dy,
                &mut buf[start..start + len],
                Some(2),
                &background,
            );
            if !avx512_here() {
                assert!(
                    !applied && buf.iter().all(|v| v.is_nan()),
                    "wrote without applying"
                );
                continue;
            }
            assert!(applied, "{cg}x{og} {ho}x{wo} not taken");
            assert!(
                buf[..start]
                    .iter()
                    .chain(&buf[start + len..])
                    .all(|v| v.is_nan()),
                "{cg}x{og} {ho}x{wo}: wrote outside dx"
            );
            for ci in 0..cg {
                for y in 0..ih {
                    for x in 0..iw {
                        let got = buf[start + (ci * ih + y) * iw + x];
                        let want = if y % 2 == 0 && x % 2 == 0 {
                            (0..og)
                                .map(|o| w[o * cg + ci] * dy[(o * ho + y / 2) * wo + x / 2])
                                .sum::<f32>()
                        } else {
                            0.0
                        };
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{cg}x{og} {ho}x{wo} aligned {aligned}: ({ci}, {y}, {x}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
