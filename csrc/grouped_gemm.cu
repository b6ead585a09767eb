// Grouped GEMMs over experts' variable-length row ranges, with the row gather fused into the
// A-tile load and the activation / gate weight (forward) or the activation's derivative and
// the gate gradient (backward, "dact") fused into the epilogue; and the per-expert weight
// gradient. 128x128 output tiles, 256 threads: tensor cores through WMMA for fp16/bf16
// (fp32 accumulation), plain fp32 FMAs for fp32. The forward/dact kernel streams its A and B
// tiles through a multi-stage shared-memory ring with 16-byte cp.async copies (scalar loads
// where strides or alignment do not allow 16 bytes). B is staged n-fast or k-fast, following
// its unit stride (W or W^T), so global reads stay coalesced either way. Rows in expert-sorted
// order: group g owns rows offsets[g] .. offsets[g+1]; the grid is sized by
// cdiv(rows, 128) + groups M tiles (an upper bound, no host sync) and blocks past the last
// tile exit at once. All indices are 64-bit. No atomics: every output element is written by
// exactly one thread.
#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "moe_adapter_kernels: the CUDA kernels need sm_80 or newer (bf16 tensor cores)"
#endif

namespace moe {

constexpr int BM = 128, BN = kGemmBlockN, BK = 32;
// Padded shared-memory rows: A [BM][LDA] k-fast or [BK][LDAT] m-fast, B [BK][LDB] n-fast or
// [BN][LDBT] k-fast, the fp32 result tile [BM][LDC]. The pads keep every WMMA pointer 32-byte aligned and every
// cp.async destination 16-byte aligned.
constexpr int LDA = BK + 8, LDAT = BM + 8, LDB = BN + 8, LDBT = BK + 8, LDC = BN + 4;
constexpr int kTileA = BM * LDA, kTileB = BK * LDB > BN * LDBT ? BK * LDB : BN * LDBT;
static_assert(kTileA % 64 == 0 && kTileB % 64 == 0, "stage bases must stay 128-byte aligned");

template <typename T>
constexpr int kStages = sizeof(T) == 2 ? 3 : 2;  // K steps in the shared-memory ring
template <typename T>
constexpr size_t gemm_smem() {
  const size_t ring = sizeof(T) * kStages<T> * (kTileA + kTileB);
  const size_t result = sizeof(float) * BM * LDC;  // reuses the ring after the main loop
  return ring > result ? ring : result;
}

// Accumulator of a 128x128 tile from A (k-fast [BM][LDA], or m-fast [BK][LDAT] when AT) and
// B (n-fast [BK][LDB], or k-fast [BN][LDBT] when BT) in shared memory. fp16/bf16: 8 warps as 2 x 4, each 64x32 = 4 x 2 WMMA
// 16x16x16 fragments.
template <typename T>
struct TileAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[4][2];
  __device__ TileAcc() {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(f[i][j], 0.0f);
  }
  // The fragment at row (A) / column (B) x and reduction offset kk of a shared tile stored
  // x-fast ([k][ld]) or k-fast ([x][ld]).
  template <bool X_FAST, typename Frag>
  __device__ static void load(Frag& f, const T* s, int x, int kk, int ld) {
    nvcuda::wmma::load_matrix_sync(f, X_FAST ? s + kk * ld + x : s + x * ld + kk, ld);
  }
  template <bool AT, bool BT>
  __device__ void mma(const T* sA, const T* sB) {
    using namespace nvcuda;
    using LayoutA = typename std::conditional<AT, wmma::col_major, wmma::row_major>::type;
    using LayoutB = typename std::conditional<BT, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb[2];
      for (int i = 0; i < 4; ++i) load<AT>(fa[i], sA, wm * 64 + i * 16, kk, AT ? LDAT : LDA);
      for (int j = 0; j < 2; ++j) load<!BT>(fb[j], sB, wn * 32 + j * 16, kk, BT ? LDBT : LDB);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(f[i][j], fa[i], fb[j], f[i][j]);
    }
  }
  __device__ void store(float* sC) {
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(sC + (wm * 64 + i * 16) * LDC + wn * 32 + j * 16,
                                        f[i][j], LDC, nvcuda::wmma::mem_row_major);
  }
};

// fp32: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 i and columns tx + 16 j.
template <>
struct TileAcc<float> {
  float v[8][8];
  __device__ TileAcc() {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) v[i][j] = 0.0f;
  }
  template <bool AT, bool BT>
  __device__ void mma(const float* sA, const float* sB) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int kk = 0; kk < BK; ++kk) {
      float ar[8], bc[8];
      for (int i = 0; i < 8; ++i) {
        const int m = ty + 16 * i;
        ar[i] = AT ? sA[kk * LDAT + m] : sA[m * LDA + kk];
      }
      for (int j = 0; j < 8; ++j) {
        const int n = tx + 16 * j;
        bc[j] = BT ? sB[n * LDBT + kk] : sB[kk * LDB + n];
      }
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) v[i][j] += ar[i] * bc[j];
    }
  }
  __device__ void store(float* sC) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int i = 0; i < 8; ++i)
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

// Can an operand be copied in 16-byte chunks (V = 16 / sizeof(T) elements)? Its chunks run
// along a unit stride over an extent that V divides, and the base and every other stride keep
// each chunk 16-byte aligned.
template <typename T>
__device__ __forceinline__ bool copy16(const void* base, int64_t unit_stride, int64_t extent,
                                       int64_t other_stride, int64_t group_stride = 0) {
  constexpr int V = 16 / sizeof(T);
  return unit_stride == 1 && extent % V == 0 && other_stride % V == 0 && group_stride % V == 0 &&
         reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// Copies 16-byte chunks (V elements) of the A rows and B columns of one K step into a stage
// of the shared-memory ring: cp.async where the source chunk is 16-byte aligned and has unit
// stride, else element by element. Out-of-range elements become zeros.
template <typename T, bool SWIGLU, bool BT>
struct TileLoader {
  static constexpr int V = 16 / sizeof(T);
  static constexpr int BNO = SWIGLU ? BN / 2 : BN;
  const T* A;
  const T* B;
  const int64_t* arow;  // A row of each tile row, -1 past the range
  int64_t K, N, col0, sam, sak, sbk, sbn;
  bool vec_a, vec_b;

  // B column of tile column c (SwiGLU forward: [gate | up] halves), -1 if out of range.
  __device__ int64_t bcol(int c) const {
    const int64_t col = col0 + (SWIGLU ? c % BNO : c);
    if (col >= N) return -1;
    return SWIGLU ? col + (c / BNO) * N : col;
  }

  __device__ void operator()(T* sA, T* sB, int64_t k0) const {
    constexpr int kChunksA = BM * BK / V, kChunksB = BK * BN / V;
    for (int i = threadIdx.x; i < kChunksA; i += kThreads) {
      const int r = i / (BK / V), kk = (i % (BK / V)) * V;
      const int64_t row = arow[r], k = k0 + kk;
      T* dst = sA + r * LDA + kk;
      if (vec_a) {
        const bool ok = row >= 0 && k < K;
        cp_async16(dst, ok ? A + row * sam + k : A, ok);
      } else {
        for (int e = 0; e < V; ++e)
          dst[e] = (row >= 0 && k + e < K) ? A[row * sam + (k + e) * sak] : from_f<T>(0.0f);
      }
    }
    for (int i = threadIdx.x; i < kChunksB; i += kThreads) {
      // k-fast: chunk (n, kk..kk+V) of column n; n-fast: chunk (kk, c..c+V) of row kk
      const int n = BT ? i / (BK / V) : (i % (BN / V)) * V;
      const int kk = BT ? (i % (BK / V)) * V : i / (BN / V);
      T* dst = BT ? sB + n * LDBT + kk : sB + kk * LDB + n;
      if (vec_b) {
        const int64_t col = bcol(n), k = k0 + kk;
        const bool ok = col >= 0 && k < K;
        cp_async16(dst, ok ? B + k * sbk + col * sbn : B, ok);
      } else {
        for (int e = 0; e < V; ++e) {
          const int64_t col = bcol(BT ? n : n + e), k = k0 + kk + (BT ? e : 0);
          dst[e] = (col >= 0 && k < K) ? B[k * sbk + col * sbn] : from_f<T>(0.0f);
        }
      }
    }
  }
};


// Forward (DACT false): c = act(A[rows] @ B[g] + bias) * scale. SWIGLU: the B tile holds 64
// gate columns then the 64 matching up columns (b is [gate | up], N output columns).
// Dact (DACT true): dh = A[rows] @ B[g] (B = W^T through strides), then dpre from preact.
// BT: B's unit stride is along K (stage it k-fast).
template <typename T, bool DACT, bool SWIGLU, bool BT>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  constexpr int S = kStages<T>;
  T* ring = reinterpret_cast<T*>(raw);  // stage s: A at s * (kTileA + kTileB), then B
  float* sC = reinterpret_cast<float*>(raw);
  __shared__ int64_t s_arow[BM], s_pair[BM];
  constexpr bool kGateUp = SWIGLU && !DACT;
  constexpr int BNO = kGateUp ? BN / 2 : BN;  // output columns per tile
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

  const T* B = static_cast<const T*>(a.b) + tile.group * a.stride_bg;
  const TileLoader<T, kGateUp, BT> load{
      static_cast<const T*>(a.a), B, s_arow, a.K, a.N, col0,
      a.stride_am, a.stride_ak, a.stride_bk, a.stride_bn,
      copy16<T>(a.a, a.stride_ak, a.K, a.stride_am),
      BT ? copy16<T>(a.b, a.stride_bk, a.K, a.stride_bn, a.stride_bg)
         : copy16<T>(a.b, a.stride_bn, a.N, a.stride_bk, a.stride_bg)};
  const int64_t k_tiles = (a.K + BK - 1) / BK;
  for (int s = 0; s < S - 1; ++s) {  // prologue: the first S - 1 K steps in flight
    if (s < k_tiles) load(ring + s * (kTileA + kTileB), ring + s * (kTileA + kTileB) + kTileA, s * BK);
    cp_async_commit();
  }
  TileAcc<T> acc;
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<S - 2>();  // this thread's copies for step kt have landed
    __syncthreads();         // everyone's have, and everyone is done with step kt - 1
    const int64_t next = kt + S - 1;
    if (next < k_tiles) {
      T* st = ring + (next % S) * (kTileA + kTileB);  // the stage step kt - 1 used
      load(st, st + kTileA, next * BK);
    }
    cp_async_commit();
    const T* st = ring + (kt % S) * (kTileA + kTileB);
    acc.template mma<false, BT>(st, st + kTileA);
  }
  cp_async_wait<0>();
  __syncthreads();
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
  const bool swiglu = a.act == kSwiglu, bt = a.stride_bk == 1 && a.stride_bn != 1;
  const int64_t bno = (swiglu && !DACT) ? BN / 2 : BN;
  const int64_t blocks = ((a.M + BM - 1) / BM + a.groups) * ((a.N + bno - 1) / bno);
  MOE_DISPATCH(a.dtype, T, {
    auto kfn = swiglu ? (bt ? gemm_kernel<T, DACT, true, true> : gemm_kernel<T, DACT, true, false>)
                      : (bt ? gemm_kernel<T, DACT, false, true> : gemm_kernel<T, DACT, false, false>);
    MOE_ALLOW_SMEM(kfn, gemm_smem<T>());
    MOE_LAUNCH(kfn, static_cast<unsigned>(blocks), kThreads, gemm_smem<T>(), stream, a);
  });
  return MOE_LAUNCH_STATUS();
}

cudaError_t gemm_forward(const GemmArgs& a, cudaStream_t stream) { return launch_gemm<false>(a, stream); }
cudaError_t gemm_dact(const GemmArgs& a, cudaStream_t stream) { return launch_gemm<true>(a, stream); }

// dW[g][k0:k0+128, n0:n0+128] = act(A[rows])^T @ (scale * B[rows]) over group g's rows, 32
// rows per K step through the same shared-memory ring as the GEMM above. A stage holds the
// raw rows: A [BK][LDAT] (with the up half beside it for SwiGLU) and B [BK][LDB]; when there
// is an activation or a scale, act(A) * scale is formed in place before the tile product,
// which reads A m-fast (col_major fragments), so both operands are copied as they lie.
constexpr int kStageW = 3 * BK * LDAT;  // A, SwiGLU up half, B (LDB == LDAT)
static_assert(LDB == LDAT && BM == BN && kStageW % 64 == 0, "weight-gradient stage layout");

template <typename T>
constexpr size_t weight_grad_smem() {
  const size_t ring = sizeof(T) * kStages<T> * kStageW, result = sizeof(float) * BM * LDC;
  return ring > result ? ring : result;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(WeightGradArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  constexpr int S = kStages<T>, V = 16 / sizeof(T);
  T* ring = reinterpret_cast<T*>(raw);  // stage s: A, up half, B at s * kStageW
  float* sC = reinterpret_cast<float*>(raw);
  __shared__ float s_scale[S][BK];
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.x, n_tiles = (a.NB + BN - 1) / BN;
  const int64_t k0 = (blockIdx.y / n_tiles) * BM, n0 = (blockIdx.y % n_tiles) * BN;
  const int64_t lo = a.groups ? a.offsets[g] : 0, hi = a.groups ? a.offsets[g + 1] : a.M;
  const bool bias_tile = a.db && k0 == 0, swiglu = a.a_act == kSwiglu;
  const bool transform = a.a_act != kIdentity || a.scale;
  const T* A = static_cast<const T*>(a.a);
  const T* B = static_cast<const T*>(a.b);
  const bool vec_a = copy16<T>(A, a.stride_ak, a.KA, a.stride_am);
  const bool vec_b = copy16<T>(B, a.stride_bn, a.NB, a.stride_bm);

  // Issue the copies of rows r0 .. r0 + BK into stage st (and record each row's scale).
  auto load = [&](int st, int64_t r0) {
    T* sA = ring + st * kStageW;
    T* sU = sA + BK * LDAT;
    T* sB = sU + BK * LDAT;
    for (int i = tid; i < BK * (BM / V); i += kThreads) {
      const int r = i / (BM / V), c = (i % (BM / V)) * V;
      const int64_t row = r0 + r;
      const bool ok = row < hi;
      const int64_t pair = (ok && a.pair_ids) ? a.pair_ids[row] : row;
      const int64_t arow = !ok ? -1 : (a.a_gather_div > 0 ? pair / a.a_gather_div : row);
      const int64_t brow = !ok ? -1 : (a.b_gather_div > 0 ? pair / a.b_gather_div : row);
      if (c == 0) s_scale[st][r] = (ok && a.scale) ? a.scale[pair] : 1.0f;
      for (int half = 0; half < (swiglu ? 2 : 1); ++half) {  // A, then the up half
        const int64_t k = k0 + c;
        T* dst = (half ? sU : sA) + r * LDAT + c;
        if (vec_a) {
          const bool in = arow >= 0 && k < a.KA;
          cp_async16(dst, in ? A + arow * a.stride_am + k + half * a.KA : A, in);
        } else {
          for (int e = 0; e < V; ++e)
            dst[e] = (arow >= 0 && k + e < a.KA)
                         ? A[arow * a.stride_am + (k + e + half * a.KA) * a.stride_ak]
                         : from_f<T>(0.0f);
        }
      }
      const int64_t col = n0 + c;
      T* dst = sB + r * LDB + c;
      if (vec_b) {
        const bool in = brow >= 0 && col < a.NB;
        cp_async16(dst, in ? B + brow * a.stride_bm + col : B, in);
      } else {
        for (int e = 0; e < V; ++e)
          dst[e] = (brow >= 0 && col + e < a.NB) ? B[brow * a.stride_bm + (col + e) * a.stride_bn]
                                                 : from_f<T>(0.0f);
      }
    }
  };

  const int64_t steps = (hi - lo + BK - 1) / BK;
  for (int s = 0; s < S - 1; ++s) {
    if (s < steps) load(s, lo + s * BK);
    cp_async_commit();
  }
  float bsum = 0.0f;
  TileAcc<T> acc;
  for (int64_t kt = 0; kt < steps; ++kt) {
    cp_async_wait<S - 2>();
    __syncthreads();
    const int64_t next = kt + S - 1;
    if (next < steps) load(static_cast<int>(next % S), lo + next * BK);
    cp_async_commit();
    const int st = static_cast<int>(kt % S);
    T* sA = ring + st * kStageW;
    const T* sU = sA + BK * LDAT;
    const T* sB = sU + BK * LDAT;
    if (bias_tile && tid < BN)
      for (int r = 0; r < BK; ++r) bsum += s_scale[st][r] * to_f(sB[r * LDB + tid]);
    if (transform) {  // block-uniform
      for (int i = tid; i < BK * BM; i += kThreads) {
        const int r = i / BM, m = i % BM;
        const float x = to_f(sA[r * LDAT + m]);
        const float h = swiglu ? x * sigmoid(x) * to_f(sU[r * LDAT + m]) : act_fwd(x, a.a_act);
        sA[r * LDAT + m] = from_f<T>(h * s_scale[st][r]);
      }
      __syncthreads();
    }
    acc.template mma<true, false>(sA, sB);
  }
  cp_async_wait<0>();
  __syncthreads();
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
    MOE_ALLOW_SMEM(kfn, weight_grad_smem<T>());
    MOE_LAUNCH(kfn, grid, kThreads, weight_grad_smem<T>(), stream, a);
  });
  return MOE_LAUNCH_STATUS();
}

}  // namespace moe
