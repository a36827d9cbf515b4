//! Block-format conversions at load, for GGUF types without a kernel of their own.
//!
//! `Q5_0` → `Q8_0` is exact: both are 32-weight blocks with one f16 scale `d`, and `Q5_0`'s
//! `w = d·(q − 16)` with 5-bit `q` is `Q8_0`'s `w = d·q'` with the 8-bit `q' = q − 16`. Layout:
//! `block_q5_0` is `d: f16, qh: [u8; 4], qs: [u8; 16]`; weight `j < 16` has its low four bits in
//! the low nibble of `qs[j]` and its fifth in bit `j` of `qh` (little-endian u32), weight
//! `j + 16` the high nibble of `qs[j]` and bit `j + 16`.

use crate::{Error, Result};

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
    use half::f16;

    use super::*;

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
