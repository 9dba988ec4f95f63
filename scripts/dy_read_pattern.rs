//! Can memory feed the stems' input-gradient kernel? Reads a 32x64x112x112 f32 "output
//! gradient" (103 MB, two threads, one half of the batch each) in the access pattern of
//! `skinny_matmul` with `from_memory` (passes of R rows over bands of 42 tiles of 32
//! columns, each tile's rows prefetched D tiles ahead during the first of three row tiles)
//! and does the kernel's 27 multiply-adds per loaded vector, with the weights in registers
//! and no output. Prints the best of 5 runs per pattern. Not part of the build:
//!
//!     rustc -O -C target-cpu=native scripts/dy_read_pattern.rs -o /tmp/dy_read_pattern
//!     /tmp/dy_read_pattern
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::time::Instant;

const ROWS: usize = 64;
const HW: usize = 112 * 112;
const IMAGES: usize = 32;
const TILE: usize = 32;

/// One image's pass; returns a sum so the work is not optimised away.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn image(d: &[f32], rows: usize, band: usize, ahead: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 18];
    let w = _mm512_set1_ps(1.0001);
    let p = d.as_ptr();
    for b0 in (0..HW).step_by(band) {
        let b1 = (b0 + band).min(HW);
        for g0 in (0..ROWS).step_by(rows) {
            let mut c = b0;
            while c + TILE <= b1 {
                for row_tile in 0..3 {
                    for r in g0..g0 + rows {
                        // SAFETY: r < ROWS and c + 32 <= HW.
                        let (x0, x1) = unsafe {
                            (
                                _mm512_loadu_ps(p.add(r * HW + c)),
                                _mm512_loadu_ps(p.add(r * HW + c + 16)),
                            )
                        };
                        let q = c + ahead * TILE;
                        if row_tile == 0 && ahead > 0 && q + TILE <= b1 {
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(r * HW + q).cast());
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(r * HW + q + 16).cast());
                        }
                        for k in 0..9 {
                            acc[2 * k] = _mm512_fmadd_ps(x0, w, acc[2 * k]);
                            acc[2 * k + 1] = _mm512_fmadd_ps(x1, w, acc[2 * k + 1]);
                        }
                    }
                }
                c += TILE;
            }
        }
    }
    let mut s = _mm512_setzero_ps();
    for a in acc {
        s = _mm512_add_ps(s, a);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !is_x86_feature_detected!("avx512f") {
        eprintln!("needs AVX-512F");
        return;
    }
    let data: Vec<f32> = (0..IMAGES * ROWS * HW)
        .map(|i| (i % 7) as f32 * 1e-3)
        .collect();
    let gb = (data.len() * 4) as f64 / 1e9;
    let macs = (IMAGES * ROWS * HW) as f64 * 27.0;
    for (rows, band_tiles, ahead) in [
        (16, 42, 2),
        (16, 42, 0),
        (64, 42, 2),
        (32, 42, 2),
        (8, 42, 2),
    ] {
        let mut best = f64::MAX;
        let mut check = 0.0;
        for _ in 0..5 {
            let start = Instant::now();
            check += std::thread::scope(|sc| {
                let half = IMAGES / 2;
                let data = &data;
                let hs: Vec<_> = (0..2)
                    .map(|t| {
                        sc.spawn(move || {
                            (t * half..(t + 1) * half)
                                .map(|i| {
                                    let d = &data[i * ROWS * HW..][..ROWS * HW];
                                    // SAFETY: AVX-512F detected above.
                                    unsafe { image(d, rows, band_tiles * TILE, ahead) }
                                })
                                .sum::<f32>()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum::<f32>()
            });
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "rows per pass {rows:>2}, band {band_tiles} tiles, fetch {ahead} tiles ahead: \
             {:.2} ms, {:.1} GB/s, {:.0} GFLOP/s (check {check:.0})",
            best * 1e3,
            gb / best,
            2.0 * macs / best / 1e9
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("x86_64 only");
}
