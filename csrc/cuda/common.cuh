// Device helpers shared by the hetlora kernels (torch-free).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "hetlora_cuda.cuh"

namespace hetlora {
namespace cuda {
namespace detail {

// fp32 accumulation for the 16-bit types and for float; double stays double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
// round to nearest even, as torch's .to(dtype) does
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Fixed butterfly: every lane ends with the same sum, in the same order on every run.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Largest k in [0, n) with bounds[k] <= q, for non-decreasing bounds with bounds[0] <= q
// and q < bounds[n].  Empty segments (equal bounds) are skipped: the segment found is
// the one that really holds q.
__device__ __forceinline__ int find_segment(const int64_t* __restrict__ bounds, int n, int64_t q) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    int mid = (lo + hi) >> 1;
    if (bounds[mid] <= q) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename A> __device__ __forceinline__ A scale_of(const A* scales, A scale, int k) {
  return scales != nullptr ? scales[k] : scale;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace detail
}  // namespace cuda
}  // namespace hetlora

// Runs `body` with scalar_t bound to the element type named by `dt`.
#define HETLORA_DISPATCH_DT(dt, ...)                                         \
  [&]() -> cudaError_t {                                                      \
    switch (dt) {                                                             \
      case ::hetlora::cuda::DType::F32: { using scalar_t = float; return __VA_ARGS__(); }         \
      case ::hetlora::cuda::DType::F16: { using scalar_t = __half; return __VA_ARGS__(); }        \
      case ::hetlora::cuda::DType::BF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      case ::hetlora::cuda::DType::F64: { using scalar_t = double; return __VA_ARGS__(); }        \
    }                                                                         \
    return cudaErrorInvalidValue;                                             \
  }()
