//! lmkit's SIMD kernels equal their scalar references on the real model's weights.

mod common;

use lmkit::formats::gguf::GgufFile;
use lmkit_kernels::act::quantize_activations;
use lmkit_kernels::dot::{available, Isa};
use lmkit_kernels::matmul::{matmul_with, QFormat, QMatrix};
use lmkit_kernels::packed::{packed_rows, Packed};

/// Relative to Σ|w·x| of the row: f32 accumulation-order differences only.
const KERNEL_REL_TOL: f32 = 1e-5;

/// `len` activations with LLM-like outliers (every 97th value 40× larger).
fn activations(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let v = ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0;
            if i % 97 == 0 {
                v * 40.0
            } else {
                v
            }
        })
        .collect()
}

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
            let x = activations(n * cols);
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

/// The K-quant kernels on the default model's MLP down projections (576 × 1536, quantized to
/// `Q4_K`, `Q5_K` and `Q6_K` by candle): their products track the exact ones (the stored weights in f64)
/// at least as closely as candle's own K-quant kernels do (8-bit activations per 256 values
/// there, per 32 here), and every SIMD implementation equals the scalar one.
#[test]
fn k_quant_kernels_track_the_exact_product_on_real_weights() {
    use lmkit::core::candle::quantized::{GgmlDType, QMatMul, QTensor};
    use lmkit::core::candle::Module;
    use lmkit_kernels::{KQuant, Q4K, Q5K, Q6K};

    let g = GgufFile::open(common::default_model()).unwrap();
    let mut checked = 0;
    for name in ["blk.0.ffn_down.weight", "blk.29.ffn_down.weight"] {
        let info = g.tensors.iter().find(|t| t.name == name).unwrap();
        let format = match info.dtype.name().as_str() {
            "Q4_0" => QFormat::Q4_0,
            "Q4_1" => QFormat::Q4_1,
            _ => QFormat::Q8_0,
        };
        let (rows, cols) = (info.dims[1], info.dims[0]);
        let src = Packed::pack(format, rows, cols, g.tensor_bytes(info)).unwrap();
        let mut w = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact_mut(cols).enumerate() {
            src.dequantize_row(r, row);
        }
        let wt = lmkit::Tensor::from_vec(w, (rows, cols), &lmkit::Device::Cpu).unwrap();
        let n = 5;
        let x = activations(n * cols);
        let xt = lmkit::Tensor::from_vec(x.clone(), (n, cols), &lmkit::Device::Cpu).unwrap();
        let mut acts = Vec::new();
        quantize_activations(&x, &mut acts);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let exact_w = q.dequantize(&lmkit::Device::Cpu).unwrap();
            let exact_w = exact_w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bytes = q.data().unwrap();
            let kq = match dtype {
                GgmlDType::Q4K => KQuant::Q4K(Q4K::pack(rows, cols, &bytes).unwrap()),
                GgmlDType::Q5K => KQuant::Q5K(Q5K::pack(rows, cols, &bytes).unwrap()),
                _ => KQuant::Q6K(Q6K::pack(rows, cols, &bytes).unwrap()),
            };
            let exact: Vec<f64> = (0..n)
                .flat_map(|t| {
                    let (x, w) = (&x, &exact_w);
                    (0..rows).map(move |r| {
                        (0..cols)
                            .map(|i| w[r * cols + i] as f64 * x[t * cols + i] as f64)
                            .sum::<f64>()
                    })
                })
                .collect();
            let candle = QMatMul::from_qtensor(q).unwrap().forward(&xt).unwrap();
            let candle = candle.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rms = |y: &[f32]| {
                let s: f64 = y
                    .iter()
                    .zip(&exact)
                    .map(|(a, e)| (*a as f64 - e).powi(2))
                    .sum();
                (s / y.len() as f64).sqrt()
            };
            let spread = (exact.iter().map(|e| e * e).sum::<f64>() / exact.len() as f64).sqrt();
            let mut scalar = vec![f32::NAN; n * rows];
            kq.rows_into(Isa::Scalar, &acts, n, 0..rows, |t, r, v| {
                scalar[t * rows + r] = v
            });
            let (mine, theirs) = (rms(&scalar), rms(&candle));
            assert!(
                mine <= theirs && mine <= 0.02 * spread,
                "{name} {dtype:?}: lmkit's RMS error {mine} vs candle's {theirs} (outputs' RMS \
                 {spread})"
            );
            for which in available() {
                let mut y = vec![f32::NAN; n * rows];
                kq.rows_into(which, &acts, n, 0..rows, |t, r, v| y[t * rows + r] = v);
                for (i, (s, v)) in scalar.iter().zip(&y).enumerate() {
                    assert!(
                        (s - v).abs() <= KERNEL_REL_TOL * s.abs().max(spread as f32),
                        "{name} {dtype:?} {which:?} out {i}: scalar {s} vs {v}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}
