//! Causal attention in bf16/f16 on the CPU, rounded where lmkit's GPU flash attention rounds
//! (`tr_flash_fwd`, `lmkit-core/cuda/train.cu`), so that a bf16 model gives the same logits on
//! both devices to within f32's rounding, not bf16's.
//!
//! Per query row at position `p`, over key tiles of 64 (FlashAttention-2's online softmax,
//! arXiv:2307.08691), with scores in log2 units `s = scale·log2(e)·q·k` (f32 sums):
//!
//! ```text
//! m' = max(m, max_tile s)      c = 2^(m − m')      p̃_j = 2^(s_j − m')   (keys j ≤ p)
//! l  = c·l + Σ p̃_j            o = c·o + Σ round(p̃_j)·v_j
//! y  = round(o / l)
//! ```
//!
//! `round` is the compute dtype's rounding: the unnormalized probabilities go into the P·V
//! product in that dtype, as the kernel's tensor-core operands do. Candle's ops instead round
//! the scores to bf16 and sum the softmax in bf16 on the CPU; with a normalized softmax in
//! f32 they still round different numbers (p/l, not p̃), which moved the argmax of ~3% of the
//! default model's positions between CPU and GPU.

use lmkit_core::{DType, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Keys per tile, as `FA_K` in train.cu.
const TILE: usize = 64;

/// `softmax(scale·q kᵀ + causal mask) v` for `q (b, kh, g·t, d)` (the `g` query heads of each
/// kv head, `t` rows each, at positions `T − t ..`) and `k`, `v (b, kh, T, d)`, all in the
/// compute dtype (bf16 or f16); returns `(b, kh, g·t, d)` in it.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    scale: f64,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let round: fn(f32) -> f32 = match dtype {
        DType::BF16 => |x| half::bf16::from_f32(x).to_f32(),
        DType::F16 => |x| half::f16::from_f32(x).to_f32(),
        other => {
            return Err(Error::Unsupported(format!(
                "CPU flash attention in {other:?} (bf16 or f16 only)"
            )))
        }
    };
    let (b, kh, gt, d) = q.dims4()?;
    let (_, _, total, _) = k.dims4()?;
    if t == 0 || gt % t != 0 || total < t || k.dims() != [b, kh, total, d] || v.dims() != k.dims() {
        return Err(Error::Unsupported(format!(
            "CPU flash attention: q {:?}, k {:?}, v {:?}, {t} rows per head",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let f32s = |x: &Tensor| -> Result<Vec<f32>> {
        Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (qf, kf, vf) = (f32s(q)?, f32s(k)?, f32s(v)?);
    let off = total - t;
    let sl = (scale * std::f64::consts::LOG2_E) as f32;
    let mut y = vec![0f32; qf.len()];
    y.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
        // row = ((bi·kh + kv)·g + head)·t + i
        let head_kv = row / gt;
        let pos = off + row % t;
        let qr = &qf[row * d..(row + 1) * d];
        let keys = &kf[head_kv * total * d..(head_kv + 1) * total * d];
        let vals = &vf[head_kv * total * d..(head_kv + 1) * total * d];
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut o = vec![0f32; d];
        let mut s = [0f32; TILE];
        for k0 in (0..=pos).step_by(TILE) {
            let n = TILE.min(pos + 1 - k0); // keys after pos are masked (p̃ = 0)
            for (j, sj) in s[..n].iter_mut().enumerate() {
                let kr = &keys[(k0 + j) * d..(k0 + j + 1) * d];
                *sj = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * sl;
            }
            let mx = s[..n].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mn = m.max(mx);
            let corr = (m - mn).exp2();
            m = mn;
            let mut sum = 0f32;
            for x in o.iter_mut() {
                *x *= corr;
            }
            for (j, sj) in s[..n].iter().enumerate() {
                let p = (sj - mn).exp2();
                sum += p;
                let pr = round(p);
                let vr = &vals[(k0 + j) * d..(k0 + j + 1) * d];
                for (x, vv) in o.iter_mut().zip(vr) {
                    *x += pr * vv;
                }
            }
            l = l * corr + sum;
        }
        let inv = 1.0 / l;
        for (x, oo) in out.iter_mut().zip(&o) {
            *x = oo * inv;
        }
    });
    Ok(Tensor::from_vec(y, (b, kh, gt, d), q.device())?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::Device;

    /// Against softmax attention written out in f64 on the same bf16 values: GQA (two query
    /// heads per kv head), rows after cached positions, more than one key tile.
    #[test]
    fn matches_plain_attention_to_bf16_rounding() {
        let (b, kh, g, t, total, d) = (2, 2, 2, 5, 70, 8);
        let val = |i: usize, k: f32| (i as f32 * k).sin() * 2.0;
        let mk = |n: usize, k: f32| -> Tensor {
            let v: Vec<f32> = (0..n).map(|i| val(i, k)).collect();
            Tensor::from_vec(v, n, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let q = mk(b * kh * g * t * d, 0.37)
            .reshape((b, kh, g * t, d))
            .unwrap();
        let k = mk(b * kh * total * d, 0.11)
            .reshape((b, kh, total, d))
            .unwrap();
        let v = mk(b * kh * total * d, 0.23)
            .reshape((b, kh, total, d))
            .unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let y = attention(&q, &k, &v, t, scale).unwrap();
        assert_eq!(y.dims(), &[b, kh, g * t, d]);
        let f = |x: &Tensor| -> Vec<f32> {
            x.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (qf, kf, vf, yf) = (f(&q), f(&k), f(&v), f(&y));
        let mut worst = 0f64;
        for row in 0..b * kh * g * t {
            let (hk, pos) = (row / (g * t), total - t + row % t);
            let s: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..d)
                        .map(|c| (qf[row * d + c] * kf[(hk * total + j) * d + c]) as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            for c in 0..d {
                let want: f64 = (0..=pos)
                    .map(|j| (s[j] - mx).exp() / z * vf[(hk * total + j) * d + c] as f64)
                    .sum();
                worst = worst.max((want - yf[row * d + c] as f64).abs());
            }
        }
        assert!(worst < 0.008, "largest difference {worst}");
        assert!(worst > 0.0, "bf16 rounding should show");
        assert!(attention(&q.to_dtype(DType::F32).unwrap(), &k, &v, t, scale).is_err());
        assert!(attention(&q, &k, &v, 3, scale).is_err());
    }
}
