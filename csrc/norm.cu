// Row-wise LayerNorm / RMSNorm (statistics in fp32), fused with the combine step when k > 0:
// y[t] = N(sum_j y_pairs[t*k + j] + shared[t]), the k slots summed in a fixed order (no
// atomics). Backward: dx per row, and per-block partial sums of the weight and bias
// gradients that the launcher reduces in a fixed order. One 256-thread block per row (per
// kNormBwdRows rows in the backward); the row is kept in shared memory as fp32.
#include "common.cuh"

namespace moe {

template <typename T>
__global__ void __launch_bounds__(kThreads) norm_kernel(NormArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  float* red = reinterpret_cast<float*>(raw);  // [kThreads]
  float* row = red + kThreads;                 // [N]
  const int64_t t = blockIdx.x;
  const T* X = static_cast<const T*>(a.x);
  const T* S = static_cast<const T*>(a.shared);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < a.N; c += kThreads) {
    float v = 0.0f;
    if (a.k == 0) {
      v = to_f(X[t * a.stride_x + c]);
    } else {
      for (int j = 0; j < a.k; ++j) v += to_f(X[(t * a.k + j) * a.stride_x + c]);
      if (S) v += to_f(S[t * a.stride_s + c]);
    }
    if (a.z) static_cast<T*>(a.z)[t * a.stride_z + c] = from_f<T>(v);
    row[c] = v;
    sum += v;
  }
  float mean = 0.0f, rstd = 1.0f;
  if (a.norm >= 0) {
    if (a.norm == 0) mean = block_sum(sum, red) / a.N;
    float sq = 0.0f;
    for (int64_t c = threadIdx.x; c < a.N; c += kThreads) sq += (row[c] - mean) * (row[c] - mean);
    rstd = 1.0f / sqrtf(block_sum(sq, red) / a.N + a.eps);
    if (threadIdx.x == 0) {
      a.mean[t] = mean;
      a.rstd[t] = rstd;
    }
  }
  const T* W = static_cast<const T*>(a.w);
  const T* B = static_cast<const T*>(a.b);
  T* Y = static_cast<T*>(a.y);
  for (int64_t c = threadIdx.x; c < a.N; c += kThreads) {
    float v = row[c];
    if (a.norm >= 0) {
      v = (v - mean) * rstd;
      if (W) v *= to_f(W[c]);
      if (B) v += to_f(B[c]);
    }
    Y[t * a.stride_y + c] = from_f<T>(v);
  }
}

cudaError_t norm_forward(const NormArgs& a, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kThreads + a.N);
  MOE_DISPATCH(a.dtype, T, {
    auto kfn = norm_kernel<T>;
    MOE_ALLOW_SMEM(kfn, smem);
    MOE_LAUNCH(kfn, static_cast<unsigned>(a.T), kThreads, smem, stream, a);
  });
  return MOE_LAUNCH_STATUS();
}

template <typename T, typename TD>
__global__ void __launch_bounds__(kThreads) norm_bwd_kernel(NormBwdArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  float* red = reinterpret_cast<float*>(raw);  // [kThreads]
  float* dw = red + kThreads;                  // [N] partial sums, column c owned by one thread
  float* db = dw + a.N;                        // [N]
  const T* X = static_cast<const T*>(a.x);
  const TD* DY = static_cast<const TD*>(a.dy);
  const T* W = static_cast<const T*>(a.w);
  T* DX = static_cast<T*>(a.dx);
  for (int64_t c = threadIdx.x; c < a.N; c += kThreads) dw[c] = db[c] = 0.0f;
  for (int r = 0; r < kNormBwdRows; ++r) {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kNormBwdRows + r;
    if (t >= a.T) break;  // uniform across the block
    const float mean = a.rms ? 0.0f : a.mean[t], rstd = a.rstd[t];
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t c = threadIdx.x; c < a.N; c += kThreads) {
      const float xhat = (to_f(X[t * a.stride_x + c]) - mean) * rstd;
      const float dy = to_f(DY[t * a.stride_dy + c]);
      const float wdy = W ? dy * to_f(W[c]) : dy;
      s1 += xhat * wdy;
      s2 += wdy;
      dw[c] += dy * xhat;
      db[c] += dy;
    }
    const float c1 = block_sum(s1, red) / a.N, c2 = block_sum(s2, red) / a.N;
    for (int64_t c = threadIdx.x; c < a.N; c += kThreads) {
      const float xhat = (to_f(X[t * a.stride_x + c]) - mean) * rstd;
      const float dy = to_f(DY[t * a.stride_dy + c]);
      const float wdy = W ? dy * to_f(W[c]) : dy;
      const float dx = a.rms ? (wdy - xhat * c1) * rstd : (wdy - xhat * c1 - c2) * rstd;
      DX[t * a.stride_dx + c] = from_f<T>(dx);
    }
  }
  for (int64_t c = threadIdx.x; c < a.N; c += kThreads) {
    if (a.dw_part) a.dw_part[static_cast<int64_t>(blockIdx.x) * a.N + c] = dw[c];
    if (a.db_part) a.db_part[static_cast<int64_t>(blockIdx.x) * a.N + c] = db[c];
  }
}

cudaError_t norm_backward(const NormBwdArgs& a, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kThreads + 2 * a.N);
  const unsigned blocks = static_cast<unsigned>((a.T + kNormBwdRows - 1) / kNormBwdRows);
  MOE_DISPATCH(a.dtype, T, {
    MOE_DISPATCH(a.dy_dtype, TD, {
      auto kfn = norm_bwd_kernel<T, TD>;
      MOE_ALLOW_SMEM(kfn, smem);
      MOE_LAUNCH(kfn, blocks, kThreads, smem, stream, a);
    });
  });
  return MOE_LAUNCH_STATUS();
}

}  // namespace moe
