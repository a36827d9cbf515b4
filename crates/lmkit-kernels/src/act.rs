//! Activation quantization to 8-bit blocks: `x ≈ d·q`, `d = max|x| / 127`, `q = round(x / d)`.

use crate::BLOCK;

/// One block of 32 quantized activations with its scale and the integer sum of its values.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(8))]
pub struct A8Block {
    pub d: f32,
    /// `d · Σ q` over the block (the block's sum, for formats with an offset).
    pub s: f32,
    pub qs: [i8; BLOCK],
}

impl Default for A8Block {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; BLOCK],
        }
    }
}

/// Quantizes `x` (length a multiple of 32) into `out` (cleared first), in parallel for long
/// inputs.
pub fn quantize_activations(x: &[f32], out: &mut Vec<A8Block>) {
    const PAR_MIN: usize = 1 << 14;
    if x.len() >= PAR_MIN {
        use rayon::prelude::*;
        out.clear();
        out.resize(x.len() / BLOCK, A8Block::default());
        out.par_chunks_mut(PAR_MIN / BLOCK)
            .zip(x.par_chunks(PAR_MIN))
            .for_each(|(o, xs)| quantize_serial(xs, o));
        return;
    }
    out.clear();
    out.resize(x.len() / BLOCK, A8Block::default());
    quantize_serial(x, out);
}

/// Quantizes `x` into `out` (`x.len() / 32` blocks) on the calling thread.
pub fn quantize_into(x: &[f32], out: &mut [A8Block]) {
    quantize_serial(x, out)
}

fn quantize_serial(x: &[f32], out: &mut [A8Block]) {
    for (chunk, slot) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut b = A8Block {
            d,
            ..Default::default()
        };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            // Round half away from zero (as C's `roundf`) without a libm call: truncating
            // `x ± 0.5` towards zero.
            let x = (v * id).clamp(-127.0, 127.0);
            let r = (x + 0.5f32.copysign(x)) as i8;
            *q = r;
            sum += r as i32;
        }
        b.s = d * sum as f32;
        *slot = b;
    }
}
