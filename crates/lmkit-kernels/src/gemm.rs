//! Prompt-sized products with dense (f32 or f16) weights: the rows a call covers are first
//! packed into panels of [`PANEL`] rows stored channel-major in f32 (`panel, channel, row`), then
//! a register tile of 32 rows × 6 tokens (AVX-512; 16 × 6 with AVX2) accumulates
//! `y[t][r..r+16] += x[t][c] · panel[c]` by broadcasting one activation at a time: no horizontal
//! sums, and each weight vector loaded feeds six FMAs. Packing costs one pass over the rows and
//! is repaid over the tokens, so it is used from [`MIN_TOKENS`] tokens up.

use std::cell::RefCell;
use std::ops::Range;

use half::f16;

use crate::dense::Dense;
use crate::dot::Isa;

/// Rows per panel.
pub const PANEL: usize = 16;
/// Fewest tokens for which packing pays.
pub const MIN_TOKENS: usize = 12;
/// Tokens per register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const TILE_TOKENS: usize = 6;

thread_local! {
    static PANELS: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Packs rows `rows` of `w` into `buf` as panels (f16 and bf16 rows widened first, f16 8 at a
/// time with F16C where the CPU has it).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn pack(
    isa: Isa,
    w: Dense,
    cols: usize,
    rows: &Range<usize>,
    buf: &mut Vec<f32>,
    row: &mut Vec<f32>,
) {
    let np = rows.len().div_ceil(PANEL);
    buf.clear();
    buf.resize(np * PANEL * cols, 0.0);
    row.resize(cols, 0.0);
    for (i, r) in rows.clone().enumerate() {
        let base = (i / PANEL) * PANEL * cols + i % PANEL;
        let src: &[f32] = match w {
            Dense::F32(v) => &v[r * cols..(r + 1) * cols],
            Dense::F16(b) => {
                widen(isa, &b[2 * r * cols..2 * (r + 1) * cols], row);
                row
            }
            Dense::BF16(b) => {
                // bf16 is the upper half of an f32: the compiler vectorizes the shifts.
                let src = &b[2 * r * cols..2 * (r + 1) * cols];
                for (o, h) in row.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([h[0], h[1]])) << 16);
                }
                row
            }
        };
        for (c, &x) in src.iter().enumerate() {
            buf[base + c * PANEL] = x;
        }
    }
}

/// Little-endian f16 bytes → f32.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn widen(isa: Isa, b: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && out.len().is_multiple_of(8) {
        // SAFETY: non-scalar ISAs have F16C; `b` holds `2 · out.len()` bytes.
        unsafe { x86::widen(b, out) };
        return;
    }
    let _ = isa;
    for (o, h) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = f16::from_le_bytes([h[0], h[1]]).to_f32();
    }
}

/// `W[r] · x_t` for `r` in `rows`, `t < n` through packed panels, handed to `emit`; returns
/// false (doing nothing) when this path does not apply (few tokens, no SIMD).
pub fn rows(
    isa: Isa,
    w: Dense,
    cols: usize,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    emit: &mut impl FnMut(usize, usize, f32),
) -> bool {
    if n < MIN_TOKENS || isa == Isa::Scalar || rows.is_empty() || x.len() < n * cols {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        PANELS.with(|b| {
            let [buf, row, part] = &mut *b.borrow_mut();
            pack(isa, w, cols, &rows, buf, row);
            // SAFETY: `Avx512` means AVX-512 F is present, any other non-scalar ISA AVX2 + FMA;
            // `buf` holds whole panels for `rows`, `x` holds `n` rows of `cols`.
            unsafe {
                if isa == Isa::Avx512 {
                    x86::run512(buf, cols, x, n, &rows, part, emit);
                } else {
                    x86::run256(buf, cols, x, n, &rows, emit);
                }
            }
        });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, emit);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// F16C; `b.len() ≥ 2 · out.len()`, `out.len() % 8 == 0`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen(b: &[u8], out: &mut [f32]) {
        assert!(b.len() >= 2 * out.len());
        for (i, o) in out.chunks_exact_mut(8).enumerate() {
            let h = _mm_loadu_si128(b.as_ptr().add(16 * i) as *const __m128i);
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }

    /// `P` panels × `N` tokens over channels `k0..k1`, starting from `init` (partial sums of
    /// earlier channel blocks, `[token][P·16]`) or zero; returns the sums the same way.
    #[inline(always)]
    unsafe fn tile512<const P: usize, const N: usize>(
        panels: *const f32,
        cols: usize,
        x: *const f32,
        k: Range<usize>,
        init: Option<*const f32>,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; N];
        if let Some(src) = init {
            for (t, a) in acc.iter_mut().enumerate() {
                for (j, ap) in a.iter_mut().enumerate() {
                    *ap = _mm512_loadu_ps(src.add(t * P * PANEL + j * PANEL));
                }
            }
        }
        for c in k {
            let mut w = [_mm512_setzero_ps(); P];
            for (p, v) in w.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(panels.add(p * PANEL * cols + c * PANEL));
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(t * cols + c));
                for (ap, wp) in a.iter_mut().zip(w.iter()) {
                    *ap = _mm512_fmadd_ps(xv, *wp, *ap);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            for (j, ap) in a.iter().enumerate() {
                _mm512_storeu_ps(out.add(t * P * PANEL + j * PANEL), *ap);
            }
        }
    }

    /// Channels per block: a 2-panel slice of this many channels (32 KiB) stays in L1 while
    /// every token tile runs over it.
    const K_BLOCK: usize = 256;

    /// All tokens against panels `p..p+P`, channel block by channel block; partial sums live
    /// in `part` (`n × P·16`).
    #[inline(always)]
    unsafe fn panels512<const P: usize>(
        buf: &[f32],
        cols: usize,
        x: &[f32],
        n: usize,
        p: usize,
        part: &mut Vec<f32>,
    ) {
        part.resize(n * P * PANEL, 0.0);
        let base = buf.as_ptr().add(p * PANEL * cols);
        let pp = part.as_mut_ptr();
        let mut k0 = 0;
        while k0 < cols {
            let k = k0..(k0 + K_BLOCK).min(cols);
            let init = |t: usize| (k0 > 0).then(|| pp.add(t * P * PANEL) as *const f32);
            let mut t = 0;
            while t + TILE_TOKENS <= n {
                let xp = x.as_ptr().add(t * cols);
                tile512::<P, TILE_TOKENS>(
                    base,
                    cols,
                    xp,
                    k.clone(),
                    init(t),
                    pp.add(t * P * PANEL),
                );
                t += TILE_TOKENS;
            }
            while t < n {
                let xp = x.as_ptr().add(t * cols);
                tile512::<P, 1>(base, cols, xp, k.clone(), init(t), pp.add(t * P * PANEL));
                t += 1;
            }
            k0 += K_BLOCK;
        }
    }

    /// # Safety
    /// AVX-512 F; `buf` holds the packed panels of `rows`; `x` holds `n` rows of `cols`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run512(
        buf: &[f32],
        cols: usize,
        x: &[f32],
        n: usize,
        rows: &Range<usize>,
        part: &mut Vec<f32>,
        emit: &mut impl FnMut(usize, usize, f32),
    ) {
        let np = rows.len().div_ceil(PANEL);
        let mut p = 0;
        while p < np {
            let two = p + 1 < np;
            if two {
                panels512::<2>(buf, cols, x, n, p, part);
            } else {
                panels512::<1>(buf, cols, x, n, p, part);
            }
            let width = if two { 2 * PANEL } else { PANEL };
            for t in 0..n {
                for (j, &y) in part[t * width..(t + 1) * width].iter().enumerate() {
                    let r = rows.start + p * PANEL + j;
                    if r < rows.end {
                        emit(t, r, y);
                    }
                }
            }
            p += if two { 2 } else { 1 };
        }
    }

    /// One panel (two 8-lane halves) × `N` tokens.
    #[inline(always)]
    unsafe fn tile256<const N: usize>(
        panel: *const f32,
        cols: usize,
        x: *const f32,
    ) -> [[f32; PANEL]; N] {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for c in 0..cols {
            let w0 = _mm256_loadu_ps(panel.add(c * PANEL));
            let w1 = _mm256_loadu_ps(panel.add(c * PANEL + 8));
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.add(t * cols + c));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
        }
        let mut out = [[0f32; PANEL]; N];
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
        }
        out
    }

    #[inline(always)]
    unsafe fn tokens256<const N: usize>(
        buf: &[f32],
        cols: usize,
        x: &[f32],
        t0: usize,
        rows: &Range<usize>,
        emit: &mut impl FnMut(usize, usize, f32),
    ) {
        let np = rows.len().div_ceil(PANEL);
        let xp = x.as_ptr().add(t0 * cols);
        for p in 0..np {
            let tile = tile256::<N>(buf.as_ptr().add(p * PANEL * cols), cols, xp);
            for (t, panel) in tile.iter().enumerate() {
                for (lane, &y) in panel.iter().enumerate() {
                    let r = rows.start + p * PANEL + lane;
                    if r < rows.end {
                        emit(t0 + t, r, y);
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX2 + FMA; as for [`run512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn run256(
        buf: &[f32],
        cols: usize,
        x: &[f32],
        n: usize,
        rows: &Range<usize>,
        emit: &mut impl FnMut(usize, usize, f32),
    ) {
        let mut t = 0;
        while t + TILE_TOKENS <= n {
            tokens256::<TILE_TOKENS>(buf, cols, x, t, rows, emit);
            t += TILE_TOKENS;
        }
        while t < n {
            tokens256::<1>(buf, cols, x, t, rows, emit);
            t += 1;
        }
    }
}
