// pybind11 module hetlora_kernels._C: argument checks, then the CPU or CUDA op.
//
// Python (hetlora_kernels/cuda.py) validates first and names the public argument; the
// TORCH_CHECKs here are the second line of defence for direct calls into _C, so that a
// wrong tensor raises (ValueError for shapes/values, TypeError for dtypes, RuntimeError
// otherwise) naming the argument instead of reading out of bounds.
//
// Every op accepts non-contiguous inputs by making a contiguous copy first (the kernels
// take dense row-major rows).  On CPU the index metadata is validated element by element
// (O(T + K)); on CUDA only shapes are checked, because reading the values back would
// synchronise the device on every call: cuda.py builds them from AdapterLayout and
// TokenGroups, which guarantee them.
#include <string>

#include <torch/extension.h>

#include "ops.h"

namespace hetlora {
namespace {

// torch's Python spelling of a dtype, as users see it ("torch.float32", not "Float")
std::string dt(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    default: return c10::toString(st);
  }
}

void check_float(const at::Tensor& t, const std::string& name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, name,
                   " must be float32, float16, bfloat16 or float64, got ", dt(st));
}

void check_same(const at::Tensor& t, const std::string& name, const at::Tensor& ref, const std::string& ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " dtype ", dt(t.scalar_type()), " differs from ",
                   ref_name, " dtype ", dt(ref.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

void check_index(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be 1-D [", n, "], got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", dt(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but the data is on ", ref.device());
}

// offsets [K+1]: 0 = offsets[0] <= ... <= offsets[K] = R, every rank <= r_max (CPU: values checked)
void check_offsets(const at::Tensor& offsets, int64_t R, int64_t r_max) {
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 2, "offsets must be 1-D [K+1] with K >= 1, got shape ",
                    offsets.sizes());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", dt(offsets.scalar_type()));
  if (!offsets.is_cpu()) return;
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t K = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r = o[k + 1] - o[k];
    TORCH_CHECK_VALUE(r >= 0 && r <= r_max, "offsets give adapter ", k, " rank ", r, ", outside [0, r_max=", r_max,
                      "]");
  }
  TORCH_CHECK_VALUE(o[K] == R, "offsets[K] = ", o[K], " but the factors have ", R, " rows");
}

// order [T] a grouping of tokens, starts [K+1] with starts[0] = base, starts[K] = T
void check_groups(const at::Tensor& order, const at::Tensor& starts, int64_t T, int64_t K, int64_t base,
                  const at::Tensor& ref) {
  check_index(order, "order", T, ref);
  check_index(starts, "starts", K + 1, ref);
  TORCH_CHECK_VALUE(base >= 0 && base <= T, "base must lie in [0, T=", T, "], got ", base);
  if (!order.is_cpu()) return;
  const int64_t* s = starts.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(s[0] == base, "starts[0] = ", s[0], " but base = ", base);
  TORCH_CHECK_VALUE(s[K] == T, "starts[K] = ", s[K], " but there are T = ", T, " tokens");
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK_VALUE(s[k] <= s[k + 1], "starts must be non-decreasing, starts[", k, "] > starts[", k + 1, "]");
  const int64_t* o = order.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < T; ++p)
    TORCH_CHECK_VALUE(o[p] >= 0 && o[p] < T, "order[", p, "] = ", o[p], " is not a token index in [0, ", T, ")");
}

std::optional<at::Tensor> prep_scales(const std::optional<at::Tensor>& scales, int64_t K, const at::Tensor& ref) {
  if (!scales) return std::nullopt;
  const at::Tensor& s = *scales;
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == K, "scales must be [K=", K, "], got shape ", s.sizes());
  TORCH_CHECK_TYPE(s.is_floating_point(), "scales must be a floating tensor, got ", dt(s.scalar_type()));
  TORCH_CHECK_VALUE(s.device() == ref.device(), "scales is on ", s.device(), " but the data is on ", ref.device());
  return s.to(acc_type(ref.scalar_type())).contiguous();
}

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "hetlora_kernels._C.", op, ": got CUDA tensors, but this build has no CUDA kernels ",
              "(built without a CUDA toolkit or without a CUDA build of torch)");
}

#ifdef WITH_CUDA
#define HETLORA_ON_DEVICE(dev_tensor, op, ...) \
  ((dev_tensor).is_cuda() ? op##_cuda(__VA_ARGS__) : op##_cpu(__VA_ARGS__))
#else
#define HETLORA_ON_DEVICE(dev_tensor, op, ...) \
  ((dev_tensor).is_cuda() ? (no_cuda(#op), op##_cpu(__VA_ARGS__)) : op##_cpu(__VA_ARGS__))
#endif

void check_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), name, " must be a CPU or CUDA tensor, got device ", t.device());
}

at::Tensor shrink(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& order, const at::Tensor& starts,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale, int64_t base,
                  int64_t r_max) {
  check_float(x_, "x", 2);
  check_float(w_, "w", 2);
  check_device(x_, "x");
  check_same(w_, "w", x_, "x");
  TORCH_CHECK_VALUE(w_.size(1) == x_.size(1), "w has ", w_.size(1), " columns but x has d=", x_.size(1));
  TORCH_CHECK_VALUE(r_max >= 1, "r_max must be >= 1, got ", r_max);
  check_offsets(offsets, w_.size(0), r_max);
  check_index(offsets, "offsets", offsets.size(0), x_);
  const int64_t K = offsets.size(0) - 1;
  check_groups(order, starts, x_.size(0), K, base, x_);
  auto s = prep_scales(scales, K, x_);
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  return HETLORA_ON_DEVICE(x, shrink, x, w, order.contiguous(), starts.contiguous(), offsets.contiguous(), s, scale,
                           base, r_max);
}

at::Tensor expand(const at::Tensor& h_, const at::Tensor& w_, const at::Tensor& order, const at::Tensor& starts,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale, int64_t base) {
  check_float(w_, "w", 2);
  check_device(w_, "w");
  TORCH_CHECK_VALUE(h_.dim() == 2, "h must be 2-D [T, r_max], got shape ", h_.sizes());
  TORCH_CHECK_TYPE(h_.scalar_type() == acc_type(w_.scalar_type()), "h must be ", dt(acc_type(w_.scalar_type())),
                   " (the accumulation dtype of w's ", dt(w_.scalar_type()), "), got ", dt(h_.scalar_type()));
  TORCH_CHECK_VALUE(h_.device() == w_.device(), "h is on ", h_.device(), " but w is on ", w_.device());
  TORCH_CHECK_VALUE(h_.size(1) >= 1, "h must have r_max >= 1 columns, got shape ", h_.sizes());
  check_offsets(offsets, w_.size(0), h_.size(1));
  check_index(offsets, "offsets", offsets.size(0), w_);
  const int64_t K = offsets.size(0) - 1;
  check_groups(order, starts, h_.size(0), K, base, w_);
  auto s = prep_scales(scales, K, w_);
  const at::Tensor h = h_.contiguous(), w = w_.contiguous();
  return HETLORA_ON_DEVICE(w, expand, h, w, order.contiguous(), starts.contiguous(), offsets.contiguous(), s, scale,
                           base);
}

at::Tensor wgrad(const at::Tensor& h_, const at::Tensor& x_, const at::Tensor& order, const at::Tensor& starts,
                 const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                 int64_t total_rank) {
  check_float(x_, "x", 2);
  check_device(x_, "x");
  TORCH_CHECK_VALUE(h_.dim() == 2 && h_.size(0) == x_.size(0), "h must be 2-D [T=", x_.size(0),
                    ", r_max], got shape ", h_.sizes());
  TORCH_CHECK_TYPE(h_.scalar_type() == acc_type(x_.scalar_type()), "h must be ", dt(acc_type(x_.scalar_type())),
                   " (the accumulation dtype of x's ", dt(x_.scalar_type()), "), got ", dt(h_.scalar_type()));
  TORCH_CHECK_VALUE(h_.device() == x_.device(), "h is on ", h_.device(), " but x is on ", x_.device());
  TORCH_CHECK_VALUE(h_.size(1) >= 1, "h must have r_max >= 1 columns, got shape ", h_.sizes());
  check_offsets(offsets, total_rank, h_.size(1));
  check_index(offsets, "offsets", offsets.size(0), x_);
  const int64_t K = offsets.size(0) - 1;
  // wgrad reads only routed positions starts[0]:starts[K]; base is starts[0] by contract
  check_index(order, "order", x_.size(0), x_);
  check_index(starts, "starts", K + 1, x_);
  if (starts.is_cpu()) check_groups(order, starts, x_.size(0), K, starts.const_data_ptr<int64_t>()[0], x_);
  auto s = prep_scales(scales, K, x_);
  const at::Tensor h = h_.contiguous(), x = x_.contiguous();
  return HETLORA_ON_DEVICE(x, wgrad, h, x, order.contiguous(), starts.contiguous(), offsets.contiguous(), s, scale,
                           total_rank);
}

// Per-layer lists of one layout: every tensor 2-D with R rows, float, and of one dtype
// and device (the Python layer splits lists of mixed dtypes).
void check_layers(const std::vector<at::Tensor>& ts, const char* name) {
  TORCH_CHECK_VALUE(!ts.empty(), name, " must hold at least one layer, got an empty list");
  const std::string first = std::string(name) + "[0]";
  for (size_t i = 0; i < ts.size(); ++i) {
    const std::string n = std::string(name) + "[" + std::to_string(i) + "]";
    check_float(ts[i], n, 2);
    if (i == 0) {
      check_device(ts[0], first.c_str());
      continue;
    }
    check_same(ts[i], n, ts[0], first);
    TORCH_CHECK_VALUE(ts[i].size(0) == ts[0].size(0), n, " has ", ts[i].size(0), " rows but ", first, " has ",
                      ts[0].size(0));
  }
}

void check_pairs(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs) {
  check_layers(As, "A");
  check_layers(Bs, "B");
  TORCH_CHECK_VALUE(As.size() == Bs.size(), "A has ", As.size(), " layers but B has ", Bs.size());
  check_same(Bs[0], "B[0]", As[0], "A[0]");
  TORCH_CHECK_VALUE(Bs[0].size(0) == As[0].size(0), "B[0] has ", Bs[0].size(0), " rows but A[0] has ",
                    As[0].size(0));
}

std::vector<at::Tensor> contiguous(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> component_norms(const std::vector<at::Tensor>& As,
                                                               const std::vector<at::Tensor>& Bs,
                                                               const at::Tensor& offsets, int64_t r_max) {
  check_pairs(As, Bs);
  TORCH_CHECK_VALUE(r_max >= 1, "r_max must be >= 1, got ", r_max);
  check_offsets(offsets, As[0].size(0), r_max);
  check_index(offsets, "offsets", offsets.size(0), As[0]);
  const auto A = contiguous(As), B = contiguous(Bs);
  return HETLORA_ON_DEVICE(A[0], component_norms, A, B, offsets.contiguous(), r_max);
}

std::vector<at::Tensor> weighted_aggregate(const std::vector<at::Tensor>& ts, const at::Tensor& offsets,
                                           const at::Tensor& weights, int64_t out_rank) {
  check_layers(ts, "t");
  TORCH_CHECK_VALUE(out_rank >= 0, "out_rank must be >= 0, got ", out_rank);
  check_offsets(offsets, ts[0].size(0), out_rank);
  check_index(offsets, "offsets", offsets.size(0), ts[0]);
  const int64_t K = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == K, "weights must be [K=", K, "], got shape ",
                    weights.sizes());
  TORCH_CHECK_TYPE(weights.is_floating_point(), "weights must be a floating tensor, got ",
                   dt(weights.scalar_type()));
  TORCH_CHECK_VALUE(weights.device() == ts[0].device(), "weights is on ", weights.device(), " but t[0] is on ",
                    ts[0].device());
  const auto t = contiguous(ts);
  const at::Tensor w = weights.to(acc_type(t[0].scalar_type())).contiguous();
  return HETLORA_ON_DEVICE(t[0], weighted_aggregate, t, offsets.contiguous(), w, out_rank);
}

at::Tensor delta_fro_sq(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                        const at::Tensor& offsets, int64_t r_max) {
  check_pairs(As, Bs);
  TORCH_CHECK_VALUE(r_max >= 1, "r_max must be >= 1, got ", r_max);
  check_offsets(offsets, As[0].size(0), r_max);
  check_index(offsets, "offsets", offsets.size(0), As[0]);
  const auto A = contiguous(As), B = contiguous(Bs);
  return HETLORA_ON_DEVICE(A[0], delta_fro_sq, A, B, offsets.contiguous(), r_max);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace hetlora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace hetlora;
  m.doc() = "hetlora C++/CUDA kernels: segmented mixed-rank LoRA GEMMs and server ops (see csrc/ops.h)";
  m.def("shrink", &shrink, "h[t, j] = s_k x[t] . w[offsets[k]+j]  ->  [T, r_max] (fp32; fp64 for fp64)",
        py::arg("x"), py::arg("w"), py::arg("order"), py::arg("starts"), py::arg("offsets"),
        py::arg("scales") = py::none(), py::arg("scale") = 1.0, py::arg("base") = 0, py::arg("r_max"));
  m.def("expand", &expand, "y[t] = s_k sum_j h[t, j] w[offsets[k]+j]  ->  [T, d] in w's dtype", py::arg("h"),
        py::arg("w"), py::arg("order"), py::arg("starts"), py::arg("offsets"), py::arg("scales") = py::none(),
        py::arg("scale") = 1.0, py::arg("base") = 0);
  m.def("wgrad", &wgrad, "out[offsets[k]+j] = s_k sum_{t in k} h[t, j] x[t]  ->  [R, d] in x's dtype",
        py::arg("h"), py::arg("x"), py::arg("order"), py::arg("starts"), py::arg("offsets"),
        py::arg("scales") = py::none(), py::arg("scale") = 1.0, py::arg("total_rank"));
  m.def("component_norms", &component_norms,
        "per-layer lists A, B -> (out [L, K, r_max], ||A rows|| [L, R], ||B rows|| [L, R])", py::arg("A"),
        py::arg("B"), py::arg("offsets"), py::arg("r_max"));
  m.def("weighted_aggregate", &weighted_aggregate, "list of t [R, d_i] -> list of [out_rank, d_i]: sum_k w_k pad(t_k)",
        py::arg("t"), py::arg("offsets"), py::arg("weights"), py::arg("out_rank"));
  m.def("delta_fro_sq", &delta_fro_sq,
        "per-layer lists A, B -> [L, K]: ||B_k^T A_k||_F^2 (Gram identity); r_max >= every rank",
        py::arg("A"), py::arg("B"), py::arg("offsets"), py::arg("r_max"));
  m.def("with_cuda", &with_cuda, "whether this build has the CUDA kernels");
}
