// lmkit's decoding kernels: one new token per sequence through a Llama block, each step a short
// fixed chain of launches on preallocated buffers (a CUDA graph replays it; see
// lmkit_models::fused_decode). Compiled to PTX by build.rs with the `cuda` feature, and as C++
// for the CPU emulator with `cuda-emu` (cuda/emu/, which runs these same kernels in the tests).
//
// Activations are f32 rows `(b, ·)`; weights W are f32, bf16 or f16 `(n, k)` row-major; the KV
// cache is `(b, kv_heads, cap, d)` in the compute dtype. All arithmetic is f32.
//
// dec_embed      x_j = E[id_j]                                          block per sequence
// dec_gemv       y_j = W a_j (+ bias) (+ res_j), W the rows of up to three matrices stacked
//                (q, k, v read the same input); res may be y (a residual added in place).
//                a_j is x_j, or with a norm weight nw its RMSNorm x_j·r_j ⊙ nw, r_j =
//                (mean(x_j²) + ε)^(−½), folded into the product: W a_j = r_j · W (x_j ⊙ nw),
//                the sum of squares taken in the same pass over x_j as the dot products.
//                                                                        warp per output row
// dec_gateup     m_j = silu(W_g a_j) ⊙ (W_u a_j), a_j as above          warp per output row
// dec_tgemv, dec_tgateup, dec_tqgemv, dec_tqgateup: the same for 2-16 sequences on tensor cores
//                (bf16 weights, or Q8_0 / Q4_1 blocks dequantized into bf16 fragments).
// dec_qgemv, dec_qgateup, dec_qembed: the same with Q8_0 / Q4_1 weights (repacked, see below).
// dec_rope_append  q_j ← rot(pos_j)·q_j; k_j ← rot(pos_j)·k_j, then k_j, v_j written at
//                cache slot slot_j; rot rotates the pairs (i, i + d/2) by pos·θᵢ (HF's
//                rotate-half layout).                                   block per (sequence, head)
// dec_attn_part, dec_attn_merge   y = softmax(s·q Kᵀ) V over the slot_j + 1 cached entries of
//                q's kv head: blocks of 64 entries, then their merge (flash-decoding).

#ifdef LMKIT_EMU
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define LMKIT_REG(name)
#endif

typedef float f32;
typedef __nv_bfloat16 bf16;
typedef __half f16;

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Products with one row of W per warp.

// acc[j] = W_row · (x_j ⊙ nw) for the b ≤ NB rows x_j of `x` (row stride k), summed over the
// warp (every lane gets the sums); nw null means ones. With SQ, sq[j] = Σ x_j² (the RMSNorm's
// sum, from the same loads).
template <typename W, int NB, bool SQ>
__device__ __forceinline__ void row_dots(const W* __restrict__ w, const float* __restrict__ x,
                                         const float* __restrict__ nw, int k, int b, float* acc,
                                         float* sq) {
  constexpr int V = 16 / sizeof(W);  // weights per 16-byte load
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < NB; j++) {
    acc[j] = 0.f;
    if (SQ) sq[j] = 0.f;
  }
  if (k % V == 0 && aligned16(w) && aligned16(x) && (!nw || aligned16(nw))) {
    // Small batches: the loop unrolled four times, so that four iterations' weight loads can
    // be in flight together where a row has that many per lane (the GPU issues loads in program
    // order, and each iteration's FMAs wait for its own); larger batches spend their registers
    // on the batch.
#pragma unroll(NB <= 2 ? 4 : 1)
    for (int c = lane * V; c < k; c += 32 * V) {
      const uint4 raw = load16<uint4>(w + c);
      W wv[V];
      memcpy(wv, &raw, 16);
      float wf[V];
#pragma unroll
      for (int e = 0; e < V; e++) wf[e] = to_f(wv[e]);
      if (nw) {
#pragma unroll
        for (int e = 0; e < V; e += 4) {
          const float4 nv = load16<float4>(nw + c + e);
          wf[e] *= nv.x;
          wf[e + 1] *= nv.y;
          wf[e + 2] *= nv.z;
          wf[e + 3] *= nv.w;
        }
      }
#pragma unroll
      for (int j = 0; j < NB; j++) {
        if (j < b) {
          const float* xr = x + (size_t)j * k + c;
          float s = 0.f, q = 0.f;
#pragma unroll
          for (int e = 0; e < V; e += 4) {
            const float4 xv = load16<float4>(xr + e);
            s += wf[e] * xv.x + wf[e + 1] * xv.y + wf[e + 2] * xv.z + wf[e + 3] * xv.w;
            q += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
          }
          acc[j] += s;
          if (SQ) sq[j] += q;
        }
      }
    }
  } else {
    for (int c = lane; c < k; c += 32) {
      const float wf = to_f(w[c]) * (nw ? nw[c] : 1.f);
#pragma unroll
      for (int j = 0; j < NB; j++) {
        if (j < b) {
          const float xv = x[(size_t)j * k + c];
          acc[j] += wf * xv;
          if (SQ) sq[j] += xv * xv;
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NB; j++) {
    acc[j] = warp_sum(acc[j]);
    if (SQ) sq[j] = warp_sum(sq[j]);
  }
}

// The RMSNorm factors r_j = (sq_j / k + ε)^(−½) (1 when there is no norm).
template <int NB>
__device__ __forceinline__ void norm_factors(const float* nw, float* sq, int k, float eps) {
#pragma unroll
  for (int j = 0; j < NB; j++) sq[j] = nw ? rsqrtf(sq[j] / (float)k + eps) : 1.f;
}

// Which of three stacked matrices (n0, n1, n2 rows) holds output row `row`, and at which row.
__device__ __forceinline__ int pick(int row, int n0, int n1, int* r) {
  if (row >= n0 + n1) {
    *r = row - n0 - n1;
    return 2;
  }
  if (row >= n0) {
    *r = row - n0;
    return 1;
  }
  *r = row;
  return 0;
}

// Lane 0 writes y_j[row] = acc_j (+ bias[r]) (+ res_j[row]) for the b sequences (rows of n).
template <int NB>
__device__ __forceinline__ void store_rows(const float* acc, const float* bias, int r,
                                           const float* res, float* y, int n, int row, int b) {
  if ((threadIdx.x & 31) != 0) return;
#pragma unroll
  for (int j = 0; j < NB; j++) {
    if (j < b) {
      const size_t o = (size_t)j * n + row;
      float v = acc[j];
      if (bias) v += bias[r];
      if (res) v += res[o];
      y[o] = v;
    }
  }
}

// m_j = silu(g_j) ⊙ u_j, written by lane 0.
template <int NB>
__device__ __forceinline__ void store_silu(const float* g, const float* u, float* m, int n,
                                           int row, int b) {
  if ((threadIdx.x & 31) != 0) return;
#pragma unroll
  for (int j = 0; j < NB; j++)
    if (j < b) m[(size_t)j * n + row] = g[j] / (1.f + expf(-g[j])) * u[j];
}

template <typename W, int NB>
__device__ void gemv(const W* w0, const W* w1, const W* w2, int n0, int n1, int n2,
                     const float* b0, const float* b1, const float* b2, const float* x,
                     const float* res, float* y, int k, int b, const float* nw, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int n = n0 + n1 + n2;
  if (row >= n) return;
  int r;
  const int i = pick(row, n0, n1, &r);
  const W* w = i == 0 ? w0 : i == 1 ? w1 : w2;
  const float* bias = i == 0 ? b0 : i == 1 ? b1 : b2;
  float acc[NB], sq[NB];
  if (nw)
    row_dots<W, NB, true>(w + (size_t)r * k, x, nw, k, b, acc, sq);
  else
    row_dots<W, NB, false>(w + (size_t)r * k, x, nw, k, b, acc, sq);
  norm_factors<NB>(nw, sq, k, eps);
#pragma unroll
  for (int j = 0; j < NB; j++) acc[j] *= sq[j];
  store_rows<NB>(acc, bias, r, res, y, n, row, b);
}

template <typename W, int NB>
__device__ void gateup(const W* wg, const W* wu, const float* x, float* m, int n, int k, int b,
                       const float* nw, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  float g[NB], u[NB], sq[NB];
  row_dots<W, NB, true>(wg + (size_t)row * k, x, nw, k, b, g, sq);
  row_dots<W, NB, false>(wu + (size_t)row * k, x, nw, k, b, u, sq);
  norm_factors<NB>(nw, sq, k, eps);
#pragma unroll
  for (int j = 0; j < NB; j++) {
    g[j] *= sq[j];
    u[j] *= sq[j];
  }
  store_silu<NB>(g, u, m, n, row, b);
}

// The products launch 128 threads per block (GEMV_THREADS in lmkit_models::fused_decode). For
// batches of 9-16 the bounds keep registers at or under 128 (four blocks per SM), or 168
// (three) for Q4_1, whose loops would spill at 128; smaller batches need fewer anyway.
#define GEMV(W, NB, MINB)                                                                       \
  extern "C" __global__ void __launch_bounds__(128, MINB) dec_gemv_##W##_##NB(                  \
      const W* w0, const W* w1, const W* w2, int n0, int n1, int n2, const float* b0,           \
      const float* b1, const float* b2, const float* x, const float* res, float* y, int k,       \
      int b, const float* nw, float eps) {                                                      \
    gemv<W, NB>(w0, w1, w2, n0, n1, n2, b0, b1, b2, x, res, y, k, b, nw, eps);                  \
  }                                                                                             \
  LMKIT_REG(dec_gemv_##W##_##NB)                                                                \
  extern "C" __global__ void __launch_bounds__(128, MINB)                                       \
      dec_gateup_##W##_##NB(const W* wg, const W* wu, const float* x, float* m, int n, int k,   \
                            int b, const float* nw, float eps) {                                \
    gateup<W, NB>(wg, wu, x, m, n, k, b, nw, eps);                                              \
  }                                                                                             \
  LMKIT_REG(dec_gateup_##W##_##NB)

#define GEMV_ALL(W) GEMV(W, 1, 1) GEMV(W, 2, 1) GEMV(W, 4, 1) GEMV(W, 8, 1) GEMV(W, 16, 4)
GEMV_ALL(f32)
GEMV_ALL(bf16)
GEMV_ALL(f16)

// ---------------------------------------------------------------------------------------------
// The same products for 2-16 sequences on tensor cores, for bf16 weights (LMKIT_DECODE_TC=1;
// lmkit_models::fused_decode): mma.sync.m16n8k16 with the sequences as A's 16 rows (rows from b
// on are zeros) and eight rows of W as B's eight columns. A block of TC_WARPS warps takes one
// tile of eight output rows; its warps take turns over k, 32 values at a time, and add their
// sums in shared memory in a fixed order. x goes into A rounded to W's type (times the norm
// weight where there is one); the RMSNorm's sums of squares come from the same loads, in f32.
// The warp-per-row kernels above read x once per output row: 16 sequences made that 32 times
// the bytes of W, and the batch-16 products took ~21 µs a call on an H200 (measured); reading
// the weights at the card's bandwidth would take ~0.4 µs (computed, not measured).
//
// Each lane loads 16 contiguous bytes of its W row per 32 values of k: lane (g, c) holds
// W[n0 + g][k0 + 8c .. k0 + 8c + 8), the first half for the chunk's first mma, the second for
// its second. In mma s (0, 1), fragment index kk = 2c + e + 8h (e, h ∈ {0, 1}) stands for
// k0 + 8c + 4s + 2h + e, in A as in B: the same products, summed in another order.
#define TC_WARPS 4

// Row `row` of x at columns col..col+8 (times nw8 when there is a norm), packed in pairs into
// p[0..4) in T; sq += Σ x². Zeros for a row past the batch.
template <typename T>
__device__ __forceinline__ void tc_row(const float* x, const float* nw8, int k, int row, int b,
                                       int col, uint32_t* p, float* sq) {
  float v[8];
  if (row < b) {
    const float4 u = load16<float4>(x + (size_t)row * k + col);
    const float4 w = load16<float4>(x + (size_t)row * k + col + 4);
    v[0] = u.x, v[1] = u.y, v[2] = u.z, v[3] = u.w, v[4] = w.x, v[5] = w.y, v[6] = w.z, v[7] = w.w;
#pragma unroll
    for (int e = 0; e < 8; e++) {
      *sq += v[e] * v[e];
      if (nw8) v[e] *= nw8[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = 0.f;
  }
#pragma unroll
  for (int e = 0; e < 4; e++) p[e] = pack2<T>(v[2 * e], v[2 * e + 1]);
}

// W's rows for the tensor-core products: load(g, col, o) packs W[g][col .. col + 8) into
// o[0..4) as pairs of T (col a multiple of 8). Dense rows are one 16-byte load.
template <typename T>
struct DenseRows {
  const T* w;
  int k;
  __device__ __forceinline__ void load(int g, int col, uint32_t* o) const {
    const uint4 u = load16<uint4>(w + (size_t)g * k + col);
    o[0] = u.x, o[1] = u.y, o[2] = u.z, o[3] = u.w;
  }
};

// This warp's share of the 16 × 8 tile: d += X[0..16) · W[rows of w, 8 of them]ᵀ over its
// chunks of k (and of the second matrix into d2 when w2 is set: gate and up read the same x).
template <typename T, typename L>
__device__ __forceinline__ void tc_tile(const L& w, const L* w2, const float* x, const float* nw,
                                       int k, int b, float* d, float* d2, float* sq0,
                                       float* sq1) {
  const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
#pragma unroll 2
  for (int k0 = wp * 32; k0 < k; k0 += TC_WARPS * 32) {
    const int col = k0 + 8 * c;
    float nw8[8];
    if (nw) {
      const float4 u = load16<float4>(nw + col);
      const float4 v = load16<float4>(nw + col + 4);
      nw8[0] = u.x, nw8[1] = u.y, nw8[2] = u.z, nw8[3] = u.w;
      nw8[4] = v.x, nw8[5] = v.y, nw8[6] = v.z, nw8[7] = v.w;
    }
    uint32_t p0[4], p1[4];
    tc_row<T>(x, nw ? nw8 : nullptr, k, g, b, col, p0, sq0);
    tc_row<T>(x, nw ? nw8 : nullptr, k, g + 8, b, col, p1, sq1);
    const uint32_t a[2][4] = {{p0[0], p1[0], p0[1], p1[1]}, {p0[2], p1[2], p0[3], p1[3]}};
    uint32_t bw[4];
    w.load(g, col, bw);
    mma16816<T>(d, a[0], bw);
    mma16816<T>(d, a[1], bw + 2);
    if (w2) {
      uint32_t bu[4];
      w2->load(g, col, bu);
      mma16816<T>(d2, a[0], bu);
      mma16816<T>(d2, a[1], bu + 2);
    }
  }
}

// The warps' tiles into red[warp][sequence][row] and their sums of squares into sqs; after
// the barrier every thread may read both.
__device__ __forceinline__ void tc_gather(const float* d, float (*red)[16][8], float sq0,
                                          float sq1, float (*sqs)[16]) {
  const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  red[wp][g][2 * c] = d[0];
  red[wp][g][2 * c + 1] = d[1];
  red[wp][g + 8][2 * c] = d[2];
  red[wp][g + 8][2 * c + 1] = d[3];
  if (sqs) {
    sq0 += __shfl_xor_sync(0xffffffffu, sq0, 1);
    sq0 += __shfl_xor_sync(0xffffffffu, sq0, 2);
    sq1 += __shfl_xor_sync(0xffffffffu, sq1, 1);
    sq1 += __shfl_xor_sync(0xffffffffu, sq1, 2);
    if (c == 0) {
      sqs[wp][g] = sq0;
      sqs[wp][g + 8] = sq1;
    }
  }
}

// Thread t's (sequence t / 8, row t % 8) of the tile: the warps' sums, and the RMSNorm factor.
__device__ __forceinline__ float tc_sum(float (*red)[16][8], const float (*sqs)[16], int k,
                                        float eps, float* r) {
  const int m = threadIdx.x >> 3, col = threadIdx.x & 7;
  float s = 0.f, q = 0.f;
#pragma unroll
  for (int u = 0; u < TC_WARPS; u++) {
    s += red[u][m][col];
    if (sqs) q += sqs[u][m];
  }
  *r = sqs ? rsqrtf(q / (float)k + eps) : 1.f;
  return s;
}

// One block's tile of eight rows (rows r0.. of the matrix that w reads; t0.. of the output).
template <typename T, typename L>
__device__ void tgemv_tile(const L& w, const float* bias, int r0, int t0, int n, const float* x,
                           const float* res, float* y, int k, int b, const float* nw, float eps) {
  __shared__ float red[TC_WARPS][16][8];
  __shared__ float sqs[TC_WARPS][16];
  float d[4] = {0.f, 0.f, 0.f, 0.f}, sq0 = 0.f, sq1 = 0.f;
  tc_tile<T, L>(w, nullptr, x, nw, k, b, d, nullptr, &sq0, &sq1);
  tc_gather(d, red, sq0, sq1, nw ? sqs : nullptr);
  __syncthreads();
  float r;
  const float s = tc_sum(red, nw ? sqs : nullptr, k, eps, &r);
  const int m = threadIdx.x >> 3, col = threadIdx.x & 7;
  if (m < b) {
    const size_t o = (size_t)m * n + t0 + col;
    float v = s * r;
    if (bias) v += bias[r0 + col];
    if (res) v += res[o];
    y[o] = v;
  }
}

template <typename T, typename L>
__device__ void tgateup_tile(const L& wg, const L& wu, int t0, int n, const float* x, float* mo,
                             int k, int b, const float* nw, float eps) {
  __shared__ float red[2][TC_WARPS][16][8];
  __shared__ float sqs[TC_WARPS][16];
  float dg[4] = {0.f, 0.f, 0.f, 0.f}, du[4] = {0.f, 0.f, 0.f, 0.f}, sq0 = 0.f, sq1 = 0.f;
  tc_tile<T, L>(wg, &wu, x, nw, k, b, dg, du, &sq0, &sq1);
  tc_gather(dg, red[0], sq0, sq1, nw ? sqs : nullptr);
  tc_gather(du, red[1], 0.f, 0.f, nullptr);
  __syncthreads();
  float r, one;
  const float g = tc_sum(red[0], nw ? sqs : nullptr, k, eps, &r) * r;
  const float u = tc_sum(red[1], nullptr, k, eps, &one) * r;
  const int m = threadIdx.x >> 3, col = threadIdx.x & 7;
  if (m < b) mo[(size_t)m * n + t0 + col] = g / (1.f + expf(-g)) * u;
}

template <typename T>
__device__ void tgemv(const T* w0, const T* w1, const T* w2, int n0, int n1, int n2,
                      const float* b0, const float* b1, const float* b2, const float* x,
                      const float* res, float* y, int k, int b, const float* nw, float eps) {
  const int n = n0 + n1 + n2, t0 = blockIdx.x * 8;
  if (t0 >= n) return;  // the whole block
  int r0;
  const int i = pick(t0, n0, n1, &r0);  // tiles do not straddle matrices (rows % 8 == 0)
  const DenseRows<T> w{(i == 0 ? w0 : i == 1 ? w1 : w2) + (size_t)r0 * k, k};
  tgemv_tile<T>(w, i == 0 ? b0 : i == 1 ? b1 : b2, r0, t0, n, x, res, y, k, b, nw, eps);
}

template <typename T>
__device__ void tgateup(const T* wg, const T* wu, const float* x, float* mo, int n, int k, int b,
                        const float* nw, float eps) {
  const int t0 = blockIdx.x * 8;
  if (t0 >= n) return;
  const DenseRows<T> g{wg + (size_t)t0 * k, k}, u{wu + (size_t)t0 * k, k};
  tgateup_tile<T>(g, u, t0, n, x, mo, k, b, nw, eps);
}

// TC_WARPS · 32 = 128 threads per block, one block per eight output rows.
#define TGEMV(W)                                                                                \
  extern "C" __global__ void __launch_bounds__(128) dec_tgemv_##W(                              \
      const W* w0, const W* w1, const W* w2, int n0, int n1, int n2, const float* b0,           \
      const float* b1, const float* b2, const float* x, const float* res, float* y, int k,       \
      int b, const float* nw, float eps) {                                                      \
    tgemv<W>(w0, w1, w2, n0, n1, n2, b0, b1, b2, x, res, y, k, b, nw, eps);                     \
  }                                                                                             \
  LMKIT_REG(dec_tgemv_##W)                                                                      \
  extern "C" __global__ void __launch_bounds__(128)                                             \
      dec_tgateup_##W(const W* wg, const W* wu, const float* x, float* m, int n, int k, int b,  \
                      const float* nw, float eps) {                                             \
    tgateup<W>(wg, wu, x, m, n, k, b, nw, eps);                                                 \
  }                                                                                             \
  LMKIT_REG(dec_tgateup_##W)

// bf16 only: x·nw is rounded into A before the norm's factor applies, and an activation of
// the residual stream times its norm weight may pass f16's 65,504 (f16 weights take the
// warp-per-row kernels, in f32).
TGEMV(bf16)

// ---------------------------------------------------------------------------------------------
// Products with GGUF block-quantized weights, repacked at load into quants and f32 scales:
//   Q8_0  q: int8 (n, k),           s: (n, k/32)          w = s·q
//   Q4_1  q: uint8 (n, k/2), block j of a row in bytes 16j..16j+16, element i of the block in
//         the low nibble of byte i (i < 16) or the high nibble of byte i − 16;
//         s, m: (n, k/32)                                  w = s·q + m
// k is a multiple of 32. A lane takes 16 bytes of quants at a time.

enum QFmt { Q8_0 = 0, Q4_1 = 1 };

// acc[j] = W_row · (x_j ⊙ nw) and sq[j] = Σ x_j² as in row_dots, for a quantized row.
template <int F, int NB, bool SQ>
__device__ __forceinline__ void qrow_dots(const uint8_t* __restrict__ q, const float* __restrict__ s,
                                          const float* __restrict__ m, const float* __restrict__ x,
                                          const float* __restrict__ nw, int k, int b, float* acc,
                                          float* sq) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < NB; j++) {
    acc[j] = 0.f;
    if (SQ) sq[j] = 0.f;
  }
  constexpr int PER = F == Q8_0 ? 16 : 32;  // values per 16 bytes of quants
  if (!aligned16(q) || !aligned16(x) || (nw && !aligned16(nw))) {
    // Buffers off a 16-byte boundary (never from lmkit's own allocations): one value at a time.
    for (int c = lane; c < k; c += 32) {
      const int blk = c / 32, e = c % 32;
      float w;
      if (F == Q8_0) {
        w = s[blk] * (float)(int8_t)q[c];
      } else {
        const uint8_t byte = q[blk * 16 + (e & 15)];
        w = s[blk] * (float)(e < 16 ? (byte & 15) : (byte >> 4)) + m[blk];
      }
      if (nw) w *= nw[c];
#pragma unroll
      for (int j = 0; j < NB; j++) {
        if (j < b) {
          const float xv = x[(size_t)j * k + c];
          acc[j] += w * xv;
          if (SQ) sq[j] += xv * xv;
        }
      }
    }
  } else {
    const int chunks = k / PER;
#pragma unroll(NB <= 2 ? 2 : 1)
    for (int ch = lane; ch < chunks; ch += 32) {
      const uint4 raw = load16<uint4>(q + (size_t)ch * 16);
      uint8_t qb[16];
      memcpy(qb, &raw, 16);
      const int c0 = ch * PER;
      const float sc = s[c0 / 32];
      // The norm's weights over this chunk's PER values (ones without a norm).
      float nv[PER];
#pragma unroll
      for (int e = 0; e < PER; e += 4) {
        const float4 t = nw ? load16<float4>(nw + c0 + e) : make_float4(1.f, 1.f, 1.f, 1.f);
        nv[e] = t.x;
        nv[e + 1] = t.y;
        nv[e + 2] = t.z;
        nv[e + 3] = t.w;
      }
      if (F == Q8_0) {
        float wf[16];
#pragma unroll
        for (int e = 0; e < 16; e++) wf[e] = (float)(int8_t)qb[e] * nv[e];
#pragma unroll
        for (int j = 0; j < NB; j++) {
          if (j < b) {
            const float* xr = x + (size_t)j * k + c0;
            float t = 0.f, qq = 0.f;
#pragma unroll
            for (int e = 0; e < 16; e += 4) {
              const float4 xv = load16<float4>(xr + e);
              t += wf[e] * xv.x + wf[e + 1] * xv.y + wf[e + 2] * xv.z + wf[e + 3] * xv.w;
              qq += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
            }
            acc[j] += sc * t;
            if (SQ) sq[j] += qq;
          }
        }
      } else {
        // Σ (s·q + m)·nw·x = s·Σ q·nw·x + m·Σ nw·x.
        const float mn = m[c0 / 32];
        float lo[16], hi[16];
#pragma unroll
        for (int e = 0; e < 16; e++) {
          lo[e] = (float)(qb[e] & 15) * nv[e];
          hi[e] = (float)(qb[e] >> 4) * nv[16 + e];
        }
#pragma unroll
        for (int j = 0; j < NB; j++) {
          if (j < b) {
            const float* xr = x + (size_t)j * k + c0;
            float t = 0.f, sx = 0.f, qq = 0.f;
#pragma unroll
            for (int e = 0; e < 16; e += 4) {
              const float4 a = load16<float4>(xr + e);
              const float4 c = load16<float4>(xr + 16 + e);
              t += lo[e] * a.x + lo[e + 1] * a.y + lo[e + 2] * a.z + lo[e + 3] * a.w;
              t += hi[e] * c.x + hi[e + 1] * c.y + hi[e + 2] * c.z + hi[e + 3] * c.w;
              sx += nv[e] * a.x + nv[e + 1] * a.y + nv[e + 2] * a.z + nv[e + 3] * a.w;
              sx += nv[16 + e] * c.x + nv[17 + e] * c.y + nv[18 + e] * c.z + nv[19 + e] * c.w;
              qq += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
              qq += c.x * c.x + c.y * c.y + c.z * c.z + c.w * c.w;
            }
            acc[j] += sc * t + mn * sx;
            if (SQ) sq[j] += qq;
          }
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NB; j++) {
    acc[j] = warp_sum(acc[j]);
    if (SQ) sq[j] = warp_sum(sq[j]);
  }
}

// Bytes of quants per row.
template <int F>
__device__ __forceinline__ size_t qrow_bytes(int k) {
  return F == Q8_0 ? (size_t)k : (size_t)k / 2;
}

template <int F, int NB>
__device__ void qgemv(const uint8_t* q0, const uint8_t* q1, const uint8_t* q2, const float* s0,
                      const float* s1, const float* s2, const float* m0, const float* m1,
                      const float* m2, int n0, int n1, int n2, const float* b0, const float* b1,
                      const float* b2, const float* x, const float* res, float* y, int k, int b,
                      const float* nw, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int n = n0 + n1 + n2;
  if (row >= n) return;
  int r;
  const int i = pick(row, n0, n1, &r);
  const uint8_t* q = i == 0 ? q0 : i == 1 ? q1 : q2;
  const float* s = i == 0 ? s0 : i == 1 ? s1 : s2;
  const float* m = i == 0 ? m0 : i == 1 ? m1 : m2;
  const float* bias = i == 0 ? b0 : i == 1 ? b1 : b2;
  const size_t blocks = (size_t)k / 32;
  float acc[NB], sq[NB];
  const uint8_t* qr = q + (size_t)r * qrow_bytes<F>(k);
  const float *sr = s + r * blocks, *mr = m ? m + r * blocks : m;
  if (nw)
    qrow_dots<F, NB, true>(qr, sr, mr, x, nw, k, b, acc, sq);
  else
    qrow_dots<F, NB, false>(qr, sr, mr, x, nw, k, b, acc, sq);
  norm_factors<NB>(nw, sq, k, eps);
#pragma unroll
  for (int j = 0; j < NB; j++) acc[j] *= sq[j];
  store_rows<NB>(acc, bias, r, res, y, n, row, b);
}

template <int F, int NB>
__device__ void qgateup(const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su,
                        const float* mg, const float* mu, const float* x, float* out, int n, int k,
                        int b, const float* nw, float eps) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
  const size_t blocks = (size_t)k / 32, rb = qrow_bytes<F>(k);
  float g[NB], u[NB], sq[NB];
  qrow_dots<F, NB, true>(qg + row * rb, sg + row * blocks, mg ? mg + row * blocks : mg, x, nw, k,
                         b, g, sq);
  qrow_dots<F, NB, false>(qu + row * rb, su + row * blocks, mu ? mu + row * blocks : mu, x, nw,
                          k, b, u, sq);
  norm_factors<NB>(nw, sq, k, eps);
#pragma unroll
  for (int j = 0; j < NB; j++) {
    g[j] *= sq[j];
    u[j] *= sq[j];
  }
  store_silu<NB>(g, u, out, n, row, b);
}

#define QGEMV(NAME, F, NB, MINB)                                                                \
  extern "C" __global__ void __launch_bounds__(128, MINB) dec_qgemv_##NAME##_##NB(              \
      const uint8_t* q0, const uint8_t* q1, const uint8_t* q2, const float* s0, const float* s1, \
      const float* s2, const float* m0, const float* m1, const float* m2, int n0, int n1,       \
      int n2, const float* b0, const float* b1, const float* b2, const float* x,               \
      const float* res, float* y, int k, int b, const float* nw, float eps) {                   \
    qgemv<F, NB>(q0, q1, q2, s0, s1, s2, m0, m1, m2, n0, n1, n2, b0, b1, b2, x, res, y, k, b,   \
                 nw, eps);                                                                      \
  }                                                                                             \
  LMKIT_REG(dec_qgemv_##NAME##_##NB)                                                            \
  extern "C" __global__ void __launch_bounds__(128, MINB) dec_qgateup_##NAME##_##NB(            \
      const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su, const float* mg,  \
      const float* mu, const float* x, float* out, int n, int k, int b, const float* nw,        \
      float eps) {                                                                              \
    qgateup<F, NB>(qg, qu, sg, su, mg, mu, x, out, n, k, b, nw, eps);                           \
  }                                                                                             \
  LMKIT_REG(dec_qgateup_##NAME##_##NB)

#define QGEMV_ALL(NAME, F, MINB)                                                              \
  QGEMV(NAME, F, 1, 1) QGEMV(NAME, F, 2, 1) QGEMV(NAME, F, 4, 1) QGEMV(NAME, F, 8, 1)         \
  QGEMV(NAME, F, 16, MINB)
QGEMV_ALL(q8_0, Q8_0, 4)
QGEMV_ALL(q4_1, Q4_1, 3)

// The tensor-core products (dec_tgemv above) for Q8_0 / Q4_1 blocks, dequantized into bf16 as
// B's fragments are packed: a lane's eight values of a row are one 8-byte load of quants (in
// Q4_1, the low nibbles of a block's bytes 0..15 hold its values 0..15, the high ones 16..31).
template <int F>
struct QuantRows {
  const uint8_t* q;
  const float* s;
  const float* m;
  int k;
  __device__ __forceinline__ void load(int g, int col, uint32_t* o) const {
    const int blk = col >> 5, i = col & 31;
    const size_t sb = (size_t)g * (k / 32) + blk;
    const float sc = s[sb], mn = F == Q4_1 ? m[sb] : 0.f;
    float v[8];
    if (F == Q8_0) {
      const uint2 raw = load8(q + (size_t)g * k + col);
      int8_t qv[8];
      memcpy(qv, &raw, 8);
#pragma unroll
      for (int e = 0; e < 8; e++) v[e] = sc * (float)qv[e];
    } else {
      const uint2 raw = load8(q + (size_t)g * (k / 2) + blk * 16 + (i & 15));
      uint8_t qv[8];
      memcpy(qv, &raw, 8);
#pragma unroll
      for (int e = 0; e < 8; e++) v[e] = sc * (float)(i < 16 ? (qv[e] & 15) : (qv[e] >> 4)) + mn;
    }
#pragma unroll
    for (int e = 0; e < 4; e++) o[e] = pack2<bf16>(v[2 * e], v[2 * e + 1]);
  }
};

template <int F>
__device__ void tqgemv(const uint8_t* q0, const uint8_t* q1, const uint8_t* q2, const float* s0,
                       const float* s1, const float* s2, const float* m0, const float* m1,
                       const float* m2, int n0, int n1, int n2, const float* b0, const float* b1,
                       const float* b2, const float* x, const float* res, float* y, int k, int b,
                       const float* nw, float eps) {
  const int n = n0 + n1 + n2, t0 = blockIdx.x * 8;
  if (t0 >= n) return;
  int r0;
  const int i = pick(t0, n0, n1, &r0);
  const float* m = i == 0 ? m0 : i == 1 ? m1 : m2;
  const size_t blocks = (size_t)k / 32;
  const QuantRows<F> w{(i == 0 ? q0 : i == 1 ? q1 : q2) + r0 * qrow_bytes<F>(k),
                       (i == 0 ? s0 : i == 1 ? s1 : s2) + r0 * blocks, m ? m + r0 * blocks : m, k};
  tgemv_tile<bf16>(w, i == 0 ? b0 : i == 1 ? b1 : b2, r0, t0, n, x, res, y, k, b, nw, eps);
}

template <int F>
__device__ void tqgateup(const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su,
                         const float* mg, const float* mu, const float* x, float* out, int n,
                         int k, int b, const float* nw, float eps) {
  const int t0 = blockIdx.x * 8;
  if (t0 >= n) return;
  const size_t blocks = (size_t)k / 32, rb = qrow_bytes<F>(k);
  const QuantRows<F> g{qg + t0 * rb, sg + t0 * blocks, mg ? mg + t0 * blocks : mg, k};
  const QuantRows<F> u{qu + t0 * rb, su + t0 * blocks, mu ? mu + t0 * blocks : mu, k};
  tgateup_tile<bf16>(g, u, t0, n, x, out, k, b, nw, eps);
}

#define TQGEMV(NAME, F)                                                                         \
  extern "C" __global__ void __launch_bounds__(128) dec_tqgemv_##NAME(                          \
      const uint8_t* q0, const uint8_t* q1, const uint8_t* q2, const float* s0, const float* s1, \
      const float* s2, const float* m0, const float* m1, const float* m2, int n0, int n1,       \
      int n2, const float* b0, const float* b1, const float* b2, const float* x,               \
      const float* res, float* y, int k, int b, const float* nw, float eps) {                   \
    tqgemv<F>(q0, q1, q2, s0, s1, s2, m0, m1, m2, n0, n1, n2, b0, b1, b2, x, res, y, k, b, nw,  \
              eps);                                                                             \
  }                                                                                             \
  LMKIT_REG(dec_tqgemv_##NAME)                                                                  \
  extern "C" __global__ void __launch_bounds__(128) dec_tqgateup_##NAME(                        \
      const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su, const float* mg,  \
      const float* mu, const float* x, float* out, int n, int k, int b, const float* nw,        \
      float eps) {                                                                              \
    tqgateup<F>(qg, qu, sg, su, mg, mu, x, out, n, k, b, nw, eps);                              \
  }                                                                                             \
  LMKIT_REG(dec_tqgateup_##NAME)

TQGEMV(q8_0, Q8_0)
TQGEMV(q4_1, Q4_1)

// A token id outside the vocabulary (ids made on the device are not checked on the host):
// its row becomes NaN, so the logits show it, and nothing is read out of the table. The NaN
// also reaches that position's keys and values, so the sequence stays NaN until it is rewound
// past it.
__device__ __forceinline__ bool bad_id(uint32_t id, int vocab, float* out, int c) {
  if (id < (uint32_t)vocab) return false;
  for (int i = threadIdx.x; i < c; i += blockDim.x) out[i] = __int_as_float(0x7fc00000);
  return true;
}

// Embedding rows of a repacked quantized table (layouts as above).
template <int F>
__device__ void qembed(const uint8_t* q, const float* s, const float* m, const uint32_t* ids,
                       float* x, int c, int vocab) {
  const size_t id = ids[blockIdx.x];
  if (bad_id((uint32_t)id, vocab, x + (size_t)blockIdx.x * c, c)) return;
  const uint8_t* row = q + id * qrow_bytes<F>(c);
  const float* sr = s + id * (c / 32);
  float* out = x + (size_t)blockIdx.x * c;
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    const int blk = i / 32, e = i % 32;
    if (F == Q8_0) {
      out[i] = sr[blk] * (float)(int8_t)row[i];
    } else {
      const uint8_t byte = row[blk * 16 + (e & 15)];
      const float v = (float)(e < 16 ? (byte & 15) : (byte >> 4));
      out[i] = sr[blk] * v + m[id * (c / 32) + blk];
    }
  }
}

extern "C" __global__ void dec_qembed_q8_0(const uint8_t* q, const float* s, const float* m,
                                           const uint32_t* ids, float* x, int c, int vocab) {
  qembed<Q8_0>(q, s, m, ids, x, c, vocab);
}
LMKIT_REG(dec_qembed_q8_0)
extern "C" __global__ void dec_qembed_q4_1(const uint8_t* q, const float* s, const float* m,
                                           const uint32_t* ids, float* x, int c, int vocab) {
  qembed<Q4_1>(q, s, m, ids, x, c, vocab);
}
LMKIT_REG(dec_qembed_q4_1)

// ---------------------------------------------------------------------------------------------
// Per-sequence kernels.

template <typename W>
__device__ void embed(const W* e, const uint32_t* ids, float* x, int c, int vocab) {
  float* out = x + (size_t)blockIdx.x * c;
  if (bad_id(ids[blockIdx.x], vocab, out, c)) return;
  const W* row = e + (size_t)ids[blockIdx.x] * c;
  for (int i = threadIdx.x; i < c; i += blockDim.x) out[i] = to_f(row[i]);
}

#define EMBED(W)                                                                                \
  extern "C" __global__ void dec_embed_##W(const W* e, const uint32_t* ids, float* x, int c,    \
                                            int vocab) {                                        \
    embed<W>(e, ids, x, c, vocab);                                                              \
  }                                                                                             \
  LMKIT_REG(dec_embed_##W)
EMBED(f32)
EMBED(bf16)
EMBED(f16)

// The next step's positions and slots: every entry of meta (n) plus one.
extern "C" __global__ void dec_advance(uint32_t* meta, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) meta[i] += 1;
}
LMKIT_REG(dec_advance)

// qkv: (b, (hq + 2·hk)·d) rows [q heads | k heads | v heads]; q out: (b, hq, d).
template <typename KV>
__device__ void rope_append(const float* qkv, float* q, KV* kc, KV* vc, const int* pos,
                            const int* slot, const float* inv_freq, int hq, int hk, int d,
                            int cap) {
  const int j = blockIdx.x, h = blockIdx.y, half = d / 2;
  const float* row = qkv + (size_t)j * (hq + 2 * hk) * d;
  const float p = (float)pos[j];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float sn, cs;
    sincosf(p * inv_freq[i], &sn, &cs);
    if (h < hq) {
      const float* src = row + (size_t)h * d;
      const float x1 = src[i], x2 = src[i + half];
      float* dst = q + ((size_t)j * hq + h) * d;
      dst[i] = x1 * cs - x2 * sn;
      dst[i + half] = x2 * cs + x1 * sn;
    } else {
      const int kh = h - hq;
      const float* ks = row + (size_t)(hq + kh) * d;
      const float* vs = row + (size_t)(hq + hk + kh) * d;
      const size_t o = (((size_t)j * hk + kh) * cap + slot[j]) * d;
      const float x1 = ks[i], x2 = ks[i + half];
      put(kc + o + i, x1 * cs - x2 * sn);
      put(kc + o + i + half, x2 * cs + x1 * sn);
      put(vc + o + i, vs[i]);
      put(vc + o + i + half, vs[i + half]);
    }
  }
}

// Attention in two kernels (split over the cache, as flash-decoding does), so that a short
// batch still fills the GPU: dec_attn_part takes ATT_CH cached positions of one (sequence,
// head) per block, dec_attn_merge combines the chunks. Partials: (b·hq, splits, d + 2) f32,
// per chunk the unnormalized output Σ e^(s−m) v, then m (the chunk's largest score) and
// l = Σ e^(s−m). A chunk past the sequence's length writes m = −∞, l = 0.
#define ATT_CH 64  // positions per block, one per thread (two warps)

template <typename KV>
__device__ void attn_part(const float* q, const KV* kc, const KV* vc, const int* slot,
                          float* part, int hq, int hk, int d, int cap, int splits, float scale) {
  __shared__ float qs[256];
  __shared__ float wsum[ATT_CH / 32][256];
  const int bh = blockIdx.x, sp = blockIdx.y, j = bh / hq, h = bh % hq, kh = h / (hq / hk);
  const int tid = threadIdx.x;
  const int len = slot[j] + 1, t0 = sp * ATT_CH;
  float* out = part + ((size_t)bh * splits + sp) * (d + 2);
  if (t0 >= len) {  // uniform over the block
    for (int i = tid; i < d; i += blockDim.x) out[i] = 0.f;
    if (tid == 0) {
      out[d] = -INFINITY;
      out[d + 1] = 0.f;
    }
    return;
  }
  const size_t base = ((size_t)j * hk + kh) * cap * d;
  const KV* K = kc + base;
  const KV* V = vc + base;
  for (int i = tid; i < d; i += blockDim.x) qs[i] = q[(size_t)bh * d + i] * scale;
  __syncthreads();
  const int t = t0 + tid;
  float sc = -INFINITY;
  if (t < len) {
    const KV* kr = K + (size_t)t * d;
    constexpr int KPL = 16 / sizeof(KV);  // keys per 16-byte load
    sc = 0.f;
    if (d % KPL == 0 && aligned16(kr)) {
      for (int i = 0; i < d; i += KPL) {
        const uint4 raw = load16<uint4>(kr + i);
        KV kv[KPL];
        memcpy(kv, &raw, 16);
#pragma unroll
        for (int e = 0; e < KPL; e++) sc += qs[i + e] * to_f(kv[e]);
      }
    } else {
      for (int i = 0; i < d; i++) sc += qs[i] * to_f(kr[i]);
    }
  }
  const float mx = block_max(sc);
  const float e = t < len ? expf(sc - mx) : 0.f;
  const float l = block_sum(e);
  // Each warp sums its 32 positions' e·v into wsum[w]. Fast path: a row of V is `lpr` lanes
  // of one 16-byte load each, so one load instruction covers 32 / lpr rows and every lane's
  // loads are independent of each other (a loop of one row per step waited a full memory
  // latency per row: 22 µs a call on an H200, the step's largest kernel). The lanes with the
  // same dimensions then add their rows' sums by shuffles.
  const int lane = tid & 31, w = tid >> 5;
  constexpr int VPL = 16 / sizeof(KV);  // values per 16-byte load
  const int lpr = d / VPL, r0 = t0 + w * 32;
  const int rows = min(32, len - r0);  // this warp's positions (uniform over the warp)
  if (d % VPL == 0 && lpr <= 32 && (32 % lpr) == 0 && aligned16(V)) {
    const int rpi = 32 / lpr, sub = lane / lpr, col = (lane % lpr) * VPL;
    float acc[VPL];
#pragma unroll
    for (int e2 = 0; e2 < VPL; e2++) acc[e2] = 0.f;
#pragma unroll 4
    for (int k = 0; k < lpr; k++) {
      const int r = k * rpi + sub;
      const float er = __shfl_xor_sync(0xffffffffu, e, lane ^ r);  // lane r's weight
      if (r < rows) {
        const uint4 raw = load16<uint4>(V + (size_t)(r0 + r) * d + col);
        KV kv[VPL];
        memcpy(kv, &raw, 16);
#pragma unroll
        for (int e2 = 0; e2 < VPL; e2++) acc[e2] += er * to_f(kv[e2]);
      }
    }
    for (int off = lpr; off < 32; off <<= 1) {
#pragma unroll
      for (int e2 = 0; e2 < VPL; e2++) acc[e2] += __shfl_xor_sync(0xffffffffu, acc[e2], off);
    }
    if (sub == 0) {
#pragma unroll
      for (int e2 = 0; e2 < VPL; e2++) wsum[w][col + e2] = acc[e2];
    }
  } else {
    float acc[8];
#pragma unroll
    for (int u = 0; u < 8; u++) acc[u] = 0.f;
    for (int r = 0; r < 32; r++) {
      const float er = __shfl_xor_sync(0xffffffffu, e, lane ^ r);  // lane r's weight
      if (r >= rows) break;  // uniform over the warp
      const KV* vr = V + (size_t)(r0 + r) * d;
#pragma unroll
      for (int u = 0; u < 8; u++) {
        const int i = lane + 32 * u;
        if (i < d) acc[u] += er * to_f(vr[i]);
      }
    }
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int i = lane + 32 * u;
      if (i < d) wsum[w][i] = acc[u];
    }
  }
  __syncthreads();
  for (int i = tid; i < d; i += blockDim.x) {
    float v = 0.f;
    for (int u = 0; u < ATT_CH / 32; u++) v += wsum[u][i];
    out[i] = v;
  }
  if (tid == 0) {
    out[d] = mx;
    out[d + 1] = l;
  }
}

// y (b, hq·d): y = Σ_c e^(m_c − M) acc_c / Σ_c e^(m_c − M) l_c, M = max_c m_c.   Block per
// (sequence, head).
__device__ void attn_merge(const float* part, float* y, int hq, int d, int splits) {
  const int bh = blockIdx.x, j = bh / hq, h = bh % hq;
  const float* p = part + (size_t)bh * splits * (d + 2);
  float M = -INFINITY;
  for (int c = 0; c < splits; c++) M = fmaxf(M, p[(size_t)c * (d + 2) + d]);
  float L = 0.f;
  for (int c = 0; c < splits; c++) {
    const float* pc = p + (size_t)c * (d + 2);
    if (pc[d + 1] > 0.f) L += expf(pc[d] - M) * pc[d + 1];
  }
  const float inv = 1.f / L;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = 0.f;
    for (int c = 0; c < splits; c++) {
      const float* pc = p + (size_t)c * (d + 2);
      if (pc[d + 1] > 0.f) v += expf(pc[d] - M) * pc[i];
    }
    y[(size_t)j * hq * d + (size_t)h * d + i] = v * inv;
  }
}

extern "C" __global__ void dec_attn_merge(const float* part, float* y, int hq, int d,
                                          int splits) {
  attn_merge(part, y, hq, d, splits);
}
LMKIT_REG(dec_attn_merge)

#define PER_KV(KV)                                                                              \
  extern "C" __global__ void dec_rope_append_##KV(                                              \
      const float* qkv, float* q, KV* kc, KV* vc, const int* pos, const int* slot,              \
      const float* inv_freq, int hq, int hk, int d, int cap) {                                  \
    rope_append<KV>(qkv, q, kc, vc, pos, slot, inv_freq, hq, hk, d, cap);                       \
  }                                                                                             \
  LMKIT_REG(dec_rope_append_##KV)                                                               \
  extern "C" __global__ void dec_attn_part_##KV(                                                \
      const float* q, const KV* kc, const KV* vc, const int* slot, float* part, int hq, int hk, \
      int d, int cap, int splits, float scale) {                                                \
    attn_part<KV>(q, kc, vc, slot, part, hq, hk, d, cap, splits, scale);                        \
  }                                                                                             \
  LMKIT_REG(dec_attn_part_##KV)
PER_KV(f32)
PER_KV(bf16)
PER_KV(f16)
