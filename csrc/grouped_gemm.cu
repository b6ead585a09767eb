// Grouped GEMMs over experts' variable-length row ranges, with the row gather fused into the
// A-tile load and the activation / gate weight (forward) or the activation's derivative and
// the gate gradient (backward, "dact") fused into the epilogue; and the per-expert weight
// gradient. 64x128 output tiles, 256 threads: tensor cores through WMMA for fp16/bf16
// (fp32 accumulation), plain fp32 FMAs for fp32. Rows in expert-sorted order: group g owns
// rows offsets[g] .. offsets[g+1]; the grid is sized by cdiv(rows, 64) + groups M tiles (an
// upper bound, no host sync) and blocks past the last tile exit at once. All indices are
// 64-bit. No atomics: every output element is written by exactly one thread.
#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "moe_adapter_kernels: the CUDA kernels need sm_80 or newer (bf16 tensor cores)"
#endif

namespace moe {

constexpr int BM = 64, BN = kGemmBlockN, BK = 32;
constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;  // padded shared-memory rows
constexpr size_t kGemmSmem = sizeof(float) * BM * LDC;  // >= the A and B tiles of any dtype

// Accumulator of a 64x128 tile from A [BM][LDA] and B [BK][LDB] in shared memory.
// fp16/bf16: 8 warps as 2 x 4, each 32x32 = 2 x 2 WMMA 16x16x16 fragments.
template <typename T>
struct TileAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[2][2];
  __device__ TileAcc() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(f[i][j], 0.0f);
  }
  __device__ void mma(const T* sA, const T* sB) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sA + (wm * 32 + i * 16) * LDA + kk, LDA);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sB + kk * LDB + wn * 32 + j * 16, LDB);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(f[i][j], fa[i], fb[j], f[i][j]);
    }
  }
  __device__ void store(float* sC) {
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(sC + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16,
                                        f[i][j], LDC, nvcuda::wmma::mem_row_major);
  }
};

// fp32: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 i and columns tx + 16 j.
template <>
struct TileAcc<float> {
  float v[4][8];
  __device__ TileAcc() {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) v[i][j] = 0.0f;
  }
  __device__ void mma(const float* sA, const float* sB) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int kk = 0; kk < BK; ++kk) {
      float ar[4], bc[8];
      for (int i = 0; i < 4; ++i) ar[i] = sA[(ty + 16 * i) * LDA + kk];
      for (int j = 0; j < 8; ++j) bc[j] = sB[kk * LDB + tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 8; ++j) v[i][j] += ar[i] * bc[j];
    }
  }
  __device__ void store(float* sC) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) sC[(ty + 16 * i) * LDC + tx + 16 * j] = v[i][j];
  }
};

// The M tile's group and row range; group -1 past the last tile.
struct Tile {
  int group;
  int64_t row0, row_end;
};

__device__ __forceinline__ Tile find_tile(const int* offsets, int groups, int64_t M, int64_t pid_m) {
  if (groups == 0) return {0, pid_m * BM, M};
  int64_t before = 0;
  for (int g = 0; g < groups; ++g) {
    const int64_t lo = offsets[g], hi = offsets[g + 1], n = (hi - lo + BM - 1) / BM;
    if (pid_m < before + n) return {g, lo + (pid_m - before) * BM, hi};
    before += n;
  }
  return {-1, 0, 0};
}

// Forward (DACT false): c = act(A[rows] @ B[g] + bias) * scale. SWIGLU: the B tile holds 64
// gate columns then the 64 matching up columns (b is [gate | up], N output columns).
// Dact (DACT true): dh = A[rows] @ B[g] (B = W^T through strides), then dpre from preact.
template <typename T, bool DACT, bool SWIGLU>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  T* sA = reinterpret_cast<T*>(raw);
  T* sB = sA + BM * LDA;
  float* sC = reinterpret_cast<float*>(raw);  // reuses the A/B tiles after the main loop
  __shared__ int64_t s_arow[BM], s_pair[BM];
  constexpr int BNO = (SWIGLU && !DACT) ? BN / 2 : BN;  // output columns per tile
  const int tid = threadIdx.x;
  const int64_t n_tiles = (a.N + BNO - 1) / BNO;
  const int64_t pid_m = blockIdx.x / n_tiles, pid_n = blockIdx.x % n_tiles;
  const Tile tile = find_tile(a.offsets, a.groups, a.M, pid_m);
  if (tile.group < 0) return;
  const int64_t col0 = pid_n * BNO;
  if (tid < BM) {
    const int64_t r = tile.row0 + tid;
    const bool ok = r < tile.row_end;
    const int64_t pair = (ok && a.pair_ids) ? a.pair_ids[r] : r;
    s_pair[tid] = pair;
    s_arow[tid] = !ok ? -1 : (a.gather_div > 0 ? pair / a.gather_div : r);
  }
  __syncthreads();

  const T* A = static_cast<const T*>(a.a);
  const T* B = static_cast<const T*>(a.b) + tile.group * a.stride_bg;
  const bool b_n_fast = a.stride_bn == 1 || a.stride_bk != 1;  // coalesce along B's unit stride
  TileAcc<T> acc;
  for (int64_t k0 = 0; k0 < a.K; k0 += BK) {
    for (int i = tid; i < BM * BK; i += kThreads) {
      const int r = i / BK, kk = i % BK;
      const int64_t row = s_arow[r], k = k0 + kk;
      sA[r * LDA + kk] = (row >= 0 && k < a.K) ? A[row * a.stride_am + k * a.stride_ak] : from_f<T>(0.0f);
    }
    for (int i = tid; i < BK * BN; i += kThreads) {
      const int kk = b_n_fast ? i / BN : i % BK, c = b_n_fast ? i % BN : i / BK;
      const int64_t k = k0 + kk;
      int64_t col = col0 + c;
      bool ok = col < a.N;
      if (SWIGLU && !DACT) {
        const int half = c / BNO;
        col = col0 + c % BNO;
        ok = col < a.N;
        col += half * a.N;
      }
      sB[kk * LDB + c] = (ok && k < a.K) ? B[k * a.stride_bk + col * a.stride_bn] : from_f<T>(0.0f);
    }
    __syncthreads();
    acc.mma(sA, sB);
    __syncthreads();
  }
  acc.store(sC);
  __syncthreads();

  T* out = static_cast<T*>(a.c);
  T* pre = static_cast<T*>(a.preact);
  const T* bias = static_cast<const T*>(a.bias);
  for (int i = tid; i < BM * BNO; i += kThreads) {
    const int r = i / BNO, c = i % BNO;
    const int64_t col = col0 + c, row = tile.row0 + r, pair = s_pair[r];
    if (s_arow[r] < 0 || col >= a.N) continue;
    const float x = sC[r * LDC + c];
    if (!DACT) {
      const int64_t bofs = tile.group * a.stride_biasg + col;
      const float z = x + (bias ? to_f(bias[bofs]) : 0.0f);
      float v;
      if (SWIGLU) {
        const float zu = sC[r * LDC + c + BNO] + (bias ? to_f(bias[bofs + a.N]) : 0.0f);
        if (pre) {
          pre[row * a.stride_pm + col] = from_f<T>(z);
          pre[row * a.stride_pm + a.N + col] = from_f<T>(zu);
        }
        v = z * sigmoid(z) * zu;
      } else {
        if (pre) pre[row * a.stride_pm + col] = from_f<T>(z);
        v = act_fwd(z, a.act);
      }
      if (a.scale) v *= a.scale[pair];
      out[(a.scatter ? pair : row) * a.stride_cm + col] = from_f<T>(v);
    } else {
      const float dh = x * (a.scale ? a.scale[pair] : 1.0f);
      const float z = to_f(pre[row * a.stride_pm + col]);
      if (SWIGLU) {
        const float up = to_f(pre[row * a.stride_pm + a.N + col]);
        out[row * a.stride_pm + col] = from_f<T>(dh * up * act_grad(z, kSilu));
        out[row * a.stride_pm + a.N + col] = from_f<T>(dh * z * sigmoid(z));
      } else {
        out[row * a.stride_pm + col] = from_f<T>(dh * act_grad(z, a.act));
      }
    }
  }
  if (DACT && a.dgate_part && tid < BM && s_arow[tid] >= 0) {
    // this tile's share of dgate[pair] = sum_n dh * act(z), in column order
    const int64_t row = tile.row0 + tid;
    float s = 0.0f;
    for (int c = 0; c < BN && col0 + c < a.N; ++c) {
      const float z = to_f(pre[row * a.stride_pm + col0 + c]);
      const float h = SWIGLU ? z * sigmoid(z) * to_f(pre[row * a.stride_pm + a.N + col0 + c])
                             : act_fwd(z, a.act);
      s += sC[tid * LDC + c] * h;
    }
    a.dgate_part[s_pair[tid] * a.stride_dg + pid_n] = s;
  }
}

template <bool DACT>
cudaError_t launch_gemm(const GemmArgs& a, cudaStream_t stream) {
  const bool swiglu = a.act == kSwiglu;
  const int64_t bno = (swiglu && !DACT) ? BN / 2 : BN;
  const int64_t blocks = ((a.M + BM - 1) / BM + a.groups) * ((a.N + bno - 1) / bno);
  MOE_DISPATCH(a.dtype, T, {
    auto kfn = swiglu ? gemm_kernel<T, DACT, true> : gemm_kernel<T, DACT, false>;
    MOE_LAUNCH(kfn, static_cast<unsigned>(blocks), kThreads, kGemmSmem, stream, a);
  });
  return MOE_LAUNCH_STATUS();
}

cudaError_t gemm_forward(const GemmArgs& a, cudaStream_t stream) { return launch_gemm<false>(a, stream); }
cudaError_t gemm_dact(const GemmArgs& a, cudaStream_t stream) { return launch_gemm<true>(a, stream); }

// dW[g][k0:k0+64, n0:n0+128] = act(A[rows])^T @ (scale * B[rows]) over group g's rows, 32
// rows at a time; the A^T tile is the "A" operand of the same 64x128 tile product.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(WeightGradArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  T* sA = reinterpret_cast<T*>(raw);
  T* sB = sA + BM * LDA;
  float* sC = reinterpret_cast<float*>(raw);
  __shared__ int64_t s_arow[BK], s_brow[BK];
  __shared__ float s_scale[BK];
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.x, n_tiles = (a.NB + BN - 1) / BN;
  const int64_t k0 = (blockIdx.y / n_tiles) * BM, n0 = (blockIdx.y % n_tiles) * BN;
  const int64_t lo = a.groups ? a.offsets[g] : 0, hi = a.groups ? a.offsets[g + 1] : a.M;
  const bool bias_tile = a.db && k0 == 0;
  const T* A = static_cast<const T*>(a.a);
  const T* B = static_cast<const T*>(a.b);
  float bsum = 0.0f;
  TileAcc<T> acc;
  for (int64_t r0 = lo; r0 < hi; r0 += BK) {
    if (tid < BK) {
      const int64_t r = r0 + tid;
      const bool ok = r < hi;
      const int64_t pair = (ok && a.pair_ids) ? a.pair_ids[r] : r;
      s_arow[tid] = !ok ? -1 : (a.a_gather_div > 0 ? pair / a.a_gather_div : r);
      s_brow[tid] = !ok ? -1 : (a.b_gather_div > 0 ? pair / a.b_gather_div : r);
      s_scale[tid] = (ok && a.scale) ? a.scale[pair] : 1.0f;
    }
    __syncthreads();
    for (int i = tid; i < BM * BK; i += kThreads) {  // sA[kk][r] = act(A[row r][k0 + kk])
      const int kk = i % BM, r = i / BM;
      const int64_t row = s_arow[r], k = k0 + kk;
      float v = 0.0f;
      if (row >= 0 && k < a.KA) {
        const float x = to_f(A[row * a.stride_am + k * a.stride_ak]);
        v = a.a_act == kSwiglu ? x * sigmoid(x) * to_f(A[row * a.stride_am + (k + a.KA) * a.stride_ak])
                               : act_fwd(x, a.a_act);
      }
      sA[kk * LDA + r] = from_f<T>(v);
    }
    for (int i = tid; i < BK * BN; i += kThreads) {
      const int r = i / BN, c = i % BN;
      const int64_t row = s_brow[r], col = n0 + c;
      sB[r * LDB + c] = (row >= 0 && col < a.NB)
                            ? from_f<T>(to_f(B[row * a.stride_bm + col * a.stride_bn]) * s_scale[r])
                            : from_f<T>(0.0f);
    }
    __syncthreads();
    if (bias_tile && tid < BN)
      for (int r = 0; r < BK; ++r) bsum += to_f(sB[r * LDB + tid]);
    acc.mma(sA, sB);
    __syncthreads();
  }
  acc.store(sC);
  __syncthreads();
  T* dw = static_cast<T*>(a.dw) + g * a.stride_wg;
  for (int i = tid; i < BM * BN; i += kThreads) {
    const int r = i / BN, c = i % BN;
    if (k0 + r < a.KA && n0 + c < a.NB)
      dw[(k0 + r) * a.stride_wk + (n0 + c) * a.stride_wn] = from_f<T>(sC[r * LDC + c]);
  }
  if (bias_tile && tid < BN && n0 + tid < a.NB)
    static_cast<T*>(a.db)[g * a.stride_dbg + n0 + tid] = from_f<T>(bsum);
}

cudaError_t weight_grad(const WeightGradArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.groups ? a.groups : 1),
                  static_cast<unsigned>(((a.KA + BM - 1) / BM) * ((a.NB + BN - 1) / BN)));
  MOE_DISPATCH(a.dtype, T, {
    auto kfn = weight_grad_kernel<T>;
    MOE_LAUNCH(kfn, grid, kThreads, kGemmSmem, stream, a);
  });
  return MOE_LAUNCH_STATUS();
}

}  // namespace moe
