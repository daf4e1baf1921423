// Tensor-level ops of hetlora_kernels._C, one CPU and (when built with WITH_CUDA) one
// CUDA implementation each.  Arguments arrive checked and contiguous from bindings.cpp;
// the semantics are those of csrc/cuda/hetlora_cuda.cuh, on at::Tensor:
//   x/w/A/B/t: float32, float16, bfloat16 or float64; "acc" is float32 for the first
//   three and float64 for float64.  order [T], starts [K+1], offsets [K+1]: int64.
//   scales: optional acc-typed [K]; when absent `scale` applies to every adapter.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace hetlora {

// h [T, r_max] acc: h[t, j] = s_k x[t] . w[offsets[k] + j] (zeros past r_k and for -1 rows)
at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t base, int64_t r_max);
// y [T, d] (w's dtype): y[t] = s_k sum_j h[t, j] w[offsets[k] + j]; zeros for -1 rows
at::Tensor expand_cpu(const at::Tensor& h, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t base);
// out [R, d] (x's dtype): out[offsets[k] + j] = s_k sum_{t in k} h[t, j] x[t]
at::Tensor wgrad_cpu(const at::Tensor& h, const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts,
                     const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                     int64_t total_rank);
// Server ops over the L layers of a model (one layout, one dtype, widths free):
// (out [L, K, r_max], na [L, R], nb [L, R]), all acc
std::tuple<at::Tensor, at::Tensor, at::Tensor> component_norms_cpu(const std::vector<at::Tensor>& As,
                                                                   const std::vector<at::Tensor>& Bs,
                                                                   const at::Tensor& offsets, int64_t r_max);
// one [out_rank, d_i] tensor per input t_i [R, d_i], in its dtype; weights acc [K]
std::vector<at::Tensor> weighted_aggregate_cpu(const std::vector<at::Tensor>& ts, const at::Tensor& offsets,
                                               const at::Tensor& weights, int64_t out_rank);
// [L, K] acc: ||B_k^T A_k||_F^2 per layer
at::Tensor delta_fro_sq_cpu(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                            const at::Tensor& offsets, int64_t r_max);

#ifdef WITH_CUDA
at::Tensor shrink_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                       const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                       int64_t base, int64_t r_max);
at::Tensor expand_cuda(const at::Tensor& h, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                       const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                       int64_t base);
at::Tensor wgrad_cuda(const at::Tensor& h, const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t total_rank);
std::tuple<at::Tensor, at::Tensor, at::Tensor> component_norms_cuda(const std::vector<at::Tensor>& As,
                                                                    const std::vector<at::Tensor>& Bs,
                                                                    const at::Tensor& offsets, int64_t r_max);
std::vector<at::Tensor> weighted_aggregate_cuda(const std::vector<at::Tensor>& ts, const at::Tensor& offsets,
                                                const at::Tensor& weights, int64_t out_rank);
at::Tensor delta_fro_sq_cuda(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                             const at::Tensor& offsets, int64_t r_max);
#endif

// acc dtype of an element dtype
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace hetlora
