//! The token tiling shared by the kernels that take rows in interleaved groups of eight
//! ([`crate::packed`], [`crate::lowbit_lanes`], [`crate::q4k_q5k`], [`crate::q6k`]): each unpacked weight register
//! serves a tile of tokens, eight at a time with AVX-512's 32 vector registers, else four, then
//! one.

// Only the x86-64 kernels tile tokens; elsewhere the scalar references run row by row.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::ops::Range;

use crate::act::A8Block;
use crate::dot::Isa;

/// Rows interleaved per group.
pub const GROUP: usize = 8;

/// A SIMD kernel for one row group.
pub(crate) trait GroupKernel {
    /// Rows `8g..8g+8` against activation rows `t0..t0 + N`: `[token][row]`. On the first
    /// token tile (`t0 == 0`) the next group's bytes are requested as this one's are read
    /// (later tiles find the group in cache).
    fn group<const N: usize>(
        &self,
        g: usize,
        t0: usize,
        acts: [&[A8Block]; N],
    ) -> [[f32; GROUP]; N];
}

/// Runs `kernel` over the groups of `rows` (`rows.start` a multiple of [`GROUP`], `rows.end`
/// at most the matrix's rows) and `n` activation rows of `nb` blocks each, handing every value
/// to `emit(t, r, value)`.
pub(crate) fn run_groups(
    isa: Isa,
    kernel: &impl GroupKernel,
    acts: &[A8Block],
    nb: usize,
    n: usize,
    rows: Range<usize>,
    mut emit: impl FnMut(usize, usize, f32),
) {
    assert!(
        acts.len() >= n * nb && rows.start.is_multiple_of(GROUP),
        "row groups: {} blocks for n={n}, rows {rows:?}",
        acts.len()
    );
    let act = |t: usize| &acts[t * nb..(t + 1) * nb];
    for g in rows.start / GROUP..rows.end.div_ceil(GROUP) {
        let valid = (rows.end - g * GROUP).min(GROUP);
        let mut put = |t0: usize, v: &[[f32; GROUP]]| {
            for (k, row) in v.iter().enumerate() {
                for (lane, &y) in row.iter().enumerate().take(valid) {
                    emit(t0 + k, g * GROUP + lane, y);
                }
            }
        };
        let mut t = 0;
        while isa == Isa::Avx512 && t + 8 <= n {
            let a = [0, 1, 2, 3, 4, 5, 6, 7].map(|k| act(t + k));
            put(t, &kernel.group(g, t, a));
            t += 8;
        }
        while t + 4 <= n {
            let a = [0, 1, 2, 3].map(|k| act(t + k));
            put(t, &kernel.group(g, t, a));
            t += 4;
        }
        while t < n {
            put(t, &kernel.group(g, t, [act(t)]));
            t += 1;
        }
    }
}
