//! Randomized Hadamard rotations of QuIP layers, row by row as the models apply them: 64 rows
//! (a prompt's share) of the default model's widths (192: k/v, 576: hidden, 1536: MLP), and
//! 1, 2 and 4 rows (decoding one or a few sequences), on one thread.
//! Throughput is rotated values per second.
//!
//! `cargo bench -p lmkit-kernels --bench rotation`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lmkit_kernels::Rotation;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("rotation");
    for (n, rows) in [
        (192usize, 64),
        (576, 64),
        (1536, 64),
        (576, 1),
        (576, 2),
        (576, 4),
    ] {
        let diag: Vec<f32> = (0..n)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let Some(r) = Rotation::new(diag) else {
            continue;
        };
        let mut x: Vec<f32> = (0..rows * n).map(|i| ((i % 97) as f32) * 0.01).collect();
        g.throughput(Throughput::Elements((rows * n) as u64));
        let id = format!("{rows}x{n}");
        g.bench_with_input(BenchmarkId::new("apply_t_rows", &id), &n, |b, _| {
            b.iter(|| r.apply_t_rows(&mut x))
        });
        g.bench_with_input(BenchmarkId::new("apply_rows", &id), &n, |b, _| {
            b.iter(|| r.apply_rows(&mut x))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
