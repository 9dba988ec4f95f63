//! What memory costs the strided shortcut's gradients (docs/benchmarks.md, "iresnet's strided
//! shortcut", commits `55afd83`-`d22f47c`, 2026-12-06):
//! two threads, each on half of a 32x64x56x56 f32 buffer (25.7 MB), time a non-temporal
//! write of all of it, an ordinary write, a read of half and of all of it, and a read of the
//! even rows of 56-float rows (what the shortcut's im2col takes). Prints the best of 9 runs.
//! Not part of the build:
//!
//!     rustc -O -C target-cpu=native scripts/mem_bandwidth.rs -o /tmp/mem_bandwidth
//!     /tmp/mem_bandwidth
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::time::Instant;

const N: usize = 32 * 64 * 56 * 56;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write_nt(d: &mut [f32]) {
    let v = _mm512_set1_ps(0.5);
    let p = d.as_mut_ptr();
    let mut i = p.align_offset(64);
    while i + 16 <= d.len() {
        unsafe { _mm512_stream_ps(p.add(i), v) };
        i += 16;
    }
    _mm_sfence();
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write(d: &mut [f32]) {
    let v = _mm512_set1_ps(0.5);
    let p = d.as_mut_ptr();
    let mut i = 0;
    while i + 16 <= d.len() {
        unsafe { _mm512_storeu_ps(p.add(i), v) };
        i += 16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read(d: &[f32]) -> f32 {
    let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let p = d.as_ptr();
    let mut i = 0;
    while i + 32 <= d.len() {
        unsafe {
            a = _mm512_add_ps(a, _mm512_loadu_ps(p.add(i)));
            b = _mm512_add_ps(b, _mm512_loadu_ps(p.add(i + 16)));
        }
        i += 32;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a, b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_even_rows(d: &[f32]) -> f32 {
    let mut a = _mm512_setzero_ps();
    let p = d.as_ptr();
    let mut r = 0;
    while (r + 1) * 56 <= d.len() {
        for c in [0, 16, 32, 40] {
            a = _mm512_add_ps(a, unsafe { _mm512_loadu_ps(p.add(r * 56 + c)) });
        }
        r += 2;
    }
    _mm512_reduce_add_ps(a)
}

fn run(name: &str, buf: &mut [f32], len: usize, f: &(dyn Fn(&mut [f32]) -> f32 + Sync)) {
    let (mut best, mut sink) = (f64::MAX, 0.0);
    for _ in 0..9 {
        let t = Instant::now();
        let (a, b) = buf[..len].split_at_mut(len / 2);
        std::thread::scope(|s| {
            let h = s.spawn(|| f(a));
            sink += f(b) + h.join().unwrap_or(0.0);
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gbs = len as f64 * 4.0 / best / 1e9;
    println!("{name:<28} {:.3} ms  {gbs:5.1} GB/s  ({sink})", best * 1e3);
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !is_x86_feature_detected!("avx512f") {
        println!("needs AVX-512F");
        return;
    }
    let mut v = vec![1.0f32; N];
    // SAFETY (all four): AVX-512F detected above.
    run("non-temporal write 25.7 MB", &mut v, N, &|d| {
        unsafe { write_nt(d) };
        0.0
    });
    run("ordinary write 25.7 MB", &mut v, N, &|d| {
        unsafe { write(d) };
        0.0
    });
    run("read 12.8 MB", &mut v, N / 2, &|d| unsafe { read(d) });
    run("read 25.7 MB", &mut v, N, &|d| unsafe { read(d) });
    run("read even rows of 25.7 MB", &mut v, N, &|d| unsafe {
        read_even_rows(d)
    });
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86_64 only");
}
