//! Borrowing a CPU tensor's f32 values, for the loops that work on plain slices (the fused
//! output layer, the one-pass AdamW, the frozen-weight product).

use candle_core::{CpuStorage, DType, Storage, Tensor};

/// Runs `f` on the f32 values of a contiguous CPU tensor; None (without calling `f`) for any
/// other tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let (s, l) = t.storage_and_layout();
    match (&*s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}
