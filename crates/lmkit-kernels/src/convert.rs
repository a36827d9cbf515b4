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

use half::f16;

use crate::{Error, Result};

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
}
