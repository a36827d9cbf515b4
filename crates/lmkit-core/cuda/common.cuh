// Helpers shared by lmkit's CUDA kernels (fused.cu, decode.cu, train.cu): conversions to and
// from f32, loads and stores of 4 and 16 bytes, and warp- and block-wide reductions. Included after the CUDA (or emulator) headers.
#pragma once

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void put(__half* p, float v) { *p = __float2half(v); }

// 16 bytes from `p` (16-byte aligned; see aligned16).
template <typename T>
__device__ __forceinline__ T load16(const void* p) {
#ifdef LMKIT_EMU
  if (reinterpret_cast<uintptr_t>(p) & 15) lmkit_emu_fault("a 16-byte load off a 16-byte boundary");
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
#else
  return *reinterpret_cast<const T*>(p);
#endif
}

// Whether 16-byte loads may start at `p` (the emulator can also answer no everywhere, to test
// the kernels' one-value-at-a-time loops).
__device__ __forceinline__ bool aligned16(const void* p) {
#ifdef LMKIT_EMU
  return lmkit_emu_aligned16(p);
#else
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
#endif
}

// 16 bytes to `p` (16-byte aligned).
__device__ __forceinline__ void store16(void* p, uint4 v) {
#ifdef LMKIT_EMU
  if (reinterpret_cast<uintptr_t>(p) & 15) lmkit_emu_fault("a 16-byte store off a 16-byte boundary");
  memcpy(p, &v, sizeof(v));
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
}

// 4 bytes from and to `p` (4-byte aligned): two 16-bit values, the first in the low half. On
// the emulator these helpers fail the launch where the GPU would fault on the address.
__device__ __forceinline__ uint32_t ld32(const void* p) {
#ifdef LMKIT_EMU
  if (reinterpret_cast<uintptr_t>(p) & 3) lmkit_emu_fault("a 4-byte load off a 4-byte boundary");
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}

__device__ __forceinline__ void st32(void* p, uint32_t v) {
#ifdef LMKIT_EMU
  if (reinterpret_cast<uintptr_t>(p) & 3) lmkit_emu_fault("a 4-byte store off a 4-byte boundary");
  memcpy(p, &v, 4);
#else
  *reinterpret_cast<uint32_t*>(p) = v;
#endif
}

__device__ __forceinline__ void st16(void* p, uint16_t v) {
#ifdef LMKIT_EMU
  if (reinterpret_cast<uintptr_t>(p) & 1) lmkit_emu_fault("a 2-byte store off a 2-byte boundary");
  memcpy(p, &v, 2);
#else
  *reinterpret_cast<uint16_t*>(p) = v;
#endif
}

// One element of AdamW (arXiv:1711.05101, as torch.optim.AdamW): gradient g (already scaled),
// moments m, v, bias corrections bc1 = 1 − β₁ᵗ, bc2 = 1 − β₂ᵗ, decay = 1 − lr·λ (or 1).
__device__ __forceinline__ void adam_elem(float* p, float* m, float* v, float g, float lr,
                                          float b1, float b2, float bc1, float bc2, float eps,
                                          float decay) {
  const float mj = b1 * *m + (1.f - b1) * g;
  const float vj = b2 * *v + (1.f - b2) * g * g;
  const float upd = (mj / bc1) / (sqrtf(vj / bc2) + eps);
  *p = *p * decay - lr * upd;
  *m = mj;
  *v = vj;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
static __device__ float block_max(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    float u = lane < nw ? sh[lane] : -INFINITY;
    u = warp_max(u);
    if (lane == 0) sh[0] = u;
  }
  __syncthreads();
  return sh[0];
}

static __device__ float block_sum(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    float u = lane < nw ? sh[lane] : 0.f;
    u = warp_sum(u);
    if (lane == 0) sh[0] = u;
  }
  __syncthreads();
  return sh[0];
}
