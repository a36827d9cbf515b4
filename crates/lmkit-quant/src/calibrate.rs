//! Quantizing a whole model, block by block, as OPTQ and QuIP do.
//!
//! The calibration windows are embedded once; then for each block `l`:
//! 1. run block `l` (reference path) over every window, accumulating the Hessian of each input
//!    site (`qkv`, `o`, `gate_up`, `down`, see `lmkit_models::CAPTURE_SITES`);
//! 2. quantize each site's layers with that Hessian and put them in the model;
//! 3. run the quantized block `l` over the windows again: its outputs are block `l+1`'s inputs.
//!
//! So every block is calibrated on what the already-quantized blocks before it produce, and
//! memory holds one set of hidden states (`windows × tokens × c` f32) plus one block's
//! Hessians. Methods without a Hessian (RTN) given no windows skip the forward passes.

use std::collections::HashMap;
use std::sync::Arc;

use lmkit_core::{Device, Linear, Tensor};
use lmkit_models::{Llama, CAPTURE_SITES};

use crate::{ldlq, Error, Hessian, Quantizer, Result, Target};

/// What one quantized layer came to.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    /// HF module name.
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// `‖(W − Ŵ)X‖² / ‖WX‖²` on the calibration inputs (`None` without calibration).
    pub rel_error: Option<f64>,
    /// Bytes of codes, scales and rotation vectors.
    pub bytes: usize,
}

/// Progress events for a bar.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// Hidden states of window `i` of `n` computed (embedding or a block's output).
    Window { block: usize, i: usize, n: usize },
    /// A layer quantized.
    Layer(&'a LayerReport),
    /// Block `block` of `n` done.
    Block { block: usize, n: usize },
}

/// Quantizes every linear layer of every block of `model` in place (the output layer and the
/// embeddings are left as they are) with `q`, calibrated on `windows` (token ids; may be empty
/// for methods without a Hessian).
pub fn quantize_model(
    model: &mut Llama,
    q: &dyn Quantizer,
    windows: &[Vec<u32>],
    on: &mut dyn FnMut(Event),
) -> Result<Vec<LayerReport>> {
    let blocks = model.num_blocks();
    // Hessians whenever there is calibration text: methods that need none still get their
    // proxy errors reported.
    let need = q.needs_hessian() || !windows.is_empty();
    if q.needs_hessian() && windows.is_empty() {
        return Err(Error::Invalid(format!(
            "{} needs calibration text: no calibration windows",
            q.name()
        )));
    }
    let mut xs: Vec<Tensor> = Vec::new();
    if need {
        for (i, w) in windows.iter().enumerate() {
            let ids = Tensor::new(w.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            xs.push(model.embed_ids(&ids)?);
            on(Event::Window {
                block: 0,
                i,
                n: windows.len(),
            });
        }
    }
    let mut reports = Vec::new();
    let mut done: Vec<(String, Linear)> = Vec::new();
    for l in 0..blocks {
        let mut hs: HashMap<String, Hessian> = HashMap::new();
        if need {
            for x in &xs {
                model.block_forward(l, x, &mut |site, inp| {
                    let d = *inp.dims().last().unwrap_or(&0);
                    hs.entry(site.to_string())
                        .or_insert_with(|| Hessian::new(d))
                        .add(inp)
                        .map_err(|e| lmkit_models::Error::Unsupported(e.to_string()))
                })?;
            }
        }
        let mut new: HashMap<String, Linear> = HashMap::new();
        for (site, modules) in CAPTURE_SITES {
            let names: Vec<String> = modules
                .iter()
                .map(|m| format!("model.layers.{l}.{m}"))
                .collect();
            let mut ws = Vec::new();
            for name in &names {
                let lin = model
                    .linear(name)
                    .ok_or_else(|| Error::Invalid(format!("the model has no layer `{name}`")))?;
                let (rows, cols) = lin.weight().dims2()?;
                let w = lin.weight().to_f32()?.flatten_all()?.to_vec1::<f32>()?;
                ws.push((name.clone(), w, rows, cols, lin.bias().cloned()));
            }
            let cols = ws.first().map_or(0, |w| w.3);
            let targets: Vec<Target> = ws
                .iter()
                .map(|(name, w, rows, _, _)| Target {
                    name,
                    w,
                    rows: *rows,
                })
                .collect();
            let h = hs.get(site);
            let out = q.quantize(&targets, cols, h)?;
            let hm = h.map(|h| h.mean());
            for ((name, w, rows, cols, bias), ql) in ws.into_iter().zip(out) {
                let rel_error = hm
                    .as_ref()
                    .map(|hm| ldlq::relative_error(&w, &ql.dequantize(), hm, cols));
                let report = LayerReport {
                    name: name.clone(),
                    rows,
                    cols,
                    rel_error,
                    bytes: ql.size_in_bytes(),
                };
                tracing::debug!(
                    "{name}: {rows}x{cols}, relative error {:?}",
                    report.rel_error
                );
                on(Event::Layer(&report));
                reports.push(report);
                // Calibration goes on with the dequantized layer (an f32 GEMM; the 8-bit
                // activations of the low-bit kernel are left out, as OPTQ and QuIP simulate
                // quantized weights in floating point); the low-bit layer goes in at the end.
                let deq = Tensor::from_vec(ql.dequantize(), (rows, cols), &Device::Cpu)?;
                new.insert(name.clone(), Linear::dense(deq, bias.clone())?);
                done.push((name, Linear::lowbit(Arc::new(ql), bias)?));
            }
        }
        model.update_linears(|name, _| Ok(new.remove(name)))?;
        if need && l + 1 < blocks {
            let n = xs.len();
            for (i, x) in xs.iter_mut().enumerate() {
                *x = model.block_forward(l, x, &mut |_, _| Ok(()))?;
                on(Event::Window { block: l + 1, i, n });
            }
        }
        on(Event::Block {
            block: l,
            n: blocks,
        });
    }
    let mut done: HashMap<String, Linear> = done.into_iter().collect();
    model.update_linears(|name, _| Ok(done.remove(name)))?;
    Ok(reports)
}

/// Summary of a layer report list: `(mean, max)` relative error, if calibrated.
pub fn error_summary(reports: &[LayerReport]) -> Option<(f64, f64)> {
    let errs: Vec<f64> = reports.iter().filter_map(|r| r.rel_error).collect();
    if errs.is_empty() {
        return None;
    }
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    let max = errs.iter().fold(0f64, |m, &e| m.max(e));
    Some((mean, max))
}

/// Bits per weight of the quantized layers alone: `8·bytes / weights`.
pub fn layer_bits_per_weight(reports: &[LayerReport]) -> f64 {
    let bytes: usize = reports.iter().map(|r| r.bytes).sum();
    let weights: usize = reports.iter().map(|r| r.rows * r.cols).sum();
    8.0 * bytes as f64 / weights.max(1) as f64
}
