//! Orthonormal Hadamard transforms of widths `2^k · 12^a · 20^b` in `O(n log n)`.
//!
//! A Hadamard matrix of order `n` has entries ±1 and `H Hᵀ = n I`, so `H/√n` is orthogonal.
//! Sylvester's construction gives orders `2^k` (the fast Walsh–Hadamard butterfly); Paley's
//! first construction gives orders `q + 1` for primes `q ≡ 3 (mod 4)`, of which 12 and 20 are
//! used here. Kronecker products of Hadamard matrices are Hadamard, so a width is covered when
//! it factors as `12^a · 20^b · 2^k` with `2^k ≥ 4^(a+b)` (each 12 = 3·4 and 20 = 5·4 takes its
//! factor 4 from the power of two): 576 = 12·12·4, 1536 = 12·128, 192 = 12·16, 4096 = 2^12,
//! 5120 = 20·256. Widths with another odd part (e.g. 11008 = 43·256) have no transform here.
//!
//! `x` is read as a row-major tensor with one axis per factor (`12, …, 20, …, 2^k`, the power of
//! two innermost and contiguous) and each factor is applied along its axis.

/// An orthonormal transform `x ↦ H x / √n` for one width.
#[derive(Debug, Clone, PartialEq)]
pub struct Hadamard {
    n: usize,
    /// Dense Paley factors, outermost first: `(order, row-major ±1 entries)`.
    dense: Vec<(usize, Vec<f32>)>,
    /// The same factors transposed (for `Hᵀ` in the vector paths).
    dense_t: Vec<Vec<f32>>,
    /// The Sylvester (power of two) factor, innermost.
    pow2: usize,
    norm: f32,
}

/// Quadratic character of `x` modulo the prime `q`: 0, 1 (a nonzero square) or −1.
fn legendre(x: usize, q: usize) -> i32 {
    let x = x % q;
    if x == 0 {
        return 0;
    }
    if (1..q).any(|y| (y * y) % q == x) {
        1
    } else {
        -1
    }
}

/// Paley's construction I: a Hadamard matrix of order `q + 1` for a prime `q ≡ 3 (mod 4)`,
/// `H = I + S` with `S = [[0, 1ᵀ], [−1, Q]]` and Jacobsthal's `Q[i][j] = χ(j − i)`.
fn paley(q: usize) -> Vec<f32> {
    let n = q + 1;
    let mut h = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            let s = match (i, j) {
                (0, 0) => 0,
                (0, _) => 1,
                (_, 0) => -1,
                _ => legendre(j + q - i, q),
            };
            h[i * n + j] = (s + i32::from(i == j)) as f32;
        }
    }
    h
}

impl Hadamard {
    /// The transform of width `n`, if `n` factors as described in the module doc.
    pub fn new(n: usize) -> Option<Self> {
        if n == 0 {
            return None;
        }
        let mut pow2 = 1usize << n.trailing_zeros();
        let mut odd = n / pow2;
        let mut dense = Vec::new();
        for (p, order) in [(3usize, 12usize), (5, 20)] {
            while odd.is_multiple_of(p) {
                if !pow2.is_multiple_of(4) {
                    return None;
                }
                odd /= p;
                pow2 /= 4;
                dense.push((order, paley(order - 1)));
            }
        }
        if odd != 1 {
            return None;
        }
        let dense_t = dense
            .iter()
            .map(|(a, m)| (0..a * a).map(|rc| m[(rc % a) * a + rc / a]).collect())
            .collect();
        Some(Self {
            n,
            dense,
            dense_t,
            pow2,
            norm: 1.0 / (n as f32).sqrt(),
        })
    }

    /// The width.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// `x ← H x / √n`.
    pub fn apply(&self, x: &mut [f32]) {
        self.run(x, 1, false)
    }

    /// `x ← Hᵀ x / √n`, the inverse of [`Hadamard::apply`].
    pub fn apply_t(&self, x: &mut [f32]) {
        self.run(x, 1, true)
    }

    /// [`Hadamard::apply`] on every column of a row-major `(n, k)` matrix at once.
    pub fn apply_cols(&self, x: &mut [f32], k: usize) {
        self.run(x, k, false)
    }

    /// [`Hadamard::apply_t`] on every column of a row-major `(n, k)` matrix at once.
    pub fn apply_t_cols(&self, x: &mut [f32], k: usize) {
        self.run(x, k, true)
    }

    /// The transform along axis 0 of `x (n, k)`: every inner loop runs over contiguous memory.
    fn run(&self, x: &mut [f32], k: usize, transpose: bool) {
        debug_assert_eq!(x.len(), self.n * k);
        let p = self.pow2;
        for block in x.chunks_exact_mut(p * k) {
            let mut h = 1;
            while h < p {
                for chunk in block.chunks_exact_mut(2 * h * k) {
                    let (a, b) = chunk.split_at_mut(h * k);
                    for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                        let (s, d) = (*u + *v, *u - *v);
                        *u = s;
                        *v = d;
                    }
                }
                h *= 2;
            }
        }
        // Each dense factor runs along an axis with `outer` blocks before it and a stride of
        // `inner` values (the axes after it, times `k`).
        let mut inner = p * k;
        let mut buf = Vec::new();
        for (order, h) in self.dense.iter().rev() {
            let a = *order;
            let outer = x.len() / (inner * a);
            buf.clear();
            buf.resize(a * inner, 0f32);
            for o in 0..outer {
                let xs = &mut x[o * a * inner..(o + 1) * a * inner];
                buf.iter_mut().for_each(|v| *v = 0.0);
                for r in 0..a {
                    let out = &mut buf[r * inner..(r + 1) * inner];
                    for c in 0..a {
                        let m = if transpose {
                            h[c * a + r]
                        } else {
                            h[r * a + c]
                        };
                        let src = &xs[c * inner..(c + 1) * inner];
                        for (y, v) in out.iter_mut().zip(src) {
                            *y += m * v;
                        }
                    }
                }
                xs.copy_from_slice(&buf);
            }
            inner *= a;
        }
        for v in x.iter_mut() {
            *v *= self.norm;
        }
    }
}

/// A Hadamard transform with a diagonal on its input side: `R = H D / √n`, so `R x = H (d ⊙ x)
/// / √n` and `Rᵀ x = d ⊙ (Hᵀ x) / √n`. With `d` a random sign vector `R` is a randomized
/// Hadamard transform (orthogonal); QuIP folds its diagonal rescaling into `d` too.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    pub diag: Vec<f32>,
    pub h: Hadamard,
}

impl Rotation {
    /// `None` when `diag.len()` has no Hadamard transform.
    pub fn new(diag: Vec<f32>) -> Option<Self> {
        let h = Hadamard::new(diag.len())?;
        Some(Self { diag, h })
    }

    pub fn len(&self) -> usize {
        self.diag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.diag.is_empty()
    }

    /// `x ← H (d ⊙ x) / √n`.
    pub fn apply(&self, x: &mut [f32]) {
        self.one(x, false)
    }

    /// `x ← d ⊙ (Hᵀ x) / √n`.
    pub fn apply_t(&self, x: &mut [f32]) {
        self.one(x, true)
    }

    fn one(&self, x: &mut [f32], transpose: bool) {
        #[cfg(target_arch = "x86_64")]
        if self.h.pow2 >= 4 && x.len() == self.len() && crate::isa() != crate::Isa::Scalar {
            // SAFETY: a non-scalar `Isa` is only selected when the CPU has AVX2 and FMA; the
            // power-of-two factor is at least 4 and `x` is one row.
            unsafe { avx2::one_row(self, x, transpose) };
            return;
        }
        self.one_scalar(x, transpose)
    }

    /// The reference of [`Rotation::apply`] and [`Rotation::apply_t`].
    fn one_scalar(&self, x: &mut [f32], transpose: bool) {
        if !transpose {
            for (v, d) in x.iter_mut().zip(&self.diag) {
                *v *= d;
            }
        }
        self.h.run(x, 1, transpose);
        if transpose {
            for (v, d) in x.iter_mut().zip(&self.diag) {
                *v *= d;
            }
        }
    }

    /// [`Rotation::apply`] on every row of a row-major `(rows, n)` matrix: sixteen rows at a
    /// time are transposed into a scratch block and transformed as its columns, so every inner
    /// loop runs over sixteen contiguous values.
    pub fn apply_rows(&self, x: &mut [f32]) {
        self.rows(x, false)
    }

    /// [`Rotation::apply_t`] on every row of a row-major `(rows, n)` matrix.
    pub fn apply_t_rows(&self, x: &mut [f32]) {
        self.rows(x, true)
    }

    fn rows(&self, x: &mut [f32], transpose: bool) {
        #[cfg(target_arch = "x86_64")]
        if self.len().is_multiple_of(8) && crate::isa() != crate::Isa::Scalar {
            // SAFETY: a non-scalar `Isa` is only selected when the CPU has AVX2 and FMA.
            unsafe { avx2::rows(self, x, transpose) };
            return;
        }
        self.rows_scalar(x, transpose)
    }

    /// The reference of [`Rotation::apply_rows`] (and the path for widths not a multiple of 8).
    fn rows_scalar(&self, x: &mut [f32], transpose: bool) {
        const TILE: usize = 16;
        let n = self.len();
        if n == 0 {
            return;
        }
        let mut buf = Vec::new();
        for chunk in x.chunks_mut(n * TILE) {
            let k = chunk.len() / n;
            if k == 1 {
                self.one_scalar(chunk, transpose);
                continue;
            }
            buf.clear();
            buf.resize(n * k, 0f32);
            for (t, row) in chunk.chunks_exact(n).enumerate() {
                for (i, v) in row.iter().enumerate() {
                    buf[i * k + t] = *v;
                }
            }
            if transpose {
                self.apply_t_cols(&mut buf, k)
            } else {
                self.apply_cols(&mut buf, k)
            }
            for (t, row) in chunk.chunks_exact_mut(n).enumerate() {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = buf[i * k + t];
                }
            }
        }
    }

    /// [`Rotation::apply`] on every column of a row-major `(n, k)` matrix.
    pub fn apply_cols(&self, x: &mut [f32], k: usize) {
        for (row, d) in x.chunks_exact_mut(k).zip(&self.diag) {
            row.iter_mut().for_each(|v| *v *= d);
        }
        self.h.apply_cols(x, k);
    }

    /// [`Rotation::apply_t`] on every column of a row-major `(n, k)` matrix.
    pub fn apply_t_cols(&self, x: &mut [f32], k: usize) {
        self.h.apply_t_cols(x, k);
        for (row, d) in x.chunks_exact_mut(k).zip(&self.diag) {
            row.iter_mut().for_each(|v| *v *= d);
        }
    }
}

/// Rows eight at a time: each 8 × 8 block is transposed in registers, so the transform runs on
/// vectors that hold one value of each of eight rows (the scalar path's columns, without its
/// element-by-element transposes). The input's diagonal and the output's scale are applied
/// on the way in and out.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Rotation;

    /// Tiles of fewer rows than this go one row at a time (measured: `benches/rotation.rs`).
    const MIN_ROWS: usize = 5;

    /// Transposes eight rows of eight lanes in place.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn transpose8(v: &mut [__m256; 8]) {
        let t0 = _mm256_unpacklo_ps(v[0], v[1]);
        let t1 = _mm256_unpackhi_ps(v[0], v[1]);
        let t2 = _mm256_unpacklo_ps(v[2], v[3]);
        let t3 = _mm256_unpackhi_ps(v[2], v[3]);
        let t4 = _mm256_unpacklo_ps(v[4], v[5]);
        let t5 = _mm256_unpackhi_ps(v[4], v[5]);
        let t6 = _mm256_unpacklo_ps(v[6], v[7]);
        let t7 = _mm256_unpackhi_ps(v[6], v[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        v[0] = _mm256_permute2f128_ps::<0x20>(u0, u4);
        v[1] = _mm256_permute2f128_ps::<0x20>(u1, u5);
        v[2] = _mm256_permute2f128_ps::<0x20>(u2, u6);
        v[3] = _mm256_permute2f128_ps::<0x20>(u3, u7);
        v[4] = _mm256_permute2f128_ps::<0x31>(u0, u4);
        v[5] = _mm256_permute2f128_ps::<0x31>(u1, u5);
        v[6] = _mm256_permute2f128_ps::<0x31>(u2, u6);
        v[7] = _mm256_permute2f128_ps::<0x31>(u3, u7);
    }

    /// The 4-point Walsh–Hadamard transform within each 128-bit lane group: `[a, b, c, d] →
    /// [a+b+c+d, a−b+c−d, a+b−c−d, a−b−c+d]`, the butterflies of half-widths 1 and 2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn wht4(v: __m128) -> __m128 {
        let odd = _mm_setr_ps(1.0, -1.0, 1.0, -1.0);
        let high = _mm_setr_ps(1.0, 1.0, -1.0, -1.0);
        let t = _mm_fmadd_ps(v, odd, _mm_permute_ps::<0b10_11_00_01>(v));
        _mm_fmadd_ps(t, high, _mm_permute_ps::<0b01_00_11_10>(t))
    }

    /// [`Rotation::apply`] (or `apply_t`) of one row, on 4-lane vectors: the four innermost
    /// values of the power-of-two axis share a vector, so every step but the first two
    /// butterflies runs on whole vectors, in place.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the power-of-two factor must be at least 4 and
    /// `x.len() == r.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn one_row(r: &Rotation, x: &mut [f32], transpose: bool) {
        let h = &r.h;
        let n = r.len();
        let nq = n / 4;
        let ptr = x.as_mut_ptr();
        // SAFETY (every load and store below): quad i < nq covers x[4i..4i + 4] within n.
        let load = |i: usize| unsafe { _mm_loadu_ps(ptr.add(4 * i)) };
        let store = |i: usize, v: __m128| unsafe { _mm_storeu_ps(ptr.add(4 * i), v) };
        let diag = |i: usize| unsafe { _mm_loadu_ps(r.diag.as_ptr().add(4 * i)) };
        // The input's diagonal and the butterflies of half-widths 1 and 2.
        for i in 0..nq {
            let v = if transpose {
                load(i)
            } else {
                _mm_mul_ps(load(i), diag(i))
            };
            store(i, wht4(v));
        }
        // Butterflies of half-widths 4 and up, between vectors within each block of pow2.
        let pq = h.pow2 / 4;
        let mut half = 1;
        while half < pq {
            for b0 in (0..nq).step_by(2 * half) {
                for i in b0..b0 + half {
                    let (u, w) = (load(i), load(i + half));
                    store(i, _mm_add_ps(u, w));
                    store(i + half, _mm_sub_ps(u, w));
                }
            }
            half *= 2;
        }
        // Each dense factor along its axis, `inner` vectors apart (innermost factor first).
        let mut inner = pq;
        let mut col = [_mm_setzero_ps(); 20];
        for ((a, m), mt) in h.dense.iter().zip(&h.dense_t).rev() {
            let (a, m) = (*a, if transpose { mt } else { m });
            for o in 0..nq / (inner * a) {
                let base = o * a * inner;
                for j in 0..inner {
                    for (c, v) in col.iter_mut().enumerate().take(a) {
                        *v = load(base + c * inner + j);
                    }
                    for row in 0..a {
                        let mut acc = _mm_setzero_ps();
                        for (c, v) in col.iter().enumerate().take(a) {
                            acc = _mm_fmadd_ps(_mm_set1_ps(m[row * a + c]), *v, acc);
                        }
                        store(base + row * inner + j, acc);
                    }
                }
            }
            inner *= a;
        }
        // The scale, and the output's diagonal.
        let norm = _mm_set1_ps(h.norm);
        for i in 0..nq {
            let v = _mm_mul_ps(load(i), norm);
            store(i, if transpose { _mm_mul_ps(v, diag(i)) } else { v });
        }
    }

    /// [`Rotation::apply_rows`] (or `apply_t_rows`) for a width that is a multiple of 8.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `r.len()` must be a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows(r: &Rotation, x: &mut [f32], transpose: bool) {
        let n = r.len();
        let h = &r.h;
        if x.len() < n * MIN_ROWS {
            // Too few rows to fill the lanes: one row at a time (decoding).
            for row in x.chunks_exact_mut(n) {
                r.one(row, transpose);
            }
            return;
        }
        // The dense factors' entries as vectors, in the order `run` applies them (innermost
        // first), transposed for `apply_t`.
        let dense: Vec<(usize, Vec<__m256>)> = h
            .dense
            .iter()
            .rev()
            .map(|(a, m)| {
                let a = *a;
                let v = (0..a * a)
                    .map(|rc| {
                        let (row, col) = (rc / a, rc % a);
                        _mm256_set1_ps(if transpose { m[col * a + row] } else { m[rc] })
                    })
                    .collect();
                (a, v)
            })
            .collect();
        let scale_in = |i: usize| if transpose { 1.0 } else { r.diag[i] };
        let scale_out = |i: usize| h.norm * if transpose { r.diag[i] } else { 1.0 };
        let mut buf = vec![_mm256_setzero_ps(); n];
        for chunk in x.chunks_mut(n * 8) {
            let k = chunk.len() / n;
            if k < MIN_ROWS {
                // Too few rows to fill the lanes: one row at a time (decoding).
                for row in chunk.chunks_exact_mut(n) {
                    r.one(row, transpose);
                }
                continue;
            }
            let ptr = chunk.as_mut_ptr();
            // In: eight rows' values i0..i0 + 8 become eight vectors of one value per row.
            for i0 in (0..n).step_by(8) {
                let mut v = [_mm256_setzero_ps(); 8];
                for (row, vr) in v.iter_mut().enumerate().take(k) {
                    // SAFETY: row < k rows of n values each, i0 + 8 ≤ n.
                    *vr = unsafe { _mm256_loadu_ps(ptr.add(row * n + i0)) };
                }
                transpose8(&mut v);
                for (q, vq) in v.iter().enumerate() {
                    buf[i0 + q] = _mm256_mul_ps(*vq, _mm256_set1_ps(scale_in(i0 + q)));
                }
            }
            // The Sylvester factor: butterflies within each block of `pow2` vectors.
            let p = h.pow2;
            for block in buf.chunks_exact_mut(p) {
                let mut half = 1;
                while half < p {
                    for pair in block.chunks_exact_mut(2 * half) {
                        let (a, b) = pair.split_at_mut(half);
                        for (u, w) in a.iter_mut().zip(b.iter_mut()) {
                            let (s, d) = (_mm256_add_ps(*u, *w), _mm256_sub_ps(*u, *w));
                            *u = s;
                            *w = d;
                        }
                    }
                    half *= 2;
                }
            }
            // Each dense factor along its axis: `inner` vectors apart, `outer` blocks.
            let mut inner = p;
            for (a, m) in &dense {
                let a = *a;
                let outer = n / (inner * a);
                let mut col = [_mm256_setzero_ps(); 20];
                for o in 0..outer {
                    let xs = &mut buf[o * a * inner..(o + 1) * a * inner];
                    for j in 0..inner {
                        for (c, v) in col.iter_mut().enumerate().take(a) {
                            *v = xs[c * inner + j];
                        }
                        for row in 0..a {
                            let mut acc = _mm256_setzero_ps();
                            for (c, v) in col.iter().enumerate().take(a) {
                                acc = _mm256_fmadd_ps(m[row * a + c], *v, acc);
                            }
                            xs[row * inner + j] = acc;
                        }
                    }
                }
                inner *= a;
            }
            // Out: scaled, transposed back into the rows.
            for i0 in (0..n).step_by(8) {
                let mut v = [_mm256_setzero_ps(); 8];
                for (q, vq) in v.iter_mut().enumerate() {
                    *vq = _mm256_mul_ps(buf[i0 + q], _mm256_set1_ps(scale_out(i0 + q)));
                }
                transpose8(&mut v);
                for (row, vr) in v.iter().enumerate().take(k) {
                    // SAFETY: as for the loads.
                    unsafe { _mm256_storeu_ps(ptr.add(row * n + i0), *vr) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_matrix(t: &Hadamard, transpose: bool) -> Vec<f32> {
        let n = t.len();
        let mut m = vec![0f32; n * n];
        for j in 0..n {
            let mut e = vec![0f32; n];
            e[j] = 1.0;
            t.run(&mut e, 1, transpose);
            for i in 0..n {
                m[i * n + j] = e[i];
            }
        }
        m
    }

    /// The vector path of `apply_rows`/`apply_t_rows` against the scalar one, on widths with
    /// one or two dense factors of 12 and 20 and row counts with partial tiles.
    #[test]
    fn vector_rows_match_scalar_rows() {
        for n in [8, 48, 192, 240, 1536, 5120] {
            let diag: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
            let r = Rotation::new(diag).unwrap();
            for rows in [1, 9, 20] {
                let x: Vec<f32> = (0..rows * n)
                    .map(|i| ((i * 31 % 113) as f32) * 0.1 - 5.0)
                    .collect();
                for transpose in [false, true] {
                    let (mut a, mut b) = (x.clone(), x.clone());
                    r.rows(&mut a, transpose);
                    r.rows_scalar(&mut b, transpose);
                    for (u, v) in a.iter().zip(&b) {
                        assert!((u - v).abs() < 1e-4 * (1.0 + v.abs()), "n {n}: {u} vs {v}");
                    }
                }
            }
        }
    }

    /// The vector path of one row's `apply`/`apply_t` against the scalar one.
    #[test]
    fn vector_row_matches_scalar_row() {
        for n in [4, 12, 48, 192, 240, 576, 1536, 5120] {
            let diag: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
            let r = Rotation::new(diag).unwrap();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 31 % 113) as f32) * 0.1 - 5.0)
                .collect();
            for transpose in [false, true] {
                let (mut a, mut b) = (x.clone(), x.clone());
                r.one(&mut a, transpose);
                r.one_scalar(&mut b, transpose);
                for (u, v) in a.iter().zip(&b) {
                    assert!((u - v).abs() < 1e-4 * (1.0 + v.abs()), "n {n}: {u} vs {v}");
                }
            }
        }
    }

    #[test]
    fn paley_orders_are_hadamard() {
        for q in [11usize, 19] {
            let n = q + 1;
            let h = paley(q);
            for i in 0..n {
                for j in 0..n {
                    let dot: f32 = (0..n).map(|k| h[i * n + k] * h[j * n + k]).sum();
                    let want = if i == j { n as f32 } else { 0.0 };
                    assert_eq!(dot, want, "q={q} rows {i},{j}");
                }
            }
        }
    }

    #[test]
    fn widths_that_factor() {
        for n in [1, 2, 4, 12, 20, 48, 192, 576, 1536, 4096, 5120, 240] {
            assert!(Hadamard::new(n).is_some(), "{n}");
        }
        for n in [0, 3, 6, 9 * 4, 7 * 64, 11008, 100] {
            assert!(Hadamard::new(n).is_none(), "{n}");
        }
    }

    #[test]
    fn orthonormal_with_pm1_entries_and_inverse() {
        for n in [12, 48, 192, 240, 576] {
            let t = Hadamard::new(n).unwrap();
            let m = dense_matrix(&t, false);
            let s = (n as f32).sqrt();
            assert!(
                m.iter().all(|v| ((v * s).abs() - 1.0).abs() < 1e-4),
                "n={n}"
            );
            for i in 0..n {
                for j in 0..n {
                    let dot: f32 = (0..n).map(|k| m[i * n + k] * m[j * n + k]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-4, "n={n} ({i},{j}) {dot}");
                }
            }
            let mt = dense_matrix(&t, true);
            for i in 0..n {
                for j in 0..n {
                    assert!((mt[i * n + j] - m[j * n + i]).abs() < 1e-6);
                }
            }
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32) - 50.0).collect();
            let mut y = x.clone();
            t.apply(&mut y);
            t.apply_t(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-3, "round trip {a} {b}");
            }
            // Columns at once equal one column at a time.
            let k = 3;
            let mut cols: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 29) as f32) - 14.0).collect();
            let mut each = cols.clone();
            t.apply_cols(&mut cols, k);
            for c in 0..k {
                let mut v: Vec<f32> = (0..n).map(|i| each[i * k + c]).collect();
                t.apply(&mut v);
                for i in 0..n {
                    each[i * k + c] = v[i];
                }
            }
            for (a, b) in cols.iter().zip(&each) {
                assert!((a - b).abs() < 1e-3, "columns {a} {b}");
            }
            // Rows at once (tiles of 16 and a remainder) equal one row at a time.
            let r = Rotation::new(
                (0..n)
                    .map(|i| if i % 3 == 0 { -1.5 } else { 0.5 })
                    .collect(),
            )
            .unwrap();
            for rows in [1, 17, 35] {
                let x: Vec<f32> = (0..rows * n)
                    .map(|i| ((i * 7 % 23) as f32) - 11.0)
                    .collect();
                for transpose in [false, true] {
                    let mut a = x.clone();
                    let mut b = x.clone();
                    if transpose {
                        r.apply_t_rows(&mut a);
                        b.chunks_mut(n).for_each(|v| r.apply_t(v));
                    } else {
                        r.apply_rows(&mut a);
                        b.chunks_mut(n).for_each(|v| r.apply(v));
                    }
                    for (u, v) in a.iter().zip(&b) {
                        assert!((u - v).abs() < 1e-3, "rows {u} {v}");
                    }
                }
            }
        }
    }
}
