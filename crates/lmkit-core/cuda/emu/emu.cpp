// A CPU emulator for lmkit's CUDA kernels, for the tests (`cuda-emu` feature). Each block runs
// on its own: every thread is a fiber (ucontext) and runs until it reaches __syncthreads, a
// warp shuffle or its end; then the scheduler releases whichever barrier all of its live
// threads have reached. A barrier that can never be released (divergent synchronization) is
// reported as an error, never a hang. Grids run one block after another, so `__shared__`
// (static) variables are per block.

#include <ucontext.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "emu.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

enum State { RUN, WAIT_BLOCK, WAIT_WARP, DONE };

struct Kernel {
  int nargs;
  void (*call)(void*, const uint64_t*);
  void* fn;
};

std::map<std::string, Kernel>& registry() {
  static std::map<std::string, Kernel> r;
  return r;
}

struct Fiber {
  ucontext_t ctx;
  State state;
};

const size_t STACK = 256 * 1024;
ucontext_t sched;
std::vector<Fiber> fibers;
// Fiber stacks, allocated once per thread index and never zero-filled (untouched pages cost
// nothing).
std::vector<std::unique_ptr<char[]>> stacks;
std::vector<float> shfl;
std::vector<int> parity;
// The registers of mma.sync (6 per thread, two buffers used in turn as shfl's) and each
// thread's buffer.
std::vector<uint32_t> mma_regs;
std::vector<int> mma_parity;
// The row addresses of ldmatrix (one per thread, two buffers used in turn).
std::vector<const void*> ldm_rows;
std::vector<int> ldm_parity;
// Each thread's cp.async copies not yet landed: committed groups, oldest first, and the open
// group last.
struct Copy {
  void* dst;
  const void* src;  // null: zeros
};
std::vector<std::vector<std::vector<Copy>>> cp_groups;
int cur = 0;
// The schedule, from LMKIT_EMU_ORDER (a comma-separated list). By default the threads of a
// block run in order, each to its next barrier, before any barrier is released. `reverse` runs
// the blocks of a grid and the threads last first. `warps` runs one warp at a time as far as it
// can go (through its warp barriers, up to a block barrier) before the next starts, as if it
// raced ahead of the others. A kernel whose result depends on the schedule (shared memory read
// and written by two threads with no barrier between them, blocks of one launch reading each
// other's output) then gives other numbers, which the tests catch.
bool reverse = false, warp_eager = false;
}  // namespace

namespace {
const Kernel* kernel = nullptr;
const uint64_t* kargs = nullptr;

void fiber_main() {
  kernel->call(kernel->fn, kargs);
  fibers[cur].state = DONE;
  swapcontext(&fibers[cur].ctx, &sched);
}

void wait(State s) {
  fibers[cur].state = s;
  swapcontext(&fibers[cur].ctx, &sched);
}

// Runs one block; false on a deadlock.
bool run_block(int threads) {
  for (int i = 0; i < threads; i++) {
    Fiber& f = fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[i].get();
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = RUN;
    parity[i] = 0;
    mma_parity[i] = 0;
    ldm_parity[i] = 0;
    cp_groups[i].assign(1, {});
  }
  const int warps = (threads + 31) / 32;
  for (;;) {
    if (warp_eager) {
      for (int wn = 0; wn < warps; wn++) {
        const int w0 = 32 * (reverse ? warps - 1 - wn : wn), w1 = std::min(w0 + 32, threads);
        for (;;) {
          for (int n = w0; n < w1; n++) {
            const int i = reverse ? w1 - 1 - (n - w0) : n;
            if (fibers[i].state != RUN) continue;
            cur = i;
            threadIdx.x = (unsigned)i;
            swapcontext(&sched, &fibers[i].ctx);
          }
          // On through the warp's own barriers while all its live lanes wait at one.
          bool live = false, all_warp = true;
          for (int i = w0; i < w1; i++) {
            if (fibers[i].state == DONE) continue;
            live = true;
            if (fibers[i].state != WAIT_WARP) all_warp = false;
          }
          if (!live || !all_warp) break;
          for (int i = w0; i < w1; i++)
            if (fibers[i].state == WAIT_WARP) fibers[i].state = RUN;
        }
      }
    } else {
      for (int n = 0; n < threads; n++) {
        const int i = reverse ? threads - 1 - n : n;
        if (fibers[i].state != RUN) continue;
        cur = i;
        threadIdx.x = (unsigned)i;
        swapcontext(&sched, &fibers[i].ctx);
      }
    }
    bool any = false, all_block = true;
    for (int i = 0; i < threads; i++) {
      if (fibers[i].state != DONE) any = true;
      if (fibers[i].state != DONE && fibers[i].state != WAIT_BLOCK) all_block = false;
    }
    if (!any) return true;
    if (all_block) {
      for (int i = 0; i < threads; i++)
        if (fibers[i].state == WAIT_BLOCK) fibers[i].state = RUN;
      continue;
    }
    bool released = false;
    for (int w0 = 0; w0 < threads; w0 += 32) {
      bool live = false, all_warp = true;
      for (int i = w0; i < w0 + 32 && i < threads; i++) {
        if (fibers[i].state == DONE) continue;
        live = true;
        if (fibers[i].state != WAIT_WARP) all_warp = false;
      }
      if (live && all_warp) {
        for (int i = w0; i < w0 + 32 && i < threads; i++)
          if (fibers[i].state == WAIT_WARP) fibers[i].state = RUN;
        released = true;
      }
    }
    if (!released) return false;
  }
}

}  // namespace

void __syncthreads() { wait(WAIT_BLOCK); }

void __syncwarp(unsigned) { wait(WAIT_WARP); }

// The first fault of the running launch (lmkit_emu_fault), or empty.
static std::string fault;

void lmkit_emu_fault(const char* what) {
  if (fault.empty()) fault = what;
}

// Set by lmkit_emu_force_scalar: every buffer counts as unaligned. Each launch reads it once
// (scalar_launch), so a test that sets it while another test's kernel runs cannot split one
// warp between the vector and the scalar loop.
static std::atomic<bool> force_scalar{false};
static bool scalar_launch = false;

bool lmkit_emu_aligned16(const void* p) {
  return !scalar_launch && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Makes aligned16 answer no (tests of the scalar loops); the results must not change.
extern "C" void lmkit_emu_force_scalar(int on) { force_scalar.store(on != 0); }

// Two exchange buffers used in turn: a lane that has read this shuffle's value may write the
// next one before the others have read, and cannot write this buffer again before all of them
// have reached the next shuffle (so have read it). One barrier per shuffle.
float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const int me = cur;
  const int n = (int)blockDim.x;
  const int buf = parity[me] * n;
  parity[me] ^= 1;
  shfl[buf + me] = v;
  wait(WAIT_WARP);
  return shfl[buf + ((me & ~31) | ((me & 31) ^ lane_mask))];
}

static float half_bits(uint32_t reg, int hi, bool f16) {
  const uint16_t bits = (uint16_t)(hi ? reg >> 16 : reg & 0xffffu);
  if (f16) {
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
  }
  return __bfloat162float(__nv_bfloat16{bits});
}

void lmkit_emu_mma16816(float* d, const uint32_t* a, const uint32_t* b, bool f16) {
  const int me = cur;
  const int n = (int)blockDim.x;
  uint32_t* buf = &mma_regs[(size_t)mma_parity[me] * n * 6];
  mma_parity[me] ^= 1;
  for (int i = 0; i < 4; i++) buf[me * 6 + i] = a[i];
  buf[me * 6 + 4] = b[0];
  buf[me * 6 + 5] = b[1];
  wait(WAIT_WARP);
  const int w = me & ~31, lane = me & 31, g = lane >> 2, c = lane & 3;
  // Element (r, k) of A and (k, col) of B, from the lane and register that hold it.
  auto A = [&](int r, int k) {
    const int from = w + (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half_bits(buf[from * 6 + reg], k & 1, f16);
  };
  auto B = [&](int k, int col) {
    const int from = w + col * 4 + (k % 8) / 2, reg = k >= 8 ? 1 : 0;
    return half_bits(buf[from * 6 + 4 + reg], k & 1, f16);
  };
  for (int i = 0; i < 4; i++) {
    const int r = g + 8 * (i >> 1), col = 2 * c + (i & 1);
    float s = d[i];
    for (int k = 0; k < 16; k++) s += A(r, k) * B(k, col);
    d[i] = s;
  }
}

void lmkit_emu_ldmatrix_x4(uint32_t* r, const void* row, bool trans) {
  const int me = cur;
  const int n = (int)blockDim.x;
  const void** buf = &ldm_rows[(size_t)ldm_parity[me] * n];
  ldm_parity[me] ^= 1;
  if (reinterpret_cast<uintptr_t>(row) & 15) lmkit_emu_fault("ldmatrix: a row off a 16-byte boundary");
  buf[me] = row;
  wait(WAIT_WARP);
  const int w = me & ~31, lane = me & 31, g = lane >> 2, c = lane & 3;
  // Element (i, j) of matrix m: value j of the row whose address lane 8m + i gave.
  auto at = [&](int m, int i, int j) {
    uint16_t v;
    memcpy(&v, static_cast<const char*>(buf[w + 8 * m + i]) + 2 * j, 2);
    return (uint32_t)v;
  };
  for (int m = 0; m < 4; m++) {
    r[m] = trans ? at(m, 2 * c, g) | at(m, 2 * c + 1, g) << 16
                 : at(m, g, 2 * c) | at(m, g, 2 * c + 1) << 16;
  }
}

static void land(const Copy& c) {
  if (c.src)
    memcpy(c.dst, c.src, 16);
  else
    memset(c.dst, 0, 16);
}

void lmkit_emu_cp_async16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) & 15 || (valid && reinterpret_cast<uintptr_t>(src) & 15))
    lmkit_emu_fault("cp.async: 16 bytes off a 16-byte boundary");
  const Copy c{dst, valid ? src : nullptr};
  if (warp_eager)
    land(c);
  else
    cp_groups[cur].back().push_back(c);
}

void lmkit_emu_cp_commit() { cp_groups[cur].emplace_back(); }

void lmkit_emu_cp_wait(int n) {
  auto& g = cp_groups[cur];
  // Committed groups are all but the open last one; land the oldest until n are pending.
  while ((int)g.size() - 1 > n) {
    for (const Copy& c : g.front()) land(c);
    g.erase(g.begin());
  }
}

namespace lmkit_emu {
void add_kernel(const char* name, int nargs, void (*call)(void*, const uint64_t*), void* fn) {
  registry()[name] = Kernel{nargs, call, fn};
}
}  // namespace lmkit_emu

// Runs kernel `name` over the grid (gx, gy) with `threads` threads per block; the arguments
// are 64-bit slots (pointers, ints sign-extended, floats in the low 32 bits). Returns 0, or
// writes why not into `err` and returns 1.
extern "C" void lmkit_emu_decode_anchor();
extern "C" void lmkit_emu_train_anchor();
extern "C" void lmkit_emu_fused_anchor();

// Whether kernel `name` is compiled in (1) or not (0).
extern "C" int lmkit_emu_has(const char* name) {
  lmkit_emu_decode_anchor();
  lmkit_emu_train_anchor();
  lmkit_emu_fused_anchor();
  return registry().count(name) ? 1 : 0;
}

extern "C" int lmkit_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned threads,
                                const uint64_t* args, int nargs, char* err, int errlen) {
  lmkit_emu_decode_anchor();
  lmkit_emu_train_anchor();
  lmkit_emu_fused_anchor();
  auto it = registry().find(name);
  if (it == registry().end()) {
    snprintf(err, errlen, "no emulated kernel `%s`", name);
    return 1;
  }
  if (it->second.nargs != nargs) {
    snprintf(err, errlen, "kernel `%s` takes %d arguments, got %d", name, it->second.nargs,
             nargs);
    return 1;
  }
  if (threads == 0 || threads % 32 != 0 || threads > 1024) {
    snprintf(err, errlen, "kernel `%s`: %u threads per block (want a multiple of 32, <= 1024)",
             name, threads);
    return 1;
  }
  kernel = &it->second;
  kargs = args;
  scalar_launch = force_scalar.load();
  fibers.assign(threads, Fiber{});
  while (stacks.size() < threads) stacks.emplace_back(new char[STACK]);
  shfl.assign(2 * threads, 0.f);
  parity.assign(threads, 0);
  mma_regs.assign((size_t)2 * threads * 6, 0u);
  mma_parity.assign(threads, 0);
  ldm_rows.assign((size_t)2 * threads, nullptr);
  ldm_parity.assign(threads, 0);
  cp_groups.assign(threads, {});
  blockDim = dim3{threads, 1, 1};
  gridDim = dim3{gx, gy, 1};
  fault.clear();
  const char* order = getenv("LMKIT_EMU_ORDER");
  const std::string o = order ? order : "";
  reverse = o.find("reverse") != std::string::npos;
  warp_eager = o.find("warps") != std::string::npos;
  for (unsigned yy = 0; yy < gy; yy++) {
    for (unsigned xx = 0; xx < gx; xx++) {
      const unsigned x = reverse ? gx - 1 - xx : xx, y = reverse ? gy - 1 - yy : yy;
      blockIdx = dim3{x, y, 0};
      if (!run_block((int)threads)) {
        snprintf(err, errlen, "kernel `%s`: block (%u, %u) deadlocked at a barrier", name, x, y);
        return 1;
      }
      if (!fault.empty()) {
        snprintf(err, errlen, "kernel `%s`: block (%u, %u): %s", name, x, y, fault.c_str());
        return 1;
      }
    }
  }
  return 0;
}
