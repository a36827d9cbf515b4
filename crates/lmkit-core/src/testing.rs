//! Test helpers: tolerance checks with a message that names the worst element.

use candle_core::Tensor;

use crate::error::OpContext;
use crate::{Error, Result};

/// Max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)
        .op("diff")?
        .abs()
        .op("diff")?
        .flatten_all()
        .op("diff")?;
    d.max(0).op("diff")?.to_scalar::<f32>().op("diff")
}

/// Fails with the max difference when it exceeds `tol`.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
    let d = max_abs_diff(a, b)?;
    if d > tol {
        return Err(Error::Invalid {
            what: "closeness".into(),
            why: format!("max |a-b| = {d} > {tol}"),
        });
    }
    Ok(())
}
