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
// tr_rms_bwd_wG  the same, one warp per row, for rows of at most 256·G (G = 1..4) warp per row
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
// tr_scale       out = x · s[0]  (s a device scalar, f32)
// tr_xent        the output layer's cross-entropy per row, nll = logsumexp(z) − z_y, with its
//                gradient coef·(softmax(z) − onehot(y)) written over the logits  block per row
// tr_colsum      the column sums of tr_rms_bwd*'s per-block partials (f32 only)
//
// The optimizer over many f32 tensors at once, up to MT = 8 per launch (PyTorch's foreach /
// fused AdamW), so that a step of a model with ~100 weight tensors is ~30 launches, where one
// tensor op per tensor and step of the norm and the update made ~600:
// tr_sumsq_x8    part[block] = Σ g² over the launch's tensors, one partial per block
// tr_clip_scale  norm = √(Σ part)·mean, out = [norm, min(1, c / (norm + 1e-6))·mean] (c ≤ 0: no
//                clipping), summed in a fixed order (the same bits on every run); out[1] is NaN
//                when the norm is not finite
// tr_adamw_x8    AdamW in place (adam_elem, common.cuh) with the gradients scaled by out[1];
//                nothing at all when out[1] is not finite (a skipped step)
// tr_cast_x8     d = s in T for eight f32 tensors (the master weights into the step's compute-
//                dtype copies, each at its offset in a stacked buffer such as [q | k | v])
// tr_widen_x8    d = s in f32 for eight T tensors (the weight gradients, for the f32 master
//                weights and the optimizer)
// tr_sum_x8      o = a + b for eight f32 tensors (gradient accumulation; o may be a)
//
// Causal attention without the (t × t) probabilities (FlashAttention-2's schedule: Dao, 2023,
// arXiv:2307.08691), on tensor cores (mma.sync.m16n8k16: 16-bit inputs, f32 sums), for
// T = bf16/f16 and head sizes D = 64, 128. q (b, h, t, D); k, v (b, kh, t, D), query head j
// reading kv head j / (h/kh); s the softmax scale. Position p sees keys 0..p.
// tr_flash_fwd   y = softmax(s·q kᵀ) v per head, written as rows (b·t, h·D) (the layout of the
//                output projection's input); lse = m + log Σ exp(s·q kᵀ − m) per row (b, h, t).
//                k, v hold cap positions per head; query i is at position off + i (a prompt
//                after off cached tokens) and sees keys 0..off + i.
//                Per block 16·W query rows (W warps of 16), over key tiles of 64 kept in
//                shared memory: S → online softmax (running max m and sum l per row, the
//                output rescaled by exp(m_old − m_new)) → O += P v, with S, P and O in
//                registers (P goes from S's accumulators to the next product's operand).
// tr_attn_dot    δ = rowsum(dy ⊙ y) per (row, head)                                warp each
// tr_flash_bwd_kv  per block 16·W keys of one kv head, over its query heads and the query
//                tiles that see them: P = exp(s·q kᵀ − lse), dv += Pᵀ dy, dP = dy vᵀ,
//                dS = s·P ⊙ (dP − δ), dk += dSᵀ q
// tr_flash_bwd_q per block 16·W query rows, over the key tiles they see: dq += dS k
// Recomputing S in both backward kernels (FlashAttention-2 does one kernel with atomic adds
// into dq) keeps every sum in registers and the results deterministic. Tiles go to shared
// memory row-major by cp.async (16 bytes per copy; the next tile's copies in flight while
// this one is used, except in the forward pass for heads of 128), and the products read their
// B operands with ldmatrix (.trans where a product takes the tile k-major), rows padded by 8
// values so that the eight rows of each 8 × 8 matrix fall in different banks.

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

// Grid-stride loop over [0, n).
#define FOR_EACH(i, n)                                                                          \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                     \
       i += (int64_t)gridDim.x * blockDim.x)

// Grid-stride loop over the groups of G values of [0, n): group i is [j, j + k), j = G·i, k ≤ G
// (less only for the last). A group is one 16-byte load or store per tensor where the tensors
// allow (ld_vec, st_vec), else k of one value: the same arithmetic in the same order.
#define FOR_EACH_GROUP(i, j, k, n, G)                                                            \
  FOR_EACH(i, ((int64_t)(n) + (G) - 1) / (G))                                                   \
  for (int64_t j = (G) * i, k = (n) - j < (G) ? (n) - j : (G); k > 0; k = 0)

// A lane takes groups of eight columns (two 16-byte loads of x and of w, one 16-byte store of a
// 16-bit a), else the same groups one value at a time: the same sums either way.
template <typename T>
__device__ void rms_fwd(const float* x, const float* w, T* a, int rows, int c, float eps) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // a whole warp leaves together
  const bool wide = c % 8 == 0 && aligned16(x) && aligned16(w) && aligned16(a);
  const float* xr = x + row * c;
  float ss = 0.f;
  for (int j = lane * 8; j < c; j += 256) {
    float v[8];
    ld_span<float, 8>(xr + j, v, c - j, wide, 0.f);
#pragma unroll
    for (int e = 0; e < 8; e++) ss += v[e] * v[e];
  }
  const float r = rsqrtf(warp_sum(ss) / c + eps);
  T* ar = a + row * c;
  for (int j = lane * 8; j < c; j += 256) {
    float v[8], wv[8];
    ld_span<float, 8>(xr + j, v, c - j, wide, 0.f);
    ld_span<float, 8>(w + j, wv, c - j, wide, 0.f);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = v[e] * r * wv[e];
    st_span<T, 8>(ar + j, v, c - j, wide);
  }
}

// Column j of one row of the RMSNorm backward: dx_j (+)= r·(g_j·w_j − x̂_j·dot) into dr[j] (and
// its copy in T when dlp is set), and g_j·x̂_j added to the dw sum acc. dot = mean(x̂ ⊙ g ⊙ w).
template <typename T>
__device__ __forceinline__ void rms_bwd_col(float xj, float gj, float wj, float r, float dot,
                                            float* dr, T* dlp, int j, int accumulate,
                                            float* acc) {
  const float xh = xj * r;
  float v = r * (gj * wj - xh * dot);
  if (accumulate) v += dr[j];
  dr[j] = v;
  if (dlp) put(dlp + j, v);
  *acc += gj * xh;
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
      if (j < c)
        rms_bwd_col<T>(xr[j], to_f(gr[j]), w[j], r, dot, dr, dx_lp ? dx_lp + row * c : nullptr, j,
                       accumulate, &acc[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < RMS_COLS; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < c) part[(int64_t)blockIdx.x * c + j] = acc[k];
  }
}

// tr_rms_bwd_w<G>: the same for rows of at most 256·G columns (G = 1..4), one warp per row
// (rows strided over all warps). A lane holds G groups of eight adjacent columns of its row,
// columns 8·lane + 256·q: x, g, w and, when accumulating, dx, loaded in 16-byte pieces (else the
// same groups one value at a time) and all issued before the row's two warp sums, so that a row
// costs one trip to memory. Each warp adds its rows' g·x̂ into its own row of shared memory (a
// lane's columns are its own); the warps' rows meet once at the end: one partial per block, as
// above. The kernel it replaced held 32 columns a lane in registers (128 per thread), read
// values of 2 or 4 bytes, loaded dx after the sums, and took 60 µs for 8192 rows of 768 on an
// H200 (1.3 TB/s).
#define RMSW_WARPS 8

template <typename T, int G>
__device__ void rms_bwd_w(const float* x, const float* w, const T* g, float* dx, T* dx_lp,
                          float* part, int rows, int c, float eps, int accumulate) {
  constexpr int C = 8 * G, GW = 2 * sizeof(T);  // 32-bit words of eight g values
  __shared__ __align__(16) float red[RMSW_WARPS][32 * C];
  const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float* mine = red[wp];
  const bool wide = c % 8 == 0 && aligned16(x) && aligned16(w) && aligned16(g) &&
                    aligned16(dx) && (!dx_lp || aligned16(dx_lp));
#pragma unroll
  for (int q = 0; q < G; ++q)
#pragma unroll
    for (int e = 0; e < 8; ++e) mine[8 * lane + 256 * q + e] = 0.f;
  for (int64_t row = (int64_t)blockIdx.x * nw + wp; row < rows; row += (int64_t)gridDim.x * nw) {
    const float* xr = x + row * c;
    const T* gr = g + row * c;
    float* dr = dx + row * c;
    // Held across the warp sums: x and dx in f32, g as loaded (packed, 16-bit for bf16/f16).
    float xv[G][8], dv[G][8];
    uint32_t gp[G][GW];
    float ss = 0.f, dot = 0.f;
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const int j = 8 * lane + 256 * q, n = c - j;
      float wv[8], gv[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) xv[q][e] = dv[q][e] = wv[e] = gv[e] = 0.f;
      T gt[8];
      if (n > 0) {
        ld_span<float, 8>(xr + j, xv[q], n, wide, 0.f);
        ld_span<float, 8>(w + j, wv, n, wide, 0.f);
        if (accumulate) ld_span<float, 8>(dr + j, dv[q], n, wide, 0.f);
        if (wide) {
#pragma unroll
          for (int u = 0; u < GW; u += 4) {
            const uint4 raw = load16<uint4>(gr + j + 4 * u / (int)sizeof(T));
            gp[q][u] = raw.x, gp[q][u + 1] = raw.y, gp[q][u + 2] = raw.z, gp[q][u + 3] = raw.w;
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) gt[e] = e < n ? gr[j + e] : from_f<T>(0.f);
          memcpy(gp[q], gt, sizeof(gt));
        }
      } else {
#pragma unroll
        for (int u = 0; u < GW; ++u) gp[q][u] = 0u;
      }
      memcpy(gt, gp[q], sizeof(gt));
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        gv[e] = to_f(gt[e]);
        ss += xv[q][e] * xv[q][e];
        dot += xv[q][e] * gv[e] * wv[e];
      }
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    const float r = rsqrtf(ss / c + eps);
    dot *= r / c;  // mean(x̂ ⊙ g ⊙ w)
    // w again, from the cache: not eight more registers per group held across the sums.
    const float* w2 = w;
#ifndef LMKIT_EMU
    asm volatile("" : "+l"(w2));
#endif
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const int j = 8 * lane + 256 * q, n = c - j;
      if (n <= 0) continue;
      float wv[8], v[8];
      T gt[8];
      ld_span<float, 8>(w2 + j, wv, n, wide, 0.f);
      memcpy(gt, gp[q], sizeof(gt));
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float gj = to_f(gt[e]), xh = xv[q][e] * r;
        v[e] = r * (gj * wv[e] - xh * dot) + dv[q][e];
        mine[j + e] += gj * xh;
      }
      st_span<float, 8>(dr + j, v, n, wide);
      if (dx_lp) st_span<T, 8>(dx_lp + row * c + j, v, n, wide);
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    float sum = 0.f;
    for (int u = 0; u < nw; u++) sum += red[u][j];
    part[(int64_t)blockIdx.x * c + j] = sum;
  }
}

// The rows side is three row-major matrices rq (b·t, ldq), rk and rv (b·t, ldk) holding q, k,
// v's heads side by side: the columns of one stacked product (rk = rq + h·d, ...), or three
// products. `back` 0: rows → heads, rotation +θ, bias added first; `back` 1: heads → rows,
// rotation −θ. Rows strided over the blocks; a row's work over the threads, G pairs (i, i + d/2)
// of one head each, i = p..p+G−1: 16-byte loads and stores where every address allows (else G
// of one value, the same arithmetic). The grid-stride loop over single pairs that this replaced
// spent three 64-bit divisions and 2-byte loads on each pair.
template <typename T>
__device__ void rope_move(T* rq, T* rk, T* rv, int ldq, int ldk, T* q, T* k, T* v,
                          const float* bias, const float* cos, const float* sin, int b, int t,
                          int h, int kh, int d, int cap, int off, int back) {
  constexpr int G = 16 / sizeof(T);
  const int half = d / 2, heads = h + 2 * kh, gph = (half + G - 1) / G;
  const bool wide = half % G == 0 && ldq % G == 0 && ldk % G == 0 && aligned16(rq) &&
                    aligned16(rk) && aligned16(rv) && aligned16(q) && aligned16(k) &&
                    aligned16(v) && aligned16(cos) && aligned16(sin) &&
                    (!bias || aligned16(bias));
  const int64_t rows = (int64_t)b * t;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int pos = (int)(row % t), bi = (int)(row / t);
    for (int idx = threadIdx.x; idx < heads * gph; idx += blockDim.x) {
      const int j = idx / gph, p = (idx - j * gph) * G, n = min(G, half - p);
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
      float cs[G], sn[G], a1[G], a2[G], o1[G], o2[G];
      if (rotate) {
        ld_span<float, G>(cos + (int64_t)pos * half + p, cs, n, wide, 1.f);
        ld_span<float, G>(sin + (int64_t)pos * half + p, sn, n, wide, 0.f);
      } else {
#pragma unroll
        for (int e = 0; e < G; e++) {
          cs[e] = 1.f;
          sn[e] = 0.f;
        }
      }
      if (!back) {
        ld_vec<T>(pk + p, a1, n, wide, 0.f);
        ld_vec<T>(pk + p + half, a2, n, wide, 0.f);
        if (bias) {
          float b1[G], b2[G];
          ld_span<float, G>(bias + j * d + p, b1, n, wide, 0.f);
          ld_span<float, G>(bias + j * d + p + half, b2, n, wide, 0.f);
#pragma unroll
          for (int e = 0; e < G; e++) {
            a1[e] += b1[e];
            a2[e] += b2[e];
          }
        }
#pragma unroll
        for (int e = 0; e < G; e++) {
          o1[e] = a1[e] * cs[e] - a2[e] * sn[e];
          o2[e] = a2[e] * cs[e] + a1[e] * sn[e];
        }
        st_vec<T>(base + p, o1, n, wide);
        st_vec<T>(base + p + half, o2, n, wide);
      } else {
        ld_vec<T>(base + p, a1, n, wide, 0.f);
        ld_vec<T>(base + p + half, a2, n, wide, 0.f);
#pragma unroll
        for (int e = 0; e < G; e++) {
          o1[e] = a1[e] * cs[e] + a2[e] * sn[e];
          o2[e] = a2[e] * cs[e] - a1[e] * sn[e];
        }
        st_vec<T>(pk + p, o1, n, wide);
        st_vec<T>(pk + p + half, o2, n, wide);
      }
    }
  }
}

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// g and u rows of stride ld: the halves of one stacked product (u = g + f, ld = 2f), or two.
// Rows strided over the blocks, a row's columns over the threads in groups of VEC (one 16-byte
// load each where every row allows it): no division per element. The grid-stride loop over
// all elements that this replaced spent a 64-bit division and 2-byte loads on each value
// (0.7 + 0.9 ms of a 113M model's step at batch 8 on an H200).
template <typename T>
__device__ void silu_mul(const T* g_, const T* u_, int ld, T* m, int rows, int f) {
  constexpr int VEC = 16 / sizeof(T);
  const bool wide = f % VEC == 0 && ld % VEC == 0 && aligned16(g_) && aligned16(u_) &&
                    aligned16(m);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T *gr = g_ + row * ld, *ur = u_ + row * ld;
    T* mr = m + row * f;
    for (int j = threadIdx.x * VEC; j < f; j += blockDim.x * VEC) {
      const int n = min(VEC, f - j);
      float g[VEC], u[VEC], o[VEC];
      ld_vec<T>(gr + j, g, n, wide, 0.f);
      ld_vec<T>(ur + j, u, n, wide, 0.f);
#pragma unroll
      for (int e = 0; e < VEC; e++) o[e] = g[e] * sigmoid(g[e]) * u[e];
      st_vec<T>(mr + j, o, n, wide);
    }
  }
}

template <typename T>
__device__ void silu_mul_bwd(const T* gu, const T* dm, T* dgu, int rows, int f) {
  constexpr int VEC = 16 / sizeof(T);
  const bool wide = f % VEC == 0 && aligned16(gu) && aligned16(dm) && aligned16(dgu);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* gr = gu + row * 2 * f;
    const T* dr = dm + row * f;
    T* outr = dgu + row * 2 * f;
    for (int j = threadIdx.x * VEC; j < f; j += blockDim.x * VEC) {
      const int n = min(VEC, f - j);
      float g[VEC], u[VEC], d[VEC], dg[VEC], du[VEC];
      ld_vec<T>(gr + j, g, n, wide, 0.f);
      ld_vec<T>(gr + f + j, u, n, wide, 0.f);
      ld_vec<T>(dr + j, d, n, wide, 0.f);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        const float s = sigmoid(g[e]);
        dg[e] = d[e] * u[e] * s * (1.f + g[e] * (1.f - s));
        du[e] = d[e] * g[e] * s;
      }
      st_vec<T>(outr + j, dg, n, wide);
      st_vec<T>(outr + f + j, du, n, wide);
    }
  }
}

template <typename T>
__device__ void add(const float* x, const T* y, float* out, int n) {
  constexpr int G = 16 / sizeof(T);
  const bool wide = aligned16(x) && aligned16(y) && aligned16(out);
  FOR_EACH_GROUP(i, j, k, n, G) {
    const bool w = wide && k == G;
    float a[G], b[G];
    ld_span<float, G>(x + j, a, (int)k, w, 0.f);
    ld_vec<T>(y + j, b, (int)k, w, 0.f);
#pragma unroll
    for (int e = 0; e < G; e++) a[e] += b[e];
    st_span<float, G>(out + j, a, (int)k, w);
  }
}

// out = x · s[0], s a device scalar (a loss's upstream gradient applied to gradients computed in
// its forward pass): 16-byte groups, else the same groups one value at a time. candle's
// broadcast multiply took 548 µs on the 151 MB of the output layer's ∂W (an H200).
template <typename T>
__device__ void scale(const T* x, T* out, int n, const float* s) {
  constexpr int G = 16 / sizeof(T);
  const float f = s[0];
  const bool wide = aligned16(x) && aligned16(out);
  FOR_EACH_GROUP(i, j, k, n, G) {
    const bool w = wide && k == G;
    float a[G];
    ld_vec<T>(x + j, a, (int)k, w, 0.f);
#pragma unroll
    for (int e = 0; e < G; e++) a[e] *= f;
    st_vec<T>(out + j, a, (int)k, w);
  }
}

// The output layer's cross-entropy of one row per block, its gradient written over the logits:
// nll = logsumexp(z) − z_k, z ← coef·(softmax(z) − onehot(k)). The row is read once for its
// statistics and once more (from the caches) to be overwritten: one pass over memory each way,
// where a forward kernel and a gradient kernel read it five times (common.cuh).
template <typename T>
__device__ void xent_in_place(T* z, const uint32_t* y, const float* coef, float* nll, int rows,
                              int v) {
  const int64_t row = blockIdx.x;
  if (row >= rows) return;
  T* zr = z + row * v;
  const uint32_t k = y[row];
  // Read before any thread overwrites it: row_softmax_stats' barriers come in between.
  const float zk = threadIdx.x == 0 && k < (uint32_t)v ? to_f(zr[k]) : 0.f;
  float m, s;
  row_softmax_stats<T>(zr, v, &m, &s);
  if (threadIdx.x == 0) nll[row] = xent_nll(m, s, zk, k, v);
  xent_grad_row<T>(zr, zr, v, m, 1.f / s, k, coef[row]);
}

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------
// Multi-tensor optimizer kernels (see the top of the file).

#define MT_G(i) const float *g##i, int n##i
// The optimizer kernels take each tensor in groups of four values (FOR_EACH_GROUP; a short
// group's missing values are 0, which add exactly 0): the same sums in the same order with or
// without 16-byte loads. With one value per load, the gradient norm and AdamW took 1.8 ms of a
// 113M model's step on an H200.
extern "C" __global__ void tr_sumsq_x8(float* part, MT_G(0), MT_G(1), MT_G(2), MT_G(3), MT_G(4),
                                       MT_G(5), MT_G(6), MT_G(7)) {
  const float* g[8] = {g0, g1, g2, g3, g4, g5, g6, g7};
  const int n[8] = {n0, n1, n2, n3, n4, n5, n6, n7};
  float s = 0.f;
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const bool wide = aligned16(g[t]);
    FOR_EACH_GROUP(i, j, k, n[t], 4) {
      float x[4];
      ld_vec<float>(g[t] + j, x, (int)k, wide && k == 4, 0.f);
#pragma unroll
      for (int e = 0; e < 4; e++) s += x[e] * x[e];
    }
  }
  s = block_sum(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}
LMKIT_REG(tr_sumsq_x8)

extern "C" __global__ void tr_clip_scale(const float* part, int np, float mean, float clip,
                                         float* out) {
  float s = 0.f;
  for (int i = threadIdx.x; i < np; i += blockDim.x) s += part[i];
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const float norm = sqrtf(s) * mean;
    const float k = clip > 0.f ? fminf(1.f, clip / (norm + 1e-6f)) : 1.f;
    out[0] = norm;
    // Gradients that are not all finite: no update at all (tr_adamw_x8 returns).
    out[1] = isfinite(norm) ? k * mean : nanf("");
  }
}
LMKIT_REG(tr_clip_scale)

#define MT_P(i) float *p##i, float *m##i, float *v##i, const float *g##i, int n##i, float d##i
extern "C" __global__ void tr_adamw_x8(const float* k, float lr, float b1, float b2, float bc1,
                                       float bc2, float eps, MT_P(0), MT_P(1), MT_P(2), MT_P(3),
                                       MT_P(4), MT_P(5), MT_P(6), MT_P(7)) {
  float* p[8] = {p0, p1, p2, p3, p4, p5, p6, p7};
  float* m[8] = {m0, m1, m2, m3, m4, m5, m6, m7};
  float* v[8] = {v0, v1, v2, v3, v4, v5, v6, v7};
  const float* g[8] = {g0, g1, g2, g3, g4, g5, g6, g7};
  const int n[8] = {n0, n1, n2, n3, n4, n5, n6, n7};
  const float d[8] = {d0, d1, d2, d3, d4, d5, d6, d7};
  const float kk = k[0];
  if (!isfinite(kk)) return;  // a skipped step (tr_clip_scale)
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const bool wide = aligned16(p[t]) && aligned16(m[t]) && aligned16(v[t]) && aligned16(g[t]);
    FOR_EACH_GROUP(i, j, len, n[t], 4) {
      const bool w = wide && len == 4;
      float pp[4], mm[4], vv[4], gg[4];
      ld_vec<float>(p[t] + j, pp, (int)len, w, 0.f);
      ld_vec<float>(m[t] + j, mm, (int)len, w, 0.f);
      ld_vec<float>(v[t] + j, vv, (int)len, w, 0.f);
      ld_vec<float>(g[t] + j, gg, (int)len, w, 0.f);
#pragma unroll
      for (int e = 0; e < 4; e++)
        adam_elem(pp + e, mm + e, vv + e, gg[e] * kk, lr, b1, b2, bc1, bc2, eps, d[t]);
      st_vec<float>(p[t] + j, pp, (int)len, w);
      st_vec<float>(m[t] + j, mm, (int)len, w);
      st_vec<float>(v[t] + j, vv, (int)len, w);
    }
  }
}
LMKIT_REG(tr_adamw_x8)

// Causal flash attention (16-bit T only), on tensor cores through mma.sync.m16n8k16 with
// PTX's fragment layout, so that the sums stay in registers (no shared-memory round trip of the
// output between key tiles). Lane l of a warp: g = l/4, c = l%4; see lmkit_emu_mma16816 in
// emu/emu.h for which elements each register holds.

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// from_f and pack2: common.cuh.

// d (16×8 f32, 4 per lane) += a (16×16 A fragment) · b (16×8 B fragment).
// mma16816: common.cuh.

// Four 8 × 8 matrices of 16-bit values from shared memory (ldmatrix.x4): this lane gives the
// address of row lane%8 of matrix lane/8 (16-byte aligned) and gets, in r[m], matrix m's
// elements (lane/4, 2·(lane%4) + {0, 1}), or with TRANS (2·(lane%4) + {0, 1}, lane/4): in
// either case the B fragment layout of mma.m16n8k16 for a tile stored n-major, or k-major.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p);
#ifdef LMKIT_EMU
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  lmkit_emu_ldmatrix_x4(r, p, TRANS);
}
#else
template <>
__device__ __forceinline__ void ldsm_x4<false>(uint32_t* r, const void* p) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
template <>
__device__ __forceinline__ void ldsm_x4<true>(uint32_t* r, const void* p) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
#endif

// A fragments (16 rows × D) of rows r0.. of a matrix whose row i starts at src + i·stride,
// zeros from row `rows` on; a[kk] covers columns 16·kk...
template <typename T, int D>
__device__ __forceinline__ void frag_a_rows(uint32_t (*a)[4], const T* src, int64_t stride, int r0,
                                            int rows) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + g + 8 * r;
    const T* p = src + (int64_t)row * stride + 2 * c;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      a[kk][r] = row < rows ? ld32(p + 16 * kk) : 0u;
      a[kk][r + 2] = row < rows ? ld32(p + 16 * kk + 8) : 0u;
    }
  }
}

// The A fragment of columns 16·kk.. of a 16-row product held as C fragments s[n] (8 columns
// each): the register reuse that feeds P (or dS) to the next product without shared memory.
template <typename T>
__device__ __forceinline__ void frag_a_acc(uint32_t* a, float (*s)[4], int kk) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// acc[n] (16 × 8·N) += a (16 × 16·K, fragments) · B (16·K × 8·N), a tile in shared memory
// (rows 16-byte aligned): element (k, n) of B at b[n·ld + k] (row n holds the k values of
// output column n), or with TRANS at b[k·ld + n] (row k holds the n values). N even. One
// ldmatrix.x4 gives the B fragments of two products: matrix m of the load covers columns
// 8·(m / 2).. and rows 8·(m % 2).. of each 16 × 16 step.
template <typename T, int K, int N, bool TRANS = false>
__device__ __forceinline__ void mma_tile(float (*acc)[4], uint32_t (*a)[4], const T* b, int ld) {
  static_assert(N % 2 == 0, "mma_tile takes column tiles in pairs");
  const int lane = threadIdx.x & 31, m = lane >> 3, i = lane & 7;
  const T* p = TRANS ? b + (8 * (m & 1) + i) * ld + 8 * (m >> 1)
                     : b + (8 * (m >> 1) + i) * ld + 8 * (m & 1);
#pragma unroll
  for (int n = 0; n < N; n += 2) {
#pragma unroll
    for (int kk = 0; kk < K; ++kk) {
      uint32_t f[4];
      ldsm_x4<TRANS>(f, TRANS ? p + kk * 16 * ld + n * 8 : p + n * 8 * ld + kk * 16);
      mma16816<T>(acc[n], a[kk], f);
      mma16816<T>(acc[n + 1], a[kk], f + 2);
    }
  }
}

// Copies of 16 bytes from global to shared memory that bypass the registers (cp.async.cg,
// sm_80+; zeros where !valid). A thread's copies are grouped by cp_commit; cp_wait<n> returns
// once all but its n most recent groups have landed, and a barrier after it shows them to
// the block.
#ifdef LMKIT_EMU
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  lmkit_emu_cp_async16(dst, src, valid);
}
__device__ __forceinline__ void cp_commit() { lmkit_emu_cp_commit(); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  lmkit_emu_cp_wait(N);
}
#else
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Rows [r0, r0 + R) of a (rows, D) matrix (row i at src + i·stride) into shared dst (R × D,
// row stride LD), zeros from row `rows` on: 16-byte cp.async copies where aligned (landed
// after cp_wait), else plain stores.
template <typename T, int D, int R, int LD>
__device__ void tile_rows(T* dst, const T* src, int64_t stride, int r0, int rows) {
  if (aligned16(src) && stride % 8 == 0) {
    for (int i = threadIdx.x; i < R * D / 8; i += blockDim.x) {
      const int r = i / (D / 8), col = (i % (D / 8)) * 8;
      const bool in = r0 + r < rows;
      // A row past the end copies nothing (zeros); its address stays inside the matrix.
      cp_async16(dst + r * LD + col, src + (in ? (int64_t)(r0 + r) * stride + col : 0), in);
    }
  } else {
    for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
      const int r = i / D, col = i % D;
      dst[r * LD + col] = r0 + r < rows ? src[(int64_t)(r0 + r) * stride + col] : from_f<T>(0.f);
    }
  }
}

// Writes rows r0 + g, r0 + g + 8 of a warp's 16 × D result acc[D/8] (times k) to dst (row i
// at dst + i·stride), skipping rows ≥ rows.
template <typename T, int D>
__device__ __forceinline__ void store_acc(float (*acc)[4], T* dst, int64_t stride, int r0,
                                          int rows, const float* k) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + g + 8 * r;
    if (row >= rows) continue;
    T* p = dst + (int64_t)row * stride + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      st32(p + 8 * n, pack2<T>(acc[n][2 * r] * k[r], acc[n][2 * r + 1] * k[r]));
  }
}

// Key tile of the forward pass.
#define FA_K 64

template <typename T, int D, int W>
__device__ void flash_fwd(const T* q, const T* k, const T* v, T* y, float* lse, int t, int h,
                          int kh, float scale, int cap, int off) {
  // S tiles in shared memory: the next one's copies in flight while this one is used, for
  // heads of 64 (36 KiB); one for heads of 128 (34 KiB), within 48 KiB of static memory.
  constexpr int BK = FA_K, LK = D + 8, S = D <= 64 ? 2 : 1;
  __shared__ __align__(16) T ks[S][BK * LK];  // keys (the B operand of q kᵀ)
  __shared__ __align__(16) T vs[S][BK * LK];  // values (of P v, read transposed)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int head = blockIdx.y, bi = head / h, j = head % h, kv = j / (h / kh);
  // Query row i (of t) is at position off + i and sees keys 0..off + i; k and v hold cap
  // positions per head. This lane's rows: w0 + g and w0 + g + 8.
  const int q0 = blockIdx.x * 16 * W, w0 = q0 + warp * 16, nk = off + t;
  const T* kh_ = k + ((int64_t)bi * kh + kv) * cap * D;
  const T* vh_ = v + ((int64_t)bi * kh + kv) * cap * D;
  uint32_t qa[D / 16][4];
  frag_a_rows<T, D>(qa, q + (int64_t)head * t * D, D, w0, t);
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // Running maximum (of scores in log2 units) and this lane's part of the sum, per row.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float sl = scale * LOG2E;
  const int last = off + min(t - 1, q0 + 16 * W - 1), first_pos = off + w0;
  const int tiles = last / BK + 1;
  auto load = [&](int it) {
    tile_rows<T, D, BK, LK>(ks[it % S], kh_, D, it * BK, nk);
    tile_rows<T, D, BK, LK>(vs[it % S], vh_, D, it * BK, nk);
  };
  if (S == 2) {
    load(0);
    cp_commit();
  }
  for (int it = 0; it < tiles; ++it) {
    const int k0 = it * BK;
    __syncthreads();  // the buffer loaded next is no longer read
    if (S == 1 || it + 1 < tiles) load(S == 1 ? it : it + 1);
    cp_commit();
    cp_wait<S - 1>();  // this tile's copies have landed
    __syncthreads();
    if (k0 > first_pos + 15) continue;  // the whole tile is after this warp's rows
    const T* kt = ks[it % S];
    const T* vt = vs[it % S];
    float s[BK / 8][4];
#pragma unroll
    for (int n = 0; n < BK / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    mma_tile<T, D / 16, BK / 8>(s, qa, kt, LK);
    const bool diag = k0 + BK - 1 > first_pos;  // some key is after some row's position
#pragma unroll
    for (int n = 0; n < BK / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int kpos = k0 + 8 * n + 2 * c + (i & 1), qpos = first_pos + g + 8 * (i >> 1);
        s[n][i] = diag && kpos > qpos ? -INFINITY : s[n][i] * sl;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m[r], mx), base = mn == -INFINITY ? 0.f : mn;
      const float corr = exp2f(m[r] - base);
      m[r] = mn;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * r] *= corr;
        o[n][2 * r + 1] *= corr;
      }
      l[r] = l[r] * corr + sum;
    }
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t pa[1][4];
      frag_a_acc<T>(pa[0], s, kk);
      mma_tile<T, 1, D / 8, true>(o, pa, vt + kk * 16 * LK, LK);
    }
  }
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = 1.f / l[r];
    const int row = w0 + g + 8 * r;
    if (lse && c == 0 && row < t) lse[(int64_t)head * t + row] = (m[r] + log2f(l[r])) * LN2;
  }
  store_acc<T, D>(o, y + ((int64_t)bi * t * h + j) * D, (int64_t)h * D, w0, t, inv);
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

// Query (dk/dv) or key (dq) positions per tile of the backward kernels: 32 for heads of 128,
// to leave registers for the sums.
#define FA_B(D) ((D) <= 64 ? 64 : 32)

template <typename T, int D, int W>
__device__ void flash_bwd_kv(const T* q, const T* k, const T* v, const T* dy, const float* lse,
                             const float* dd, T* dk, T* dv, int t, int h, int kh, float scale) {
  constexpr int BQ = FA_B(D), LQ = D + 8;
  // Heads of 64 keep the warp's keys and values as A fragments in registers; heads of 128
  // reload them per query tile (from cache), to leave registers for the sums.
  constexpr bool HOLD = D <= 64;
  // Two tiles in shared memory (37 / 34.5 KiB): the next one's copies in flight.
  __shared__ __align__(16) T qs[2][BQ * LQ];  // q rows (B operand of k qᵀ; of dSᵀ q, transposed)
  __shared__ __align__(16) T gs[2][BQ * LQ];  // dy rows (of v dyᵀ; of Pᵀ dy, transposed)
  __shared__ float ls[2][BQ], ds[2][BQ];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int kvh = blockIdx.y, bi = kvh / kh, kv = kvh % kh, grp = h / kh;
  const int k0 = blockIdx.x * 16 * W, w0 = k0 + warp * 16;
  const T* kr = k + (int64_t)kvh * t * D;
  const T* vr = v + (int64_t)kvh * t * D;
  uint32_t ka[D / 16][4], va[D / 16][4];
  if (HOLD) {
    frag_a_rows<T, D>(ka, kr, D, w0, t);
    frag_a_rows<T, D>(va, vr, D, w0, t);
  }
  float adk[D / 8][4], adv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) adk[n][i] = adv[n][i] = 0.f;
  const float sl = scale * LOG2E;
  // This lane's keys: w0 + g and w0 + g + 8. Tile `it` holds queries qa + (it % nq)·BQ.. of
  // query head kv·grp + it / nq (the heads that read this kv head, in turn).
  const int qa = (k0 / BQ) * BQ, nq = (t - qa + BQ - 1) / BQ, tiles = grp * nq;
  auto load = [&](int it) {
    const int j = kv * grp + it / nq, head = bi * h + j, q0 = qa + (it % nq) * BQ, b = it & 1;
    tile_rows<T, D, BQ, LQ>(qs[b], q + (int64_t)head * t * D, D, q0, t);
    tile_rows<T, D, BQ, LQ>(gs[b], dy + ((int64_t)bi * t * h + j) * D, (int64_t)h * D, q0, t);
    for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
      const int p = q0 + i;
      ls[b][i] = p < t ? lse[(int64_t)head * t + p] * LOG2E : INFINITY;
      ds[b][i] = p < t ? dd[(int64_t)head * t + p] : 0.f;
    }
  };
  load(0);
  cp_commit();
  for (int it = 0; it < tiles; ++it) {
    const int q0 = qa + (it % nq) * BQ, b = it & 1;
    __syncthreads();  // the buffers loaded next are no longer read
    if (it + 1 < tiles) load(it + 1);
    cp_commit();
    cp_wait<1>();  // this tile's copies have landed
    __syncthreads();
    if (w0 > q0 + BQ - 1) continue;  // every query of the tile is before this warp's keys
    const T* qt = qs[b];
    const T* gt = gs[b];
    const float* lt = ls[b];
    const float* dt = ds[b];
    if (!HOLD) {
      frag_a_rows<T, D>(ka, kr, D, w0, t);
      frag_a_rows<T, D>(va, vr, D, w0, t);
    }
    // Sᵀ (16 keys × BQ queries) → Pᵀ = exp(s·Sᵀ − lse), zero where the key is after the query.
    float p[BQ / 8][4], dp[BQ / 8][4];
#pragma unroll
    for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) p[n][i] = dp[n][i] = 0.f;
    mma_tile<T, D / 16, BQ / 8>(p, ka, qt, LQ);
#pragma unroll
    for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ci = 8 * n + 2 * c + (i & 1), kpos = w0 + g + 8 * (i >> 1);
        p[n][i] = kpos <= q0 + ci ? exp2f(p[n][i] * sl - lt[ci]) : 0.f;
      }
    // dv += Pᵀ dy
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t pa[1][4];
      frag_a_acc<T>(pa[0], p, kk);
      mma_tile<T, 1, D / 8, true>(adv, pa, gt + kk * 16 * LQ, LQ);
    }
    // dPᵀ = v dyᵀ, then dSᵀ = s·Pᵀ ⊙ (dPᵀ − δ), and dk += dSᵀ q.
    mma_tile<T, D / 16, BQ / 8>(dp, va, gt, LQ);
#pragma unroll
    for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int ci = 8 * n + 2 * c + (i & 1);
        dp[n][i] = scale * p[n][i] * (dp[n][i] - dt[ci]);
      }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t da[1][4];
      frag_a_acc<T>(da[0], dp, kk);
      mma_tile<T, 1, D / 8, true>(adk, da, qt + kk * 16 * LQ, LQ);
    }
  }
  const float one[2] = {1.f, 1.f};
  store_acc<T, D>(adk, dk + (int64_t)kvh * t * D, D, w0, t, one);
  store_acc<T, D>(adv, dv + (int64_t)kvh * t * D, D, w0, t, one);
}

template <typename T, int D, int W>
__device__ void flash_bwd_q(const T* q, const T* k, const T* v, const T* dy, const float* lse,
                            const float* dd, T* dq, int t, int h, int kh, float scale) {
  // Two tiles in shared memory (36 / 34 KiB): the next one's copies in flight.
  constexpr int BK = FA_B(D), LK = D + 8;
  __shared__ __align__(16) T ks[2][BK * LK];  // keys (B operand of q kᵀ; of dS k, transposed)
  __shared__ __align__(16) T vs[2][BK * LK];  // values (B operand of dy vᵀ)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int head = blockIdx.y, bi = head / h, j = head % h, kv = j / (h / kh);
  const int q0 = blockIdx.x * 16 * W, w0 = q0 + warp * 16;
  const T* kh_ = k + ((int64_t)bi * kh + kv) * t * D;
  const T* vh_ = v + ((int64_t)bi * kh + kv) * t * D;
  uint32_t qa[D / 16][4], ga[D / 16][4];
  frag_a_rows<T, D>(qa, q + (int64_t)head * t * D, D, w0, t);
  frag_a_rows<T, D>(ga, dy + ((int64_t)bi * t * h + j) * D, (int64_t)h * D, w0, t);
  // This lane's rows: w0 + g and w0 + g + 8.
  float l_row[2], d_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = w0 + g + 8 * r;
    l_row[r] = row < t ? lse[(int64_t)head * t + row] * LOG2E : INFINITY;
    d_row[r] = row < t ? dd[(int64_t)head * t + row] : 0.f;
  }
  float adq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) adq[n][0] = adq[n][1] = adq[n][2] = adq[n][3] = 0.f;
  const float sl = scale * LOG2E;
  const int tiles = min(t - 1, q0 + 16 * W - 1) / BK + 1;
  auto load = [&](int it) {
    tile_rows<T, D, BK, LK>(ks[it & 1], kh_, D, it * BK, t);
    tile_rows<T, D, BK, LK>(vs[it & 1], vh_, D, it * BK, t);
  };
  load(0);
  cp_commit();
  for (int it = 0; it < tiles; ++it) {
    const int k0 = it * BK;
    __syncthreads();  // the buffers loaded next are no longer read
    if (it + 1 < tiles) load(it + 1);
    cp_commit();
    cp_wait<1>();  // this tile's copies have landed
    __syncthreads();
    if (k0 > w0 + 15) continue;
    const T* kt = ks[it & 1];
    const T* vt = vs[it & 1];
    float p[BK / 8][4], dp[BK / 8][4];
#pragma unroll
    for (int n = 0; n < BK / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) p[n][i] = dp[n][i] = 0.f;
    mma_tile<T, D / 16, BK / 8>(p, qa, kt, LK);  // S = q kᵀ
    mma_tile<T, D / 16, BK / 8>(dp, ga, vt, LK);  // dP = dy vᵀ
#pragma unroll
    for (int n = 0; n < BK / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int kpos = k0 + 8 * n + 2 * c + (i & 1), r = i >> 1, qpos = w0 + g + 8 * r;
        const float pv = kpos <= qpos ? exp2f(p[n][i] * sl - l_row[r]) : 0.f;
        dp[n][i] = scale * pv * (dp[n][i] - d_row[r]);  // dS
      }
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t da[1][4];
      frag_a_acc<T>(da[0], dp, kk);
      mma_tile<T, 1, D / 8, true>(adq, da, kt + kk * 16 * LK, LK);  // dq += dS k
    }
  }
  const float one[2] = {1.f, 1.f};
  store_acc<T, D>(adq, dq + (int64_t)head * t * D, D, w0, t, one);
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

// Four warps per block. Static shared memory (of the 48 KiB a block may declare statically),
// for heads of 64 / 128: forward 36 / 34 KiB, dk/dv 37 / 34.5 KiB, dq 36 / 34 KiB.

// bf16 mma.sync needs sm_80 or newer; older targets build without these kernels, which
// `BlockOps::has_flash` sees: training then materializes attention's probabilities, and
// prompts on the fused-decoding cache take candle's ops.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
FLASH_KERNELS(bf16, 64, 4)
FLASH_KERNELS(bf16, 128, 4)
FLASH_KERNELS(f16, 64, 4)
FLASH_KERNELS(f16, 128, 4)
#endif

#define DOT_KERNEL(S)                                                                             \
  extern "C" __global__ void tr_attn_dot_##S(const S* y, const S* dy, float* dd, int b, int t,   \
                                             int h, int d) {                                     \
    attn_dot<S>(y, dy, dd, b, t, h, d);                                                           \
  }                                                                                               \
  LMKIT_REG(tr_attn_dot_##S)

DOT_KERNEL(bf16)
DOT_KERNEL(f16)

#define RMS_BWD_W(S, G)                                                                         \
  extern "C" __global__ void __launch_bounds__(32 * RMSW_WARPS, 2)                                \
      tr_rms_bwd_w##G##_##S(const float* x, const float* w, const S* g, float* dx, S* dx_lp,      \
                            float* part, int rows, int c, float eps, int accumulate) {            \
    rms_bwd_w<S, G>(x, w, g, dx, dx_lp, part, rows, c, eps, accumulate);                          \
  }                                                                                               \
  LMKIT_REG(tr_rms_bwd_w##G##_##S)

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
  RMS_BWD_W(S, 1)                                                                                 \
  RMS_BWD_W(S, 2)                                                                                 \
  RMS_BWD_W(S, 3)                                                                                 \
  RMS_BWD_W(S, 4)                                                                                 \
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
  LMKIT_REG(tr_add_##S) \
  extern "C" __global__ void tr_scale_##S(const S* x, S* out, int n, const float* s) {        \
    scale<S>(x, out, n, s);                                                                       \
  }                                                                                               \
  LMKIT_REG(tr_scale_##S) \
  extern "C" __global__ void tr_xent_##S(S* z, const uint32_t* y, const float* coef, float* nll, \
                                         int rows, int v) {                                      \
    xent_in_place<S>(z, y, coef, nll, rows, v);                                                   \
  }                                                                                               \
  LMKIT_REG(tr_xent_##S)

TRAIN_KERNELS(f32)
TRAIN_KERNELS(bf16)
TRAIN_KERNELS(f16)

// Conversions of eight tensors per launch (tr_cast_x8, tr_widen_x8); unused slots have n = 0.
// Groups of 16 bytes of the narrower type.
template <typename A, typename B>
__device__ void convert_x8(const A* const* s, B* const* d, const int* n) {
  constexpr int G = 16 / (sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B));
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const bool wide = aligned16(s[t]) && aligned16(d[t]);
    FOR_EACH_GROUP(i, j, k, n[t], G) {
      float x[G];
      ld_span<A, G>(s[t] + j, x, (int)k, wide && k == G, 0.f);
      st_span<B, G>(d[t] + j, x, (int)k, wide && k == G);
    }
  }
}

#define CONV_ARG(A, B, i) const A *s##i, B *d##i, int n##i
#define CONV_KERNEL(name, A, B)                                                                   \
  extern "C" __global__ void name(CONV_ARG(A, B, 0), CONV_ARG(A, B, 1), CONV_ARG(A, B, 2),        \
                                  CONV_ARG(A, B, 3), CONV_ARG(A, B, 4), CONV_ARG(A, B, 5),        \
                                  CONV_ARG(A, B, 6), CONV_ARG(A, B, 7)) {                         \
    const A* s[8] = {s0, s1, s2, s3, s4, s5, s6, s7};                                             \
    B* d[8] = {d0, d1, d2, d3, d4, d5, d6, d7};                                                   \
    const int n[8] = {n0, n1, n2, n3, n4, n5, n6, n7};                                            \
    convert_x8<A, B>(s, d, n);                                                                    \
  }                                                                                               \
  LMKIT_REG(name)

// out[j] = Σ_r part[r, j] (the per-block partial sums of tr_rms_bwd*): 32 columns per block of
// 256 threads, eight interleaved partial sums per column added in a fixed order (the same bits
// on every run). candle's sums took 2.1 ms of a 113M model's step on an H200, 25 of their 54
// calls adding up these partials.
extern "C" __global__ void tr_colsum(const float* part, float* out, int rows, int c) {
  __shared__ float sh[8][33];
  const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5;
  const int j = blockIdx.x * 32 + lane;
  float s = 0.f;
  if (j < c)
#pragma unroll 8
    for (int r = grp; r < rows; r += 8) s += part[(int64_t)r * c + j];
  sh[grp][lane] = s;
  __syncthreads();
  if (grp == 0 && j < c) {
    float t = 0.f;
    for (int g = 0; g < 8; g++) t += sh[g][lane];
    out[j] = t;
  }
}
LMKIT_REG(tr_colsum)

#define SUM_ARG(i) float *o##i, const float *a##i, const float *b##i, int n##i
extern "C" __global__ void tr_sum_x8(SUM_ARG(0), SUM_ARG(1), SUM_ARG(2), SUM_ARG(3), SUM_ARG(4),
                                     SUM_ARG(5), SUM_ARG(6), SUM_ARG(7)) {
  float* o[8] = {o0, o1, o2, o3, o4, o5, o6, o7};
  const float* a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
  const float* b[8] = {b0, b1, b2, b3, b4, b5, b6, b7};
  const int n[8] = {n0, n1, n2, n3, n4, n5, n6, n7};
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const bool wide = aligned16(o[t]) && aligned16(a[t]) && aligned16(b[t]);
    FOR_EACH_GROUP(i, j, k, n[t], 4) {
      const bool w = wide && k == 4;
      float x[4], y[4];
      ld_vec<float>(a[t] + j, x, (int)k, w, 0.f);
      ld_vec<float>(b[t] + j, y, (int)k, w, 0.f);
#pragma unroll
      for (int e = 0; e < 4; e++) x[e] += y[e];
      st_vec<float>(o[t] + j, x, (int)k, w);
    }
  }
}
LMKIT_REG(tr_sum_x8)

CONV_KERNEL(tr_cast_x8_f32, f32, f32)
CONV_KERNEL(tr_cast_x8_bf16, f32, bf16)
CONV_KERNEL(tr_cast_x8_f16, f32, f16)
CONV_KERNEL(tr_widen_x8_bf16, bf16, f32)
CONV_KERNEL(tr_widen_x8_f16, f16, f32)
