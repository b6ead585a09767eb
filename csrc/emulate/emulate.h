// A CPU emulation of the small part of the CUDA execution model the kernels in csrc/ use, so
// CI (no GPU) runs the very same kernel code on CPU tensors and checks it against the
// reference, as TRITON_INTERPRET=1 does for the Triton kernels.
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread: a fiber runs until it
// reaches __syncthreads() or returns, then the next one runs; a barrier is passed once every
// live thread of the block has reached it (a barrier that only some threads reach is
// reported as an error, as it is a bug on a GPU). Blocks run one after another. Shared memory
// is shared by the block's fibers; dynamic shared memory (128-byte aligned, as on a GPU) is
// filled with 0xFF bytes (NaN / -1) before each block, so reads of unwritten shared memory
// show. ldmatrix records the 8x8 matrices at the 32 lanes' row addresses, and mma.sync gives
// each lane its own results from them by the PTX fragment layouts (see Frag below).
// cp.async copies are queued per thread and performed only when that thread waits for their
// group, so a read of a stage before its wait sees stale bytes, as it may on a GPU.
//
// Checked as the hardware requires (a failed check is reported when the launch ends):
// ldmatrix row addresses and cp.async source and destination 16-byte aligned, and every
// ldmatrix row and cp.async destination inside the dynamic shared memory.
//
// Races: set_reverse(true) runs the threads of each block, and the blocks of each grid, in
// the opposite order. A kernel whose threads exchange data without a barrier between the
// write and the read (or whose blocks depend on one another) then computes something else,
// so running the tests both ways and comparing bit for bit exposes such races.
//
// Not emulated (checked on the GPU instead): other warp-level primitives (shuffles, votes)
// and timing.
#pragma once

#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

inline dim3 thread_idx, block_idx, block_dim, grid_dim;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};

// A thread's cp.async copies: the open group and the committed ones, oldest first.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
  bool valid;
};
struct AsyncQueue {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> committed;
};

inline ucontext_t scheduler;
inline std::vector<AsyncQueue> async_queues;
inline std::vector<Fiber> fibers;
inline std::vector<unsigned char> smem_storage;
inline unsigned char* smem = nullptr;  // smem_storage's first 128-byte aligned byte
inline size_t smem_size = 0;
inline int current = 0;
inline bool reverse = false;
inline std::string error;  // the first failed check of the running launch
inline const std::function<void()>* body = nullptr;
constexpr size_t kStackBytes = 256 * 1024;

inline unsigned char* dynamic_smem() { return smem; }

inline void set_reverse(bool on) { reverse = on; }

// Record a failed check (the fiber goes on; launch() throws once the grid is done).
inline void fail(const std::string& what) {
  if (error.empty())
    error = "CUDA emulator: " + what + " (thread " + std::to_string(current) + " of block (" +
            std::to_string(block_idx.x) + ", " + std::to_string(block_idx.y) + "))";
}

inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// True if [p, p + bytes) lies in the dynamic shared memory, else records why not.
inline bool in_smem(const void* p, size_t bytes, const char* what) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b >= smem && b + bytes <= smem + smem_size) return true;
  fail(std::string(what) + " outside the dynamic shared memory");
  return false;
}

inline void fiber_entry() {
  (*body)();
  fibers[current].done = true;  // returning resumes the scheduler through uc_link
}

inline void syncthreads() { swapcontext(&fibers[current].ctx, &scheduler); }

template <size_t N>
inline void cp_async(void* dst, const void* src, bool valid) {
  if (!aligned(dst, N) || !aligned(src, N))
    fail("cp.async address not " + std::to_string(N) + "-byte aligned");
  if (in_smem(dst, N, "cp.async destination"))
    async_queues[current].open.push_back({dst, src, N, valid});
}
inline void cp_async16(void* dst, const void* src, bool valid) { cp_async<16>(dst, src, valid); }
inline void cp_async4(void* dst, const void* src, bool valid) { cp_async<4>(dst, src, valid); }

inline void cp_async_commit() {
  AsyncQueue& q = async_queues[current];
  q.committed.push_back(std::move(q.open));
  q.open.clear();
}

template <int N>
inline void cp_async_wait() {
  AsyncQueue& q = async_queues[current];
  while (q.committed.size() > static_cast<size_t>(N)) {
    for (const AsyncCopy& c : q.committed.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, c.bytes);
      else
        std::memset(c.dst, 0, c.bytes);
    }
    q.committed.pop_front();
  }
}

// ldmatrix.x4: the fragment keeps the four 8x8 matrices as the 32 lanes' row addresses held
// at load time (row(lane) for every lane, as each lane's own address on a GPU), so mma16816
// can look up any lane's registers, which a fiber cannot read from the other lanes.
struct Frag {
  uint16_t m[4][8][8];  // [matrix][row][element] as stored in shared memory
  bool trans;
};

template <bool TRANS, typename Row>
inline void ldsm_x4(Frag& f, Row row) {
  f.trans = TRANS;
  for (int lane = 0; lane < 32; ++lane) {
    const void* p = row(lane);
    if (!aligned(p, 16)) fail("ldmatrix row address not 16-byte aligned");
    if (!in_smem(p, 16, "ldmatrix row")) return;
    std::memcpy(f.m[lane / 8][lane % 8], p, 16);
  }
}

// The 16-bit element that lane holds in register reg, half h (0: low), after ldmatrix.
inline uint16_t frag_elem(const Frag& f, int lane, int reg, int h) {
  const int g = lane / 4, t = lane % 4;
  return f.trans ? f.m[reg][2 * t + h][g] : f.m[reg][g][2 * t + h];
}

template <typename T>
inline float bits_to_f(uint16_t v) {
  T x;
  std::memcpy(&x, &v, 2);
  return static_cast<float>(x);
}

// mma.m16n8k16 (row.col, fp32 accumulators) for the calling lane's four results: A (r, k) is
// held by lane 4 (r % 8) + (k % 8) / 2 in register r / 8 + 2 (k / 8); B (k, n) of the j-th
// n8 half by lane 4 n + (k % 8) / 2 in register 2 j + k / 8; half k % 2 of each.
template <typename T>
inline void mma16816(float* c, const Frag& a, const Frag& b, int j) {
  const int lane = static_cast<int>(thread_idx.x % 32), g = lane / 4, t = lane % 4;
  float ar[2][16], bc[2][16];
  for (int k = 0; k < 16; ++k)
    for (int s = 0; s < 2; ++s) {
      const int r = g + 8 * s, n = 2 * t + s;
      ar[s][k] = bits_to_f<T>(frag_elem(a, 4 * (r % 8) + (k % 8) / 2, r / 8 + 2 * (k / 8), k % 2));
      bc[s][k] = bits_to_f<T>(frag_elem(b, 4 * n + (k % 8) / 2, 2 * j + k / 8, k % 2));
    }
  for (int i = 0; i < 4; ++i) {
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += ar[i / 2][k] * bc[i % 2][k];
    c[i] += s;
  }
}

inline void set_thread(int i) {
  current = i;
  thread_idx = dim3(i % block_dim.x, (i / block_dim.x) % block_dim.y,
                    i / (block_dim.x * block_dim.y));
}

inline void run_block(int n) {
  async_queues.assign(n, AsyncQueue{});  // copies left in flight at exit are dropped
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  int live = n;
  while (live) {
    int waiting = 0;
    for (int j = 0; j < n; ++j) {
      const int i = reverse ? n - 1 - j : j;
      if (fibers[i].done) continue;
      set_thread(i);
      swapcontext(&scheduler, &fibers[i].ctx);
      if (!fibers[i].done) ++waiting;
    }
    if (waiting && waiting != live)
      throw std::runtime_error(
          "CUDA emulator: __syncthreads() reached by " + std::to_string(waiting) + " of " +
          std::to_string(live) + " live threads in block (" + std::to_string(block_idx.x) +
          ", " + std::to_string(block_idx.y) + ")");
    live = waiting;
  }
}

// Run fn once per thread of every block of the grid; throws if a check failed.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& fn) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (static_cast<int>(fibers.size()) < n) fibers.resize(n);
  for (auto& f : fibers)
    if (f.stack.empty()) f.stack.resize(kStackBytes);
  smem_storage.resize(smem_bytes + 128);
  smem = smem_storage.data() + (128 - reinterpret_cast<uintptr_t>(smem_storage.data()) % 128);
  smem_size = smem_bytes;
  body = &fn;
  error.clear();
  grid_dim = grid;
  block_dim = block;
  const unsigned blocks = grid.x * grid.y * grid.z;
  for (unsigned j = 0; j < blocks && error.empty(); ++j) {
    const unsigned b = reverse ? blocks - 1 - j : j;
    block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
    std::memset(smem, 0xFF, smem_size);
    run_block(n);
  }
  body = nullptr;
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace emu

#define threadIdx ::emu::thread_idx
#define blockIdx ::emu::block_idx
#define blockDim ::emu::block_dim
#define gridDim ::emu::grid_dim
#define __syncthreads() ::emu::syncthreads()
