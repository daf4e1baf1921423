// Server-side ops over packed adapters, torch-free: per-component norms (rank pruning),
// ||B_k^T A_k||_F^2 by the Gram identity, and zero-pad + weighted aggregation.
// No atomics anywhere: every output is one thread's (or one block's) fixed-order sum.
#include "common.cuh"

namespace hetlora {
namespace cuda {
namespace {

using detail::Acc;
using detail::ceil_div;
using detail::find_segment;
using detail::from_acc;
using detail::to_acc;
using detail::warp_sum;

constexpr int kWarps = 8;
constexpr int kThreads = 256;

template <typename T, typename A>
__device__ __forceinline__ A warp_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t d, int lane) {
  A acc = A(0);
  for (int64_t c = lane; c < d; c += 32) acc += to_acc(a[c]) * to_acc(b[c]);
  return warp_sum(acc);
}

// One warp per packed row r: both row norms, then their product into out[k, j].
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
component_norms_kernel(const T* __restrict__ Am, const T* __restrict__ Bm, typename Acc<T>::type* __restrict__ out,
                       typename Acc<T>::type* __restrict__ na, typename Acc<T>::type* __restrict__ nb,
                       const int64_t* __restrict__ offsets, int64_t R, int K, int64_t d_in, int64_t d_out,
                       int64_t r_max) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= R) return;
  const A a = sqrt(warp_dot<T, A>(Am + r * d_in, Am + r * d_in, d_in, lane));
  const A b = sqrt(warp_dot<T, A>(Bm + r * d_out, Bm + r * d_out, d_out, lane));
  if (lane == 0) {
    const int k = find_segment(offsets, K, r);
    na[r] = a;
    nb[r] = b;
    out[k * r_max + (r - offsets[k])] = a * b;
  }
}

// grid.x: tile of kThreads columns, grid.y: output row i.  Adapters whose rank is <= i
// contribute zero padding, i.e. nothing.
template <typename T>
__global__ void __launch_bounds__(kThreads)
aggregate_kernel(const T* __restrict__ t, const typename Acc<T>::type* __restrict__ w, T* __restrict__ out,
                 const int64_t* __restrict__ offsets, int K, int64_t d) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= d) return;
  A acc = A(0);
  for (int k = 0; k < K; ++k) {
    const int64_t r0 = offsets[k];
    if (i < offsets[k + 1] - r0) acc += w[k] * to_acc(t[(r0 + i) * d + c]);
  }
  out[i * d + c] = from_acc<T>(acc);
}

// One block per adapter; warp q takes every kWarps-th pair (i <= j) of components,
// computes (a_i . a_j)(b_i . b_j) and keeps a running sum; thread 0 adds the warps'
// sums in warp order.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
delta_fro_sq_kernel(const T* __restrict__ Am, const T* __restrict__ Bm, typename Acc<T>::type* __restrict__ out,
                    const int64_t* __restrict__ offsets, int64_t d_in, int64_t d_out) {
  using A = typename Acc<T>::type;
  __shared__ A part[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int k = blockIdx.x;
  const int64_t r0 = offsets[k];
  const int rk = static_cast<int>(offsets[k + 1] - r0);
  A sum = A(0);
  int idx = 0;
  for (int i = 0; i < rk; ++i) {
    for (int j = i; j < rk; ++j, ++idx) {
      if (idx % kWarps != warp) continue;
      const A ga = warp_dot<T, A>(Am + (r0 + i) * d_in, Am + (r0 + j) * d_in, d_in, lane);
      const A gb = warp_dot<T, A>(Bm + (r0 + i) * d_out, Bm + (r0 + j) * d_out, d_out, lane);
      sum += (i == j ? A(1) : A(2)) * ga * gb;  // the Gram product is symmetric
    }
  }
  if (lane == 0) part[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = A(0);
#pragma unroll
    for (int q = 0; q < kWarps; ++q) total += part[q];
    out[k] = total;
  }
}

}  // namespace

cudaError_t component_norms(DType dt, const void* A_, const void* B_, void* out, void* na, void* nb,
                            const int64_t* offsets, int64_t R, int64_t K, int64_t d_in, int64_t d_out, int64_t r_max,
                            cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    component_norms_kernel<scalar_t><<<ceil_div(R, kWarps), kWarps * 32, 0, stream>>>(
        static_cast<const scalar_t*>(A_), static_cast<const scalar_t*>(B_), static_cast<A*>(out),
        static_cast<A*>(na), static_cast<A*>(nb), offsets, R, static_cast<int>(K), d_in, d_out, r_max);
    return cudaGetLastError();
  });
}

cudaError_t weighted_aggregate(DType dt, const void* t, const void* weights, void* out, const int64_t* offsets,
                               int64_t K, int64_t d, int64_t out_rank, cudaStream_t stream) {
  if (d == 0 || out_rank == 0) return cudaSuccess;
  if (out_rank > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(ceil_div(d, kThreads), static_cast<unsigned>(out_rank));
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    aggregate_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(static_cast<const scalar_t*>(t),
                                                               static_cast<const A*>(weights),
                                                               static_cast<scalar_t*>(out), offsets,
                                                               static_cast<int>(K), d);
    return cudaGetLastError();
  });
}

cudaError_t delta_fro_sq(DType dt, const void* A_, const void* B_, void* out, const int64_t* offsets, int64_t K,
                         int64_t d_in, int64_t d_out, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    delta_fro_sq_kernel<scalar_t><<<static_cast<unsigned>(K), kWarps * 32, 0, stream>>>(
        static_cast<const scalar_t*>(A_), static_cast<const scalar_t*>(B_), static_cast<A*>(out), offsets, d_in,
        d_out);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace hetlora
