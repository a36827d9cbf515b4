//! QuIP: "QuIP: 2-Bit Quantization of Large Language Models With Guarantees" (Chee, Cai,
//! Kuleshov, De Sa; NeurIPS 2023, arXiv 2307.13304; reference code Cornell-RelaxML/QuIP).
//!
//! Incoherence processing makes the weights and the Hessian "incoherent" (no entry much larger
//! than the root mean square), which is what lets LDLQ round to 2 bits without collapse:
//!
//! 1. Diagonal rescaling (`preproc_rescale`): with `H ← H/max|H|`,
//!    `sᵢ = (Hᵢᵢ / (WᵀW)ᵢᵢ)^{1/4}`, then `W ← W diag(s)`, `H ← diag(s)⁻¹ H diag(s)⁻¹`.
//! 2. Random orthogonal transforms (`preproc_proj`): `H ← H·n/tr(H) + 10⁻² I`, then
//!    `W̃ = U W Vᵀ`, `H̃ = V H Vᵀ` with `U = H_m diag(σ)/√m`, `V = H_n diag(τ)/√n` randomized
//!    Hadamard transforms (`σ`, `τ` random signs, see [`lmkit_kernels::hadamard`]).
//! 3. OPTQ's damping `H̃ ← H̃ + 0.01·mean(diag H̃)·I`, then LDLQ ([`crate::ldlq`]) on the
//!    symmetric grid `s·(2q/maxq − 1)`, `s = 2.4·rms(W̃)` (the reference's `qfn b`).
//!
//! At run time nothing is undone in the weights: `W x ≈ Uᵀ Ŵ V diag(s)⁻¹ x`, so the layer stores
//! the codes `Ŵ`, the input rotation `Rᵢ = H_n diag(τ ⊘ s)/√n` (the rescaling folded into the
//! sign vector) and the output rotation `Rₒ = U`; the forward is `y = Rₒᵀ (Ŵ (Rᵢ x))`, two fast
//! Hadamard transforms (`O(n log n)`) around the low-bit product.
//!
//! Deviations:
//! - randomized Hadamard transforms (QuIP# style) instead of the paper's Kronecker products of
//!   random orthogonal matrices: the same incoherence guarantee up to log factors, applied in
//!   `O(n log n)` with only a sign vector stored; widths must factor as `2^k·12^a·20^b`;
//! - layers that read the same input (q/k/v, gate/up) share `s` (from their stacked rows) and
//!   `τ`, so the rotated input is computed once per token;
//! - `--scale row` (an option; the paper's one scale per matrix is the default) gives each row
//!   its own `s`;
//! - no greedy passes after LDLQ (QuIP-RG), the paper's plain "QuIP" row.

use lmkit_kernels::lowbit::transpose;
use lmkit_kernels::Rotation;

use crate::ldlq::{self, Grid};
use crate::{check_target, Error, Hessian, LowBit, LowBitLinear, Quantizer, Result, Target};

#[derive(Debug, Clone, Copy)]
pub struct Quip {
    pub bits: u8,
    /// Seed of the random signs.
    pub seed: u64,
    /// Grid half-width in units of the rms (2.4).
    pub clip: f32,
    /// One grid per row instead of per matrix.
    pub per_row: bool,
    /// OPTQ damping after the transforms (0.01).
    pub damp: f64,
}

impl Quip {
    pub fn new(bits: u8) -> Self {
        Self {
            bits,
            seed: 0,
            clip: 2.4,
            per_row: false,
            damp: 0.01,
        }
    }
}

/// Random ±1 signs, one stream per (seed, name).
fn signs(seed: u64, name: &str, n: usize) -> Vec<f32> {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |a, b| {
        (a ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut r = lmkit_rand::SplitMix64::new(lmkit_rand::mix(seed ^ h));
    (0..n)
        .map(|_| if r.next_u64() & 1 == 0 { 1.0 } else { -1.0 })
        .collect()
}

fn rotation(diag: Vec<f32>, what: &str) -> Result<Rotation> {
    let n = diag.len();
    Rotation::new(diag).ok_or_else(|| {
        Error::Unsupported(format!(
            "quip: `{what}` has width {n}, which has no Hadamard transform here (widths \
             2^k·12^a·20^b); use --method gptq for this model"
        ))
    })
}

impl Quantizer for Quip {
    fn name(&self) -> &'static str {
        "quip"
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
        n: usize,
        h: Option<&Hessian>,
    ) -> Result<Vec<LowBitLinear>> {
        let h = h.ok_or_else(|| Error::Invalid("quip needs calibration (a Hessian)".into()))?;
        for t in targets {
            check_target(t, n)?;
        }
        let first = targets.first().map_or("layer", |t| t.name);
        let maxq = (1u32 << self.bits) - 1;
        let mut hm = h.mean();

        // 1. Diagonal rescaling from the stacked rows.
        let hmax = hm
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()))
            .max(f64::MIN_POSITIVE);
        let mut w2 = vec![0f64; n];
        for t in targets {
            for row in t.w.chunks(n) {
                for (a, &v) in w2.iter_mut().zip(row) {
                    *a += f64::from(v) * f64::from(v);
                }
            }
        }
        let s: Vec<f64> = (0..n)
            .map(|i| {
                let dh = (hm[i * n + i] / hmax).max(1e-8);
                let si = (dh / w2[i].max(1e-8)).sqrt().sqrt().max(1e-8);
                // As stored: the file holds f16(1/s).
                1.0 / f64::from(half::f16::from_f64((1.0 / si).min(6.0e4)).to_f32())
            })
            .collect();
        for i in 0..n {
            for j in 0..n {
                hm[i * n + j] /= s[i] * s[j];
            }
        }

        // 2. Rotations: H ← H·n/tr(H) + 0.01 I, then H̃ = V H Vᵀ.
        let tr: f64 = (0..n).map(|i| hm[i * n + i]).sum();
        for i in 0..n {
            for j in 0..n {
                hm[i * n + j] *= n as f64 / (tr + 1e-8);
            }
            hm[i * n + i] += 1e-2;
        }
        let tau = signs(self.seed, first, n);
        let v = rotation(tau.clone(), first)?;
        let mut hr = rotate_sym(&hm, n, &v);
        ldlq::damp(&mut hr, n, self.damp);
        let fb = ldlq::feedback(&hr, n, first)?;

        let input_diag: Vec<f32> = tau
            .iter()
            .zip(&s)
            .map(|(t, s)| (1.0 / s) as f32 * t)
            .collect();
        targets
            .iter()
            .map(|t| {
                let m = t.rows;
                let sigma = signs(self.seed, &format!("{}.out", t.name), m);
                let u = rotation(sigma, t.name)?;
                // W̃ = U (W diag(s)) Vᵀ = U (V (W diag(s))ᵀ)ᵀ: V on every column of the
                // transpose, then U on every column.
                let ws: Vec<f32> =
                    t.w.chunks(n)
                        .flat_map(|row| row.iter().zip(&s).map(|(x, si)| x * *si as f32))
                        .collect();
                let mut wt = transpose(&ws, m, n);
                v.apply_cols(&mut wt, m);
                let mut w = transpose(&wt, n, m);
                u.apply_cols(&mut w, n);
                let rms = |x: &[f32]| -> f32 {
                    (x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>()
                        / x.len().max(1) as f64)
                        .sqrt() as f32
                };
                let grids: Vec<Grid> = if self.per_row {
                    w.chunks(n)
                        .map(|r| Grid::symmetric(rms(r), self.clip, maxq).stored())
                        .collect()
                } else {
                    vec![Grid::symmetric(rms(&w), self.clip, maxq).stored(); m]
                };
                let codes = ldlq::round_rows(&w, n, &grids, &fb, maxq);
                let scales = grids.iter().map(|g| [g.a, g.b]).collect();
                let lb = LowBit::from_codes(self.bits, m, n, n, &codes, scales)?;
                let input = rotation(input_diag.clone(), t.name)?;
                Ok(LowBitLinear::new(lb, Some(input), Some(u))?)
            })
            .collect()
    }
}

/// `R H Rᵀ` for a symmetric `H (n × n)`: `M = R H`, then `R Mᵀ = (M Rᵀ)ᵀ`, symmetrized.
fn rotate_sym(h: &[f64], n: usize, r: &Rotation) -> Vec<f64> {
    let mut m: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    r.apply_cols(&mut m, n);
    let mut mt = transpose(&m, n, n);
    r.apply_cols(&mut mt, n);
    // `mt` is (R Mᵀ) = (M Rᵀ)ᵀ = R H Rᵀ up to rounding; symmetrize away the f32 error.
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = 0.5 * (f64::from(mt[i * n + j]) + f64::from(mt[j * n + i]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer with outlier input channels (what incoherence processing is for).
    fn layer(rows: usize, n: usize, seed: u64) -> (Vec<f32>, Hessian) {
        let mut r = lmkit_rand::SplitMix64::new(seed);
        let mut g = || (r.next_f64() * 2.0 - 1.0) as f32;
        let w: Vec<f32> = (0..rows * n)
            .map(|i| {
                let v = g();
                if i % n == 3 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect();
        let tokens = 4 * n;
        let x: Vec<f32> = (0..tokens * n)
            .map(|i| if i % n == 5 { g() * 10.0 } else { g() })
            .collect();
        let mut hm = vec![0f64; n * n];
        for t in 0..tokens {
            for i in 0..n {
                for j in 0..n {
                    hm[i * n + j] +=
                        f64::from(x[t * n + i]) * f64::from(x[t * n + j]) / tokens as f64;
                }
            }
        }
        (w, Hessian::from_mean(n, hm, tokens).unwrap())
    }

    fn proxy(q: &dyn Quantizer, w: &[f32], rows: usize, n: usize, h: &Hessian) -> f64 {
        let t = Target {
            name: "model.layers.0.mlp.up_proj",
            w,
            rows,
        };
        let out = q.quantize(&[t], n, Some(h)).unwrap();
        ldlq::relative_error(w, &out[0].dequantize(), &h.mean(), n)
    }

    #[test]
    fn quip_beats_gptq_beats_rtn_at_two_bits() {
        let (rows, n) = (48, 96);
        let (w, h) = layer(rows, n, 11);
        let rtn = proxy(
            &crate::rtn::Rtn {
                bits: 2,
                group: None,
            },
            &w,
            rows,
            n,
            &h,
        );
        let gptq = proxy(
            &crate::gptq::Gptq {
                bits: 2,
                damp: 0.01,
            },
            &w,
            rows,
            n,
            &h,
        );
        let quip = proxy(&Quip::new(2), &w, rows, n, &h);
        assert!(
            quip < gptq && gptq < rtn,
            "quip {quip} gptq {gptq} rtn {rtn}"
        );
    }

    #[test]
    fn four_bits_reconstruct_closely() {
        let (rows, n) = (24, 64);
        let (w, h) = layer(rows, n, 3);
        let e = proxy(&Quip::new(4), &w, rows, n, &h);
        assert!(e < 0.02, "relative proxy error {e}");
    }

    #[test]
    fn a_width_without_a_transform_is_a_clear_error() {
        let n = 7 * 32;
        let w = vec![0.5f32; 2 * n];
        let h = Hessian::from_mean(
            n,
            (0..n * n)
                .map(|i| f64::from(u8::from(i % (n + 1) == 0)))
                .collect(),
            1,
        )
        .unwrap();
        let t = Target {
            name: "x",
            w: &w,
            rows: 2,
        };
        let e = Quip::new(2).quantize(&[t], n, Some(&h)).unwrap_err();
        assert!(e.to_string().contains("width 224"), "{e}");
    }
}
