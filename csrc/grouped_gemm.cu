// Grouped GEMMs over experts' variable-length row ranges, with the row gather fused into the
// A-tile load and the activation / gate weight (forward) or the activation's derivative and
// the gate gradient (backward, "dact") fused into the epilogue; and the per-expert weight
// gradient. 128x128 output tiles, 256 threads: tensor cores through ldmatrix + mma.sync for
// fp16/bf16 (fp32 accumulation), plain fp32 FMAs for fp32. The forward/dact kernel streams its
// A and B tiles through a multi-stage shared-memory ring with 16-byte cp.async copies (scalar
// loads where strides or alignment do not allow 16 bytes). B is staged n-fast or k-fast, following
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
// [BN][LDBT] k-fast, the fp32 result tile [BM][LDC]. The 8-element pads keep every ldmatrix
// row and cp.async destination 16-byte aligned and each ldmatrix free of bank conflicts; LDC's
// keeps the fragment stores of a half-warp in distinct banks.
constexpr int LDA = BK + 8, LDAT = BM + 8, LDB = BN + 8, LDBT = BK + 8, LDC = BN + 8;
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
// B (n-fast [BK][LDB], or k-fast [BN][LDBT] when BT) in shared memory. fp16/bf16: 8 warps as
// 2 x 4, each 64x32 = 4 x 4 mma.m16n8k16 results, operands through ldmatrix (transposing
// m-fast A and n-fast B on the way). The padded rows (8 elements) put the 8 row addresses of
// each 8x8 matrix in distinct banks.
template <typename T>
struct TileAcc {
  float c[4][4][4];  // [16-row block][8-column block][fragment element]
  __device__ TileAcc() {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
  }
  template <bool AT, bool BT>
  __device__ void mma(const T* sA, const T* sB) {
    const int warp = threadIdx.x / 32, m0 = (warp / 4) * 64, n0 = (warp % 4) * 32;
    for (int kk = 0; kk < BK; kk += 16) {
      Frag fa[4], fb[2];
      for (int i = 0; i < 4; ++i)
        ldsm_x4<AT>(fa[i], [&](int l) {
          const int m = m0 + i * 16;
          return AT ? sA + (kk + l % 8 + 8 * (l / 16)) * LDAT + m + 8 * (l / 8 % 2)
                    : sA + (m + l % 16) * LDA + kk + 8 * (l / 16);
        });
      for (int j = 0; j < 2; ++j)
        ldsm_x4<!BT>(fb[j], [&](int l) {
          const int n = n0 + j * 16 + 8 * (l / 16);
          return BT ? sB + (n + l % 8) * LDBT + kk + 8 * (l / 8 % 2)
                    : sB + (kk + l % 16) * LDB + n;
        });
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) mma16816<T>(c[i][j], fa[i], fb[j / 2], j % 2);
    }
  }
  __device__ void store(float* sC) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r0 = (warp / 4) * 64 + lane / 4, c0 = (warp % 4) * 32 + 2 * (lane % 4);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e)
          sC[(r0 + i * 16 + 8 * (e / 2)) * LDC + c0 + j * 8 + e % 2] = c[i][j][e];
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

// Can every row of a [rows, ld] operand at p be accessed in 16-byte chunks from any column
// that is a multiple of 16 / sizeof(T)?
template <typename T>
__device__ __forceinline__ bool rows16(const void* p, int64_t ld) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % (16 / sizeof(T)) == 0;
}

// Can an operand be copied in 16-byte chunks (V = 16 / sizeof(T) elements)? Its chunks run
// along a unit stride over an extent that V divides, and the base and every other stride keep
// each chunk 16-byte aligned.
template <typename T>
__device__ __forceinline__ bool copy16(const void* base, int64_t unit_stride, int64_t extent,
                                       int64_t other_stride, int64_t group_stride = 0) {
  constexpr int V = 16 / sizeof(T);
  return unit_stride == 1 && extent % V == 0 && group_stride % V == 0 &&
         rows16<T>(base, other_stride);
}

// Copies 16-byte chunks (V elements) of the A rows and B columns of one K step into a stage
// of the shared-memory ring: cp.async where the source chunk is 16-byte aligned and has unit
// stride, else element by element. Out-of-range elements become zeros. Each thread copies the
// same NA A chunks and NB B chunks at every K step, so their sources (less the K offset) and
// destinations are worked out once, in the constructor.
template <typename T, bool SWIGLU, bool BT>
struct TileLoader {
  static constexpr int V = 16 / sizeof(T);
  static constexpr int BNO = SWIGLU ? BN / 2 : BN;
  static constexpr int NA = BM * BK / V / kThreads, NB = BK * BN / V / kThreads;
  const GemmArgs& a;    // K, N and the strides
  const T* B;           // this tile's group of B
  const int64_t* arow;  // A row of each tile row, -1 past the range
  int64_t col0;
  bool vec_a, vec_b;
  const T* src_a[NA];  // this thread's chunks at k0 = 0 (nullptr: row or column out of range)
  const T* src_b[NB];

  // Tile coordinates of this thread's j-th chunk: A (row, kk); B (n, kk) with n its first
  // column (n-fast) or its column (k-fast).
  __device__ static int a_row(int j) { return (threadIdx.x + j * kThreads) / (BK / V); }
  __device__ static int a_kk(int j) { return (threadIdx.x + j * kThreads) % (BK / V) * V; }
  __device__ static int b_n(int j) {
    const int i = threadIdx.x + j * kThreads;
    return BT ? i / (BK / V) : i % (BN / V) * V;
  }
  __device__ static int b_kk(int j) {
    const int i = threadIdx.x + j * kThreads;
    return BT ? i % (BK / V) * V : i / (BN / V);
  }

  __device__ TileLoader(const GemmArgs& a_, const T* B_, const int64_t* arow_, int64_t col0_,
                        bool vec_a_, bool vec_b_)
      : a(a_), B(B_), arow(arow_), col0(col0_), vec_a(vec_a_), vec_b(vec_b_) {
    const T* A = static_cast<const T*>(a.a);
    for (int j = 0; j < NA; ++j) {
      const int64_t row = arow[a_row(j)];
      src_a[j] = row >= 0 ? A + row * a.stride_am + a_kk(j) * a.stride_ak : nullptr;
    }
    for (int j = 0; j < NB; ++j) {
      const int64_t col = bcol(a, col0, b_n(j));
      src_b[j] = col >= 0 ? B + b_kk(j) * a.stride_bk + col * a.stride_bn : nullptr;
    }
  }

  // B column of tile column c (SwiGLU forward: [gate | up] halves), -1 if out of range.
  __device__ static int64_t bcol(const GemmArgs& a, int64_t col0, int c) {
    const int64_t col = col0 + (SWIGLU ? c % BNO : c);
    if (col >= a.N) return -1;
    return SWIGLU ? col + (c / BNO) * a.N : col;
  }

  __device__ void operator()(T* sA, T* sB, int64_t k0) const {
    if (!vec_a || !vec_b) return copy_elementwise(a, B, arow, col0, sA, sB, k0);
    for (int j = 0; j < NA; ++j) {
      const bool ok = src_a[j] && k0 + a_kk(j) < a.K;
      cp_async16(sA + a_row(j) * LDA + a_kk(j), ok ? src_a[j] + k0 : B, ok);
    }
    for (int j = 0; j < NB; ++j) {
      const int n = b_n(j), kk = b_kk(j);
      const bool ok = src_b[j] && k0 + kk < a.K;
      cp_async16(BT ? sB + n * LDBT + kk : sB + kk * LDB + n,
                 ok ? src_b[j] + k0 * a.stride_bk : B, ok);
    }
  }

  // The same copies element by element (strides or alignment rule out 16-byte chunks; rare,
  // so kept out of line, from the arguments alone, to leave the main loop its registers).
  __device__ static __noinline__ void copy_elementwise(const GemmArgs& a, const T* B,
                                                       const int64_t* arow, int64_t col0,
                                                       T* sA, T* sB, int64_t k0) {
    const T* A = static_cast<const T*>(a.a);
    for (int j = 0; j < NA; ++j) {
      const int64_t row = arow[a_row(j)], k = k0 + a_kk(j);
      T* dst = sA + a_row(j) * LDA + a_kk(j);
      for (int e = 0; e < V; ++e)
        dst[e] = (row >= 0 && k + e < a.K) ? A[row * a.stride_am + (k + e) * a.stride_ak]
                                           : from_f<T>(0.0f);
    }
    for (int j = 0; j < NB; ++j) {
      const int n = b_n(j), kk = b_kk(j);
      T* dst = BT ? sB + n * LDBT + kk : sB + kk * LDB + n;
      for (int e = 0; e < V; ++e) {
        const int64_t col = bcol(a, col0, BT ? n : n + e), k = k0 + kk + (BT ? e : 0);
        dst[e] = (col >= 0 && k < a.K) ? B[k * a.stride_bk + col * a.stride_bn]
                                       : from_f<T>(0.0f);
      }
    }
  }
};


// True on a GPU; the emulator records a misaligned 16-byte access as a failure (and falls
// back to element access, as a CPU would fault on the aligned vector instruction).
#ifdef MOE_EMULATE
inline bool aligned16(const void* p) {
  if (::emu::aligned(p, 16)) return true;
  ::emu::fail("16-byte global access not 16-byte aligned");
  return false;
}
#else
__device__ __forceinline__ bool aligned16(const void*) { return true; }
#endif

template <typename T>
struct alignas(16) Chunk {
  T v[16 / sizeof(T)];
};

// The first n (<= 16 / sizeof(T)) of the 16 / sizeof(T) elements at p as floats (the rest 0):
// one 16-byte load when vec (p 16-byte aligned) and n is all of them.
template <typename T>
__device__ __forceinline__ void load_chunk(float* x, const T* p, int n, bool vec) {
  constexpr int VE = 16 / sizeof(T);
  if (vec && n == VE && aligned16(p)) {
    const Chunk<T> ch = *reinterpret_cast<const Chunk<T>*>(p);
    for (int e = 0; e < VE; ++e) x[e] = to_f(ch.v[e]);
  } else {
    for (int e = 0; e < VE; ++e) x[e] = e < n ? to_f(p[e]) : 0.0f;
  }
}

// Store the first n of x at p, as one 16-byte store when vec and n is all of them.
template <typename T>
__device__ __forceinline__ void store_chunk(T* p, const float* x, int n, bool vec) {
  constexpr int VE = 16 / sizeof(T);
  if (vec && n == VE && aligned16(p)) {
    Chunk<T> ch;
    for (int e = 0; e < VE; ++e) ch.v[e] = from_f<T>(x[e]);
    *reinterpret_cast<Chunk<T>*>(p) = ch;
  } else {
    for (int e = 0; e < n; ++e) p[e] = from_f<T>(x[e]);
  }
}

// Forward (DACT false): c = act(A[rows] @ B[g] + bias) * scale. SWIGLU: the B tile holds 64
// gate columns then the 64 matching up columns (b is [gate | up], N output columns).
// Dact (DACT true): dh = A[rows] @ B[g] (B = W^T through strides), then dpre from preact.
// BT: B's unit stride is along K (stage it k-fast).
template <typename T, bool DACT, bool SWIGLU, bool BT>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(GemmArgs a) {
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
    const int id = (ok && a.pair_ids) ? a.pair_ids[r] : 0;  // int32: a 32-bit division
    s_pair[tid] = a.pair_ids ? id : r;
    s_arow[tid] = !ok ? -1 : (a.gather_div > 0 ? id / a.gather_div : r);
  }
  __syncthreads();

  const T* B = static_cast<const T*>(a.b) + tile.group * a.stride_bg;
  const TileLoader<T, kGateUp, BT> load{
      a, B, s_arow, col0, copy16<T>(a.a, a.stride_ak, a.K, a.stride_am),
      BT ? copy16<T>(a.b, a.stride_bk, a.K, a.stride_bn, a.stride_bg)
         : copy16<T>(a.b, a.stride_bn, a.N, a.stride_bk, a.stride_bg)};
  const int64_t k_tiles = (a.K + BK - 1) / BK;
  constexpr int kStage = kTileA + kTileB;
  for (int s = 0; s < S - 1; ++s) {  // prologue: the first S - 1 K steps in flight
    if (s < k_tiles) load(ring + s * kStage, ring + s * kStage + kTileA, s * BK);
    cp_async_commit();
  }
  TileAcc<T> acc;
  int st = 0, st_next = S - 1;  // the stages of K steps kt and kt + S - 1
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<S - 2>();  // this thread's copies for step kt have landed
    __syncthreads();         // everyone's have, and everyone is done with step kt - 1
    if (kt + S - 1 < k_tiles)  // into the stage step kt - 1 used
      load(ring + st_next * kStage, ring + st_next * kStage + kTileA, (kt + S - 1) * BK);
    cp_async_commit();
    acc.template mma<false, BT>(ring + st * kStage, ring + st * kStage + kTileA);
    st = st + 1 == S ? 0 : st + 1;
    st_next = st_next + 1 == S ? 0 : st_next + 1;
  }
  cp_async_wait<0>();
  __syncthreads();
  acc.store(sC);
  __syncthreads();

  // Epilogue, VE consecutive columns of a row per thread and step (one 16-byte access per
  // operand where its rows allow, see load_chunk / store_chunk).
  constexpr int VE = 16 / sizeof(T);
  T* out = static_cast<T*>(a.c);
  T* pre = static_cast<T*>(a.preact);
  const T* bias = static_cast<const T*>(a.bias);
  // SwiGLU: pre (and the dact output) hold [gate | up], whose up half must align too
  const bool vec_pre = rows16<T>(pre, a.stride_pm) && (!SWIGLU || a.N % VE == 0);
  const bool vec_out = DACT ? rows16<T>(out, a.stride_pm) && (!SWIGLU || a.N % VE == 0)
                            : rows16<T>(out, a.stride_cm);
  for (int i = tid; i < BM * (BNO / VE); i += kThreads) {
    const int r = i / (BNO / VE), c = (i % (BNO / VE)) * VE;
    const int64_t col = col0 + c, row = tile.row0 + r, pair = s_pair[r];
    if (s_arow[r] < 0 || col >= a.N) continue;
    const int n = a.N - col < VE ? static_cast<int>(a.N - col) : VE;  // valid columns
    const float sc = a.scale ? a.scale[pair] : 1.0f;  // forward: row scale; dact: the gate
    float x[VE], v[VE];
    for (int e = 0; e < VE; ++e) x[e] = sC[r * LDC + c + e];
    if (!DACT) {
      const int64_t bofs = tile.group * a.stride_biasg + col;
      for (int e = 0; e < VE; ++e) x[e] += (bias && e < n) ? to_f(bias[bofs + e]) : 0.0f;
      if (SWIGLU) {
        float zu[VE];
        for (int e = 0; e < VE; ++e)
          zu[e] = sC[r * LDC + c + BNO + e] +
                  ((bias && e < n) ? to_f(bias[bofs + a.N + e]) : 0.0f);
        if (pre) {
          store_chunk(pre + row * a.stride_pm + col, x, n, vec_pre);
          store_chunk(pre + row * a.stride_pm + a.N + col, zu, n, vec_pre);
        }
        for (int e = 0; e < VE; ++e) v[e] = x[e] * sigmoid(x[e]) * zu[e] * sc;
      } else {
        if (pre) store_chunk(pre + row * a.stride_pm + col, x, n, vec_pre);
        for (int e = 0; e < VE; ++e) v[e] = act_fwd(x[e], a.act) * sc;
      }
      store_chunk(out + (a.scatter ? pair : row) * a.stride_cm + col, v, n, vec_out);
    } else {
      float z[VE], h[VE];  // h = act(z), for the gate gradient
      load_chunk(z, pre + row * a.stride_pm + col, n, vec_pre);
      if (SWIGLU) {
        float up[VE], du[VE];
        load_chunk(up, pre + row * a.stride_pm + a.N + col, n, vec_pre);
        for (int e = 0; e < VE; ++e) {
          const float silu = z[e] * sigmoid(z[e]);
          v[e] = x[e] * sc * up[e] * act_grad(z[e], kSilu);
          du[e] = x[e] * sc * silu;
          h[e] = silu * up[e];
        }
        store_chunk(out + row * a.stride_pm + a.N + col, du, n, vec_out);
      } else {
        for (int e = 0; e < VE; ++e) {
          v[e] = x[e] * sc * act_grad(z[e], a.act);
          h[e] = a.dgate_part ? act_fwd(z[e], a.act) : 0.0f;
        }
      }
      store_chunk(out + row * a.stride_pm + col, v, n, vec_out);
      if (a.dgate_part)  // only this thread reads or writes these (r, c + e)
        for (int e = 0; e < n; ++e) sC[r * LDC + c + e] = x[e] * h[e];
    }
  }
  if (DACT && a.dgate_part) {  // block-uniform
    // this tile's share of dgate[pair] = sum_n dh * act(z): a fixed order per row, lane l
    // starting at column l (mod the tile's columns) so a warp's reads hit distinct banks
    __syncthreads();
    const int64_t nc = a.N - col0 < BN ? a.N - col0 : BN;
    if (tid < BM && s_arow[tid] >= 0) {
      float s = 0.0f;
      for (int64_t j = 0, c = (tid % 32) % nc; j < nc; ++j, c = c + 1 == nc ? 0 : c + 1)
        s += sC[tid * LDC + c];
      a.dgate_part[s_pair[tid] * a.stride_dg + pid_n] = s;
    }
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
// which reads A m-fast (transposing ldmatrix), so both operands are copied as they lie. The
// rows' scales ride the ring too (4-byte cp.async into [S][BK] floats after the stages).
// Which rows a step gathers is worked out once per step by warp 0, one step before the
// step's copies are issued, from pair ids it loaded a step earlier still: no thread waits on
// a global load before issuing its copies.
constexpr int kStageW = 3 * BK * LDAT;  // A, SwiGLU up half, B (LDB == LDAT)
static_assert(LDB == LDAT && BM == BN && kStageW % 64 == 0, "weight-gradient stage layout");
static_assert(BK == 32, "warp 0 works out one row of a K step per lane");

template <typename T>
constexpr size_t weight_grad_smem() {
  const size_t ring = sizeof(T) * kStages<T> * kStageW + sizeof(float) * kStages<T> * BK;
  const size_t result = sizeof(float) * BM * LDC;
  return ring > result ? ring : result;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) weight_grad_kernel(WeightGradArgs a) {
  MOE_DYNAMIC_SMEM(raw);
  constexpr int S = kStages<T>, V = 16 / sizeof(T);
  T* ring = reinterpret_cast<T*>(raw);  // stage s: A, up half, B at s * kStageW
  float* s_scale = reinterpret_cast<float*>(ring + S * kStageW);  // [S][BK]
  float* sC = reinterpret_cast<float*>(raw);
  __shared__ int64_t s_rows[2][3][BK];  // [step % 2][A row, B row, pair id][row of the step]
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.x, n_tiles = (a.NB + BN - 1) / BN;
  const int64_t k0 = (blockIdx.y / n_tiles) * BM, n0 = (blockIdx.y % n_tiles) * BN;
  const int64_t lo = a.groups ? a.offsets[g] : 0, hi = a.groups ? a.offsets[g + 1] : a.M;
  const int64_t steps = (hi - lo + BK - 1) / BK;
  const bool bias_tile = a.db && k0 == 0, swiglu = a.a_act == kSwiglu;
  const bool transform = a.a_act != kIdentity || a.scale;
  const T* A = static_cast<const T*>(a.a);
  const T* B = static_cast<const T*>(a.b);
  const bool vec_a = copy16<T>(A, a.stride_ak, a.KA, a.stride_am);
  const bool vec_b = copy16<T>(B, a.stride_bn, a.NB, a.stride_bm);

  // Warp 0: the pair id of lane tid's row of step n (int32: the gathers divide in 32 bits;
  // no pair ids, no gather), and the row info of step n from it.
  auto pair_id = [&](int64_t n) -> int {
    const int64_t row = lo + n * BK + tid;
    return (a.pair_ids && n < steps && row < hi) ? a.pair_ids[row] : 0;
  };
  auto row_info = [&](int64_t n, int id) {
    const int64_t row = lo + n * BK + tid;
    const bool ok = row < hi;
    s_rows[n & 1][0][tid] = !ok ? -1 : (a.a_gather_div > 0 ? id / a.a_gather_div : row);
    s_rows[n & 1][1][tid] = !ok ? -1 : (a.b_gather_div > 0 ? id / a.b_gather_div : row);
    s_rows[n & 1][2][tid] = a.pair_ids ? id : row;
  };
  // Issue the copies of step n's rows (and their scales) into stage st. This thread copies
  // the chunk at column c of rows r0, r0 + RSTEP, ... of every step.
  constexpr int RSTEP = kThreads / (BM / V);
  const int c = tid % (BM / V) * V, r0 = tid / (BM / V);
  const bool a_in = k0 + c < a.KA, b_in = n0 + c < a.NB;  // the chunk's columns exist
  auto load = [&](int st, int64_t n) {
    T* sA = ring + st * kStageW;
    T* sU = sA + BK * LDAT;
    T* sB = sU + BK * LDAT;
    for (int j = 0; j < BK / RSTEP; ++j) {
      const int r = r0 + j * RSTEP;
      const int64_t arow = s_rows[n & 1][0][r], brow = s_rows[n & 1][1][r];
      if (c == 0 && a.scale)
        cp_async4(s_scale + st * BK + r, a.scale + (arow >= 0 ? s_rows[n & 1][2][r] : 0),
                  arow >= 0);
      for (int half = 0; half < (swiglu ? 2 : 1); ++half) {  // A, then the up half
        T* dst = (half ? sU : sA) + r * LDAT + c;
        if (vec_a) {
          const bool in = arow >= 0 && a_in;
          cp_async16(dst, in ? A + arow * a.stride_am + k0 + c + half * a.KA : A, in);
        } else {
          for (int e = 0; e < V; ++e)
            dst[e] = (arow >= 0 && k0 + c + e < a.KA)
                         ? A[arow * a.stride_am + (k0 + c + e + half * a.KA) * a.stride_ak]
                         : from_f<T>(0.0f);
        }
      }
      T* dst = sB + r * LDB + c;
      if (vec_b) {
        const bool in = brow >= 0 && b_in;
        cp_async16(dst, in ? B + brow * a.stride_bm + n0 + c : B, in);
      } else {
        for (int e = 0; e < V; ++e)
          dst[e] = (brow >= 0 && n0 + c + e < a.NB)
                       ? B[brow * a.stride_bm + (n0 + c + e) * a.stride_bn]
                       : from_f<T>(0.0f);
      }
    }
  };
  auto scale = [&](int st, int r) { return a.scale ? s_scale[st * BK + r] : 1.0f; };

  // Prologue: row info of steps 0 .. S - 1, copies of steps 0 .. S - 2.
  int id_next = tid < BK ? pair_id(0) : 0;
  for (int s = 0; s < S; ++s) {
    if (tid < BK) {
      row_info(s, id_next);
      id_next = pair_id(s + 1);
    }
    if (s == S - 1) break;
    __syncthreads();
    if (s < steps) load(s, s);
    cp_async_commit();
  }
  float bsum = 0.0f;
  TileAcc<T> acc;
  int st = 0, st_next = S - 1;  // the stages of steps kt and kt + S - 1
  for (int64_t kt = 0; kt < steps; ++kt, st = st + 1 == S ? 0 : st + 1,
               st_next = st_next + 1 == S ? 0 : st_next + 1) {
    cp_async_wait<S - 2>();
    __syncthreads();  // also: step kt + S - 1's row info is visible, step kt + S - 2's is read
    const int64_t n = kt + S - 1;
    if (n < steps) load(st_next, n);
    cp_async_commit();
    if (tid < BK && n + 1 < steps) {
      row_info(n + 1, id_next);
      id_next = pair_id(n + 2);
    }
    T* sA = ring + st * kStageW;
    const T* sU = sA + BK * LDAT;
    const T* sB = sU + BK * LDAT;
    if (bias_tile && tid < BN)
      for (int r = 0; r < BK; ++r) bsum += scale(st, r) * to_f(sB[r * LDB + tid]);
    if (transform) {  // block-uniform
      for (int i = tid; i < BK * BM; i += kThreads) {
        const int r = i / BM, m = i % BM;
        const float x = to_f(sA[r * LDAT + m]);
        const float h = swiglu ? x * sigmoid(x) * to_f(sU[r * LDAT + m]) : act_fwd(x, a.a_act);
        sA[r * LDAT + m] = from_f<T>(h * scale(st, r));
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
