//! Quantized matmul throughput per format, shape and implementation, on the default model's
//! shapes (rows × cols of W): attention 576×576, MLP up/gate 1536×576, MLP down 576×1536, output
//! 49152×576; for one token (decode) and 64 tokens (prompt). Throughput is weight bytes read per
//! second for decode and multiply-accumulates per second (as "elements") for prompts.
//!
//! `cargo bench -p lmkit-kernels --bench qmatmul` (set RAYON_NUM_THREADS to fix the threads).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lmkit_kernels::dot::available;
use lmkit_kernels::matmul::{matmul_with, QFormat, QMatrix};

const SHAPES: &[(usize, usize)] = &[(576, 576), (1536, 576), (576, 1536), (49152, 576)];

fn weights(format: QFormat, rows: usize, cols: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut s = 0x9E37_79B9u32;
    let mut v = Vec::with_capacity(rows * cols / 32 * bb);
    for _ in 0..rows * cols / 32 {
        // A small positive f16 scale (0x2000 ≈ 0.0078) and offset, then random quants.
        v.extend([0x00, 0x20]);
        if format == QFormat::Q4_1 {
            v.extend([0x00, 0xA0]);
        }
        for _ in 0..bb - if format == QFormat::Q4_1 { 4 } else { 2 } {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            v.push(s as u8);
        }
    }
    v
}

fn bench(c: &mut Criterion) {
    for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
        let mut g = c.benchmark_group(format!("qmatmul_{format:?}"));
        g.sample_size(20);
        for &(rows, cols) in SHAPES {
            let data = weights(format, rows, cols);
            let w = QMatrix {
                format,
                rows,
                cols,
                data: &data,
            };
            for n in [1usize, 64] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
                    .collect();
                let mut y = vec![0f32; n * rows];
                g.throughput(if n == 1 {
                    Throughput::Bytes(data.len() as u64)
                } else {
                    Throughput::Elements((n * rows * cols) as u64)
                });
                for isa in available() {
                    let id = BenchmarkId::new(format!("{isa:?}/n{n}"), format!("{rows}x{cols}"));
                    g.bench_with_input(id, &n, |b, &n| {
                        b.iter(|| matmul_with(isa, &w, &x, n, &mut y))
                    });
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
