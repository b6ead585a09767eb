// Router: logits = u @ W_g with fp32 accumulation, top-k (ties to the lowest expert index),
// softmax over the k kept logits, and per-block expert counts and gate sums (for the
// permutation and the aux loss).
// One 256-thread block per kRouterTokens (32) tokens: 8 threads per token split the d_in
// reduction, then sum their partials in a fixed order (deterministic).
#include "common.cuh"

namespace moe {

constexpr int kSplit = kThreads / kRouterTokens;  // threads per token

__device__ __forceinline__ bool ranks_above(float a, float b) {
  return isnan(a) ? !isnan(b) : a > b;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) route_kernel(RouteArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  float* s_part = reinterpret_cast<float*>(raw);       // [kThreads]
  float* s_logit = s_part + kThreads;                  // [kRouterTokens][E]
  float* s_kept = s_logit + kRouterTokens * a.E;       // [kRouterTokens][K]
  float* s_gate = s_kept + kRouterTokens * a.K;        // [kRouterTokens][K]
  int* s_ids = reinterpret_cast<int*>(s_gate + kRouterTokens * a.K);  // [kRouterTokens][K]
  const int tid = threadIdx.x, local = tid / kSplit, sub = tid % kSplit;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterTokens + local;
  const bool valid = t < a.T;
  const T* u = static_cast<const T*>(a.u) + (valid ? t : 0) * a.stride_u;
  const T* wg = static_cast<const T*>(a.wg);

  for (int e = 0; e < a.E; ++e) {
    float acc = 0.0f;
    if (valid)
      for (int64_t d = sub; d < a.D; d += kSplit) acc += to_f(u[d]) * to_f(wg[d * a.stride_w + e]);
    s_part[tid] = acc;
    __syncthreads();
    if (sub == 0) {
      float s = 0.0f;
      for (int j = 0; j < kSplit; ++j) s += s_part[tid + j];
      s_logit[local * a.E + e] = s;
    }
    __syncthreads();
  }

  if (sub == 0 && valid) {
    const float* lg = s_logit + local * a.E;
    float* kept = s_kept + local * a.K;
    int* ids = s_ids + local * a.K;
    for (int e = 0; e < a.E; ++e) a.logits[t * a.E + e] = lg[e];
    // repeated argmax over the experts not taken yet, scanning up: ties keep the lowest e and
    // NaN ranks above everything (as in torch.topk), so the K ids are always distinct
    for (int j = 0; j < a.K; ++j) {
      int best = -1;
      for (int e = 0; e < a.E; ++e) {
        bool taken = false;
        for (int i = 0; i < j; ++i) taken |= ids[i] == e;
        if (!taken && (best < 0 || ranks_above(lg[e], lg[best]))) best = e;
      }
      ids[j] = best;
      kept[j] = lg[best];
    }
    float z = 0.0f;
    for (int j = 0; j < a.K; ++j) z += expf(kept[j] - kept[0]);
    for (int j = 0; j < a.K; ++j) {
      const float gate = expf(kept[j] - kept[0]) / z;
      a.ids[t * a.K + j] = ids[j];
      a.weights[t * a.K + j] = gate;
      s_gate[local * a.K + j] = gate;
    }
  }
  __syncthreads();
  if (tid < a.E) {  // pairs of this block per expert and their gate sum, in token order
    int count = 0;
    float gates = 0.0f;
    for (int l = 0; l < kRouterTokens; ++l) {
      if (static_cast<int64_t>(blockIdx.x) * kRouterTokens + l >= a.T) break;
      for (int j = 0; j < a.K; ++j) {
        if (s_ids[l * a.K + j] != tid) continue;
        ++count;
        gates += s_gate[l * a.K + j];
      }
    }
    a.block_counts[static_cast<int64_t>(blockIdx.x) * a.E + tid] = count;
    a.block_gates[static_cast<int64_t>(blockIdx.x) * a.E + tid] = gates;
  }
}

cudaError_t route(const RouteArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((a.T + kRouterTokens - 1) / kRouterTokens);
  const size_t smem = sizeof(float) * (kThreads + kRouterTokens * (a.E + 2 * a.K)) +
                      sizeof(int) * kRouterTokens * a.K;
  MOE_DISPATCH(a.dtype, T, {
    auto kfn = route_kernel<T>;
    MOE_ALLOW_SMEM(kfn, smem);  // above 48 KiB for large E and k (e.g. E = k = 128)
    MOE_LAUNCH(kfn, blocks, kThreads, smem, stream, a);
  });
  return MOE_LAUNCH_STATUS();
}

}  // namespace moe
