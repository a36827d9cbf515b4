//! Round to nearest (RTN): every weight to the nearest point of its row's (or group's)
//! asymmetric min-max grid, `q = clamp(round(w/scale) + zero, 0, 2^bits − 1)`. The baseline
//! of every quantization paper; needs no calibration.
//!
//! Deviations: none (the grid is OPTQ's `Quantizer` with `sym=False`, `mse=False`).

use crate::ldlq::Grid;
use crate::{check_target, Hessian, LowBit, LowBitLinear, Quantizer, Result, Target};

#[derive(Debug, Clone, Copy)]
pub struct Rtn {
    pub bits: u8,
    /// Weights per grid along a row (a multiple of 32; `None`: the whole row).
    pub group: Option<usize>,
}

impl Quantizer for Rtn {
    fn name(&self) -> &'static str {
        "rtn"
    }

    fn bits(&self) -> u8 {
        self.bits
    }

    fn needs_hessian(&self) -> bool {
        false
    }

    fn quantize(
        &self,
        targets: &[Target],
        cols: usize,
        _h: Option<&Hessian>,
    ) -> Result<Vec<LowBitLinear>> {
        let maxq = (1u32 << self.bits) - 1;
        let group = self.group.unwrap_or(cols);
        targets
            .iter()
            .map(|t| {
                check_target(t, cols)?;
                let mut codes = Vec::with_capacity(t.w.len());
                let mut scales = Vec::new();
                for part in t.w.chunks(group.min(cols).max(1)) {
                    let g = Grid::min_max(part, maxq).stored();
                    codes.extend(part.iter().map(|&v| g.code_space(v, maxq).round() as u8));
                    scales.push([g.a, g.b]);
                }
                let w = LowBit::from_codes(self.bits, t.rows, cols, group, &codes, scales)?;
                Ok(LowBitLinear::new(w, None, None)?)
            })
            .collect()
    }
}
