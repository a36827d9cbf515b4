//! Block-format conversions at load, for GGUF types without a kernel of their own.
//!
//! `Q4_K` → `Q4_1` is exact up to the f16 rounding of each 32-weight block's scale and offset:
//! a `Q4_K` super-block of 256 weights holds eight 32-weight sub-blocks, each
//! `w = (d·sc)·q − (dmin·m)` with 4-bit `q` and 6-bit `sc`, `m`; that is `Q4_1`'s
//! `w = d'·q + m'` with `d' = d·sc`, `m' = −dmin·m` (stored as f16, relative error ≤ 2⁻¹¹ on the
//! scale and offset; the quants are copied). Layout: ggml's `block_q4_K` is
//! `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`, where each 32 bytes of `qs` hold two
//! sub-blocks (low nibbles, then high nibbles); `Q4_1` puts weight `i` of a block in the low
//! nibble of byte `i` and weight `i + 16` in the high nibble.
//!
//! `Q5_0` → `Q8_0` is exact: both are 32-weight blocks with one f16 scale `d`, and `Q5_0`'s
//! `w = d·(q − 16)` with 5-bit `q` is `Q8_0`'s `w = d·q'` with the 8-bit `q' = q − 16`. Layout:
//! `block_q5_0` is `d: f16, qh: [u8; 4], qs: [u8; 16]`; weight `j < 16` has its low four bits in
//! the low nibble of `qs[j]` and its fifth in bit `j` of `qh` (little-endian u32), weight
//! `j + 16` the high nibble of `qs[j]` and bit `j + 16`.

use half::f16;

use crate::{Error, Result};

/// A conversion of whole blocks of one format into another's bytes.
pub type Conversion = fn(&[u8]) -> Result<Vec<u8>>;

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of one `block_q4_K`.
pub const Q4K_BYTES: usize = 144;

/// Sub-block `j`'s 6-bit scale and min (ggml's `get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// `Q4_K` bytes (any number of whole super-blocks) → `Q4_1` bytes, block for block.
pub fn q4k_to_q4_1(src: &[u8]) -> Result<Vec<u8>> {
    if !src.len().is_multiple_of(Q4K_BYTES) {
        return Err(Error::Shape {
            op: "Q4_K → Q4_1",
            why: format!("{} bytes is not a whole number of Q4_K blocks", src.len()),
        });
    }
    let mut out = Vec::with_capacity(src.len() / Q4K_BYTES * 8 * 20);
    for sb in src.chunks_exact(Q4K_BYTES) {
        let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        let dmin = f16::from_le_bytes([sb[2], sb[3]]).to_f32();
        let scales = &sb[4..16];
        let qs = &sb[16..144];
        for j in 0..8 {
            let (sc, m) = scale_min(j, scales);
            let bytes = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let nib = |i: usize| {
                if j % 2 == 0 {
                    bytes[i] & 0x0F
                } else {
                    bytes[i] >> 4
                }
            };
            out.extend(f16::from_f32(d * sc as f32).to_le_bytes());
            out.extend(f16::from_f32(-(dmin * m as f32)).to_le_bytes());
            for i in 0..16 {
                out.push(nib(i) | (nib(i + 16) << 4));
            }
        }
    }
    Ok(out)
}

/// Bytes of one `block_q5_0`.
pub const Q5_0_BYTES: usize = 22;

/// `Q5_0` bytes (any number of whole blocks) → `Q8_0` bytes, block for block, exactly.
pub fn q5_0_to_q8_0(src: &[u8]) -> Result<Vec<u8>> {
    if !src.len().is_multiple_of(Q5_0_BYTES) {
        return Err(Error::Shape {
            op: "Q5_0 → Q8_0",
            why: format!("{} bytes is not a whole number of Q5_0 blocks", src.len()),
        });
    }
    let mut out = Vec::with_capacity(src.len() / Q5_0_BYTES * 34);
    for b in src.chunks_exact(Q5_0_BYTES) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        out.extend_from_slice(&b[..2]);
        let q = |j: usize, nib: u8| (nib | ((((qh >> j) & 1) as u8) << 4)) as i8 - 16;
        out.extend((0..16).map(|j| q(j, qs[j] & 0x0F) as u8));
        out.extend((0..16).map(|j| q(j + 16, qs[j] >> 4) as u8));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's `dequantize_row_q4_K`, written from its definition.
    fn dequantize_q4k(sb: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        let dmin = f16::from_le_bytes([sb[2], sb[3]]).to_f32();
        let mut y = Vec::with_capacity(QK_K);
        let mut q = &sb[16..];
        let mut is = 0;
        for _ in (0..QK_K).step_by(64) {
            let (sc, m) = scale_min(is, &sb[4..16]);
            let (d1, m1) = (d * sc as f32, dmin * m as f32);
            let (sc, m) = scale_min(is + 1, &sb[4..16]);
            let (d2, m2) = (d * sc as f32, dmin * m as f32);
            y.extend(q[..32].iter().map(|&b| d1 * (b & 0x0F) as f32 - m1));
            y.extend(q[..32].iter().map(|&b| d2 * (b >> 4) as f32 - m2));
            q = &q[32..];
            is += 2;
        }
        y
    }

    fn dequantize_q4_1(b: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
        let mut y = vec![0f32; 32];
        for i in 0..16 {
            y[i] = d * (b[4 + i] & 0x0F) as f32 + m;
            y[i + 16] = d * (b[4 + i] >> 4) as f32 + m;
        }
        y
    }

    #[test]
    fn q4k_becomes_q4_1_up_to_f16_scale_rounding() {
        let mut s = 12345u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as u8
        };
        let mut src = Vec::new();
        for _ in 0..3 {
            src.extend(f16::from_f32(0.0123).to_le_bytes());
            src.extend(f16::from_f32(0.0071).to_le_bytes());
            for _ in 0..140 {
                src.push(next());
            }
        }
        let out = q4k_to_q4_1(&src).unwrap();
        assert_eq!(out.len(), 3 * 8 * 20);
        for (sb, blocks) in src.chunks_exact(Q4K_BYTES).zip(out.chunks_exact(8 * 20)) {
            let want = dequantize_q4k(sb);
            let got: Vec<f32> = blocks.chunks_exact(20).flat_map(dequantize_q4_1).collect();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                // f16 rounding of d·sc (≤ 2⁻¹¹ relative) times q ≤ 15, and of dmin·m.
                assert!((g - w).abs() <= 2e-3 * scale, "{g} vs {w}");
            }
        }
        assert!(q4k_to_q4_1(&src[1..]).is_err());
    }

    /// ggml's `dequantize_row_q5_0`, written from its definition.
    fn dequantize_q5_0(b: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let mut y = vec![0f32; 32];
        for j in 0..16 {
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            let x0 = ((b[6 + j] as u32 & 0x0F) | xh0) as i32 - 16;
            let x1 = ((b[6 + j] as u32 >> 4) | xh1) as i32 - 16;
            y[j] = x0 as f32 * d;
            y[j + 16] = x1 as f32 * d;
        }
        y
    }

    #[test]
    fn q5_0_becomes_q8_0_exactly() {
        let mut s = 777u32;
        let mut src = Vec::new();
        for k in 0..5 {
            src.extend(f16::from_f32(0.01 * (k as f32 + 1.0)).to_le_bytes());
            for _ in 0..20 {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                src.push(s as u8);
            }
        }
        // The extremes of the 5-bit range too: all bits set, all clear.
        src.extend(f16::from_f32(-0.5).to_le_bytes());
        src.extend([0xFF; 20]);
        src.extend(f16::from_f32(0.25).to_le_bytes());
        src.extend([0x00; 20]);
        let out = q5_0_to_q8_0(&src).unwrap();
        assert_eq!(out.len(), 7 * 34);
        for (b, q8) in src.chunks_exact(Q5_0_BYTES).zip(out.chunks_exact(34)) {
            let d = f16::from_le_bytes([q8[0], q8[1]]).to_f32();
            let got: Vec<f32> = q8[2..].iter().map(|&q| q as i8 as f32 * d).collect();
            assert_eq!(got, dequantize_q5_0(b));
        }
        assert!(q5_0_to_q8_0(&src[1..]).is_err());
    }
}
