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

/// The f32 values of a contiguous CPU tensor, borrowed for as long as this lives (a read lock
/// on the tensor's storage: many can be held at once, for many tensors).
pub struct F32Values<'a> {
    guard: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for F32Values<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.clone()],
            // `read_f32` only builds an `F32Values` over f32 CPU storage.
            _ => &[],
        }
    }
}

/// Borrows the f32 values of a contiguous CPU tensor; None for any other tensor.
pub fn read_f32(t: &Tensor) -> Option<F32Values<'_>> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let (s, l) = t.storage_and_layout();
    let (a, b) = l.contiguous_offsets()?;
    let ok = matches!(&*s, Storage::Cpu(CpuStorage::F32(v)) if b <= v.len());
    ok.then(|| F32Values {
        guard: s,
        range: a..b,
    })
}
