// Permutation: stable counting sort of the T*k (token, slot) pairs by expert, in two launches.
// scan_kernel (one block) turns the router's per-block counts into block_base, each block's
// first sorted position per expert (offsets[e] plus the pairs of e in earlier blocks), the
// expert offsets, and the aux loss from the per-block gate sums. permute_kernel (one block per
// router block) ranks its pairs within their expert by pair order and scatters them.
// No atomics, fixed summation orders: deterministic.
#include "common.cuh"

namespace moe {

// Thread (part p, expert e) owns a contiguous run of router blocks for expert e: it sums
// them, a per-expert scan over the parts gives each run's start, and it writes the run's
// block_base.
__global__ void __launch_bounds__(kThreads) scan_kernel(PermuteArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  int* s_count = reinterpret_cast<int*>(raw);                // [kThreads]: run sums, then starts
  float* s_gate = reinterpret_cast<float*>(s_count + kThreads);  // [kThreads]
  int* s_start = reinterpret_cast<int*>(s_gate + kThreads);      // [E]: offsets[e]
  const int E = a.E, parts = kThreads / E, tid = threadIdx.x;
  const int p = tid / E, e = tid % E;
  const int64_t nb = (a.T + kRouterTokens - 1) / kRouterTokens;
  const int64_t len = (nb + parts - 1) / parts;
  const bool active = p < parts;
  const int64_t lo = active ? (p * len < nb ? p * len : nb) : 0;
  const int64_t hi = active ? (lo + len < nb ? lo + len : nb) : 0;
  int count = 0;
  float gates = 0.0f;
  for (int64_t b = lo; b < hi; ++b) {
    count += a.block_counts[b * E + e];
    gates += a.block_gates[b * E + e];
  }
  s_count[tid] = count;
  s_gate[tid] = gates;
  __syncthreads();
  if (tid < E) {  // per expert: exclusive scan of the runs, totals in s_count / s_gate[tid]
    int run = 0;
    float gsum = 0.0f;
    for (int q = 0; q < parts; ++q) {
      const int c = s_count[q * E + tid];
      s_count[q * E + tid] = run;
      run += c;
      gsum += s_gate[q * E + tid];
    }
    s_start[tid] = run;  // the total for now; the expert's start after the next step
    s_gate[tid] = gsum;
  }
  __syncthreads();
  if (tid == 0) {
    int start = 0;
    float aux = 0.0f;
    for (int x = 0; x < E; ++x) {
      const int total = s_start[x];
      aux += s_gate[x] * static_cast<float>(total);
      a.offsets[x] = start;
      s_start[x] = start;
      start += total;
    }
    a.offsets[E] = start;
    *a.aux = aux * a.aux_scale;
  }
  __syncthreads();
  if (active) {
    int base = s_start[e] + s_count[tid];
    for (int64_t b = lo; b < hi; ++b) {
      const int c = a.block_counts[b * E + e];
      a.block_base[b * E + e] = base;
      base += c;
    }
  }
}

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
  auto scan = scan_kernel;
  MOE_LAUNCH(scan, 1, kThreads, sizeof(int) * (2 * kThreads + a.E), stream, a);
  const unsigned blocks = static_cast<unsigned>((a.T + kRouterTokens - 1) / kRouterTokens);
  if (blocks) {
    auto kfn = permute_kernel;
    MOE_LAUNCH(kfn, blocks, kThreads, sizeof(int) * kRouterTokens * a.K, stream, a);
  }
  return MOE_LAUNCH_STATUS();
}

}  // namespace moe
