// Torch launchers for the CUDA kernels: argument checks with clear errors (ValueError for
// shapes and values, TypeError for dtypes, as the Triton ops raise), output
// allocation, and registration as torch ops (namespace moe_adapter_cuda) so the module and
// torch.compile can call them. Same signatures and semantics as the Triton ops in
// moe_adapter_kernels/ops/ (see their docstrings for shapes). Built for CUDA tensors, or for
// CPU tensors through the emulator (MOE_EMULATE, csrc/emulate/).
// ATen, the op registry and plain pybind11 rather than <torch/extension.h>: the module binds no
// tensor-typed Python functions, and the lighter headers compile in a third of the time
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#ifndef MOE_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels.h"

#ifdef MOE_EMULATE
namespace emu {
inline void set_reverse(bool on);  // csrc/emulate/emulate.h, included after this file
}
#endif

namespace {

// Argument errors are formatted here with std::to_string and string concatenation, and thrown
// as c10 errors, never through TORCH_CHECK's iostream formatting: on the GPU image (torch 2.11,
// CUDA 13) streaming an integer from inside this module crashed (SIGSEGV in num_put: the
// module's stream code and the process's locale disagree), turning every bad-argument error
// into a segfault.
std::string piece(const char* s) { return s; }
std::string piece(const std::string& s) { return s; }
std::string piece(at::ScalarType t) { return c10::toString(t); }
std::string piece(const at::Device& d) { return d.str(); }
template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
std::string piece(I v) {
  return std::to_string(v);
}
std::string piece(at::IntArrayRef r) {
  std::string s = "[";
  for (size_t i = 0; i < r.size(); ++i) s += (i ? ", " : "") + std::to_string(r[i]);
  return s + "]";
}
template <class... A>
std::string message(const A&... parts) {
  std::string s;
  ((s += piece(parts)), ...);
  return s;
}

#define MOE_CHECK_AS(kind, cond, ...)                                                 \
  do {                                                                                \
    if (!(cond))                                                                      \
      throw ::c10::kind({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},        \
                        message(__VA_ARGS__));                                        \
  } while (0)
#define MOE_CHECK(cond, ...) MOE_CHECK_AS(Error, cond, __VA_ARGS__)
#define MOE_CHECK_VALUE(cond, ...) MOE_CHECK_AS(ValueError, cond, __VA_ARGS__)
#define MOE_CHECK_TYPE(cond, ...) MOE_CHECK_AS(TypeError, cond, __VA_ARGS__)

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

#ifdef MOE_EMULATE
constexpr auto kDevice = at::kCPU;
constexpr const char* kDeviceName = "CPU (emulated CUDA)";
#else
constexpr auto kDevice = at::kCUDA;
constexpr const char* kDeviceName = "CUDA";
#endif

bool g_poison = false;  // fill fresh outputs with NaN / -7 so unwritten elements show (tests)

Tensor alloc(at::IntArrayRef shape, const at::TensorOptions& opt) {
  Tensor t = at::empty(shape, opt);
  if (g_poison && t.numel()) t.fill_(at::isFloatingType(t.scalar_type()) ? NAN : -7);
  return t;
}

moe::DType dtype_of(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return moe::kF32;
    case at::kHalf: return moe::kF16;
    case at::kBFloat16: return moe::kBF16;
    default:
      MOE_CHECK_TYPE(false, "moe_adapter_cuda.", op, ": ", name, " has dtype ", t.scalar_type(),
                       "; expected float32, float16 or bfloat16");
  }
  return moe::kF32;
}

// A tensor of `dim` dims on the kernels' device, contiguous in its last dim (`contig`: fully).
void check(const Tensor& t, const char* op, const char* name, int64_t dim, bool contig = true) {
  MOE_CHECK_VALUE(t.device().type() == kDevice, "moe_adapter_cuda.", op, ": ", name, " is on ",
              t.device(), "; expected a ", kDeviceName, " tensor");
  MOE_CHECK_VALUE(t.dim() == dim, "moe_adapter_cuda.", op, ": ", name, " must be a ", dim,
                    "-dim tensor, got shape ", t.sizes());
  MOE_CHECK_VALUE(!contig || t.is_contiguous(), "moe_adapter_cuda.", op, ": ", name,
              " must be contiguous (call .contiguous())");
}

void check_device(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  MOE_CHECK_VALUE(t.device() == like.device(), "moe_adapter_cuda.", op, ": ", name, " is on ",
              t.device(), ", expected ", like.device());
}

void check_same(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  MOE_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "moe_adapter_cuda.", op, ": ", name,
                   " has dtype ", t.scalar_type(), ", expected ", like.scalar_type());
  check_device(t, like, op, name);
}

void check_int(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  check(t, op, name, 1);
  MOE_CHECK_TYPE(t.scalar_type() == at::kInt, "moe_adapter_cuda.", op, ": ", name,
                   " must be int32, got ", t.scalar_type());
  check_device(t, like, op, name);
}

const float* f32_ptr(const OptTensor& t, const Tensor& like, const char* op, const char* name) {
  if (!t) return nullptr;
  check(*t, op, name, 1);
  MOE_CHECK_TYPE(t->scalar_type() == at::kFloat, "moe_adapter_cuda.", op, ": ", name,
                   " must be float32, got ", t->scalar_type());
  check_device(*t, like, op, name);
  return t->data_ptr<float>();
}

moe::Act act_of(c10::string_view name, const char* op) {
  if (name == "none" || name == "identity") return moe::kIdentity;
  if (name == "silu") return moe::kSilu;
  if (name == "swiglu") return moe::kSwiglu;
  if (name == "gelu") return moe::kGelu;
  MOE_CHECK_VALUE(false, "moe_adapter_cuda.", op, ": unknown activation '", std::string(name),
              "'; expected none, identity, silu, swiglu or gelu");
  return moe::kIdentity;
}

int norm_of(c10::string_view name, const char* op, bool allow_none) {
  if (name == "layernorm") return 0;
  if (name == "rmsnorm") return 1;
  MOE_CHECK_VALUE(allow_none && name == "none", "moe_adapter_cuda.", op, ": unknown norm '",
              std::string(name), "'; expected layernorm or rmsnorm", allow_none ? " or none" : "");
  return -1;
}

const void* opt_ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

cudaStream_t stream_for(const Tensor& t) {
#ifdef MOE_EMULATE
  (void)t;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
#endif
}

void check_launch(cudaError_t err, const char* op) {
#ifdef MOE_EMULATE
  (void)err;
  (void)op;
#else
  MOE_CHECK(err == cudaSuccess, "moe_adapter_cuda.", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
#endif
}

#ifdef MOE_EMULATE
#define DEVICE_GUARD(t) (void)(t)
#else
#define DEVICE_GUARD(t) const c10::cuda::OptionalCUDAGuard guard_(t.device())
#endif

Tensors5 route(const Tensor& u, const Tensor& w_gate, int64_t top_k) {
  const char* op = "route";
  check(u, op, "u", 2);
  check(w_gate, op, "w_gate", 2);
  check_same(w_gate, u, op, "w_gate");
  const int64_t T = u.size(0), d = u.size(1), E = w_gate.size(1);
  MOE_CHECK_VALUE(w_gate.size(0) == d, "moe_adapter_cuda.route: w_gate must be [", d, ", E], got ",
              w_gate.sizes());
  MOE_CHECK_VALUE(1 <= E && E <= 256, "moe_adapter_cuda.route: supports 1 to 256 experts, got ", E);
  MOE_CHECK_VALUE(1 <= top_k && top_k <= E, "moe_adapter_cuda.route: top_k must be in [1, ", E,
              "], got ", top_k);
  MOE_CHECK_VALUE(T * top_k < (int64_t(1) << 31), "moe_adapter_cuda.route: T * top_k must be < 2^31");
  DEVICE_GUARD(u);
  const auto opt = u.options();
  const int64_t nb = (T + moe::kRouterTokens - 1) / moe::kRouterTokens;
  Tensor logits = alloc({T, E}, opt.dtype(at::kFloat));
  Tensor ids = alloc({T, top_k}, opt.dtype(at::kInt));
  Tensor weights = alloc({T, top_k}, opt.dtype(at::kFloat));
  Tensor block_counts = alloc({nb, E}, opt.dtype(at::kInt));
  Tensor block_gates = alloc({nb, E}, opt.dtype(at::kFloat));
  if (T) {
    moe::RouteArgs a{u.data_ptr(), w_gate.data_ptr(), logits.data_ptr<float>(),
                     ids.data_ptr<int>(), weights.data_ptr<float>(), block_counts.data_ptr<int>(),
                     block_gates.data_ptr<float>(), T, d, u.stride(0), w_gate.stride(0),
                     static_cast<int>(E), static_cast<int>(top_k), dtype_of(u, op, "u")};
    check_launch(moe::route(a, stream_for(u)), op);
  }
  return {logits, ids, weights, block_counts, block_gates};
}

Tensors4 permute(const Tensor& topk_ids, const Tensor& block_counts, const Tensor& block_gates,
                 int64_t num_experts) {
  const char* op = "permute";
  check(topk_ids, op, "topk_ids", 2);
  check(block_counts, op, "block_counts", 2);
  check(block_gates, op, "block_gates", 2);
  MOE_CHECK_TYPE(topk_ids.scalar_type() == at::kInt && block_counts.scalar_type() == at::kInt,
                   "moe_adapter_cuda.permute: topk_ids and block_counts must be int32");
  MOE_CHECK_TYPE(block_gates.scalar_type() == at::kFloat,
                   "moe_adapter_cuda.permute: block_gates must be float32, got ",
                   block_gates.scalar_type());
  check_device(block_counts, topk_ids, op, "block_counts");
  check_device(block_gates, topk_ids, op, "block_gates");
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), E = num_experts;
  MOE_CHECK_VALUE(1 <= E && E <= 256, "moe_adapter_cuda.permute: supports 1 to 256 experts, got ",
                    E);
  const int64_t nb = (T + moe::kRouterTokens - 1) / moe::kRouterTokens;
  auto check_blocks = [&](const Tensor& t, const char* name) {
    MOE_CHECK_VALUE(t.size(0) == nb && t.size(1) == E, "moe_adapter_cuda.permute: ", name,
                      " must be [", nb, ", ", E, "], got ", t.sizes());
  };
  check_blocks(block_counts, "block_counts");
  check_blocks(block_gates, "block_gates");
  DEVICE_GUARD(topk_ids);
  const auto opt = topk_ids.options();
  Tensor block_base = alloc({nb, E}, opt);
  Tensor offsets = alloc({E + 1}, opt);
  Tensor aux = alloc({}, opt.dtype(at::kFloat));
  Tensor sorted_pair = alloc({T * k}, opt);
  Tensor pair_pos = alloc({T * k}, opt);
  moe::PermuteArgs a{topk_ids.data_ptr<int>(), block_counts.data_ptr<int>(),
                     block_gates.data_ptr<float>(), block_base.data_ptr<int>(),
                     offsets.data_ptr<int>(), aux.data_ptr<float>(), sorted_pair.data_ptr<int>(),
                     pair_pos.data_ptr<int>(), T, static_cast<int>(E), static_cast<int>(k),
                     T ? static_cast<float>(static_cast<double>(E) / (double(T) * double(T)))
                       : 0.0f};
  check_launch(moe::permute(a, stream_for(topk_ids)), op);
  return {sorted_pair, pair_pos, offsets, aux};
}

// Shared checks of the grouped GEMMs: b is [G, K, N] with offsets [G+1] (grouped) or [K, N].
int64_t check_gemm(const char* op, const Tensor& a, const Tensor& b, const OptTensor& offsets,
                   const OptTensor& pair_ids, bool needs_pairs) {
  check(a, op, "a", 2);
  const bool grouped = offsets.has_value();
  check(b, op, "b", grouped ? 3 : 2, false);
  check_same(b, a, op, "b");
  MOE_CHECK_VALUE(b.size(-2) == a.size(1), "moe_adapter_cuda.", op, ": b's reduction dim is ",
              b.size(-2), ", a has K=", a.size(1));
  MOE_CHECK_VALUE(!needs_pairs || pair_ids, "moe_adapter_cuda.", op,
              ": gather/scatter/scale/grouped need pair_ids");
  if (pair_ids) check_int(*pair_ids, a, op, "pair_ids");
  if (!grouped) return 0;
  check_int(*offsets, a, op, "offsets");
  MOE_CHECK_VALUE(offsets->size(0) == b.size(0) + 1, "moe_adapter_cuda.", op,
              ": offsets must have G+1 entries");
  return b.size(0);
}

Tensors2 grouped_gemm(const Tensor& a, const Tensor& b, const OptTensor& offsets,
                      const OptTensor& pair_ids, int64_t gather_div, bool scatter,
                      const OptTensor& scale, c10::string_view activation, bool save_preact,
                      const OptTensor& bias) {
  const char* op = "grouped_gemm";
  const int64_t G = check_gemm(op, a, b, offsets, pair_ids,
                               offsets || gather_div > 0 || scatter || scale);
  const moe::Act act = act_of(activation, op);
  const int64_t Nb = b.size(-1), N = act == moe::kSwiglu ? Nb / 2 : Nb;
  MOE_CHECK_VALUE(act != moe::kSwiglu || Nb % 2 == 0, "moe_adapter_cuda.grouped_gemm: a swiglu "
              "weight needs an even number of columns, got ", Nb);
  const int64_t M = G ? pair_ids->size(0) : a.size(0);
  if (bias) {
    check(*bias, op, "bias", G ? 2 : 1);
    check_same(*bias, a, op, "bias");
    MOE_CHECK_VALUE(bias->size(-1) == Nb, "moe_adapter_cuda.grouped_gemm: bias must have ", Nb,
                " columns, got ", bias->sizes());
  }
  DEVICE_GUARD(a);
  Tensor out = alloc({M, N}, a.options());
  Tensor preact = save_preact ? alloc({M, Nb}, a.options()) : a.new_empty({0});
  if (M && N) {
    moe::GemmArgs g{};
    g.a = a.data_ptr();
    g.b = b.data_ptr();
    g.c = out.data_ptr();
    g.preact = save_preact ? preact.data_ptr() : nullptr;
    g.bias = opt_ptr(bias);
    g.pair_ids = pair_ids ? pair_ids->data_ptr<int>() : nullptr;
    g.scale = f32_ptr(scale, a, op, "scale");
    g.offsets = G ? offsets->data_ptr<int>() : nullptr;
    g.M = M, g.N = N, g.K = a.size(1);
    g.stride_am = a.stride(0), g.stride_ak = a.stride(1);
    g.stride_bg = G ? b.stride(0) : 0, g.stride_bk = b.stride(-2), g.stride_bn = b.stride(-1);
    g.stride_cm = out.stride(0), g.stride_pm = save_preact ? preact.stride(0) : 0;
    g.stride_biasg = (bias && G) ? bias->stride(0) : 0;
    g.groups = static_cast<int>(G), g.gather_div = static_cast<int>(gather_div);
    g.scatter = scatter, g.act = act, g.dtype = dtype_of(a, op, "a");
    check_launch(moe::gemm_forward(g, stream_for(a)), op);
  }
  return {out, preact};
}

Tensors2 grouped_dact(const Tensor& dc, const Tensor& w, const Tensor& preact,
                      c10::string_view activation, const OptTensor& offsets,
                      const OptTensor& pair_ids, int64_t gather_div, const OptTensor& gate) {
  const char* op = "grouped_dact";
  const Tensor wt = w.transpose(-1, -2);
  const int64_t G = check_gemm(op, dc, wt, offsets, pair_ids,
                               offsets || gather_div > 0 || gate);
  const moe::Act act = act_of(activation, op);
  const int64_t F = wt.size(-1);
  check(preact, op, "preact", 2);
  check_same(preact, dc, op, "preact");
  MOE_CHECK_VALUE(preact.size(1) == (act == moe::kSwiglu ? 2 * F : F), "moe_adapter_cuda.",
              op, ": preact has ", preact.size(1), " columns for activation ",
              std::string(activation), " and F=", F);
  const int64_t M = preact.size(0);
  const int64_t n_tiles = (F + moe::kGemmBlockN - 1) / moe::kGemmBlockN;
  DEVICE_GUARD(dc);
  Tensor dpre = alloc(preact.sizes(), preact.options());
  Tensor part = gate ? alloc({gate->numel(), n_tiles}, dc.options().dtype(at::kFloat))
                     : dc.new_empty({0});
  if (M && F) {
    moe::GemmArgs g{};
    g.a = dc.data_ptr();
    g.b = wt.data_ptr();
    g.c = dpre.data_ptr();
    g.preact = preact.data_ptr();
    g.pair_ids = pair_ids ? pair_ids->data_ptr<int>() : nullptr;
    g.scale = f32_ptr(gate, dc, op, "gate");
    g.dgate_part = gate ? part.data_ptr<float>() : nullptr;
    g.offsets = G ? offsets->data_ptr<int>() : nullptr;
    g.M = M, g.N = F, g.K = dc.size(1);
    g.stride_am = dc.stride(0), g.stride_ak = dc.stride(1);
    g.stride_bg = G ? wt.stride(0) : 0, g.stride_bk = wt.stride(-2), g.stride_bn = wt.stride(-1);
    g.stride_pm = preact.stride(0), g.stride_dg = gate ? part.stride(0) : 0;
    g.groups = static_cast<int>(G), g.gather_div = static_cast<int>(gather_div);
    g.act = act, g.dtype = dtype_of(dc, op, "dc");
    check_launch(moe::gemm_dact(g, stream_for(dc)), op);
  }
  if (!gate) return {dpre, dc.new_empty({0})};
  Tensor dgate = M ? part.sum(1) : at::zeros({gate->numel()}, dc.options().dtype(at::kFloat));
  return {dpre, dgate};
}

Tensors2 weight_grad(const Tensor& a, const Tensor& b, const OptTensor& offsets,
                     const OptTensor& pair_ids, int64_t a_gather_div, int64_t b_gather_div,
                     const OptTensor& scale, c10::string_view a_activation, bool bias_grad) {
  const char* op = "weight_grad";
  check(a, op, "a", 2);
  check(b, op, "b", 2);
  check_same(b, a, op, "b");
  const moe::Act act = act_of(a_activation, op);
  const int64_t KA = act == moe::kSwiglu ? a.size(1) / 2 : a.size(1), NB = b.size(1);
  const int64_t G = offsets ? offsets->size(0) - 1 : 0;
  if (offsets) check_int(*offsets, a, op, "offsets");
  if (pair_ids) check_int(*pair_ids, a, op, "pair_ids");
  MOE_CHECK_VALUE(pair_ids || (!offsets && a_gather_div == 0 && b_gather_div == 0 && !scale),
              "moe_adapter_cuda.weight_grad: grouped rows, gathers and scale need pair_ids");
  const int64_t M = pair_ids ? pair_ids->size(0) : a.size(0);
  MOE_CHECK_VALUE(pair_ids || b.size(0) == M, "moe_adapter_cuda.weight_grad: a has ", M,
              " rows, b has ", b.size(0));
  DEVICE_GUARD(a);
  std::vector<int64_t> shape = G ? std::vector<int64_t>{G, KA, NB} : std::vector<int64_t>{KA, NB};
  Tensor dw = alloc(shape, a.options());
  Tensor db = bias_grad ? alloc(G ? std::vector<int64_t>{G, NB} : std::vector<int64_t>{NB},
                                a.options())
                        : a.new_empty({0});
  if (dw.numel()) {
    moe::WeightGradArgs g{};
    g.a = a.data_ptr();
    g.b = b.data_ptr();
    g.dw = dw.data_ptr();
    g.db = bias_grad ? db.data_ptr() : nullptr;
    g.pair_ids = pair_ids ? pair_ids->data_ptr<int>() : nullptr;
    g.scale = f32_ptr(scale, a, op, "scale");
    g.offsets = G ? offsets->data_ptr<int>() : nullptr;
    g.M = M, g.KA = KA, g.NB = NB;
    g.stride_am = a.stride(0), g.stride_ak = a.stride(1);
    g.stride_bm = b.stride(0), g.stride_bn = b.stride(1);
    g.stride_wg = G ? dw.stride(0) : 0, g.stride_wk = dw.stride(-2), g.stride_wn = dw.stride(-1);
    g.stride_dbg = (bias_grad && G) ? db.stride(0) : 0;
    g.groups = static_cast<int>(G);
    g.a_gather_div = static_cast<int>(a_gather_div), g.b_gather_div = static_cast<int>(b_gather_div);
    g.a_act = act, g.dtype = dtype_of(a, op, "a");
    check_launch(moe::weight_grad(g, stream_for(a)), op);
  }
  return {dw, db};
}

void check_affine(const OptTensor& p, const Tensor& x, int64_t N, const char* op, const char* name) {
  if (!p) return;
  check(*p, op, name, 1);
  check_same(*p, x, op, name);
  MOE_CHECK_VALUE(p->size(0) == N, "moe_adapter_cuda.", op, ": ", name, " must have ", N,
              " elements, got ", p->size(0));
}

// Shared by norm and combine: x holds T*k rows (k = 0: T rows, a plain norm).
Tensors4 norm_rows(const char* op, const Tensor& x, const OptTensor& shared, int64_t k,
                   int norm, const OptTensor& weight, const OptTensor& bias, double eps,
                   bool save_sum) {
  check(x, op, "x", 2);
  const int64_t N = x.size(1);
  const int64_t T = k ? x.size(0) / k : x.size(0);
  MOE_CHECK_VALUE(!k || x.size(0) % k == 0, "moe_adapter_cuda.", op, ": y_pairs has ", x.size(0),
              " rows, not a multiple of k=", k);
  if (shared) {
    check(*shared, op, "shared", 2);
    check_same(*shared, x, op, "shared");
    MOE_CHECK_VALUE(shared->size(0) == T && shared->size(1) == N, "moe_adapter_cuda.", op,
                ": shared must be [", T, ", ", N, "], got ", shared->sizes());
  }
  check_affine(weight, x, N, op, "weight");
  check_affine(bias, x, N, op, "bias");
  DEVICE_GUARD(x);
  Tensor y = alloc({T, N}, x.options());
  Tensor mean = alloc({T}, x.options().dtype(at::kFloat));
  Tensor rstd = alloc({T}, x.options().dtype(at::kFloat));
  Tensor z = alloc({save_sum ? T : 0, N}, x.options());
  if (T && N) {
    moe::NormArgs a{x.data_ptr(), opt_ptr(shared), y.data_ptr(), save_sum ? z.data_ptr() : nullptr,
                    opt_ptr(weight), opt_ptr(bias), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                    T, N, x.stride(0), shared ? shared->stride(0) : 0, y.stride(0),
                    save_sum ? z.stride(0) : 0, static_cast<int>(k), norm,
                    static_cast<float>(eps), dtype_of(x, op, "x")};
    check_launch(moe::norm_forward(a, stream_for(x)), op);
  }
  return {y, mean, rstd, z};
}

Tensors3 norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
              c10::string_view kind, double eps) {
  auto [y, mean, rstd, z] = norm_rows("norm", x, std::nullopt, 0, norm_of(kind, "norm", false),
                                      weight, bias, eps, false);
  return {y, mean, rstd};
}

Tensors4 combine(const Tensor& y_pairs, const OptTensor& shared, int64_t top_k,
                 c10::string_view norm, const OptTensor& weight, const OptTensor& bias,
                 double eps, bool save_sum) {
  MOE_CHECK_VALUE(top_k >= 1, "moe_adapter_cuda.combine: top_k must be >= 1, got ", top_k);
  return norm_rows("combine", y_pairs, shared, top_k, norm_of(norm, "combine", true), weight,
                   bias, eps, save_sum);
}

Tensors3 norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                       const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                       c10::string_view kind) {
  const char* op = "norm_backward";
  check(dy, op, "dy", 2);
  check(x, op, "x", 2);
  MOE_CHECK_VALUE(dy.sizes() == x.sizes(), "moe_adapter_cuda.norm_backward: dy ", dy.sizes(),
              " != x ", x.sizes());
  const int64_t T = x.size(0), N = x.size(1);
  check_affine(weight, x, N, op, "weight");
  check_affine(bias, x, N, op, "bias");
  const bool rms = norm_of(kind, op, false) == 1;
  DEVICE_GUARD(x);
  const int64_t nprog = (T + moe::kNormBwdRows - 1) / moe::kNormBwdRows;
  Tensor dx = alloc({T, N}, x.options());
  Tensor dwp = alloc({nprog, N}, x.options().dtype(at::kFloat));
  Tensor dbp = alloc({nprog, N}, x.options().dtype(at::kFloat));
  if (T && N) {
    moe::NormBwdArgs a{dy.data_ptr(), x.data_ptr(), opt_ptr(weight), mean.data_ptr<float>(),
                       rstd.data_ptr<float>(), dx.data_ptr(), dwp.data_ptr<float>(),
                       dbp.data_ptr<float>(), T, N, dy.stride(0), x.stride(0), dx.stride(0), rms,
                       dtype_of(x, op, "x"), dtype_of(dy, op, "dy")};
    check_launch(moe::norm_backward(a, stream_for(x)), op);
  }
  Tensor dw = weight ? dwp.sum(0).to(weight->scalar_type()) : x.new_empty({0});
  Tensor db = bias ? dbp.sum(0).to(bias->scalar_type()) : x.new_empty({0});
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY(moe_adapter_cuda, m) {
  m.def("route(Tensor u, Tensor w_gate, int top_k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("permute(Tensor topk_ids, Tensor block_counts, Tensor block_gates, int num_experts) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor? offsets, Tensor? pair_ids, int gather_div, "
        "bool scatter, Tensor? scale, str activation, bool save_preact, Tensor? bias) -> "
        "(Tensor, Tensor)");
  m.def("grouped_dact(Tensor dc, Tensor w, Tensor preact, str activation, Tensor? offsets, "
        "Tensor? pair_ids, int gather_div, Tensor? gate) -> (Tensor, Tensor)");
  m.def("weight_grad(Tensor a, Tensor b, Tensor? offsets, Tensor? pair_ids, int a_gather_div, "
        "int b_gather_div, Tensor? scale, str a_activation, bool bias_grad) -> (Tensor, Tensor)");
  m.def("norm(Tensor x, Tensor? weight, Tensor? bias, str kind, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, str kind) -> (Tensor, Tensor, Tensor)");
  m.def("combine(Tensor y_pairs, Tensor? shared, int top_k, str norm, Tensor? weight, "
        "Tensor? bias, float eps, bool save_sum) -> (Tensor, Tensor, Tensor, Tensor)");
}

#ifdef MOE_EMULATE
TORCH_LIBRARY_IMPL(moe_adapter_cuda, CPU, m) {
#else
TORCH_LIBRARY_IMPL(moe_adapter_cuda, CUDA, m) {
#endif
  m.impl("route", &route);
  m.impl("permute", &permute);
  m.impl("grouped_gemm", &grouped_gemm);
  m.impl("grouped_dact", &grouped_dact);
  m.impl("weight_grad", &weight_grad);
  m.impl("norm", &norm);
  m.impl("norm_backward", &norm_backward);
  m.impl("combine", &combine);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_adapter_kernels CUDA C++ kernels (ops under torch.ops.moe_adapter_cuda)";
  m.attr("emulated") = kDevice == at::kCPU;
  m.def("set_poison", [](bool on) { g_poison = on; },
        "Fill fresh outputs with NaN / -7 so elements a kernel fails to write show (tests).");
#ifdef MOE_EMULATE
  m.def("set_reverse", &emu::set_reverse,
        "Run each block's threads and each grid's blocks in reverse order (race tests).");
#endif
}
