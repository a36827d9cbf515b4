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
// Whether wmma's memory operations are strict (the `warps` schedule; see nvcuda::wmma below).
bool lmkit_emu_strict();
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);

struct uint4 {
  unsigned x, y, z, w;
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

// nvcuda::wmma (tensor-core tiles of 16×16×16, 16-bit inputs, f32 accumulators) on the CPU.
// Every thread of the warp holds the whole tile and computes it (the real API leaves the
// mapping of elements to threads unspecified, so code that only loads, stores, fills and
// multiplies fragments cannot tell). Each call is a warp barrier, as the real ones are
// warp-synchronous, and checks what the hardware requires: 32-byte aligned pointers, and
// leading dimensions of a multiple of 16 bytes. Under the `warps` schedule (see emu.cpp) the
// memory side is strict: a lane loads a tile when it arrives (then waits for the others), and
// stores its share of one (8 consecutive elements per lane, lane 16 the first 8, so that
// a lane's share is never where that lane usually reads) when it arrives, without waiting; so memory that other lanes write or
// read is safe to touch only after a __syncwarp, as on the GPU.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float emu_f(float x) { return x; }
inline float emu_f(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float emu_f(__half x) { return __half2float(x); }

template <typename Use, int M, int N, int K, typename T, typename L = void>
struct fragment {
  // matrix_a: M×K, matrix_b: K×N, accumulator: M×N; row-major.
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

inline int emu_lane() { return (int)(threadIdx.x & 31); }

inline void emu_check(const void* p, unsigned ldm, size_t elem) {
  if ((reinterpret_cast<uintptr_t>(p) & 31) != 0) lmkit_emu_fault("wmma: pointer not 32-byte aligned");
  if ((ldm * elem) % 16 != 0) lmkit_emu_fault("wmma: leading dimension not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  const bool strict = lmkit_emu_strict();
  if (!strict) __syncwarp();
  emu_check(p, ldm, sizeof(T));
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<L, col_major> ? p[c * ldm + r] : p[r * ldm + c];
  if (strict) __syncwarp();
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                      layout_t l) {
  const bool strict = lmkit_emu_strict();
  if (!strict) __syncwarp();
  emu_check(p, ldm, sizeof(float));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
  if (strict) __syncwarp();
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t l) {
  const bool strict = lmkit_emu_strict();
  if (!strict) __syncwarp();
  emu_check(p, ldm, sizeof(float));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      if (!strict || ((r * N + c) / 8 + 16) % 32 == emu_lane())
        (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
  if (!strict) __syncwarp();
}

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, T v) {
  for (auto& e : f.x) e = v;
}

// d = a·b + c in f32.
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  __syncwarp();
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += emu_f(a.x[i * K + k]) * emu_f(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda

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
