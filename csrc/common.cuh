// Device helpers shared by the kernels: dtype conversion, activations, a fixed-order block
// reduction, dtype dispatch and the launch macro (a real launch, or the CPU emulator).
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "kernels.h"

#ifdef MOE_EMULATE
#include "emulate/emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace moe {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks (a power of two)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// act(z) for identity, SiLU and GELU (erf); SwiGLU is silu(gate) * up, done by the callers.
__device__ __forceinline__ float act_fwd(float z, int act) {
  if (act == kGelu) return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
  if (act == kIdentity) return z;
  return z * sigmoid(z);
}

// d act(z) / dz (SiLU also serves SwiGLU's gate half).
__device__ __forceinline__ float act_grad(float z, int act) {
  if (act == kGelu)
    return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) +
           z * 0.3989422804014327f * expf(-0.5f * z * z);
  if (act == kIdentity) return 1.0f;
  float s = sigmoid(z);
  return s * (1.0f + z * (1.0f - s));
}

// Asynchronous 16-byte (and 4-byte) global -> shared copies (sm_80 cp.async; zeros when
// !valid, src must then still be a mapped address). A thread's copies land once it waits for
// their group: cp_async_wait<N>() returns when at most N of its committed groups are still in
// flight.
#ifndef MOE_EMULATE
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#else
using ::emu::cp_async16;
using ::emu::cp_async4;
using ::emu::cp_async_commit;
using ::emu::cp_async_wait;
#endif

// Warp-level tensor-core operands (sm_80 ldmatrix + mma.sync, 16-bit inputs, fp32 sums).
// A Frag is one 16x16 operand tile as the four 8x8 matrices of an ldmatrix.x4: lane L gives
// the address of row L % 8 of matrix L / 8 (16 contiguous bytes of shared memory), and
// receives two elements of each matrix (TRANS: of its transpose). For mma.m16n8k16 the
// matrices are, in order: A (m, k) = (0-7, 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15);
// B (k, n) = (0-7, 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15), i.e. two k16 x n8 operands.
// mma16816 adds A @ B[:, 8j:8j+8] into c, lane L holding c[i] at row L / 4 + 8 (i / 2), column
// 2 (L % 4) + i % 2 of the 16x8 result (PTX ISA, "Matrix fragments for mma.m16n8k16").
// row(lane) returns the lane's row pointer; the emulator calls it for every lane.
#ifndef MOE_EMULATE
struct Frag {
  uint32_t r[4];
};

template <bool TRANS, typename Row>
__device__ __forceinline__ void ldsm_x4(Frag& f, Row row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row(threadIdx.x % 32)));
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(f.r[0]), "=r"(f.r[1]), "=r"(f.r[2]), "=r"(f.r[3]) : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(f.r[0]), "=r"(f.r[1]), "=r"(f.r[2]), "=r"(f.r[3]) : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const Frag& a, const Frag& b, int j) {
  const uint32_t b0 = b.r[2 * j], b1 = b.r[2 * j + 1];
  if (std::is_same<T, __nv_bfloat16>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b0), "r"(b1));
}
#else
using ::emu::Frag;
using ::emu::ldsm_x4;
using ::emu::mma16816;
#endif

// Sum of v over the block in a fixed tree order (deterministic); every thread gets the
// result. red: kThreads floats of shared memory, free again on return.
__device__ __forceinline__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  float r = red[0];
  __syncthreads();
  return r;
}

}  // namespace moe

// Run BODY with T bound to the C++ type of a DType.
#define MOE_DISPATCH(DTYPE, T, ...)           \
  switch (DTYPE) {                            \
    case ::moe::kF16: {                       \
      using T = __half;                       \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    case ::moe::kBF16: {                      \
      using T = __nv_bfloat16;                \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    default: {                                \
      using T = float;                        \
      __VA_ARGS__;                            \
    }                                         \
  }

#ifdef MOE_EMULATE
#define MOE_LAUNCH(KFN, GRID, BLOCK, SMEM, STREAM, ...) \
  ::emu::launch(GRID, BLOCK, SMEM, [&] { KFN(__VA_ARGS__); })
#define MOE_LAUNCH_STATUS() 0
#else
#define MOE_LAUNCH(KFN, GRID, BLOCK, SMEM, STREAM, ...) \
  KFN<<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__)
#define MOE_LAUNCH_STATUS() cudaGetLastError()
#endif

// Let KFN use BYTES of dynamic shared memory (above the 48 KiB default needs an opt-in).
#ifdef MOE_EMULATE
#define MOE_ALLOW_SMEM(KFN, BYTES) ((void)0)
#else
#define MOE_ALLOW_SMEM(KFN, BYTES)                                                           \
  do {                                                                                       \
    if ((BYTES) > 48 * 1024)                                                                 \
      cudaFuncSetAttribute(KFN, cudaFuncAttributeMaxDynamicSharedMemorySize,                 \
                           static_cast<int>(BYTES));                                         \
  } while (0)
#endif

// Dynamic shared memory of a kernel, as a byte pointer.
#ifdef MOE_EMULATE
#define MOE_DYNAMIC_SMEM(NAME) unsigned char* NAME = ::emu::dynamic_smem()
#else
#define MOE_DYNAMIC_SMEM(NAME) extern __shared__ __align__(128) unsigned char NAME[]
#endif
