//! Machine ceilings, measured: memory copy bandwidth (STREAM's "copy": `b[i] = a[i]`, counted
//! as bytes read + bytes written) and peak f32 FMA throughput, both over every thread of the
//! current rayon pool. `lmkit bench --roofline` puts the model's achieved rates next to them.

use std::time::Instant;

use rayon::prelude::*;

use crate::dot::Isa;

/// Best-of-`reps` copy bandwidth in GB/s (read + write) over a buffer of `bytes` per side.
pub fn copy_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 4).max(1024);
    let a = vec![1.0f32; n];
    let mut b = vec![0.0f32; n];
    let chunk = n
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1024);
    let mut best = 0.0f64;
    for _ in 0..reps.max(1) + 1 {
        let t = Instant::now();
        b.par_chunks_mut(chunk)
            .zip(a.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        let s = t.elapsed().as_secs_f64();
        best = best.max(2.0 * n as f64 * 4.0 / s / 1e9);
    }
    std::hint::black_box(&b);
    best
}

/// Peak f32 GFLOP/s of fused multiply-adds on independent register chains (the widest vectors
/// `isa` has: 16 lanes for AVX-512, 8 for AVX2; scalar otherwise), all threads together.
pub fn fma_peak(isa: Isa) -> f64 {
    const ITERS: u64 = 20_000_000;
    let threads = rayon::current_num_threads().max(1);
    let t = Instant::now();
    let flops: f64 = (0..threads)
        .into_par_iter()
        .map(|_| fma_loop(isa, ITERS))
        .sum();
    flops / t.elapsed().as_secs_f64() / 1e9
}

/// Runs `iters` rounds of 12 independent FMA chains; returns the flops done.
fn fma_loop(isa: Isa, iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if isa == Isa::Avx512 {
            // SAFETY: `Avx512` means the CPU has AVX-512 F.
            return unsafe { x86::fma512(iters) };
        }
        if isa != Isa::Scalar {
            // SAFETY: non-scalar means AVX2 + FMA.
            return unsafe { x86::fma256(iters) };
        }
    }
    let _ = isa;
    let mut acc = [1.0f32; 12];
    for _ in 0..iters / 8 {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (iters / 8) as f64 * 12.0 * 2.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    macro_rules! fma_chains {
        ($name:ident, $features:literal, $set:ident, $fma:ident, $lanes:expr) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(iters: u64) -> f64 {
                let (m, c) = ($set(0.999_999), $set(1e-7));
                let mut acc = [$set(1.0); 12];
                for _ in 0..iters {
                    for a in acc.iter_mut() {
                        *a = $fma(*a, m, c);
                    }
                }
                std::hint::black_box(&acc);
                iters as f64 * 12.0 * $lanes * 2.0
            }
        };
    }
    fma_chains!(fma256, "avx2,fma", _mm256_set1_ps, _mm256_fmadd_ps, 8.0);
    fma_chains!(fma512, "avx512f", _mm512_set1_ps, _mm512_fmadd_ps, 16.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_positive_and_finite() {
        let bw = copy_bandwidth(1 << 20, 1);
        assert!(bw.is_finite() && bw > 0.0);
        let isa = crate::dot::isa();
        // A short loop keeps the test quick; it only checks the plumbing.
        assert!(fma_loop(isa, 1000) > 0.0);
    }
}
