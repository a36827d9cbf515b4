//! Prompts (several new tokens per sequence) on a GPU as a fused pass over the slab cache of
//! fused decoding: per block ~10 launches where candle's ops take ~35.
//!
//! ```text
//! a   = RMSNorm(x) ⊙ w₁                                 tr_rms_fwd (f32 x in, compute dtype out)
//! q, k, v = a W_qᵀ, a W_kᵀ, a W_vᵀ (+ biases)          cuBLAS (one product if stacked)
//! q, K[len..], V[len..] ← RoPE(qkv)                     tr_rope_split, k and v straight into the slab
//! y   = softmax(q Kᵀ/√d + causal) V over 0..len + t     tr_flash_fwd (no (t × T) scores)
//! x  += y W_oᵀ                                          cuBLAS, tr_add
//! a   = RMSNorm(x) ⊙ w₂                                 tr_rms_fwd
//! m   = silu(a W_gᵀ) ⊙ (a W_uᵀ)                         cuBLAS (one if stacked), tr_silu_mul
//! x  += m W_dᵀ                                          cuBLAS, tr_add
//! ```
//!
//! The kernels are the training path's (`lmkit_core::block_ops`). The products run in the
//! compute dtype (bf16/f16: the flash kernels' dtypes). Dense weights already in it are read in
//! place (no second copy; q/k/v and gate/up are then three and two products); others, such as
//! a quantized file's, are dequantized once into a copy with q/k/v and gate/up stacked (one
//! product each), as llama.cpp dequantizes to f16 for cuBLAS on large batches. It applies with
//! heads of 64 or 128 and no adapters;
//! `LMKIT_CUDA_PREFILL=0` turns it off (then prompts take candle's ops, which write the same
//! slab).
//!
//! Deviations from the reference path: attention's scores stay f32 (the reference path rounds
//! them to the compute dtype), its probabilities are rounded to it only for the product with v
//! while each row's normalizer sums them unrounded (as FlashAttention-2 does), and sums run in
//! another order. The residual stream is f32 in both.

use lmkit_core::block_ops::{flash_applies, BlockOps, GateUp, Heads, QkvRows, MAX_HIDDEN};
use lmkit_core::launch::Launcher;
use lmkit_core::linear::Weight;
use lmkit_core::{DType, Tensor};

use crate::llama::BLOCK_LINEARS as LINEARS;
use crate::{Error, KvCache, Llama, Result};

/// Weights in the compute dtype that read the same input: stacked into one matrix (one
/// product) when they had to be copied anyway (dequantized or cast), else the model's own
/// tensors (no second copy of a dense model; one product each).
enum Group {
    Stacked(Tensor),
    Own(Vec<Tensor>),
}

impl Group {
    /// `ws` in `cd`: the model's tensors when they are dense in `cd`, else a stacked copy.
    fn new(ws: Vec<Tensor>, cd: DType) -> Result<Self> {
        if ws.iter().all(|w| w.dtype() == cd && w.is_contiguous()) {
            return Ok(Group::Own(ws));
        }
        let ws = ws
            .iter()
            .map(|w| w.to_dtype(cd))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Group::Stacked(Tensor::cat(&ws, 0)?.contiguous()?))
    }

    /// The products `a Wᵢᵀ`: one stacked, or one per weight.
    fn products(&self, a: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Group::Stacked(w) => Ok(vec![a.matmul(&w.t()?)?]),
            Group::Own(ws) => ws.iter().map(|w| Ok(a.matmul(&w.t()?)?)).collect(),
        }
    }
}

/// One block's weights as the prompt pass reads them.
struct PromptBlock {
    n1: Tensor,
    n2: Tensor,
    /// W_q, W_k, W_v.
    qkv: Group,
    /// `[b_q; b_k; b_v]` f32.
    b_qkv: Option<Tensor>,
    w_o: Tensor,
    /// W_g, W_u.
    gu: Group,
    w_d: Tensor,
}

/// A model's weights for the prompt pass, built with its fused-decoding weights.
pub(crate) struct PromptWeights {
    blocks: Vec<PromptBlock>,
    final_norm: Tensor,
}

/// Why the prompt pass does not apply to `model` (which fused decoding takes), if it does not.
pub(crate) fn unsupported(model: &Llama) -> Option<String> {
    if std::env::var("LMKIT_CUDA_PREFILL").is_ok_and(|v| v == "0") {
        return Some("LMKIT_CUDA_PREFILL=0".into());
    }
    let cfg = model.config();
    if !flash_applies(model.dtype(), cfg.head_dim) {
        return Some(format!(
            "the fused prompt pass computes in bf16/f16 with heads of 64 or 128, not {:?} with {}",
            model.dtype(),
            cfg.head_dim
        ));
    }
    if cfg.hidden_size > MAX_HIDDEN {
        return Some(format!(
            "a hidden size of {} (at most {MAX_HIDDEN})",
            cfg.hidden_size
        ));
    }
    let has_flash = Launcher::for_device(model.device())
        .and_then(|l| BlockOps::new(l, model.dtype(), model.device()).ok())
        .is_some_and(|k| k.has_flash(cfg.head_dim));
    if !has_flash {
        return Some(
            "flash attention's kernels are not built for this GPU (sm_80 or newer)".into(),
        );
    }
    None
}

impl PromptWeights {
    pub(crate) fn new(model: &Llama) -> Result<Self> {
        let cfg = model.config();
        let cd = model.dtype();
        // Dense weights as they are (cast by `Group` or below if need be), others dequantized.
        let dense = |w: &Weight| -> Result<Tensor> {
            match w {
                Weight::Dense(t) => Ok(t.clone()),
                w => Ok(w.to_f32()?),
            }
        };
        let in_cd = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(cd)?.contiguous()?) };
        let f32v = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut lin = Vec::with_capacity(7);
            let mut bias = Vec::with_capacity(3);
            for n in LINEARS {
                let l = model
                    .linear(&format!("model.layers.{i}.{n}"))
                    .ok_or_else(|| Error::Unsupported(format!("no layer {i}.{n}")))?;
                lin.push(dense(l.weight())?);
                bias.push(l.bias().cloned());
            }
            let stack = |ts: &[Tensor]| -> Result<Tensor> { Ok(Tensor::cat(ts, 0)?.contiguous()?) };
            let b_qkv = match (&bias[0], &bias[1], &bias[2]) {
                (Some(q), Some(k), Some(v)) => Some(stack(&[f32v(q)?, f32v(k)?, f32v(v)?])?),
                (None, None, None) => None,
                _ => {
                    return Err(Error::Unsupported(format!(
                        "block {i} has biases on some of q/k/v only"
                    )))
                }
            };
            let (n1, n2) = model.block_norms(i)?;
            blocks.push(PromptBlock {
                n1: f32v(n1)?,
                n2: f32v(n2)?,
                qkv: Group::new(lin[0..3].to_vec(), cd)?,
                b_qkv,
                w_o: in_cd(&lin[3])?,
                gu: Group::new(lin[4..6].to_vec(), cd)?,
                w_d: in_cd(&lin[6])?,
            });
        }
        Ok(Self {
            blocks,
            final_norm: f32v(model.final_norm_weight())?,
        })
    }
}

/// RoPE's `(t, d/2)` f32 tables for positions `off..off + t`, on the model's device.
fn rope_tables(model: &Llama, off: usize, t: usize) -> Result<(Tensor, Tensor)> {
    let half = model.config().head_dim / 2;
    let (cos, sin) = model.rope_angles(off, t);
    let dev = model.device();
    Ok((
        Tensor::from_vec(cos, (t, half), dev)?,
        Tensor::from_vec(sin, (t, half), dev)?,
    ))
}

/// Runs `ids (b, t)` after the slab's cached positions, writing their keys and values into
/// it: the final hidden states `(b, t, c)` in the compute dtype.
pub(crate) fn run(
    model: &Llama,
    w: &PromptWeights,
    launcher: Launcher,
    cache: &mut KvCache,
    ids: &Tensor,
) -> Result<Tensor> {
    let cfg = model.config();
    let (b, t) = ids.dims2()?;
    let c = cfg.hidden_size;
    let eps = cfg.rms_norm_eps as f32;
    let ops = BlockOps::new(launcher, model.dtype(), model.device())?;
    let slab = cache.slab_for(b, t)?;
    let (kv, len, cap) = (slab.kv, slab.len, slab.cap);
    let heads = Heads {
        b,
        t,
        h: cfg.num_heads,
        kh: cfg.num_kv_heads,
        d: cfg.head_dim,
        cap,
        off: len,
    };
    let (cos, sin) = rope_tables(model, len, t)?;
    let mut x = model.embed_ids(ids)?.reshape((b * t, c))?.contiguous()?; // (n, c) f32
    for (blk, (k, v)) in w.blocks.iter().zip(&kv) {
        let a = ops.rms(&x, &blk.n1, eps)?;
        let qkv = blk.qkv.products(&a)?; // (n, qkv), or (n, h·d), (n, kh·d) twice
        let rows = match qkv.as_slice() {
            [s] => QkvRows::Stacked(s),
            [q, k, v] => QkvRows::Split(q, k, v),
            _ => {
                return Err(Error::Unsupported(
                    "q/k/v come in one or three products".into(),
                ))
            }
        };
        let q = ops.rope_split(rows, blk.b_qkv.as_ref(), &cos, &sin, k, v, &heads)?;
        drop(qkv);
        let (y, _) = ops.flash_fwd(&q, k, v, &heads, false)?; // (n, h·d)
        let o = y.matmul(&blk.w_o.t()?)?;
        let xm = ops.add(&x, &o)?;
        let a = ops.rms(&xm, &blk.n2, eps)?;
        let gu = blk.gu.products(&a)?; // (n, 2f), or (n, f) twice
        let gu = match gu.as_slice() {
            [s] => GateUp::Stacked(s),
            [g, u] => GateUp::Split(g, u),
            _ => {
                return Err(Error::Unsupported(
                    "gate/up come in one or two products".into(),
                ))
            }
        };
        let m = ops.silu_mul(gu, cfg.intermediate_size)?;
        let down = m.matmul(&blk.w_d.t()?)?;
        x = ops.add(&xm, &down)?;
    }
    cache.advance(t);
    Ok(ops.rms(&x, &w.final_norm, eps)?.reshape((b, t, c))?)
}
