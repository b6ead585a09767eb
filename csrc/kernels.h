// Plain C++ interface between the torch launchers (ops.cpp) and the CUDA kernels (*.cu):
// one argument struct and one launch function per kernel family. No torch types here, so
// every .cu compiles with nvcc alone (CI's compile check) and the same kernels build for the
// CPU emulator (emulate/).
#pragma once

#include <cstdint>

#ifdef MOE_EMULATE
using cudaStream_t = void*;
using cudaError_t = int;
#else
#include <cuda_runtime.h>
#endif

namespace moe {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
// Activation codes shared with the Triton kernels (ops/grouped_gemm.py ACTIVATIONS).
enum Act : int { kIdentity = 0, kSilu = 1, kSwiglu = 2, kGelu = 3 };
// Tokens per router block; the permutation ranks pairs within the same blocks.
constexpr int kRouterTokens = 32;

// logits = u @ wg (fp32), top-k (ties to the lowest index), softmax over the kept k,
// block_counts[b][e] = pairs of block b routed to e, block_gates[b][e] = the sum of their
// top-k weights.
struct RouteArgs {
  const void* u;
  const void* wg;
  float* logits;
  int* ids;
  float* weights;
  int* block_counts;
  float* block_gates;
  int64_t T, D, stride_u, stride_w;
  int E, K;
  DType dtype;
};
cudaError_t route(const RouteArgs& a, cudaStream_t stream);

// Stable counting sort of the T*K pairs by expert. A one-block scan of the router's
// block_counts writes block_base[b][e] (the first sorted position of block b's pairs for
// expert e), offsets [E+1] and aux = aux_scale * sum_e (gates of e) * (pairs of e); then
// one block per router block scatters its pairs.
struct PermuteArgs {
  const int* ids;
  const int* block_counts;
  const float* block_gates;
  int* block_base;
  int* offsets;
  float* aux;
  int* sorted_pair;
  int* pair_pos;
  int64_t T;
  int E, K;
  float aux_scale;
};
cudaError_t permute(const PermuteArgs& a, cudaStream_t stream);

// Grouped GEMM over expert row ranges (groups > 0) or one dense GEMM (groups == 0).
// Forward: c = act(a[rows] @ b[g] + bias[g]) * scale[pair], optional pre-activation.
// Dact: dpre = d act(preact) of (gate[pair] * (a[rows] @ b[g])), with per-tile partial sums
// of the gate gradient. Rows gathered by pair // gather_div when gather_div > 0.
struct GemmArgs {
  const void* a;
  const void* b;
  void* c;             // forward output [M, N] (dact: dpre [M, N or 2N])
  void* preact;        // forward: saved pre-activation or null; dact: the saved input
  const void* bias;    // forward only, [G, N'] or [N']
  const int* pair_ids;
  const float* scale;  // forward: row scale by pair; dact: the gate by pair
  float* dgate_part;   // dact: [P, n_tiles] partial gate gradients, or null
  const int* offsets;
  int64_t M, N, K;     // N: output columns (half of b's columns for SwiGLU)
  int64_t stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_cm, stride_pm,
      stride_biasg, stride_dg;
  int groups, gather_div;
  bool scatter;
  Act act;
  DType dtype;
};
cudaError_t gemm_forward(const GemmArgs& a, cudaStream_t stream);
cudaError_t gemm_dact(const GemmArgs& a, cudaStream_t stream);
constexpr int kGemmBlockN = 128;  // forward/dact tile width (SwiGLU forward: 64 outputs)

// dW[g] = act(a[rows_g])^T @ (scale * b[rows_g]) per group (or over all rows), and the bias
// gradient (column sums of scale * b) when db is set. Empty groups get exact zeros.
struct WeightGradArgs {
  const void* a;
  const void* b;
  void* dw;
  void* db;
  const int* pair_ids;
  const float* scale;
  const int* offsets;
  int64_t M, KA, NB;
  int64_t stride_am, stride_ak, stride_bm, stride_bn, stride_wg, stride_wk, stride_wn,
      stride_dbg;
  int groups, a_gather_div, b_gather_div;
  Act a_act;
  DType dtype;
};
cudaError_t weight_grad(const WeightGradArgs& a, cudaStream_t stream);

// Row norm (norm = 0 LayerNorm, 1 RMSNorm, -1 none) of x, or, for combine, of the sum of
// the k pair rows plus the shared row; statistics in fp32.
struct NormArgs {
  const void* x;       // norm: x [T, N]; combine: y_pairs [T*k, N]
  const void* shared;  // combine: [T, N] or null
  void* y;
  void* z;             // combine: the pre-norm sum, or null
  const void* w;
  const void* b;
  float* mean;
  float* rstd;
  int64_t T, N, stride_x, stride_s, stride_y, stride_z;
  int k, norm;         // k = 0: plain norm of x
  float eps;
  DType dtype;
};
cudaError_t norm_forward(const NormArgs& a, cudaStream_t stream);

struct NormBwdArgs {
  const void* dy;
  const void* x;
  const void* w;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dw_part;  // [cdiv(T, kNormBwdRows), N] or null
  float* db_part;
  int64_t T, N, stride_dy, stride_x, stride_dx;
  bool rms;
  DType dtype, dy_dtype;
};
cudaError_t norm_backward(const NormBwdArgs& a, cudaStream_t stream);
constexpr int kNormBwdRows = 16;

}  // namespace moe
