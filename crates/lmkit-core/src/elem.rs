//! Element types of the CPU twins of lmkit's fused ops: f32, bf16 and f16 storage, with f32
//! arithmetic.

use candle_core::{CpuStorage, Layout};
use half::{bf16, f16};

pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// The elements of `v` under the contiguous layout `l`.
pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= v.len() => Ok(&v[a..b]),
        _ => candle_core::bail!("fused op: the input must be contiguous"),
    }
}

/// The length of the last dimension of `l` (at least 1).
pub(crate) fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Runs `$body` with `$x` bound to the contiguous f32, bf16 or f16 elements of the CPU storage
/// `$s` under `$l`, and wraps the `Vec` it returns in storage of the same type.
macro_rules! with_float {
    ($s:expr, $l:expr, |$x:ident| $body:expr) => {{
        use candle_core::CpuStorage as S;
        match $s {
            S::F32(v) => {
                let $x = $crate::elem::contiguous(v, $l)?;
                S::F32($body)
            }
            S::BF16(v) => {
                let $x = $crate::elem::contiguous(v, $l)?;
                S::BF16($body)
            }
            S::F16(v) => {
                let $x = $crate::elem::contiguous(v, $l)?;
                S::F16($body)
            }
            s => candle_core::bail!(
                "fused op: f32, bf16 or f16 input, not {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        }
    }};
}
pub(crate) use with_float;

/// Runs `$body` with `$x` bound to the contiguous f32, bf16 or f16 elements of `$s` under
/// `$l`; `$body`'s value is returned as is (it must have one type for all three).
macro_rules! read_float {
    ($s:expr, $l:expr, |$x:ident| $body:expr) => {{
        use candle_core::CpuStorage as S;
        match $s {
            S::F32(v) => {
                let $x = $crate::elem::contiguous(v, $l)?;
                $body
            }
            S::BF16(v) => {
                let $x = $crate::elem::contiguous(v, $l)?;
                $body
            }
            S::F16(v) => {
                let $x = $crate::elem::contiguous(v, $l)?;
                $body
            }
            s => candle_core::bail!(
                "fused op: f32, bf16 or f16 input, not {:?}",
                candle_core::backend::BackendStorage::dtype(s)
            ),
        }
    }};
}
pub(crate) use read_float;

/// The same element type of a second CPU storage as of the first (`$x`'s).
pub(crate) fn same<'a, T: 'static>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let any: &dyn std::any::Any = match s {
        CpuStorage::F32(v) => v,
        CpuStorage::BF16(v) => v,
        CpuStorage::F16(v) => v,
        CpuStorage::U32(v) => v,
        s => candle_core::bail!(
            "fused op: unexpected input type {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        ),
    };
    match any.downcast_ref::<Vec<T>>() {
        Some(v) => contiguous(v, l),
        None => candle_core::bail!("fused op: inputs of different types"),
    }
}
