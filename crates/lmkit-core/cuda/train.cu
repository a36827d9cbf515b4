// lmkit's kernels for the device training step of a dense Llama (lmkit_train::body_gpu): the
// elementwise and row-wise work between the step's cuBLAS products, each fused so that a tensor
// is read and written once. Compiled to PTX by build.rs with the `cuda` feature, and as C++ for
// the CPU emulator with `cuda-emu` (cuda/emu/, which runs these same kernels in the tests).
//
// The residual stream x and the norms' weights are f32; T (f32, bf16, f16) is the compute dtype
// of the products' inputs and outputs. All arithmetic is f32.
//
// tr_rms_fwd     a = x̂ ⊙ w,  x̂ = x·r,  r = (mean(x²) + ε)^(−½)                  warp per row
// tr_rms_bwd     dx (+)= r·(g⊙w − x̂·mean(x̂ ⊙ g⊙w)), also written in T when dx_lp is set;
//                dw = Σ_rows g ⊙ x̂ as one partial sum per block (the caller adds them up).
//                                                         rows strided over the blocks
// tr_rope_split  rows (b·t, ·) of q, k, v (one stacked product [q | k | v], or three) (+ bias)
//                → q (b, h, t, d),
//                k, v (b, kh, cap, d) at positions off.., q and k rotated by +θ (HF's
//                rotate-half pairs (i, i+d/2), angle pos·θᵢ, the tables' row i for token i);
//                with cap = t, off = 0 for training, a KV cache's capacity and length for a
//                prompt. tr_rope_merge is its adjoint (cap = t): rotation by −θ, heads back
//                into packed rows (the gradients of q, k, v into that of the packed product).
// tr_silu_mul    m = silu(g) ⊙ u, rows of g and u of stride ld (the halves of [g | u], or two)
// tr_silu_mul_bwd  dg = dm ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),  du = dm ⊙ silu(g)
// tr_add         out = x + y  (x, out f32; y in T: a residual add)
//
// Causal attention without the (t × t) probabilities (FlashAttention-2's schedule: Dao, 2023,
// arXiv:2307.08691), on tensor cores (wmma tiles of 16×16×16, 16-bit inputs, f32 sums), for
// T = bf16/f16 and head sizes D = 64, 128. q (b, h, t, D); k, v (b, kh, t, D), query head j
// reading kv head j / (h/kh); s the softmax scale. Position p sees keys 0..p.
// tr_flash_fwd   y = softmax(s·q kᵀ) v per head, written as rows (b·t, h·D) (the layout of the
//                output projection's input); lse = m + log Σ exp(s·q kᵀ − m) per row (b, h, t).
//                k, v hold cap positions per head; query i is at position off + i (a prompt
//                after off cached tokens) and sees keys 0..off + i.
//                Per block 16·W query rows (W warps of 16), over key tiles of 32 kept in
//                shared memory: S → online softmax (running max m and sum l per row, the
//                output rescaled by exp(m_old − m_new)) → O += P v.
// tr_attn_dot    δ = rowsum(dy ⊙ y) per (row, head)                                warp each
// tr_flash_bwd_kv  per block 16·W keys of one kv head, over its query heads and the query
//                tiles that see them: P = exp(s·q kᵀ − lse), dv += Pᵀ dy, dP = dy vᵀ,
//                dS = s·P ⊙ (dP − δ), dk += dSᵀ q
// tr_flash_bwd_q per block 16·W query rows, over the key tiles they see: dq += dS k
// Recomputing S in both backward kernels (FlashAttention-2 does one kernel with atomic adds
// into dq) keeps every sum in registers and the results deterministic.

#ifdef LMKIT_EMU
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>
#define LMKIT_REG(name)
#endif

typedef float f32;
typedef __nv_bfloat16 bf16;
typedef __half f16;

#include "common.cuh"

// Grid-stride loop over [0, n).
#define FOR_EACH(i, n)                                                                          \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                     \
       i += (int64_t)gridDim.x * blockDim.x)

template <typename T>
__device__ void rms_fwd(const float* x, const float* w, T* a, int rows, int c, float eps) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // a whole warp leaves together
  const float* xr = x + row * c;
  float ss = 0.f;
  for (int j = lane; j < c; j += 32) ss += xr[j] * xr[j];
  const float r = rsqrtf(warp_sum(ss) / c + eps);
  T* ar = a + row * c;
  for (int j = lane; j < c; j += 32) put(ar + j, xr[j] * r * w[j]);
}

// Columns per thread of tr_rms_bwd: c ≤ RMS_COLS · blockDim.x.
#define RMS_COLS 16

template <typename T>
__device__ void rms_bwd(const float* x, const float* w, const T* g, float* dx, T* dx_lp,
                        float* part, int rows, int c, float eps, int accumulate) {
  float acc[RMS_COLS];
#pragma unroll
  for (int k = 0; k < RMS_COLS; ++k) acc[k] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* xr = x + row * c;
    const T* gr = g + row * c;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
      ss += xr[j] * xr[j];
      dot += xr[j] * to_f(gr[j]) * w[j];
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    const float r = rsqrtf(ss / c + eps);
    dot *= r / c;  // mean(x̂ ⊙ g ⊙ w)
    float* dr = dx + row * c;
#pragma unroll
    for (int k = 0; k < RMS_COLS; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (j < c) {
        const float xh = xr[j] * r, gj = to_f(gr[j]);
        float v = r * (gj * w[j] - xh * dot);
        if (accumulate) v += dr[j];
        dr[j] = v;
        if (dx_lp) put(dx_lp + row * c + j, v);
        acc[k] += gj * xh;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < RMS_COLS; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < c) part[(int64_t)blockIdx.x * c + j] = acc[k];
  }
}

// One pair (i, i + d/2) of one head of one row per iteration. The rows side is three row-major
// matrices rq (b·t, ldq), rk and rv (b·t, ldk) holding q, k, v's heads side by side: the
// columns of one stacked product (rk = rq + h·d, ...), or three products. `back` 0: rows →
// heads, rotation +θ, bias added first; `back` 1: heads → rows, rotation −θ.
template <typename T>
__device__ void rope_move(T* rq, T* rk, T* rv, int ldq, int ldk, T* q, T* k, T* v,
                          const float* bias, const float* cos, const float* sin, int b, int t,
                          int h, int kh, int d, int cap, int off, int back) {
  const int half = d / 2, heads = h + 2 * kh;
  const int64_t total = (int64_t)b * t * heads * half;
  FOR_EACH(i, total) {
    const int p = (int)(i % half);
    const int64_t rest = i / half;
    const int j = (int)(rest % heads);
    const int64_t row = rest / heads;  // b·t rows
    const int pos = (int)(row % t), bi = (int)(row / t);
    T *base, *pk;
    int rotate = 1;
    if (j < h) {
      base = q + (((int64_t)bi * h + j) * t + pos) * d;
      pk = rq + row * ldq + (int64_t)j * d;
    } else if (j < h + kh) {
      base = k + (((int64_t)bi * kh + (j - h)) * cap + off + pos) * d;
      pk = rk + row * ldk + (int64_t)(j - h) * d;
    } else {
      base = v + (((int64_t)bi * kh + (j - h - kh)) * cap + off + pos) * d;
      pk = rv + row * ldk + (int64_t)(j - h - kh) * d;
      rotate = 0;
    }
    const float cs = rotate ? cos[(int64_t)pos * half + p] : 1.f;
    const float sn = rotate ? sin[(int64_t)pos * half + p] : 0.f;
    if (!back) {
      float x1 = to_f(pk[p]), x2 = to_f(pk[p + half]);
      if (bias) {
        x1 += bias[j * d + p];
        x2 += bias[j * d + p + half];
      }
      put(base + p, x1 * cs - x2 * sn);
      put(base + p + half, x2 * cs + x1 * sn);
    } else {
      const float y1 = to_f(base[p]), y2 = to_f(base[p + half]);
      put(pk + p, y1 * cs + y2 * sn);
      put(pk + p + half, y2 * cs - y1 * sn);
    }
  }
}

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// g and u rows of stride ld: the halves of one stacked product (u = g + f, ld = 2f), or two.
template <typename T>
__device__ void silu_mul(const T* g_, const T* u_, int ld, T* m, int rows, int f) {
  FOR_EACH(i, (int64_t)rows * f) {
    const int64_t row = i / f, j = i - row * f;
    const float g = to_f(g_[row * ld + j]), u = to_f(u_[row * ld + j]);
    put(m + i, g * sigmoid(g) * u);
  }
}

template <typename T>
__device__ void silu_mul_bwd(const T* gu, const T* dm, T* dgu, int rows, int f) {
  FOR_EACH(i, (int64_t)rows * f) {
    const int64_t row = i / f, j = i - row * f;
    const int64_t ig = row * 2 * f + j, iu = ig + f;
    const float g = to_f(gu[ig]), u = to_f(gu[iu]), d = to_f(dm[i]), s = sigmoid(g);
    put(dgu + ig, d * u * s * (1.f + g * (1.f - s)));
    put(dgu + iu, d * g * s);
  }
}

template <typename T>
__device__ void add(const float* x, const T* y, float* out, int n) {
  FOR_EACH(i, n) out[i] = x[i] + to_f(y[i]);
}

// ---------------------------------------------------------------------------------------------
// Causal flash attention (16-bit T only).

#ifndef LMKIT_EMU
using namespace nvcuda;
#else
namespace wmma = nvcuda::wmma;
#endif

#define FA_T 32  // key (forward, dq) or query (dk/dv) positions per tile

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  T x;
  put(&x, v);
  return x;
}

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;

// out (16 × 16·NT, f32, row stride ldo) = a (16 × D, row stride lda) · bᵀ, b (16·NT × D, row
// stride ldb): a warp's product of its rows with a tile's rows.
template <typename T, int D, int NT>
__device__ void rows_by_rows(const T* a, int lda, const T* b, int ldb, float* out, int ldo) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      FragA<T> fa;
      FragBc<T> fb;
      wmma::load_matrix_sync(fa, a + kk * 16, lda);
      wmma::load_matrix_sync(fb, b + n * 16 * ldb + kk * 16, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, ldo, wmma::mem_row_major);
  }
}

// acc[n] += p (16 × K, row stride ldp) · m (K × 16·N, row stride ldm), for the N accumulators of a
// warp's 16 × 16·N result.
template <typename T, int K, int N>
__device__ void acc_product(Acc* acc, const T* p, int ldp, const T* m, int ldm) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      FragA<T> fa;
      FragBr<T> fb;
      wmma::load_matrix_sync(fa, p + kk * 16, ldp);
      wmma::load_matrix_sync(fb, m + kk * 16 * ldm + n * 16, ldm);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Copies rows [r0, r0 + R) of a (rows, D) matrix whose row i starts at src + i·stride into
// shared dst (R × D), zeros past `rows`.
template <typename T, int D>
__device__ void load_rows(T* dst, const T* src, int64_t stride, int r0, int R, int rows) {
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    const int r = r0 + i / D, c = i % D;
    dst[i] = r < rows ? src[(int64_t)r * stride + c] : from_f<T>(0.f);
  }
}

// Writes a warp's 16 × D result (accumulators acc[D/16]) scaled by k to rows [r0, r0 + 16) of
// dst (row i at dst + i·stride), skipping rows ≥ rows; stage is 16 × 16 f32 of shared memory.
template <typename T, int D>
__device__ void store_rows(const Acc* acc, float* stage, T* dst, int64_t stride, int r0, int rows,
                           float k) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage, acc[n], 16, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < 256; i += 32) {
      const int r = r0 + i / 16;
      if (r < rows) put(dst + (int64_t)r * stride + n * 16 + i % 16, stage[i] * k);
    }
    __syncwarp();
  }
}

template <typename T, int D, int W>
__device__ void flash_fwd(const T* q, const T* k, const T* v, T* y, float* lse, int t, int h,
                          int kh, float scale, int cap, int off) {
  constexpr int BQ = 16 * W;
  __shared__ __align__(32) T qs[BQ * D];
  __shared__ __align__(32) T ks[FA_T * D];
  __shared__ __align__(32) T vs[FA_T * D];
  __shared__ __align__(32) float ss[W][16 * FA_T];
  __shared__ __align__(32) T ps[W][16 * FA_T];
  __shared__ __align__(32) float os[W][16 * D];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head = blockIdx.y, bi = head / h, j = head % h, kv = j / (h / kh);
  // Query row i (of t) is at position off + i and sees keys 0..off + i; k and v hold cap
  // positions per head.
  const int q0 = blockIdx.x * BQ, w0 = off + q0 + warp * 16, nk = off + t;
  const T* kh_ = k + ((int64_t)bi * kh + kv) * cap * D;
  const T* vh_ = v + ((int64_t)bi * kh + kv) * cap * D;
  load_rows<T, D>(qs, q + (int64_t)head * t * D, D, q0, BQ, t);
  for (int i = lane; i < 16 * D; i += 32) os[warp][i] = 0.f;
  // Row `row` of the warp's 16 belongs to lanes 2·row and 2·row + 1, each with half the columns.
  const int row = lane >> 1, half = lane & 1, qpos = w0 + row, qi = qpos - off;
  float m = -INFINITY, l = 0.f;
  const int last = off + min(t - 1, q0 + BQ - 1);
  for (int k0 = 0; k0 <= last; k0 += FA_T) {
    __syncthreads();
    load_rows<T, D>(ks, kh_, D, k0, FA_T, nk);
    load_rows<T, D>(vs, vh_, D, k0, FA_T, nk);
    __syncthreads();
    if (k0 > w0 + 15) continue;  // the whole tile is after this warp's rows
    rows_by_rows<T, D, FA_T / 16>(qs + warp * 16 * D, D, ks, D, ss[warp], FA_T);
    __syncwarp();
    float* sr = ss[warp] + row * FA_T + half * (FA_T / 2);
    float mx = -INFINITY;
    for (int c = 0; c < FA_T / 2; ++c) {
      const int kpos = k0 + half * (FA_T / 2) + c;
      const float sv = kpos <= qpos ? sr[c] * scale : -INFINITY;
      sr[c] = sv;
      mx = fmaxf(mx, sv);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float mn = fmaxf(m, mx);
    const float corr = m == -INFINITY ? 0.f : expf(m - mn);
    float sum = 0.f;
    T* pr = ps[warp] + row * FA_T + half * (FA_T / 2);
    for (int c = 0; c < FA_T / 2; ++c) {
      const float p = mn == -INFINITY ? 0.f : expf(sr[c] - mn);
      sum += p;
      put(pr + c, p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * corr + sum;
    m = mn;
    float* orow = os[warp] + row * D + half * (D / 2);
    for (int c = 0; c < D / 2; ++c) orow[c] *= corr;
    __syncwarp();
    for (int n = 0; n < D / 16; ++n) {
      Acc acc;
      wmma::load_matrix_sync(acc, os[warp] + n * 16, D, wmma::mem_row_major);
      acc_product<T, FA_T, 1>(&acc, ps[warp], FA_T, vs + n * 16, D);
      wmma::store_matrix_sync(os[warp] + n * 16, acc, D, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (qi < t) {
    const float inv = 1.f / l;
    const float* orow = os[warp] + row * D + half * (D / 2);
    T* yr = y + ((int64_t)(bi * t + qi) * h + j) * D + half * (D / 2);
    for (int c = 0; c < D / 2; ++c) put(yr + c, orow[c] * inv);
    if (lse && half == 0) lse[(int64_t)head * t + qi] = m + logf(l);
  }
}

template <typename T>
__device__ void attn_dot(const T* y, const T* dy, float* dd, int b, int t, int h, int d) {
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= (int64_t)b * t * h) return;  // a whole warp leaves together
  const int64_t row = w / h;            // b·t rows
  const int j = (int)(w % h);
  const T* yr = y + w * d;
  const T* gr = dy + w * d;
  float s = 0.f;
  for (int c = lane; c < d; c += 32) s += to_f(yr[c]) * to_f(gr[c]);
  s = warp_sum(s);
  if (lane == 0) dd[((row / t) * h + j) * t + row % t] = s;
}

template <typename T, int D, int W>
__device__ void flash_bwd_kv(const T* q, const T* k, const T* v, const T* dy, const float* lse,
                             const float* dd, T* dk, T* dv, int t, int h, int kh, float scale) {
  constexpr int BK = 16 * W;
  __shared__ __align__(32) T ks[BK * D];
  __shared__ __align__(32) T vs[BK * D];
  __shared__ __align__(32) T qs[FA_T * D];
  __shared__ __align__(32) T gs[FA_T * D];
  __shared__ float ls[FA_T], ds[FA_T];
  __shared__ __align__(32) float ss[W][16 * FA_T];
  __shared__ __align__(32) T ps[W][16 * FA_T];
  __shared__ __align__(32) T dss[W][16 * FA_T];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kvh = blockIdx.y, bi = kvh / kh, kv = kvh % kh, g = h / kh;
  const int k0 = blockIdx.x * BK, w0 = k0 + warp * 16;
  load_rows<T, D>(ks, k + (int64_t)kvh * t * D, D, k0, BK, t);
  load_rows<T, D>(vs, v + (int64_t)kvh * t * D, D, k0, BK, t);
  Acc adk[D / 16], adv[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(adk[n], 0.f);
    wmma::fill_fragment(adv[n], 0.f);
  }
  // Key `row` of the warp's 16 belongs to lanes 2·row and 2·row + 1, each with half the queries.
  const int row = lane >> 1, half = lane & 1, kpos = w0 + row;
  for (int jj = 0; jj < g; ++jj) {
    const int j = kv * g + jj, head = bi * h + j;
    for (int q0 = (k0 / FA_T) * FA_T; q0 < t; q0 += FA_T) {
      __syncthreads();
      load_rows<T, D>(qs, q + (int64_t)head * t * D, D, q0, FA_T, t);
      load_rows<T, D>(gs, dy + ((int64_t)bi * t * h + j) * D, (int64_t)h * D, q0, FA_T, t);
      for (int i = threadIdx.x; i < FA_T; i += blockDim.x) {
        const int p = q0 + i;
        ls[i] = p < t ? lse[(int64_t)head * t + p] : INFINITY;
        ds[i] = p < t ? dd[(int64_t)head * t + p] : 0.f;
      }
      __syncthreads();
      if (w0 > q0 + FA_T - 1) continue;  // every query of the tile is before this warp's keys
      // Sᵀ (16 keys × FA_T queries), then Pᵀ.
      rows_by_rows<T, D, FA_T / 16>(ks + warp * 16 * D, D, qs, D, ss[warp], FA_T);
      __syncwarp();
      float* sr = ss[warp] + row * FA_T + half * (FA_T / 2);
      T* pr = ps[warp] + row * FA_T + half * (FA_T / 2);
      for (int c = 0; c < FA_T / 2; ++c) {
        const int ci = half * (FA_T / 2) + c, qpos = q0 + ci;
        put(pr + c, kpos <= qpos ? expf(sr[c] * scale - ls[ci]) : 0.f);
      }
      __syncwarp();
      acc_product<T, FA_T, D / 16>(adv, ps[warp], FA_T, gs, D);  // dv += Pᵀ dy
      // dPᵀ = v dyᵀ, then dSᵀ = s·Pᵀ ⊙ (dPᵀ − δ).
      rows_by_rows<T, D, FA_T / 16>(vs + warp * 16 * D, D, gs, D, ss[warp], FA_T);
      __syncwarp();
      T* dr = dss[warp] + row * FA_T + half * (FA_T / 2);
      for (int c = 0; c < FA_T / 2; ++c) {
        const int ci = half * (FA_T / 2) + c;
        put(dr + c, scale * to_f(pr[c]) * (sr[c] - ds[ci]));
      }
      __syncwarp();
      acc_product<T, FA_T, D / 16>(adk, dss[warp], FA_T, qs, D);  // dk += dSᵀ q
    }
  }
  __syncwarp();
  T* dkh = dk + (int64_t)kvh * t * D;
  T* dvh = dv + (int64_t)kvh * t * D;
  store_rows<T, D>(adk, ss[warp], dkh, D, w0, t, 1.f);
  store_rows<T, D>(adv, ss[warp], dvh, D, w0, t, 1.f);
}

template <typename T, int D, int W>
__device__ void flash_bwd_q(const T* q, const T* k, const T* v, const T* dy, const float* lse,
                            const float* dd, T* dq, int t, int h, int kh, float scale) {
  constexpr int BQ = 16 * W;
  __shared__ __align__(32) T qs[BQ * D];
  __shared__ __align__(32) T gs[BQ * D];
  __shared__ __align__(32) T ks[FA_T * D];
  __shared__ __align__(32) T vs[FA_T * D];
  __shared__ __align__(32) float ss[W][16 * FA_T];
  __shared__ __align__(32) T ps[W][16 * FA_T];
  __shared__ __align__(32) T dss[W][16 * FA_T];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head = blockIdx.y, bi = head / h, j = head % h, kv = j / (h / kh);
  const int q0 = blockIdx.x * BQ, w0 = q0 + warp * 16;
  const T* kh_ = k + ((int64_t)bi * kh + kv) * t * D;
  const T* vh_ = v + ((int64_t)bi * kh + kv) * t * D;
  load_rows<T, D>(qs, q + (int64_t)head * t * D, D, q0, BQ, t);
  load_rows<T, D>(gs, dy + ((int64_t)bi * t * h + j) * D, (int64_t)h * D, q0, BQ, t);
  const int row = lane >> 1, half = lane & 1, qpos = w0 + row;
  const float l_row = qpos < t ? lse[(int64_t)head * t + qpos] : INFINITY;
  const float d_row = qpos < t ? dd[(int64_t)head * t + qpos] : 0.f;
  Acc adq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(adq[n], 0.f);
  const int last = min(t - 1, q0 + BQ - 1);
  for (int k0 = 0; k0 <= last; k0 += FA_T) {
    __syncthreads();
    load_rows<T, D>(ks, kh_, D, k0, FA_T, t);
    load_rows<T, D>(vs, vh_, D, k0, FA_T, t);
    __syncthreads();
    if (k0 > w0 + 15) continue;
    rows_by_rows<T, D, FA_T / 16>(qs + warp * 16 * D, D, ks, D, ss[warp], FA_T);
    __syncwarp();
    float* sr = ss[warp] + row * FA_T + half * (FA_T / 2);
    T* pr = ps[warp] + row * FA_T + half * (FA_T / 2);
    for (int c = 0; c < FA_T / 2; ++c) {
      const int kpos = k0 + half * (FA_T / 2) + c;
      put(pr + c, kpos <= qpos ? expf(sr[c] * scale - l_row) : 0.f);
    }
    __syncwarp();
    rows_by_rows<T, D, FA_T / 16>(gs + warp * 16 * D, D, vs, D, ss[warp], FA_T);  // dP = dy vᵀ
    __syncwarp();
    T* dr = dss[warp] + row * FA_T + half * (FA_T / 2);
    for (int c = 0; c < FA_T / 2; ++c) put(dr + c, scale * to_f(pr[c]) * (sr[c] - d_row));
    __syncwarp();
    acc_product<T, FA_T, D / 16>(adq, dss[warp], FA_T, ks, D);  // dq += dS k
  }
  __syncwarp();
  store_rows<T, D>(adq, ss[warp], dq + (int64_t)head * t * D, D, w0, t, 1.f);
}

#define FLASH_KERNELS(S, D, W)                                                                    \
  extern "C" __global__ void __launch_bounds__(32 * W) tr_flash_fwd_##D##_##S(const S* q, const S* k, const S* v, S* y,    \
                                                    float* lse, int t, int h, int kh,            \
                                                    float scale, int cap, int off) {             \
    flash_fwd<S, D, W>(q, k, v, y, lse, t, h, kh, scale, cap, off);                               \
  }                                                                                               \
  LMKIT_REG(tr_flash_fwd_##D##_##S)                                                               \
  extern "C" __global__ void __launch_bounds__(32 * W) tr_flash_bwd_kv_##D##_##S(                 \
      const S* q, const S* k, const S* v, const S* dy, const float* lse, const float* dd, S* dk, \
      S* dv, int t, int h, int kh, float scale) {                                                 \
    flash_bwd_kv<S, D, W>(q, k, v, dy, lse, dd, dk, dv, t, h, kh, scale);                         \
  }                                                                                               \
  LMKIT_REG(tr_flash_bwd_kv_##D##_##S)                                                            \
  extern "C" __global__ void __launch_bounds__(32 * W) tr_flash_bwd_q_##D##_##S(                  \
      const S* q, const S* k, const S* v,                                                         \
                                                      const S* dy, const float* lse,             \
                                                      const float* dd, S* dq, int t, int h,      \
                                                      int kh, float scale) {                     \
    flash_bwd_q<S, D, W>(q, k, v, dy, lse, dd, dq, t, h, kh, scale);                              \
  }                                                                                               \
  LMKIT_REG(tr_flash_bwd_q_##D##_##S)

// Warps per block: 4 for D = 64, 2 for D = 128. Static shared memory: 45 / 47 KB forward,
// 41 KB backward, of the 48 KB a block may declare statically (no room for another array).

// 16-bit wmma needs sm_80 or newer; older targets build without these kernels, which
// `BlockOps::has_flash` sees: training then materializes attention's probabilities, and
// prompts on the fused-decoding cache take candle's ops.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
FLASH_KERNELS(bf16, 64, 4)
FLASH_KERNELS(bf16, 128, 2)
FLASH_KERNELS(f16, 64, 4)
FLASH_KERNELS(f16, 128, 2)
#endif

#define DOT_KERNEL(S)                                                                             \
  extern "C" __global__ void tr_attn_dot_##S(const S* y, const S* dy, float* dd, int b, int t,   \
                                             int h, int d) {                                     \
    attn_dot<S>(y, dy, dd, b, t, h, d);                                                           \
  }                                                                                               \
  LMKIT_REG(tr_attn_dot_##S)

DOT_KERNEL(bf16)
DOT_KERNEL(f16)

#define TRAIN_KERNELS(S)                                                                          \
  extern "C" __global__ void tr_rms_fwd_##S(const float* x, const float* w, S* a, int rows, \
                                            int c, float eps) {                                  \
    rms_fwd<S>(x, w, a, rows, c, eps);                                                            \
  }                                                                                               \
  LMKIT_REG(tr_rms_fwd_##S)                                                                       \
  extern "C" __global__ void __launch_bounds__(1024)                                              \
      tr_rms_bwd_##S(const float* x, const float* w, const S* g,                                  \
                                            float* dx, S* dx_lp, float* part, int rows,      \
                                            int c, float eps, int accumulate) {                  \
    rms_bwd<S>(x, w, g, dx, dx_lp, part, rows, c, eps, accumulate);                               \
  }                                                                                               \
  LMKIT_REG(tr_rms_bwd_##S)                                                                       \
  extern "C" __global__ void tr_rope_split_##S(S* rq, S* rk, S* rv, int ldq, int ldk, S* q,     \
                                               S* k, S* v, const float* bias, const float* cos,  \
                                               const float* sin, int b, int t, int h, int kh,    \
                                               int d, int cap, int off) {                        \
    rope_move<S>(rq, rk, rv, ldq, ldk, q, k, v, bias, cos, sin, b, t, h, kh, d, cap, off, 0);     \
  }                                                                                               \
  LMKIT_REG(tr_rope_split_##S)                                                                    \
  extern "C" __global__ void tr_rope_merge_##S(S* packed, S* q, S* k, S* v, const float* cos,    \
                                               const float* sin, int b, int t, int h, int kh,    \
                                               int d) {                                          \
    const int w = (h + 2 * kh) * d;                                                               \
    rope_move<S>(packed, packed + h * d, packed + (h + kh) * d, w, w, q, k, v, nullptr, cos, sin, \
                 b, t, h, kh, d, t, 0, 1);                                                        \
  }                                                                                               \
  LMKIT_REG(tr_rope_merge_##S)                                                                    \
  extern "C" __global__ void tr_silu_mul_##S(const S* g, const S* u, int ld, S* m, int rows,    \
                                             int f) {                                            \
    silu_mul<S>(g, u, ld, m, rows, f);                                                            \
  }                                                                                               \
  LMKIT_REG(tr_silu_mul_##S)                                                                      \
  extern "C" __global__ void tr_silu_mul_bwd_##S(const S* gu, const S* dm, S* dgu, int rows, \
                                                 int f) {                                        \
    silu_mul_bwd<S>(gu, dm, dgu, rows, f);                                                        \
  }                                                                                               \
  LMKIT_REG(tr_silu_mul_bwd_##S)                                                                  \
  extern "C" __global__ void tr_add_##S(const float* x, const S* y, float* out, int n) {      \
    add<S>(x, y, out, n);                                                                         \
  }                                                                                               \
  LMKIT_REG(tr_add_##S)

TRAIN_KERNELS(f32)
TRAIN_KERNELS(bf16)
TRAIN_KERNELS(f16)
