//! OPTQ/GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers", arXiv 2210.17323) as LDLQ: QuIP (arXiv 2307.13304, Theorem 1)
//! shows OPTQ's column-by-column error feedback through the Cholesky factor of `H⁻¹` is LDLQ
//! with `H = (L̃ + I) D (L̃ + I)ᵀ`; see [`crate::ldlq`].
//!
//! Per layer: `H ← H + damp·mean(diag H)·I` (dead inputs get `H_ii = 1` and zero weights), each
//! row on OPTQ's min-max grid, then `Ŵ = LDLQ(W, H)`.
//!
//! Deviations: one grid per row (no `--groupsize`, no act-order); columns are rounded last to
//! first, the order of QuIP's `round_ldl` (OPTQ's own code goes first to last, which is LDLQ on
//! the reversed Hessian: the same method, a different ordering).

use crate::ldlq::{self, Grid};
use crate::{check_target, Error, Hessian, LowBit, LowBitLinear, Quantizer, Result, Target};

#[derive(Debug, Clone, Copy)]
pub struct Gptq {
    pub bits: u8,
    /// Fraction of the mean diagonal added to `H` (OPTQ's `percdamp`, 0.01).
    pub damp: f64,
}

impl Quantizer for Gptq {
    fn name(&self) -> &'static str {
        "gptq"
    }

    fn bits(&self) -> u8 {
        self.bits
    }

    fn needs_hessian(&self) -> bool {
        true
    }

    fn quantize(
        &self,
        targets: &[Target],
        cols: usize,
        h: Option<&Hessian>,
    ) -> Result<Vec<LowBitLinear>> {
        let h = h.ok_or_else(|| Error::Invalid("gptq needs calibration (a Hessian)".into()))?;
        let maxq = (1u32 << self.bits) - 1;
        let mut hm = h.mean();
        let dead = ldlq::damp(&mut hm, cols, self.damp);
        let what = targets.first().map_or("layer", |t| t.name);
        let fb = ldlq::feedback(&hm, cols, what)?;
        targets
            .iter()
            .map(|t| {
                check_target(t, cols)?;
                let mut w = t.w.to_vec();
                for row in w.chunks_mut(cols) {
                    for &i in &dead {
                        row[i] = 0.0;
                    }
                }
                let grids: Vec<Grid> = w
                    .chunks(cols)
                    .map(|r| Grid::min_max(r, maxq).stored())
                    .collect();
                let codes = ldlq::round_rows(&w, cols, &grids, &fb, maxq);
                let scales = grids.iter().map(|g| [g.a, g.b]).collect();
                let lb = LowBit::from_codes(self.bits, t.rows, cols, cols, &codes, scales)?;
                Ok(LowBitLinear::new(lb, None, None)?)
            })
            .collect()
    }
}
