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
        Some(Self {
            n,
            dense,
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
        for (v, d) in x.iter_mut().zip(&self.diag) {
            *v *= d;
        }
        self.h.apply(x);
    }

    /// `x ← d ⊙ (Hᵀ x) / √n`.
    pub fn apply_t(&self, x: &mut [f32]) {
        self.h.apply_t(x);
        for (v, d) in x.iter_mut().zip(&self.diag) {
            *v *= d;
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
        const TILE: usize = 16;
        let n = self.len();
        if n == 0 {
            return;
        }
        let mut buf = Vec::new();
        for chunk in x.chunks_mut(n * TILE) {
            let k = chunk.len() / n;
            if k == 1 {
                if transpose {
                    self.apply_t(chunk)
                } else {
                    self.apply(chunk)
                }
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
