//! The proxy Hessian of a linear layer, `H = E[x xᵀ]` over its calibration inputs, accumulated
//! streaming in f64.

use lmkit_core::{DType, Tensor};

use crate::{Error, Result};

/// Running sum of `x xᵀ` over input rows of width `d`.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub d: usize,
    sum: Vec<f64>,
    /// Rows (tokens) added.
    pub count: usize,
}

impl Hessian {
    pub fn new(d: usize) -> Self {
        Self {
            d,
            sum: vec![0.0; d * d],
            count: 0,
        }
    }

    /// Adds the rows of `x (.., d)`: `Σ xᵀx` through an f32 GEMM per call, summed in f64.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let d = *x.dims().last().unwrap_or(&0);
        if d != self.d {
            return Err(Error::Shape {
                op: "Hessian",
                why: format!("input {:?} for width {}", x.dims(), self.d),
            });
        }
        let x = x.to_dtype(DType::F32)?.reshape(((), d))?;
        let n = x.dims()[0];
        let xtx = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
        for (s, v) in self.sum.iter_mut().zip(xtx) {
            *s += f64::from(v);
        }
        self.count += n;
        Ok(())
    }

    /// `E[x xᵀ]` (`d × d`, row-major).
    pub fn mean(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum.iter().map(|v| v / n).collect()
    }

    /// A Hessian from a mean matrix (tests, fixtures).
    pub fn from_mean(d: usize, mean: Vec<f64>, count: usize) -> Result<Self> {
        if mean.len() != d * d || count == 0 {
            return Err(Error::Shape {
                op: "Hessian",
                why: format!("{} entries for width {d}, count {count}", mean.len()),
            });
        }
        Ok(Self {
            d,
            sum: mean.iter().map(|v| v * count as f64).collect(),
            count,
        })
    }
}
