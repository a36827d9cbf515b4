//! The embedding table's gradient: `∂W[idᵣ] += gᵣ` over the rows `r` of the upstream gradient.
//! candle's index-select backward is an index-add that runs serially over the ids on CUDA
//! (4 ms for 8,192 tokens on an H100); here the CUDA kernel adds every element atomically
//! (`embedding_bwd_f32` in `cuda/fused.cu`) and the CPU twin loops over the rows.
//!
//! Deviations: on CUDA the order of the additions into one row varies from run to run, so a
//! token seen many times in a batch may get a gradient that differs in the last bits.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::elem::contiguous;
use crate::error::OpContext;
use crate::Result;

/// `table.index_select(ids)` of a `(v, c)` table, with the gradient computed as above.
pub fn embedding_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let rows = table.detach().index_select(ids, 0).op("embedding")?;
    if !table.track_op() {
        return Ok(rows);
    }
    let (v, _) = table.dims2().op("embedding table")?;
    let ids = ids.to_dtype(DType::U32).op("embedding ids")?;
    crate::fused::attach(
        table,
        rows,
        "embedding",
        Box::new(move |_, g| {
            let dtype = g.dtype();
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            g.apply_op2_no_bwd(&ids, &EmbeddingGrad { vocab: v })?
                .to_dtype(dtype)
        }),
    )
}

/// The gradient `(vocab, c)` f32 of a `(vocab, c)` table from the upstream gradient `g (n, c)`
/// of its rows `ids (n,)` (a training step that writes its own backward).
pub fn embedding_grad(g: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    let g = g.to_dtype(DType::F32).op("embedding grad")?;
    let g = g.contiguous().op("embedding grad")?;
    let ids = ids.to_dtype(DType::U32).op("embedding ids")?;
    g.apply_op2_no_bwd(&ids, &EmbeddingGrad { vocab })
        .op("embedding grad")
}

struct EmbeddingGrad {
    vocab: usize,
}

impl CustomOp2 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "embedding_grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        ids: &CpuStorage,
        li: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::U32(ids)) = (g, ids) else {
            candle_core::bail!("embedding_grad: f32 gradient and u32 ids")
        };
        let (g, ids) = (contiguous(g, lg)?, contiguous(ids, li)?);
        let c = crate::elem::last_dim(lg);
        let mut dw = vec![0f32; self.vocab * c];
        for (&id, row) in ids.iter().zip(g.chunks_exact(c)) {
            if let Some(dst) = dw.get_mut(id as usize * c..(id as usize + 1) * c) {
                dst.iter_mut().zip(row).for_each(|(d, x)| *d += x);
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from((self.vocab, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        ids: &candle_core::CudaStorage,
        li: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let c = crate::elem::last_dim(lg);
        let n = lg.shape().elem_count() / c;
        if li.shape().elem_count() != n {
            candle_core::bail!(
                "embedding_grad: {n} gradient rows, {} ids",
                li.shape().elem_count()
            )
        }
        let out = crate::cuda_ops::embedding_grad((g, lg), (ids, li), n, c, self.vocab)?;
        Ok((out, Shape::from((self.vocab, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against candle's index-select backward, with repeated ids.
    #[test]
    fn matches_index_select_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let (v, c) = (11, 6);
        let vals: Vec<f32> = (0..v * c).map(|i| (i as f32 * 0.41).sin()).collect();
        let w = Var::from_tensor(&Tensor::from_vec(vals, (v, c), &dev).op("w")?).op("var")?;
        let ids = Tensor::new(&[3u32, 0, 3, 10, 7, 3], &dev).op("ids")?;
        let mix: Vec<f32> = (0..6 * c).map(|i| (i as f32 * 0.77).cos()).collect();
        let mix = Tensor::from_vec(mix, (6, c), &dev).op("mix")?;
        let a = embedding_rows(w.as_tensor(), &ids)?;
        let b = w.as_tensor().index_select(&ids, 0).op("plain")?;
        let ga = (&a * &mix).and_then(|x| x.sum_all()?.backward()).op("a")?;
        let gb = (&b * &mix).and_then(|x| x.sum_all()?.backward()).op("b")?;
        let (Some(ga), Some(gb)) = (ga.get(w.as_tensor()), gb.get(w.as_tensor())) else {
            panic!("a gradient is missing")
        };
        let d = (ga - gb)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .op("diff")?;
        assert!(d < 1e-6, "gradients differ by {d}");
        let d = (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .op("diff")?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
