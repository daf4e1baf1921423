// Server-side ops over packed adapters, torch-free: per-component norms (rank pruning),
// ||B_k^T A_k||_F^2 by the Gram identity, and zero-pad + weighted aggregation.
// Each serves every layer of a model in one launch (a layer per grid slice, its pointers
// and widths read from a device table).  No atomics anywhere: every output is one
// thread's (or one block's) fixed-order sum.
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

template <typename T> __device__ __forceinline__ const T* ptr_at(const int64_t* table, int64_t i) {
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(table[i]));
}

// grid.x: group of kWarps packed rows (one warp per row r), grid.y: layer.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
component_norms_kernel(const int64_t* __restrict__ table, typename Acc<T>::type* __restrict__ out,
                       typename Acc<T>::type* __restrict__ na, typename Acc<T>::type* __restrict__ nb,
                       const int64_t* __restrict__ offsets, int64_t R, int K, int64_t r_max) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t l = blockIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= R) return;
  const T* Am = ptr_at<T>(table, 4 * l);
  const T* Bm = ptr_at<T>(table, 4 * l + 1);
  const int64_t d_in = table[4 * l + 2], d_out = table[4 * l + 3];
  const A a = sqrt(warp_dot<T, A>(Am + r * d_in, Am + r * d_in, d_in, lane));
  const A b = sqrt(warp_dot<T, A>(Bm + r * d_out, Bm + r * d_out, d_out, lane));
  if (lane == 0) {
    const int k = find_segment(offsets, K, r);
    na[l * R + r] = a;
    nb[l * R + r] = b;
    out[(l * K + k) * r_max + (r - offsets[k])] = a * b;
  }
}

// grid.x: tile of kThreads columns, grid.y: output row j, grid.z: tensor i of the table.
// Adapters whose rank is <= j contribute zero padding, i.e. nothing.
template <typename T>
__global__ void __launch_bounds__(kThreads)
aggregate_kernel(const int64_t* __restrict__ table, const typename Acc<T>::type* __restrict__ w,
                 const int64_t* __restrict__ offsets, int K) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.z;
  const int64_t j = blockIdx.y;
  const int64_t d = table[3 * i + 2];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= d) return;
  const T* t = ptr_at<T>(table, 3 * i);
  T* out = const_cast<T*>(ptr_at<T>(table, 3 * i + 1));
  A acc = A(0);
  for (int k = 0; k < K; ++k) {
    const int64_t r0 = offsets[k];
    if (j < offsets[k + 1] - r0) acc += w[k] * to_acc(t[(r0 + j) * d + c]);
  }
  out[j * d + c] = from_acc<T>(acc);
}

// grid.x: adapter k, grid.y: layer.  Warp q takes every kWarps-th pair (i <= j) of
// components, computes (a_i . a_j)(b_i . b_j) and keeps a running sum; thread 0 adds the
// warps' sums in warp order.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
delta_fro_sq_kernel(const int64_t* __restrict__ table, typename Acc<T>::type* __restrict__ out,
                    const int64_t* __restrict__ offsets, int K) {
  using A = typename Acc<T>::type;
  __shared__ A part[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int k = blockIdx.x;
  const int64_t l = blockIdx.y;
  const T* Am = ptr_at<T>(table, 4 * l);
  const T* Bm = ptr_at<T>(table, 4 * l + 1);
  const int64_t d_in = table[4 * l + 2], d_out = table[4 * l + 3];
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
    out[l * K + k] = total;
  }
}

}  // namespace

cudaError_t component_norms(DType dt, const int64_t* table, int64_t L, void* out, void* na, void* nb,
                            const int64_t* offsets, int64_t R, int64_t K, int64_t r_max, cudaStream_t stream) {
  if (R == 0 || L == 0) return cudaSuccess;
  if (L > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(ceil_div(R, kWarps), static_cast<unsigned>(L));
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    component_norms_kernel<scalar_t><<<grid, kWarps * 32, 0, stream>>>(
        table, static_cast<A*>(out), static_cast<A*>(na), static_cast<A*>(nb), offsets, R, static_cast<int>(K),
        r_max);
    return cudaGetLastError();
  });
}

cudaError_t weighted_aggregate(DType dt, const int64_t* table, int64_t n, int64_t max_d, const void* weights,
                               const int64_t* offsets, int64_t K, int64_t out_rank, cudaStream_t stream) {
  if (n == 0 || max_d == 0 || out_rank == 0) return cudaSuccess;
  if (out_rank > 65535 || n > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(ceil_div(max_d, kThreads), static_cast<unsigned>(out_rank), static_cast<unsigned>(n));
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    aggregate_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(table, static_cast<const A*>(weights), offsets,
                                                               static_cast<int>(K));
    return cudaGetLastError();
  });
}

cudaError_t delta_fro_sq(DType dt, const int64_t* table, int64_t L, void* out, const int64_t* offsets, int64_t K,
                         cudaStream_t stream) {
  if (K == 0 || L == 0) return cudaSuccess;
  if (L > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(L));
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    delta_fro_sq_kernel<scalar_t><<<grid, kWarps * 32, 0, stream>>>(table, static_cast<A*>(out), offsets,
                                                                     static_cast<int>(K));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace hetlora
