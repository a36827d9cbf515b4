//! Matmul throughput per weight format, shape and implementation, on the default model's shapes
//! (rows × cols of W): attention 576×576, MLP up/gate 1536×576, MLP down 576×1536, output
//! 49152×576; for one token (decode) and 64 tokens (prompt). Throughput is weight bytes read per
//! second for decode and multiply-accumulates per second ("elements") for prompts.
//!
//! Each product runs as the models run it: one thread team, rows handed out in chunks
//! (Q4_0/Q4_1/Q8_0 in the interleaved layout of `packed`, Q4_K/Q5_K/Q6_K in those of
//! `q4k_q5k`/`q6k`, F16/F32 through `dense`). The K-quants run only on the shapes whose rows
//! are whole 256-weight super-blocks (576×1536).
//!
//! `cargo bench -p lmkit-kernels --bench qmatmul` (set RAYON_NUM_THREADS to fix the threads).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lmkit_kernels::act::quantize_activations;
use lmkit_kernels::dot::{available, Isa};
use lmkit_kernels::team::{self, SharedMut};
use lmkit_kernels::{Dense, KQuant, Packed, QFormat, WeightView, Q4K, Q5K, Q6K};

const SHAPES: &[(usize, usize)] = &[(576, 576), (1536, 576), (576, 1536), (49152, 576)];

/// Random K-quant super-blocks with small positive f16 scales: `Q4_K`'s and `Q5_K`'s `d` and
/// `dmin` lead their blocks (144 and 176 bytes), `Q6_K`'s `d` ends its 210.
fn kquant_bytes(name: &str, rows: usize, cols: usize) -> Vec<u8> {
    let q4k = name != "Q6_K";
    let bytes = match name {
        "Q4_K" => 144,
        "Q5_K" => 176,
        _ => 210,
    };
    let mut s = 0x9E37_79B9u32;
    let mut v = Vec::with_capacity(rows * cols / 256 * bytes);
    for _ in 0..rows * cols / 256 {
        if q4k {
            v.extend([0x00, 0x20, 0x00, 0x20]);
        }
        for _ in 0..bytes - 4 + if q4k { 0 } else { 2 } {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            v.push(s as u8);
        }
        if !q4k {
            v.extend([0x00, 0x20]);
        }
    }
    v
}

fn quant_bytes(format: QFormat, rows: usize, cols: usize) -> Vec<u8> {
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

/// `y = x Wᵀ` on a thread team, rows in chunks of 64.
fn product(isa: Isa, w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    let mut acts = Vec::new();
    if w.wants_blocks() {
        quantize_activations(x, &mut acts);
    }
    let rows = w.rows();
    let out = SharedMut::new(y);
    team::run(1, |tm| {
        tm.for_chunks(rows, 64, |r| {
            // SAFETY: chunks are disjoint rows; each (t, r) is written once.
            w.rows_into(isa, x, &acts, n, r, |t, r, v| unsafe {
                out.set(t * rows + r, v)
            });
        });
    });
}

fn bench(c: &mut Criterion) {
    for name in ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "F32"] {
        let mut g = c.benchmark_group(format!("matmul_{name}"));
        g.sample_size(20);
        for &(rows, cols) in SHAPES {
            if name.ends_with("_K") && !cols.is_multiple_of(256) {
                continue;
            }
            let (packed, kquant, f16s, f32s);
            let (w, bytes) = match name {
                "Q4_K" | "Q5_K" | "Q6_K" => {
                    let data = kquant_bytes(name, rows, cols);
                    kquant = match name {
                        "Q4_K" => KQuant::Q4K(Q4K::pack(rows, cols, &data).expect("Q4_K blocks")),
                        "Q5_K" => KQuant::Q5K(Q5K::pack(rows, cols, &data).expect("Q5_K blocks")),
                        _ => KQuant::Q6K(Q6K::pack(rows, cols, &data).expect("Q6_K blocks")),
                    };
                    (WeightView::KQuant(&kquant), data.len())
                }
                "F32" => {
                    f32s = (0..rows * cols)
                        .map(|i| ((i % 23) as f32 - 11.0) / 64.0)
                        .collect::<Vec<f32>>();
                    let w = WeightView::Dense {
                        w: Dense::F32(&f32s),
                        rows,
                        cols,
                    };
                    (w, rows * cols * 4)
                }
                "F16" => {
                    f16s = (0..rows * cols)
                        .flat_map(|i| {
                            half::f16::from_f32(((i % 23) as f32 - 11.0) / 64.0).to_le_bytes()
                        })
                        .collect::<Vec<u8>>();
                    let w = WeightView::Dense {
                        w: Dense::F16(&f16s),
                        rows,
                        cols,
                    };
                    (w, rows * cols * 2)
                }
                _ => {
                    let format = match name {
                        "Q4_0" => QFormat::Q4_0,
                        "Q4_1" => QFormat::Q4_1,
                        _ => QFormat::Q8_0,
                    };
                    let data = quant_bytes(format, rows, cols);
                    packed = Packed::pack(format, rows, cols, &data).expect("valid blocks");
                    (WeightView::Packed(&packed), data.len())
                }
            };
            for n in [1usize, 64] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
                    .collect();
                let mut y = vec![0f32; n * rows];
                g.throughput(if n == 1 {
                    Throughput::Bytes(bytes as u64)
                } else {
                    Throughput::Elements((n * rows * cols) as u64)
                });
                for isa in available() {
                    if isa == Isa::Scalar && n > 1 && rows > 4096 {
                        continue; // seconds per iteration; the other shapes show it
                    }
                    let id = BenchmarkId::new(format!("{isa:?}/n{n}"), format!("{rows}x{cols}"));
                    g.bench_with_input(id, &n, |b, &n| b.iter(|| product(isa, &w, &x, n, &mut y)));
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
