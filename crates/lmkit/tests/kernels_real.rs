//! lmkit's SIMD kernels equal their scalar references on the real model's weights.

mod common;

use lmkit::formats::gguf::GgufFile;
use lmkit_kernels::act::quantize_activations;
use lmkit_kernels::dot::{available, Isa};
use lmkit_kernels::matmul::{matmul_with, QFormat, QMatrix};
use lmkit_kernels::packed::{packed_rows, Packed};

/// Relative to Σ|w·x| of the row: f32 accumulation-order differences only.
const KERNEL_REL_TOL: f32 = 1e-5;

#[test]
fn simd_matches_scalar_on_every_weight_of_the_default_model() {
    let g = GgufFile::open(common::default_model()).unwrap();
    let mut checked = 0;
    for info in &g.tensors {
        let format = match info.dtype.name().as_str() {
            "Q4_0" => QFormat::Q4_0,
            "Q4_1" => QFormat::Q4_1,
            "Q8_0" => QFormat::Q8_0,
            _ => continue,
        };
        if !info.name.starts_with("blk.0.")
            && !info.name.starts_with("blk.29.")
            && info.name != "token_embd.weight"
        {
            continue;
        }
        let (rows, cols) = (info.dims[1], info.dims[0]);
        let w = QMatrix {
            format,
            rows,
            cols,
            data: g.tensor_bytes(info),
        };
        let packed = Packed::pack(format, rows, cols, w.data).unwrap();
        for n in [1usize, 3, 8, 13] {
            // Activations with LLM-like outliers.
            let x: Vec<f32> = (0..n * cols)
                .map(|i| {
                    let v = ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0;
                    if i % 97 == 0 {
                        v * 40.0
                    } else {
                        v
                    }
                })
                .collect();
            let mut ys = vec![0f32; n * rows];
            matmul_with(Isa::Scalar, &w, &x, n, &mut ys).unwrap();
            let scale: f32 = ys.iter().map(|v| v.abs()).sum::<f32>() / ys.len() as f32;
            let mut acts = Vec::new();
            quantize_activations(&x, &mut acts);
            for which in available() {
                let mut yf = vec![0f32; n * rows];
                matmul_with(which, &w, &x, n, &mut yf).unwrap();
                // The interleaved layout (what models run) gives the same products.
                let mut yp = vec![f32::NAN; n * rows];
                packed_rows(which, &packed, &acts, n, 0..rows, |t, r, v| {
                    yp[t * rows + r] = v
                });
                for (i, (s, p)) in ys.iter().zip(&yp).enumerate() {
                    assert!(
                        (s - p).abs() <= KERNEL_REL_TOL * scale * cols as f32,
                        "{} n={n} out {i}: scalar {s} vs packed {which:?} {p}",
                        info.name
                    );
                }
                for (i, (s, f)) in ys.iter().zip(&yf).enumerate() {
                    assert!(
                        (s - f).abs() <= KERNEL_REL_TOL * scale * cols as f32,
                        "{} n={n} out {i}: scalar {s} vs {which:?} {f}",
                        info.name
                    );
                }
                // Batch invariance: token t alone gives the same row as in the batch.
                for t in 0..n {
                    let mut y1 = vec![0f32; rows];
                    matmul_with(which, &w, &x[t * cols..(t + 1) * cols], 1, &mut y1).unwrap();
                    for r in 0..rows {
                        let b = yf[t * rows + r];
                        assert!(
                            (y1[r] - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{} {which:?} n={n} t={t} r={r}: alone {} vs batch {b}",
                            info.name,
                            y1[r]
                        );
                    }
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 15, "checked {checked} tensors");
}
