// Helpers shared by lmkit's CUDA kernels (fused.cu, decode.cu, train.cu): conversions to and
// from f32, loads and stores of 4, 8 and 16 bytes, and warp- and block-wide reductions. Included
// after the CUDA (or emulator) headers.
#pragma once

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void put(__half* p, float v) { *p = __float2half(v); }

// sizeof(T) bytes (4, 8 or 16) from `p`, aligned to as many. On the emulator a load off that
// boundary fails the launch, where the GPU would fault on the address.
template <typename T>
__device__ __forceinline__ T load_n(const void* p) {
#ifdef LMKIT_EMU
  if (reinterpret_cast<uintptr_t>(p) & (sizeof(T) - 1))
    lmkit_emu_fault(sizeof(T) == 16  ? "a 16-byte load off a 16-byte boundary"
                    : sizeof(T) == 8 ? "an 8-byte load off an 8-byte boundary"
                                     : "a 4-byte load off a 4-byte boundary");
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
#else
  return *reinterpret_cast<const T*>(p);
#endif
}

// 16 bytes from `p` (16-byte aligned; see aligned16).
template <typename T>
__device__ __forceinline__ T load16(const void* p) {
  static_assert(sizeof(T) == 16, "load16 takes a 16-byte type");
  return load_n<T>(p);
}

// 8 bytes from `p` (8-byte aligned).
__device__ __forceinline__ uint2 load8(const void* p) { return load_n<uint2>(p); }

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
  // One instruction, as written: the compiler split some plain uint4 stores in four.
  // (The "memory" clobber keeps it ordered with the kernel's other memory accesses.)
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#endif
}

// 4 bytes from and to `p` (4-byte aligned): two 16-bit values, the first in the low half.
__device__ __forceinline__ uint32_t ld32(const void* p) { return load_n<uint32_t>(p); }

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

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  T x;
  put(&x, v);
  return x;
}

// Two values rounded to T, packed into one register (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
#ifdef LMKIT_EMU
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_f<T>(lo), b = from_f<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return (uint32_t)ua | ((uint32_t)ub << 16);
}
#else
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
#endif

// d (16 × 8, f32) += a (16 × 16) · b (16 × 8) on tensor cores, T = bf16 or f16:
// mma.sync.aligned.m16n8k16.row.col with PTX's fragment layout (emu/emu.h spells it out).
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b);
#ifdef LMKIT_EMU
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
  lmkit_emu_mma16816(d, a, b, std::is_same_v<T, __half>);
}
#else
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// VEC = 16 / sizeof(T) values at p into f32 x: one 16-byte load when `wide` (p 16-byte aligned,
// VEC values there), else n ≤ VEC loads of one value, the rest of x set to `pad`.
template <typename T>
__device__ __forceinline__ void ld_vec(const T* p, float* x, int n, bool wide, float pad) {
  constexpr int VEC = 16 / sizeof(T);
  if (wide) {
    const uint4 raw = load16<uint4>(p);
    T t[VEC];
    memcpy(t, &raw, 16);
#pragma unroll
    for (int e = 0; e < VEC; e++) x[e] = to_f(t[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; e++) x[e] = e < n ? to_f(p[e]) : pad;
  }
}

// N values at p (N a multiple of VEC) in N / VEC calls of ld_vec.
template <typename T, int N>
__device__ __forceinline__ void ld_span(const T* p, float* x, int n, bool wide, float pad) {
  constexpr int VEC = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < N; q += VEC) ld_vec<T>(p + q, x + q, n - q, wide, pad);
}

// x[0..VEC) (or its first n when not `wide`) stored at p in T. The 16 bytes are packed by
// register pairs: rounding into a T array first made the compiler split the store in four.
template <typename T>
__device__ __forceinline__ void st_vec(T* p, const float* x, int n, bool wide) {
  constexpr int VEC = 16 / sizeof(T);
  if (wide) {
    uint4 u;
    if constexpr (sizeof(T) == 4) {
      memcpy(&u, x, 16);
    } else {
      u.x = pack2<T>(x[0], x[1]);
      u.y = pack2<T>(x[2], x[3]);
      u.z = pack2<T>(x[4], x[5]);
      u.w = pack2<T>(x[6], x[7]);
    }
    store16(p, u);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; e++)
      if (e < n) put(p + e, x[e]);  // static indices: x stays in registers
  }
}

// x[0..N) stored at p (its first n when not `wide`) in N / VEC calls of st_vec.
template <typename T, int N>
__device__ __forceinline__ void st_span(T* p, const float* x, int n, bool wide) {
  constexpr int VEC = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < N; q += VEC) st_vec<T>(p + q, x + q, n - q, wide);
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

// ---------------------------------------------------------------------------------------------
// Cross-entropy rows (fused.cu's xent_fwd/xent_bwd, train.cu's tr_xent), one block per row.
// The row's softmax statistics come from one read of the row, in 16-byte loads where the row
// allows them (online softmax: Milakov & Gimelshein, 2018, arXiv:1805.02867): each thread
// keeps a running max m and Σ exp(z − m), rescaling the sum by exp(m_old − m_new) when the max
// grows, and the block combines the threads' pairs. Two passes of one value per thread per
// load (the first version) read the row twice at 2 bytes per load instruction: 325 µs per
// 2048 rows of 49,152 bf16 on an H200.

// x[0..n) into (m, s), xm = max(x).
__device__ __forceinline__ void online_add(float& m, float& s, const float* x, int n, float xm) {
  if (xm > m) {
    s *= expf(m - xm);  // 0 while m is −∞
    m = xm;
  }
  if (m != -INFINITY)
    for (int e = 0; e < n; e++) s += expf(x[e] - m);
}

// Every thread of the block gets the row's max and Σ exp(z − max) (0 for an all −∞ row).
// Thread t takes the groups of VEC values at t·VEC, (t + blockDim)·VEC, ..., each one 16-byte
// load where the row allows, else VEC loads of one value (the row's tail padded with −∞, which
// adds exactly 0): the same sums in the same order either way, so the same bits.
template <typename T>
__device__ void row_softmax_stats(const T* z, int v, float* m_out, float* s_out) {
  constexpr int VEC = 16 / sizeof(T);
  const bool wide = v % VEC == 0 && aligned16(z);
  float m = -INFINITY, s = 0.f;
#pragma unroll 4
  for (int c = threadIdx.x * VEC; c < v; c += blockDim.x * VEC) {
    float x[VEC];
    ld_vec<T>(z + c, x, v - c, wide, -INFINITY);
    float xm = -INFINITY;
#pragma unroll
    for (int e = 0; e < VEC; e++) xm = fmaxf(xm, x[e]);
    online_add(m, s, x, VEC, xm);
  }
  const float mb = block_max(m);
  *s_out = block_sum(m == -INFINITY ? 0.f : s * expf(m - mb));
  *m_out = mb;
}

// dz = g · (exp(z − m) · inv − onehot(k)) over the row (dz may be z: each value is read
// before it is written, by the same thread).
template <typename T>
__device__ void xent_grad_row(const T* z, T* dz, int v, float m, float inv, uint32_t k, float g) {
  constexpr int VEC = 16 / sizeof(T);
  const bool wide = v % VEC == 0 && aligned16(z) && aligned16(dz);
#pragma unroll 4
  for (int c = threadIdx.x * VEC; c < v; c += blockDim.x * VEC) {
    const int n = min(VEC, v - c);
    float x[VEC];
    ld_vec<T>(z + c, x, n, wide, 0.f);
#pragma unroll
    for (int e = 0; e < VEC; e++)
      x[e] = g * (expf(x[e] - m) * inv - ((uint32_t)(c + e) == k ? 1.f : 0.f));
    st_vec<T>(dz + c, x, n, wide);
  }
}

// nll = log s + m − z_k, NaN for a target outside the row.
__device__ __forceinline__ float xent_nll(float m, float s, float zk, uint32_t k, int v) {
  return k < (uint32_t)v ? logf(s) + m - zk : __int_as_float(0x7fc00000);
}
