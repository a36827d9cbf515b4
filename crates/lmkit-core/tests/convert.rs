//! GGUF block types without an lmkit kernel run through a converted copy, and `Q4_K`, `Q5_K`
//! and `Q6_K` through their own kernels: the products stay close to the exact (dequantized) ones, and
//! every layer has a kernel.

use lmkit_core::candle::quantized::{GgmlDType, QTensor};
use lmkit_core::linear::Weight;
use lmkit_core::{Device, Linear, Tensor};

/// 8-bit activations plus the conversion's rounding, relative to the output range.
const REL_TOL: f32 = 0.03;

#[test]
fn k_quants_and_q5_run_native_and_track_the_exact_product() {
    let (rows, cols) = (24, 512);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| (((i * 7919) % 2001) as f32 - 1000.0) / 1000.0)
        .collect();
    let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..3 * cols)
        .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
        .collect();
    let x = Tensor::from_vec(x, (3, cols), &Device::Cpu).unwrap();
    for (dtype, becomes) in [
        (GgmlDType::Q4K, "Q4_K"),
        (GgmlDType::Q5K, "Q5_K"),
        (GgmlDType::Q6K, "Q6_K"),
        (GgmlDType::Q5_0, "Q8_0"),
        (GgmlDType::Q3K, "Q8_0"),
    ] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        // The exact values of the stored blocks.
        let exact = q.dequantize(&Device::Cpu).unwrap();
        let want = x.matmul(&exact.t().unwrap()).unwrap();
        let stored_bytes = q.data().unwrap().into_owned();
        let lin = Linear::quantized(q, None).unwrap();
        if let Weight::KQuant(w) = lin.weight() {
            assert_eq!(w.unpack(), stored_bytes, "{dtype:?} repacking is lossless");
        }
        assert!(
            matches!(lin.weight(), Weight::Packed(_) | Weight::KQuant(_)),
            "{dtype:?} has a kernel"
        );
        assert_eq!(lin.weight().type_name(), becomes);
        assert!(lin.kernel_data().unwrap().is_some());
        if matches!(
            dtype,
            GgmlDType::Q5_0 | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
        ) {
            // Q5_0: same scale, the quants shifted; K-quants: repacked. Either way the weights
            // are the stored ones, value for value (candle dequantizes the file's blocks).
            let stored = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let conv = lin.weight().to_f32().unwrap();
            assert_eq!(
                conv.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                stored
            );
        }
        let got = lin.forward(&x).unwrap();
        let (g, w) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let range = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in g.iter().zip(&w) {
            assert!((a - b).abs() <= REL_TOL * range, "{dtype:?}: {a} vs {b}");
        }
    }
}
