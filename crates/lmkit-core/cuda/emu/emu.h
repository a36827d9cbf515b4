// The CPU emulator's stand-ins for CUDA's device-side API, enough for lmkit's kernels: one
// block at a time, each thread a fiber; __syncthreads and warp shuffles switch fibers (see
// emu.cpp). Used by the `cuda-emu` feature so that the tests run the kernels' own source.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <algorithm>
#include <utility>

#define __global__
#define __launch_bounds__(...)
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
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: d (16×8, f32) += a (16×16)
// · b (16×8), with PTX's fragment layout. Lane l (g = l/4, c = l%4) passes its own registers,
// two 16-bit values in each, the lower index in the low half:
//   a[0] = A[g][2c, 2c+1]   a[1] = A[g+8][2c, 2c+1]   a[2] = A[g][2c+8, 2c+9]   a[3] = A[g+8][2c+8, 2c+9]
//   b[0] = B[2c, 2c+1][g]   b[1] = B[2c+8, 2c+9][g]
//   d[0], d[1] = D[g][2c, 2c+1]   d[2], d[3] = D[g+8][2c, 2c+1]
// The call is a warp barrier (all 32 lanes take part, as on the GPU); each lane gets its own
// four outputs, computed from the whole warp's registers.
void lmkit_emu_mma16816(float* d, const uint32_t* a, const uint32_t* b, bool f16);
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l%8 of
// matrix l/8 (eight 16-bit values, 16-byte aligned); r[i] gets matrix i's elements
// (l/4, 2(l%4)) and (l/4, 2(l%4) + 1), or with `trans` (2(l%4), l/4) and (2(l%4) + 1, l/4),
// the first in the low half. A warp barrier, as mma.sync.
void lmkit_emu_ldmatrix_x4(uint32_t* r, const void* row, bool trans);
// cp.async.cg.shared.global with 16 bytes (zeros when !valid), commit_group and wait_group n.
// The copies of a thread's group land when that thread waits for the group (the latest the
// GPU may make them land: a read of the tile before the wait sees the old values); under
// LMKIT_EMU_ORDER=warps they land at once instead (the earliest: a copy into a buffer that
// another warp still reads, with no barrier between, changes what that warp reads).
void lmkit_emu_cp_async16(void* dst, const void* src, bool valid);
void lmkit_emu_cp_commit();
void lmkit_emu_cp_wait(int n);

struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

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
using std::isfinite;
using std::nanf;
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

#define __align__(n) __attribute__((aligned(n)))

// A barrier for the 32 threads of a warp.
void __syncwarp(unsigned mask = 0xffffffffu);

// Records a fault of the running kernel (the launch then fails with `what`).
void lmkit_emu_fault(const char* what);


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
