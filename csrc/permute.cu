// Permutation: stable counting sort of the T*k (token, slot) pairs by expert. The router
// counted each block's pairs per expert; block_base (an exclusive prefix sum over experts and
// blocks, computed by the launcher with torch ops on the device) is each block's first sorted
// position per expert. Here one block per router block ranks its pairs within their expert
// by pair order and scatters them. No atomics: deterministic.
#include "common.cuh"

namespace moe {

__global__ void __launch_bounds__(kThreads) permute_kernel(PermuteArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  int* s_ids = reinterpret_cast<int*>(raw);  // [kRouterTokens * K]
  const int per = kRouterTokens * a.K;
  const int64_t pairs = a.T * a.K;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * per;
  for (int i = threadIdx.x; i < per; i += kThreads)
    s_ids[i] = first + i < pairs ? a.ids[first + i] : -1;
  __syncthreads();
  for (int i = threadIdx.x; i < per; i += kThreads) {
    const int e = s_ids[i];
    if (e < 0) continue;
    int rank = 0;
    for (int q = 0; q < i; ++q) rank += s_ids[q] == e;
    const int pos = a.block_base[static_cast<int64_t>(blockIdx.x) * a.E + e] + rank;
    a.sorted_pair[pos] = static_cast<int>(first + i);
    a.pair_pos[first + i] = pos;
  }
}

cudaError_t permute(const PermuteArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((a.T + kRouterTokens - 1) / kRouterTokens);
  auto kfn = permute_kernel;
  MOE_LAUNCH(kfn, blocks, kThreads, sizeof(int) * kRouterTokens * a.K, stream, a);
  return MOE_LAUNCH_STATUS();
}

}  // namespace moe
