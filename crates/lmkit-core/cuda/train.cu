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
// tr_rope_split  packed rows (b·t, (h + 2·kh)·d) = [q | k | v] (+ bias) → q (b, h, t, d),
//                k, v (b, kh, t, d), q and k rotated by +θ (HF's rotate-half pairs (i, i+d/2),
//                angle pos·θᵢ);  tr_rope_merge is its adjoint: rotation by −θ, heads back into
//                packed rows (the gradients of q, k, v into that of the packed product).
// tr_silu_mul    m = silu(g) ⊙ u over rows [g | u] of width 2f
// tr_silu_mul_bwd  dg = dm ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),  du = dm ⊙ silu(g)
// tr_add         out = x + y  (x, out f32; y in T: a residual add)

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

// One pair (i, i + d/2) of one head of one row per iteration. `back` 0: packed → heads,
// rotation +θ, bias added first; `back` 1: heads → packed, rotation −θ.
template <typename T>
__device__ void rope_move(T* packed, T* q, T* k, T* v, const float* bias, const float* cos,
                          const float* sin, int b, int t, int h, int kh, int d, int back) {
  const int half = d / 2, heads = h + 2 * kh, width = heads * d;
  const int64_t total = (int64_t)b * t * heads * half;
  FOR_EACH(i, total) {
    const int p = (int)(i % half);
    const int64_t rest = i / half;
    const int j = (int)(rest % heads);
    const int64_t row = rest / heads;  // b·t rows
    const int pos = (int)(row % t), bi = (int)(row / t);
    T* base;
    int rotate = 1;
    if (j < h) {
      base = q + (((int64_t)bi * h + j) * t + pos) * d;
    } else if (j < h + kh) {
      base = k + (((int64_t)bi * kh + (j - h)) * t + pos) * d;
    } else {
      base = v + (((int64_t)bi * kh + (j - h - kh)) * t + pos) * d;
      rotate = 0;
    }
    T* pk = packed + row * width + (int64_t)j * d;
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

template <typename T>
__device__ void silu_mul(const T* gu, T* m, int rows, int f) {
  FOR_EACH(i, (int64_t)rows * f) {
    const int64_t row = i / f, j = i - row * f;
    const float g = to_f(gu[row * 2 * f + j]), u = to_f(gu[row * 2 * f + f + j]);
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

#define TRAIN_KERNELS(S)                                                                          \
  extern "C" __global__ void tr_rms_fwd_##S(const float* x, const float* w, S* a, int rows, \
                                            int c, float eps) {                                  \
    rms_fwd<S>(x, w, a, rows, c, eps);                                                            \
  }                                                                                               \
  LMKIT_REG(tr_rms_fwd_##S)                                                                       \
  extern "C" __global__ void tr_rms_bwd_##S(const float* x, const float* w, const S* g,          \
                                            float* dx, S* dx_lp, float* part, int rows,      \
                                            int c, float eps, int accumulate) {                  \
    rms_bwd<S>(x, w, g, dx, dx_lp, part, rows, c, eps, accumulate);                               \
  }                                                                                               \
  LMKIT_REG(tr_rms_bwd_##S)                                                                       \
  extern "C" __global__ void tr_rope_split_##S(S* packed, S* q, S* k, S* v, const float* bias,   \
                                               const float* cos, const float* sin, int b, int t, \
                                               int h, int kh, int d) {                           \
    rope_move<S>(packed, q, k, v, bias, cos, sin, b, t, h, kh, d, 0);                             \
  }                                                                                               \
  LMKIT_REG(tr_rope_split_##S)                                                                    \
  extern "C" __global__ void tr_rope_merge_##S(S* packed, S* q, S* k, S* v, const float* cos,    \
                                               const float* sin, int b, int t, int h, int kh,    \
                                               int d) {                                          \
    rope_move<S>(packed, q, k, v, nullptr, cos, sin, b, t, h, kh, d, 1);                          \
  }                                                                                               \
  LMKIT_REG(tr_rope_merge_##S)                                                                    \
  extern "C" __global__ void tr_silu_mul_##S(const S* gu, S* m, int rows, int f) {           \
    silu_mul<S>(gu, m, rows, f);                                                                  \
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
