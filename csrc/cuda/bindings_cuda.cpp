// CUDA side of csrc/ops.h: allocate outputs with torch, hand raw pointers and the
// current stream to the torch-free launchers of hetlora_cuda.cuh.  Built only where a
// CUDA toolkit and a CUDA build of torch exist (csrc/build.py defines WITH_CUDA).
// Arguments arrive checked and contiguous from bindings.cpp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops.h"
#include "hetlora_cuda.cuh"

namespace hetlora {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    case at::kDouble: return cuda::DType::F64;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "hetlora_kernels._C.", op, " CUDA launch failed: ", cudaGetErrorString(err));
}

const int64_t* idx(const at::Tensor& t) { return t.const_data_ptr<int64_t>(); }

const void* scales_ptr(const std::optional<at::Tensor>& s) { return s ? s->const_data_ptr() : nullptr; }

}  // namespace

at::Tensor shrink_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                       const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                       int64_t base, int64_t r_max) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0);
  auto opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor h = base > 0 ? at::zeros({T, r_max}, opts) : at::empty({T, r_max}, opts);
  check_launch(cuda::shrink(dtype_of(x), x.const_data_ptr(), w.const_data_ptr(), h.mutable_data_ptr(), idx(order),
                            idx(starts), idx(offsets), scales_ptr(scales), scale, base, T, offsets.size(0) - 1,
                            x.size(1), r_max, c10::cuda::getCurrentCUDAStream()),
               "shrink");
  return h;
}

at::Tensor expand_cuda(const at::Tensor& h, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                       const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                       int64_t base) {
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t T = h.size(0), d = w.size(1);
  at::Tensor y = base > 0 ? at::zeros({T, d}, w.options()) : at::empty({T, d}, w.options());
  check_launch(cuda::expand(dtype_of(w), h.const_data_ptr(), w.const_data_ptr(), y.mutable_data_ptr(), idx(order),
                            idx(starts), idx(offsets), scales_ptr(scales), scale, base, T, offsets.size(0) - 1, d,
                            h.size(1), c10::cuda::getCurrentCUDAStream()),
               "expand");
  return y;
}

at::Tensor wgrad_cuda(const at::Tensor& h, const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t total_rank) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(K <= 65535, "wgrad: at most 65535 adapters per launch, got K=", K);
  at::Tensor out = at::empty({total_rank, x.size(1)}, x.options());
  // the two-pass path's partial sums (long groups, small grid): see cuda::wgrad_chunks
  const int64_t ws = cuda::wgrad_workspace(x.size(0), K, x.size(1), h.size(1));
  at::Tensor work = ws > 0 ? at::empty({ws}, x.options().dtype(acc_type(x.scalar_type()))) : at::Tensor();
  check_launch(cuda::wgrad(dtype_of(x), h.const_data_ptr(), x.const_data_ptr(), out.mutable_data_ptr(),
                           ws > 0 ? work.mutable_data_ptr() : nullptr, idx(order), idx(starts), idx(offsets),
                           scales_ptr(scales), scale, x.size(0), K, x.size(1), h.size(1),
                           c10::cuda::getCurrentCUDAStream()),
               "wgrad");
  return out;
}

namespace {

// The device table the server kernels read (hetlora_cuda.cuh): `cols` int64 per row.
// Filled in pinned memory and copied without blocking the host; the caching host
// allocator keeps the pinned block alive until the copy on the current stream is done.
at::Tensor device_table(const std::vector<std::vector<int64_t>>& rows, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(rows.size()), cols = static_cast<int64_t>(rows[0].size());
  at::Tensor host = at::empty({n, cols}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < cols; ++j) p[i * cols + j] = rows[i][j];
  return host.to(device, at::kLong, /*non_blocking=*/true);
}

int64_t as_int(const void* ptr) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr)); }

at::Tensor factor_table(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs) {
  std::vector<std::vector<int64_t>> rows;
  for (size_t l = 0; l < As.size(); ++l)
    rows.push_back({as_int(As[l].const_data_ptr()), as_int(Bs[l].const_data_ptr()), As[l].size(1), Bs[l].size(1)});
  return device_table(rows, As[0].device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> component_norms_cuda(const std::vector<at::Tensor>& As,
                                                                    const std::vector<at::Tensor>& Bs,
                                                                    const at::Tensor& offsets, int64_t r_max) {
  const c10::cuda::CUDAGuard guard(As[0].device());
  const int64_t L = static_cast<int64_t>(As.size()), R = As[0].size(0), K = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(L <= 65535, "component_norms: at most 65535 layers per call, got ", L);
  auto opts = As[0].options().dtype(acc_type(As[0].scalar_type()));
  at::Tensor out = at::zeros({L, K, r_max}, opts);
  at::Tensor na = at::empty({L, R}, opts), nb = at::empty({L, R}, opts);
  const at::Tensor table = factor_table(As, Bs);
  check_launch(cuda::component_norms(dtype_of(As[0]), idx(table), L, out.mutable_data_ptr(), na.mutable_data_ptr(),
                                     nb.mutable_data_ptr(), idx(offsets), R, K, r_max,
                                     c10::cuda::getCurrentCUDAStream()),
               "component_norms");
  return {out, na, nb};
}

std::vector<at::Tensor> weighted_aggregate_cuda(const std::vector<at::Tensor>& ts, const at::Tensor& offsets,
                                                const at::Tensor& weights, int64_t out_rank) {
  const c10::cuda::CUDAGuard guard(ts[0].device());
  TORCH_CHECK_VALUE(out_rank <= 65535, "weighted_aggregate: out_rank must be <= 65535, got ", out_rank);
  TORCH_CHECK_VALUE(ts.size() <= 65535, "weighted_aggregate: at most 65535 tensors per call, got ", ts.size());
  std::vector<at::Tensor> outs;
  std::vector<std::vector<int64_t>> rows;
  int64_t max_d = 0;
  for (const at::Tensor& t : ts) {
    outs.push_back(at::empty({out_rank, t.size(1)}, t.options()));
    rows.push_back({as_int(t.const_data_ptr()), as_int(outs.back().mutable_data_ptr()), t.size(1)});
    max_d = std::max<int64_t>(max_d, t.size(1));
  }
  const at::Tensor table = device_table(rows, ts[0].device());
  check_launch(cuda::weighted_aggregate(dtype_of(ts[0]), idx(table), static_cast<int64_t>(ts.size()), max_d,
                                        weights.const_data_ptr(), idx(offsets), offsets.size(0) - 1, out_rank,
                                        c10::cuda::getCurrentCUDAStream()),
               "weighted_aggregate");
  return outs;
}

at::Tensor delta_fro_sq_cuda(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                             const at::Tensor& offsets, int64_t r_max) {
  const c10::cuda::CUDAGuard guard(As[0].device());
  const int64_t L = static_cast<int64_t>(As.size()), K = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(L <= 65535, "delta_fro_sq: at most 65535 layers per call, got ", L);
  int64_t max_d = 0;
  for (int64_t l = 0; l < L; ++l) max_d = std::max<int64_t>(max_d, std::max(As[l].size(1), Bs[l].size(1)));
  const auto acc = As[0].options().dtype(acc_type(As[0].scalar_type()));
  at::Tensor out = at::empty({L, K}, acc);
  at::Tensor work = at::empty({cuda::delta_fro_workspace(L, K, r_max, max_d)}, acc);
  const at::Tensor table = factor_table(As, Bs);
  check_launch(cuda::delta_fro_sq(dtype_of(As[0]), idx(table), L, out.mutable_data_ptr(), work.mutable_data_ptr(),
                                  idx(offsets), K, r_max, max_d, c10::cuda::getCurrentCUDAStream()),
               "delta_fro_sq");
  return out;
}

}  // namespace hetlora
