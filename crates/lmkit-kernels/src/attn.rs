//! Attention of up to [`MAX_QUERIES`] queries of one head over its cached keys and values:
//! `out_q = softmax(q·Kᵀ·scale)[..len_q] V`, `len_q` the positions query `q` may see (the
//! caller's causal mask).
//!
//! Layouts (one buffer per head, positions in order):
//! - keys in blocks of [`KEY_BLOCK`] positions, each block stored channel-major
//!   (`block, channel, position-in-block`; see [`key_index`]), so one vector load holds one
//!   channel of 16 keys and `q·Kᵀ` for 16 keys is `d` broadcast-multiply-adds, no horizontal sums;
//! - values row-major `(positions, d)`, so `Σ p_j V[j]` streams rows.
//!
//! Several queries (consecutive prompt tokens) share every key and value load. The scalar
//! reference is [`attend`] with `Isa::Scalar`.

use crate::dot::Isa;
use crate::ops::softmax_unnormalized_skipping;
use std::ops::Range;

/// Positions per key block.
pub const KEY_BLOCK: usize = 16;
/// Queries handled together.
pub const MAX_QUERIES: usize = 4;

/// Index of (position `p`, channel `c`) in a head's key buffer with head size `d`.
#[inline]
pub fn key_index(p: usize, c: usize, d: usize) -> usize {
    (p / KEY_BLOCK) * KEY_BLOCK * d + c * KEY_BLOCK + p % KEY_BLOCK
}

/// Floats a head's key buffer holds for `len` positions (whole blocks).
pub fn key_buffer_len(len: usize, d: usize) -> usize {
    len.next_multiple_of(KEY_BLOCK) * d
}

/// Scratch floats [`attend`] needs for `queries` queries over up to `len` positions.
pub fn scratch_len(queries: usize, len: usize) -> usize {
    queries * len.next_multiple_of(KEY_BLOCK)
}

/// Attention of `qs.len() ≤ MAX_QUERIES` queries (each `d`) of one head; query `q` sees
/// positions `0..lens[q]`. `keys` is the head's blocked key buffer, `values` its `(len, d)` rows
/// (at least `max(lens)` of each); `scores` is scratch of [`scratch_len`]; `outs[q]` gets `d`
/// values.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    qs: &[&[f32]],
    lens: &[usize],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    outs: &mut [&mut [f32]],
) {
    const NONE: [Range<usize>; MAX_QUERIES] = [0..0, 0..0, 0..0, 0..0];
    attend_skipping(isa, qs, lens, &NONE, keys, values, scale, scores, outs);
}

/// As [`attend`], query `q` not seeing the positions in `skips[q]` either: several
/// continuations laid one after another in the cache after a shared context each see the context
/// and their own earlier tokens, not the other continuations (tree attention).
///
/// On return `scores[q · stride ..][..lens[q]]` (`stride = max(lens)` rounded up to
/// [`KEY_BLOCK`]) holds query `q`'s unnormalized attention weights and the result's entry `q`
/// their sum: the attention probabilities are their ratio (what H2O accumulates).
#[allow(clippy::too_many_arguments)]
pub fn attend_skipping(
    isa: Isa,
    qs: &[&[f32]],
    lens: &[usize],
    skips: &[Range<usize>],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    outs: &mut [&mut [f32]],
) -> [f32; MAX_QUERIES] {
    let nq = qs
        .len()
        .min(lens.len())
        .min(skips.len())
        .min(outs.len())
        .min(MAX_QUERIES);
    let mut sums = [1f32; MAX_QUERIES];
    if nq == 0 {
        return sums;
    }
    let d = qs[0].len();
    let max = lens[..nq].iter().copied().max().unwrap_or(0);
    let stride = max.next_multiple_of(KEY_BLOCK);
    assert!(
        keys.len() >= key_buffer_len(max, d)
            && values.len() >= max * d
            && scores.len() >= nq * stride
            && qs[..nq].iter().all(|q| q.len() == d)
            && outs[..nq].iter().all(|o| o.len() == d),
        "attend: buffers too small for {nq} queries over {max} positions"
    );
    let scores = &mut scores[..nq * stride];
    let done = simd::scores(isa, &qs[..nq], keys, d, stride, scale, scores);
    if !done {
        for (q, row) in qs[..nq].iter().zip(scores.chunks_exact_mut(stride)) {
            for (j, s) in row[..max].iter_mut().enumerate() {
                *s = (0..d).map(|c| q[c] * keys[key_index(j, c, d)]).sum::<f32>() * scale;
            }
        }
    }
    // Unnormalized weights; each output is divided by its sum at the end.
    for (((row, &len), skip), sum) in scores
        .chunks_exact_mut(stride)
        .zip(lens)
        .zip(skips)
        .zip(sums.iter_mut())
    {
        *sum = softmax_unnormalized_skipping(isa, &mut row[..len], skip.clone());
        row[len..].iter_mut().for_each(|v| *v = 0.0);
    }
    if !simd::weighted_sum(isa, scores, stride, max, values, d, &mut outs[..nq]) {
        for (row, out) in scores.chunks_exact(stride).zip(outs.iter_mut()) {
            out.iter_mut().for_each(|o| *o = 0.0);
            for (p, v) in row[..max].iter().zip(values.chunks_exact(d)) {
                for (o, x) in out.iter_mut().zip(v) {
                    *o += p * x;
                }
            }
        }
    }
    for (out, sum) in outs[..nq].iter_mut().zip(sums) {
        let inv = 1.0 / sum;
        out.iter_mut().for_each(|o| *o *= inv);
    }
    sums
}

mod simd {
    use super::*;

    /// Fills `scores[q·stride + j]` for `j < stride`; false if no SIMD path applies.
    pub fn scores(
        isa: Isa,
        qs: &[&[f32]],
        keys: &[f32],
        d: usize,
        stride: usize,
        scale: f32,
        scores: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            macro_rules! go {
                ($f:ident, $n:literal) => {{
                    let q: [&[f32]; $n] = std::array::from_fn(|i| qs[i]);
                    // SAFETY: `Avx512` implies AVX-512 F, other non-scalar ISAs AVX2 + FMA;
                    // `attend` checked the buffer sizes (whole key blocks up to `stride`).
                    unsafe { x86::$f::<$n>(q, keys, d, stride, scale, scores) }
                }};
            }
            macro_rules! by_n {
                ($f:ident) => {
                    match qs.len() {
                        1 => go!($f, 1),
                        2 => go!($f, 2),
                        3 => go!($f, 3),
                        _ => go!($f, 4),
                    }
                };
            }
            if isa == Isa::Avx512 {
                by_n!(scores512);
            } else {
                by_n!(scores256);
            }
            return true;
        }
        let _ = (isa, qs, keys, d, stride, scale, scores);
        false
    }

    /// `outs[q] = Σ_{j<len} scores[q·stride + j] · V[j]`; false if no SIMD path applies.
    pub fn weighted_sum(
        isa: Isa,
        scores: &[f32],
        stride: usize,
        len: usize,
        values: &[f32],
        d: usize,
        outs: &mut [&mut [f32]],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar && d.is_multiple_of(8) {
            macro_rules! go {
                ($f:ident, $n:literal) => {{
                    let p: [&[f32]; $n] =
                        std::array::from_fn(|i| &scores[i * stride..(i + 1) * stride]);
                    let o: [*mut f32; $n] = std::array::from_fn(|i| outs[i].as_mut_ptr());
                    // SAFETY: as for `scores`; `outs[q]` has `d` values and `values` `len` rows.
                    unsafe { x86::$f::<$n>(p, len, values, d, o) }
                }};
            }
            macro_rules! by_n {
                ($f:ident) => {
                    match outs.len() {
                        1 => go!($f, 1),
                        2 => go!($f, 2),
                        3 => go!($f, 3),
                        _ => go!($f, 4),
                    }
                };
            }
            if isa == Isa::Avx512 && d.is_multiple_of(16) {
                by_n!(wsum512);
            } else {
                by_n!(wsum256);
            }
            return true;
        }
        let _ = (isa, scores, stride, len, values, d, outs);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::KEY_BLOCK;

    /// # Safety
    /// AVX-512 F; `keys` holds `stride / 16` whole blocks of `d` channels; `scores` holds
    /// `N · stride`; each `q` has `d` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores512<const N: usize>(
        q: [&[f32]; N],
        keys: &[f32],
        d: usize,
        stride: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let sc = _mm512_set1_ps(scale);
        for blk in 0..stride / KEY_BLOCK {
            let kb = keys.as_ptr().add(blk * KEY_BLOCK * d);
            let mut acc = [_mm512_setzero_ps(); N];
            for c in 0..d {
                let kv = _mm512_loadu_ps(kb.add(c * KEY_BLOCK));
                for (a, qq) in acc.iter_mut().zip(q.iter()) {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*qq.get_unchecked(c)), kv, *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let dst = scores.as_mut_ptr().add(i * stride + blk * KEY_BLOCK);
                _mm512_storeu_ps(dst, _mm512_mul_ps(*a, sc));
            }
        }
    }

    /// # Safety
    /// AVX2 + FMA; as for [`scores512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores256<const N: usize>(
        q: [&[f32]; N],
        keys: &[f32],
        d: usize,
        stride: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let sc = _mm256_set1_ps(scale);
        for blk in 0..stride / KEY_BLOCK {
            let kb = keys.as_ptr().add(blk * KEY_BLOCK * d);
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            for c in 0..d {
                let k0 = _mm256_loadu_ps(kb.add(c * KEY_BLOCK));
                let k1 = _mm256_loadu_ps(kb.add(c * KEY_BLOCK + 8));
                for (a, qq) in acc.iter_mut().zip(q.iter()) {
                    let qv = _mm256_set1_ps(*qq.get_unchecked(c));
                    a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let dst = scores.as_mut_ptr().add(i * stride + blk * KEY_BLOCK);
                _mm256_storeu_ps(dst, _mm256_mul_ps(a[0], sc));
                _mm256_storeu_ps(dst.add(8), _mm256_mul_ps(a[1], sc));
            }
        }
    }

    /// `out_q = Σ_j p_q[j] · V[j]` for one vector width: columns in passes of `wide` vectors
    /// (the accumulators of all queries stay in registers), then single vectors.
    macro_rules! weighted_sum {
        ($name:ident, $cols:ident, $features:literal, $lanes:literal, wide: $wide:literal,
         $zero:ident, $loadu:ident, $set1:ident, $fmadd:ident, $storeu:ident) => {
            /// Columns `c0..c0 + lanes·L` of every output.
            #[inline(always)]
            unsafe fn $cols<const N: usize, const L: usize>(
                p: &[&[f32]; N],
                len: usize,
                values: &[f32],
                d: usize,
                out: &[*mut f32; N],
                c0: usize,
            ) {
                let mut acc = [[$zero(); L]; N];
                for j in 0..len {
                    let row = values.as_ptr().add(j * d + c0);
                    let mut v = [$zero(); L];
                    for (k, x) in v.iter_mut().enumerate() {
                        *x = $loadu(row.add($lanes * k));
                    }
                    for (a, pq) in acc.iter_mut().zip(p.iter()) {
                        let w = $set1(*pq.get_unchecked(j));
                        for (ak, vk) in a.iter_mut().zip(v.iter()) {
                            *ak = $fmadd(w, *vk, *ak);
                        }
                    }
                }
                for (a, o) in acc.iter().zip(out.iter()) {
                    for (k, x) in a.iter().enumerate() {
                        $storeu(o.add(c0 + $lanes * k), *x);
                    }
                }
            }

            /// # Safety
            /// The CPU has the enabled features; `d` is a multiple of the lane count; `values`
            /// holds `len` rows of `d`; each `p` holds `len` weights; each `out` points to `d`
            /// floats (overwritten).
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const N: usize>(
                p: [&[f32]; N],
                len: usize,
                values: &[f32],
                d: usize,
                out: [*mut f32; N],
            ) {
                let mut c0 = 0;
                while c0 + $wide * $lanes <= d {
                    $cols::<N, $wide>(&p, len, values, d, &out, c0);
                    c0 += $wide * $lanes;
                }
                while c0 < d {
                    $cols::<N, 1>(&p, len, values, d, &out, c0);
                    c0 += $lanes;
                }
            }
        };
    }

    weighted_sum!(wsum512, wsum512_cols, "avx512f", 16, wide: 4, _mm512_setzero_ps,
        _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps);
    weighted_sum!(wsum256, wsum256_cols, "avx2,fma", 8, wide: 2, _mm256_setzero_ps,
        _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_attention_matches_the_definition() {
        for &(d, lens) in &[
            (64, &[1usize][..]),
            (64, &[37, 38, 39, 40][..]),
            (40, &[9, 10][..]),
            (8, &[300, 301, 302][..]),
            (6, &[5][..]),
            (16, &[16, 17, 18, 19][..]),
        ] {
            let max = *lens.iter().max().unwrap();
            let nq = lens.len();
            let qs: Vec<Vec<f32>> = (0..nq)
                .map(|q| {
                    (0..d)
                        .map(|i| (((i + 3 * q) * 13 % 7) as f32 - 3.0) / 4.0)
                        .collect()
                })
                .collect();
            let kr: Vec<f32> = (0..max * d)
                .map(|i| ((i * 31 % 19) as f32 - 9.0) / 5.0)
                .collect();
            let v: Vec<f32> = (0..max * d)
                .map(|i| ((i * 17 % 23) as f32 - 11.0) / 6.0)
                .collect();
            // Blocked keys; padding positions hold garbage that must be masked out.
            let mut keys = vec![1e3f32; key_buffer_len(max, d)];
            for p in 0..max {
                for c in 0..d {
                    keys[key_index(p, c, d)] = kr[p * d + c];
                }
            }
            let scale = 1.0 / (d as f32).sqrt();
            // Without skips, and with each query skipping a different middle range (tree
            // attention), which must match the definition over the positions left.
            let skip_sets: [Vec<Range<usize>>; 2] = [
                vec![0..0; nq],
                lens.iter()
                    .enumerate()
                    .map(|(q, &len)| (len / 3 + q % 2)..(len / 2 + q).min(len.saturating_sub(1)))
                    .collect(),
            ];
            for (isa, skips) in crate::dot::available()
                .into_iter()
                .flat_map(|isa| skip_sets.iter().map(move |s| (isa, s)))
            {
                let mut scratch = vec![f32::NAN; scratch_len(nq, max)];
                let mut outs: Vec<Vec<f32>> = vec![vec![f32::NAN; d]; nq];
                let qr: Vec<&[f32]> = qs.iter().map(|q| q.as_slice()).collect();
                let mut or: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                attend_skipping(
                    isa,
                    &qr,
                    lens,
                    skips,
                    &keys,
                    &v,
                    scale,
                    &mut scratch,
                    &mut or,
                );
                for (q, &len) in lens.iter().enumerate() {
                    // Reference in f64; skipped positions weigh nothing.
                    let s: Vec<f64> = (0..len)
                        .map(|j| {
                            if skips[q].contains(&j) {
                                return f64::NEG_INFINITY;
                            }
                            (0..d)
                                .map(|i| (qs[q][i] * kr[j * d + i]) as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..len).map(|j| e[j] / z * v[j * d + c] as f64).sum();
                        assert!(
                            (outs[q][c] as f64 - want).abs() < 1e-5,
                            "{isa:?} d={d} q={q} len={len} col {c}: {} vs {want}",
                            outs[q][c]
                        );
                    }
                }
            }
        }
    }
}
