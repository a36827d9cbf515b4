// lmkit's own CUDA kernels for training (compiled to PTX by build.rs with the `cuda` feature;
// loaded through candle's custom-module cache, see src/cuda_ops.rs; with `cuda-emu` also as C++
// for the CPU emulator of cuda/emu/, all but embedding_bwd_f32). Each has a CPU twin in
// Rust (src/attn_softmax.rs, src/xent.rs) that the tests compare against plain tensor ops.
//
// causal_softmax   y = softmax(scale·x) over the causally visible columns of each row, 0 after
//                  them; row r is query position (r mod t) + offset.     One warp per row.
// causal_softmax_bwd  dx = scale · y ⊙ (g − Σⱼ gⱼyⱼ).                  One warp per row.
// xent_fwd         nllᵢ = logsumexp(zᵢ) − zᵢ,yᵢ   (NaN for a target outside the row).
// xent_bwd         dzᵢ = gᵢ · (softmax(zᵢ) − onehot(yᵢ)).               One block per row,
//                  the row read once for its statistics (online softmax, common.cuh).
// All arithmetic is f32 whatever the storage type.

#ifdef LMKIT_EMU
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define LMKIT_REG(name)
#endif

#include "common.cuh"

template <typename T>
__device__ void causal_softmax(const T* x, T* y, int64_t rows, int cols, int t, int offset,
                               float scale) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const int valid = min(cols, (int)(row % t) + offset + 1);
  float m = -INFINITY;
  for (int c = lane; c < valid; c += 32) m = fmaxf(m, to_f(xr[c]) * scale);
  m = warp_max(m);
  float s = 0.f;
  for (int c = lane; c < valid; c += 32) s += expf(to_f(xr[c]) * scale - m);
  s = warp_sum(s);
  const float inv = 1.f / s;
  for (int c = lane; c < cols; c += 32) {
    put(yr + c, c < valid ? expf(to_f(xr[c]) * scale - m) * inv : 0.f);
  }
}

template <typename T>
__device__ void causal_softmax_bwd(const T* y, const T* g, T* dx, int64_t rows, int cols, int t,
                                   int offset, float scale) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* yr = y + row * cols;
  const T* gr = g + row * cols;
  T* dr = dx + row * cols;
  const int valid = min(cols, (int)(row % t) + offset + 1);
  float dot = 0.f;
  for (int c = lane; c < valid; c += 32) dot += to_f(yr[c]) * to_f(gr[c]);
  dot = warp_sum(dot);
  for (int c = lane; c < cols; c += 32) {
    put(dr + c, c < valid ? scale * to_f(yr[c]) * (to_f(gr[c]) - dot) : 0.f);
  }
}

// The row statistics and the gradient row are common.cuh's (shared with train.cu's tr_xent).
template <typename T>
__device__ void xent_fwd(const T* z, const uint32_t* y, float* nll, int64_t rows, int v) {
  const int64_t row = blockIdx.x;
  if (row >= rows) return;
  const T* zr = z + row * v;
  float m, s;
  row_softmax_stats<T>(zr, v, &m, &s);
  if (threadIdx.x == 0) {
    const uint32_t k = y[row];
    nll[row] = xent_nll(m, s, k < (uint32_t)v ? to_f(zr[k]) : 0.f, k, v);
  }
}

template <typename T>
__device__ void xent_bwd(const T* z, const uint32_t* y, const float* g, T* dz, int64_t rows,
                         int v) {
  const int64_t row = blockIdx.x;
  if (row >= rows) return;
  float m, s;
  row_softmax_stats<T>(z + row * v, v, &m, &s);
  xent_grad_row<T>(z + row * v, dz + row * v, v, m, 1.f / s, y[row], g[row]);
}

#define KERNELS(SUFFIX, T)                                                                        \
  extern "C" __global__ void causal_softmax_##SUFFIX(const T* x, T* y, int64_t rows, int cols,   \
                                                     int t, int offset, float scale) {           \
    causal_softmax<T>(x, y, rows, cols, t, offset, scale);                                        \
  }                                                                                               \
  extern "C" __global__ void causal_softmax_bwd_##SUFFIX(const T* y, const T* g, T* dx,          \
                                                         int64_t rows, int cols, int t,          \
                                                         int offset, float scale) {              \
    causal_softmax_bwd<T>(y, g, dx, rows, cols, t, offset, scale);                                \
  }                                                                                               \
  extern "C" __global__ void xent_fwd_##SUFFIX(const T* z, const uint32_t* y, float* nll,        \
                                               int64_t rows, int v) {                            \
    xent_fwd<T>(z, y, nll, rows, v);                                                              \
  }                                                                                               \
  extern "C" __global__ void xent_bwd_##SUFFIX(const T* z, const uint32_t* y, const float* g,    \
                                               T* dz, int64_t rows, int v) {                     \
    xent_bwd<T>(z, y, g, dz, rows, v);                                                            \
  }                                                                                               \
  LMKIT_REG(causal_softmax_##SUFFIX)                                                              \
  LMKIT_REG(causal_softmax_bwd_##SUFFIX)                                                          \
  LMKIT_REG(xent_fwd_##SUFFIX)                                                                    \
  LMKIT_REG(xent_bwd_##SUFFIX)

KERNELS(f32, float)
KERNELS(bf16, __nv_bfloat16)
KERNELS(f16, __half)

// AdamW in place on f32 parameter p and moments m, v, for gradient g times k (k = scale, or
// scale · *scale_dev): m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
// p ← p·decay − lr · (m/bc₁) / (√(v/bc₂) + ε).   The same arithmetic as the CPU path.
__device__ void adamw(float* p, float* m, float* v, const float* g, float k, int64_t n, float lr,
                      float b1, float b2, float bc1, float bc2, float eps, float decay) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    adam_elem(p + i, m + i, v + i, g[i] * k, lr, b1, b2, bc1, bc2, eps, decay);
}

extern "C" __global__ void adamw_f32(float* p, float* m, float* v, const float* g, float k,
                                     int64_t n, float lr, float b1, float b2, float bc1, float bc2,
                                     float eps, float decay) {
  adamw(p, m, v, g, k, n, lr, b1, b2, bc1, bc2, eps, decay);
}

extern "C" __global__ void adamw_dev_f32(float* p, float* m, float* v, const float* g,
                                         const float* k_dev, int64_t n, float lr, float b1,
                                         float b2, float bc1, float bc2, float eps, float decay) {
  adamw(p, m, v, g, k_dev[0], n, lr, b1, b2, bc1, bc2, eps, decay);
}

LMKIT_REG(adamw_f32)
LMKIT_REG(adamw_dev_f32)

// The emulator has no atomicAdd: this kernel is the GPU's only (its CPU twin is
// lmkit_core::fused's embedding backward).
#ifndef LMKIT_EMU
// Embedding backward: dw[ids[r], j] += g[r, j] over all rows r (dw zeroed by the caller).
// Atomic adds: parallel over every element, where an index_add over the ids is serial.
extern "C" __global__ void embedding_bwd_f32(const float* g, const uint32_t* ids, float* dw,
                                             int64_t n, int c, int64_t v) {
  const int64_t total = n * c, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / c;
    const uint32_t id = ids[r];
    if ((int64_t)id < v) atomicAdd(dw + (int64_t)id * c + (i - r * c), g[i]);
  }
}
#endif
