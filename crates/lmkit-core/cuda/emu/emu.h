// The CPU emulator's stand-ins for CUDA's device-side API, enough for lmkit's kernels: one
// block at a time, each thread a fiber; __syncthreads and warp shuffles switch fibers (see
// emu.cpp). Used by the `cuda-emu` feature so that the tests run the kernels' own source.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

void __syncthreads();
bool lmkit_emu_aligned16(const void* p);
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);

struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = (uint32_t)h.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as __float2bfloat16 does; NaN stays NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(uint16_t)(u >> 16)};
}
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return {(_Float16)f}; }

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

namespace lmkit_emu {

using Body = void (*)(const uint64_t*);

template <typename T>
T from_slot(uint64_t v) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>((uintptr_t)v);
  } else if constexpr (std::is_same_v<T, float>) {
    uint32_t u = (uint32_t)v;
    float f;
    memcpy(&f, &u, 4);
    return f;
  } else {
    return (T)(int64_t)v;
  }
}

void add_kernel(const char* name, int nargs, void (*call)(void*, const uint64_t*), void* fn);

template <typename... A, size_t... I>
void call_with(void (*f)(A...), const uint64_t* a, std::index_sequence<I...>) {
  f(from_slot<A>(a[I])...);
}

template <typename... A>
void call(void* fn, const uint64_t* a) {
  call_with(reinterpret_cast<void (*)(A...)>(fn), a, std::index_sequence_for<A...>{});
}

struct Reg {
  template <typename... A>
  Reg(const char* name, void (*f)(A...)) {
    add_kernel(name, (int)sizeof...(A), &call<A...>, reinterpret_cast<void*>(f));
  }
};

}  // namespace lmkit_emu

#define LMKIT_REG(name) static lmkit_emu::Reg lmkit_reg_##name(#name, &name);
