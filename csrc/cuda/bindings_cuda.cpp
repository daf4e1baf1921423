// CUDA side of csrc/ops.h: allocate outputs with torch, hand raw pointers and the
// current stream to the torch-free launchers of hetlora_cuda.cuh.  Built only where a
// CUDA toolkit and a CUDA build of torch exist (csrc/build.py defines WITH_CUDA).
// Arguments arrive checked and contiguous from bindings.cpp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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
  check_launch(cuda::wgrad(dtype_of(x), h.const_data_ptr(), x.const_data_ptr(), out.mutable_data_ptr(), idx(order),
                           idx(starts), idx(offsets), scales_ptr(scales), scale, x.size(0), K, x.size(1), h.size(1),
                           c10::cuda::getCurrentCUDAStream()),
               "wgrad");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> component_norms_cuda(const at::Tensor& A, const at::Tensor& B,
                                                                    const at::Tensor& offsets, int64_t r_max) {
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t R = A.size(0), K = offsets.size(0) - 1;
  auto opts = A.options().dtype(acc_type(A.scalar_type()));
  at::Tensor out = at::zeros({K, r_max}, opts);
  at::Tensor na = at::empty({R}, opts), nb = at::empty({R}, opts);
  check_launch(cuda::component_norms(dtype_of(A), A.const_data_ptr(), B.const_data_ptr(), out.mutable_data_ptr(),
                                     na.mutable_data_ptr(), nb.mutable_data_ptr(), idx(offsets), R, K, A.size(1),
                                     B.size(1), r_max, c10::cuda::getCurrentCUDAStream()),
               "component_norms");
  return {out, na, nb};
}

at::Tensor weighted_aggregate_cuda(const at::Tensor& t, const at::Tensor& offsets, const at::Tensor& weights,
                                   int64_t out_rank) {
  const c10::cuda::CUDAGuard guard(t.device());
  TORCH_CHECK_VALUE(out_rank <= 65535, "weighted_aggregate: out_rank must be <= 65535, got ", out_rank);
  at::Tensor out = at::empty({out_rank, t.size(1)}, t.options());
  check_launch(cuda::weighted_aggregate(dtype_of(t), t.const_data_ptr(), weights.const_data_ptr(),
                                        out.mutable_data_ptr(), idx(offsets), offsets.size(0) - 1, t.size(1),
                                        out_rank, c10::cuda::getCurrentCUDAStream()),
               "weighted_aggregate");
  return out;
}

at::Tensor delta_fro_sq_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& offsets) {
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t K = offsets.size(0) - 1;
  at::Tensor out = at::empty({K}, A.options().dtype(acc_type(A.scalar_type())));
  check_launch(cuda::delta_fro_sq(dtype_of(A), A.const_data_ptr(), B.const_data_ptr(), out.mutable_data_ptr(),
                                  idx(offsets), K, A.size(1), B.size(1), c10::cuda::getCurrentCUDAStream()),
               "delta_fro_sq");
  return out;
}

}  // namespace hetlora
