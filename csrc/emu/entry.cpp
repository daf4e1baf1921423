// C entry points of the emulated kernels (ctypes cannot call C++ or pass an enum class):
// each forwards to the launcher of csrc/cuda/hetlora_cuda.cuh with a null stream.
#include "hetlora_cuda.cuh"

using hetlora::cuda::DType;

extern "C" {

int hetlora_emu_shrink(int dt, const void* x, const void* w, void* h, const int64_t* order, const int64_t* starts,
                       const int64_t* offsets, const void* scales, double scale, int64_t base, int64_t T, int64_t K,
                       int64_t d, int64_t r_max) {
  return hetlora::cuda::shrink(static_cast<DType>(dt), x, w, h, order, starts, offsets, scales, scale, base, T, K, d,
                               r_max, nullptr);
}

int hetlora_emu_expand(int dt, const void* h, const void* w, void* y, const int64_t* order, const int64_t* starts,
                       const int64_t* offsets, const void* scales, double scale, int64_t base, int64_t T, int64_t K,
                       int64_t d, int64_t r_max) {
  return hetlora::cuda::expand(static_cast<DType>(dt), h, w, y, order, starts, offsets, scales, scale, base, T, K, d,
                               r_max, nullptr);
}

int hetlora_emu_wgrad(int dt, const void* h, const void* x, void* out, void* workspace, const int64_t* order,
                      const int64_t* starts, const int64_t* offsets, const void* scales, double scale, int64_t T,
                      int64_t K, int64_t d, int64_t r_max) {
  return hetlora::cuda::wgrad(static_cast<DType>(dt), h, x, out, workspace, order, starts, offsets, scales, scale, T,
                              K, d, r_max, nullptr);
}

int64_t hetlora_emu_wgrad_workspace(int64_t T, int64_t K, int64_t d, int64_t r_max) {
  return hetlora::cuda::wgrad_workspace(T, K, d, r_max);
}

int64_t hetlora_emu_wgrad_chunks(int64_t T, int64_t K, int64_t d, int64_t r_max) {
  return hetlora::cuda::wgrad_chunks(T, K, d, r_max);
}

int hetlora_emu_component_norms(int dt, const int64_t* table, int64_t L, void* out, void* na, void* nb,
                                const int64_t* offsets, int64_t R, int64_t K, int64_t r_max) {
  return hetlora::cuda::component_norms(static_cast<DType>(dt), table, L, out, na, nb, offsets, R, K, r_max, nullptr);
}

int hetlora_emu_weighted_aggregate(int dt, const int64_t* table, int64_t n, int64_t max_d, const void* weights,
                                   const int64_t* offsets, int64_t K, int64_t out_rank) {
  return hetlora::cuda::weighted_aggregate(static_cast<DType>(dt), table, n, max_d, weights, offsets, K, out_rank,
                                           nullptr);
}

int hetlora_emu_delta_fro_sq(int dt, const int64_t* table, int64_t L, void* out, void* workspace,
                             const int64_t* offsets, int64_t K, int64_t r_max, int64_t max_d) {
  return hetlora::cuda::delta_fro_sq(static_cast<DType>(dt), table, L, out, workspace, offsets, K, r_max, max_d,
                                     nullptr);
}

int64_t hetlora_emu_delta_fro_workspace(int64_t L, int64_t K, int64_t r_max, int64_t max_d) {
  return hetlora::cuda::delta_fro_workspace(L, K, r_max, max_d);
}

int64_t hetlora_emu_delta_fro_splits(int64_t L, int64_t K, int64_t r_max, int64_t max_d) {
  return hetlora::cuda::delta_fro_splits(L, K, r_max, max_d);
}

}  // extern "C"
