// Segmented mixed-rank LoRA GEMMs (forward and backward), torch-free.
//
// One kernel family serves all four products of DESIGN.md section 2:
//   forward   h  = x A_k^T          shrink(x, A)            y  = s_k h B_k   expand(h, B, s)
//   backward  g  = s_k dy B_k^T     shrink(dy, B, s)        dx = g A_k       expand(g, A)
//             dA_k = sum g^T x      wgrad(g, x)             dB_k = s_k sum h^T dy   wgrad(h, dy, s)
// Tokens are visited through `order` (grouped by adapter, -1 tokens first), so inputs
// are never gathered into a copy.  Every output element is produced by exactly one
// thread or warp with a fixed summation order: results are bitwise reproducible.
#include "common.cuh"

namespace hetlora {
namespace cuda {
namespace {

using detail::Acc;
using detail::ceil_div;
using detail::find_segment;
using detail::from_acc;
using detail::scale_of;
using detail::to_acc;
using detail::warp_sum;

constexpr int kWarps = 8;       // warps per block in the warp-per-row kernels
constexpr int kThreads = 256;   // threads per block in the column-parallel kernels
constexpr int kRows = 8;        // rank components handled together (register accumulators)
constexpr int kTokens = 16;     // routed positions per block in expand (w rows read once per run)
constexpr int kWarpTokens = 4;  // routed positions per warp in shrink (w rows read once per run)

// The run of a tile that starts at position p: positions [p, end) of the tile [.., p_end)
// that one adapter's group holds, with that adapter's scale, first packed row and rank.
// end <= p only with corrupt starts.
template <typename A>
struct Run {
  int64_t end;
  A s;
  int64_t r0;
  int rk;
};

template <typename A>
__device__ __forceinline__ Run<A> run_at(int64_t p, int64_t p_end, const int64_t* __restrict__ starts, int K,
                                         const int64_t* __restrict__ offsets, const A* __restrict__ scales, A scale) {
  const int k = find_segment(starts, K, p);  // the adapter whose group holds p (never an empty one)
  const int64_t end = starts[k + 1] < p_end ? starts[k + 1] : p_end;
  const int64_t r0 = offsets[k];
  return {end, scale_of(scales, scale, k), r0, static_cast<int>(offsets[k + 1] - r0)};
}

// One warp per kWarpTokens consecutive routed positions, cut into runs of one adapter: per
// group of kRows components each lane reads the w rows once for the run's tokens (one warp
// per token read them once per token), keeps kRows partial dot products per token, and the
// warp reduces them.  Each h value is the same lane-strided sum, reduced the same way, as
// with one token per warp: bitwise the same.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
shrink_kernel(const T* __restrict__ x, const T* __restrict__ w, typename Acc<T>::type* __restrict__ h,
              const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
              const int64_t* __restrict__ offsets, const typename Acc<T>::type* __restrict__ scales,
              typename Acc<T>::type scale, int64_t base, int64_t T_total, int K, int64_t d, int64_t r_max) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t p_begin =
      base + (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kWarpTokens;
  if (p_begin >= T_total) return;  // whole warps leave together: no shuffle sees a missing lane
  const int64_t p_end = p_begin + kWarpTokens < T_total ? p_begin + kWarpTokens : T_total;
  for (int64_t p = p_begin; p < p_end;) {
    const auto [q, s, r0, rk] = run_at(p, p_end, starts, K, offsets, scales, scale);
    if (q <= p) break;  // only with corrupt starts: leave the rest unwritten rather than spin
    const int n = static_cast<int>(q - p);
    int64_t tok[kWarpTokens];
#pragma unroll
    for (int i = 0; i < kWarpTokens; ++i) tok[i] = i < n ? order[p + i] : 0;
    for (int j0 = 0; j0 < rk; j0 += kRows) {
      A acc[kWarpTokens][kRows];
#pragma unroll
      for (int i = 0; i < kWarpTokens; ++i)
#pragma unroll
        for (int u = 0; u < kRows; ++u) acc[i][u] = A(0);
      const int nu = rk - j0 < kRows ? rk - j0 : kRows;
      const T* wr = w + (r0 + j0) * d;
      for (int64_t c = lane; c < d; c += 32) {
        A wv[kRows];
#pragma unroll
        for (int u = 0; u < kRows; ++u) wv[u] = u < nu ? to_acc(wr[u * d + c]) : A(0);
#pragma unroll
        for (int i = 0; i < kWarpTokens; ++i) {
          if (i < n) {
            const A xv = to_acc(x[tok[i] * d + c]);
#pragma unroll
            for (int u = 0; u < kRows; ++u) acc[i][u] += xv * wv[u];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kWarpTokens; ++i) {
        if (i < n) {  // n is the same on every lane: the whole warp shuffles or none of it
#pragma unroll
          for (int u = 0; u < kRows; ++u) acc[i][u] = warp_sum(acc[i][u]);
          if (lane == 0) {
#pragma unroll
            for (int u = 0; u < kRows; ++u)
              if (u < nu) h[tok[i] * r_max + j0 + u] = acc[i][u] * s;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kWarpTokens; ++i)  // unrolled: tok[] stays in registers
      if (i < n)
        for (int64_t j = rk + lane; j < r_max; j += 32) h[tok[i] * r_max + j] = A(0);
    p = q;
  }
}

// grid.x: tile of kTokens consecutive routed positions, grid.y: tile of kThreads output
// columns.  The tile is cut into runs of one adapter (one run where groups are longer than a
// tile); each thread reads a run's w rows once for all its tokens, where one block per token
// read them once per token.  h[t, j] is a warp-wide broadcast load, w rows are coalesced.
// Each output is the same j-ordered sum as with one token per block: bitwise the same.
template <typename T>
__global__ void __launch_bounds__(kThreads)
expand_kernel(const typename Acc<T>::type* __restrict__ h, const T* __restrict__ w, T* __restrict__ y,
              const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
              const int64_t* __restrict__ offsets, const typename Acc<T>::type* __restrict__ scales,
              typename Acc<T>::type scale, int64_t base, int64_t T_total, int K, int64_t d, int64_t r_max) {
  using A = typename Acc<T>::type;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (c >= d) return;
  const int64_t p_begin = base + static_cast<int64_t>(blockIdx.x) * kTokens;
  const int64_t p_end = p_begin + kTokens < T_total ? p_begin + kTokens : T_total;
  for (int64_t p = p_begin; p < p_end;) {
    const auto [q, s, r0, rk] = run_at(p, p_end, starts, K, offsets, scales, scale);
    if (q <= p) break;  // only with corrupt starts: leave the rest unwritten rather than spin
    const int n = static_cast<int>(q - p);
    int64_t tok[kTokens];
    A acc[kTokens];
#pragma unroll
    for (int u = 0; u < kTokens; ++u) {
      acc[u] = A(0);
      tok[u] = u < n ? order[p + u] : 0;
    }
    for (int j = 0; j < rk; ++j) {
      const A wv = to_acc(w[(r0 + j) * d + c]);
#pragma unroll
      for (int u = 0; u < kTokens; ++u)
        if (u < n) acc[u] += h[tok[u] * r_max + j] * wv;
    }
#pragma unroll
    for (int u = 0; u < kTokens; ++u)
      if (u < n) y[tok[u] * d + c] = from_acc<T>(acc[u] * s);
    p = q;
  }
}

// grid.x: tile of kThreads columns, grid.y: adapter k, grid.z: group of kRows components.
// Each thread owns kRows output elements of one column and sums over the adapter's tokens
// in `order` sequentially: no atomics, so the result does not depend on scheduling.
template <typename T>
__global__ void __launch_bounds__(kThreads)
wgrad_kernel(const typename Acc<T>::type* __restrict__ h, const T* __restrict__ x, T* __restrict__ out,
             typename Acc<T>::type* __restrict__ work, int chunks, const int64_t* __restrict__ order,
             const int64_t* __restrict__ starts, const int64_t* __restrict__ offsets,
             const typename Acc<T>::type* __restrict__ scales, typename Acc<T>::type scale, int64_t d,
             int64_t r_max) {
  using A = typename Acc<T>::type;
  // grid.y = K * chunks: slice `ch` of adapter k's group (the whole group when chunks == 1)
  const int k = blockIdx.y / chunks;
  const int ch = blockIdx.y % chunks;
  const int j0 = blockIdx.z * kRows;
  const int64_t r0 = offsets[k];
  const int rk = static_cast<int>(offsets[k + 1] - r0);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j0 >= rk || c >= d) return;
  const int nu = rk - j0 < kRows ? rk - j0 : kRows;
  A acc[kRows];
#pragma unroll
  for (int u = 0; u < kRows; ++u) acc[u] = A(0);
  const int64_t s0 = starts[k], n = starts[k + 1] - s0;
  const int64_t p0 = s0 + n * ch / chunks, p1 = s0 + n * (ch + 1) / chunks;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t tok = order[p];
    const A xv = to_acc(x[tok * d + c]);
    const A* hr = h + tok * r_max + j0;
#pragma unroll
    for (int u = 0; u < kRows; ++u)
      if (u < nu) acc[u] += hr[u] * xv;
  }
  if (chunks > 1) {  // partial sums, added in slice order by wgrad_reduce_kernel
    A* wr = work + (static_cast<int64_t>(blockIdx.y) * r_max + j0) * d + c;
#pragma unroll
    for (int u = 0; u < kRows; ++u)
      if (u < nu) wr[u * d] = acc[u];
    return;
  }
  const A s = scale_of(scales, scale, k);
#pragma unroll
  for (int u = 0; u < kRows; ++u)
    if (u < nu) out[(r0 + j0 + u) * d + c] = from_acc<T>(acc[u] * s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
wgrad_reduce_kernel(const typename Acc<T>::type* __restrict__ work, T* __restrict__ out, int chunks,
                    const int64_t* __restrict__ offsets, const typename Acc<T>::type* __restrict__ scales,
                    typename Acc<T>::type scale, int64_t d, int64_t r_max) {
  using A = typename Acc<T>::type;
  const int k = blockIdx.y;
  const int j = blockIdx.z;
  const int64_t r0 = offsets[k];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= offsets[k + 1] - r0 || c >= d) return;
  A acc = A(0);
  const A* wr = work + (static_cast<int64_t>(k) * chunks * r_max + j) * d + c;
  for (int ch = 0; ch < chunks; ++ch) acc += wr[static_cast<int64_t>(ch) * r_max * d];
  out[(r0 + j) * d + c] = from_acc<T>(acc * scale_of(scales, scale, k));
}

}  // namespace

cudaError_t shrink(DType dt, const void* x, const void* w, void* h, const int64_t* order, const int64_t* starts,
                   const int64_t* offsets, const void* scales, double scale, int64_t base, int64_t T, int64_t K,
                   int64_t d, int64_t r_max, cudaStream_t stream) {
  const int64_t n = T - base;
  if (n <= 0) return cudaSuccess;
  constexpr int64_t per_block = static_cast<int64_t>(kWarps) * kWarpTokens;
  if ((n + per_block - 1) / per_block > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    shrink_kernel<scalar_t><<<ceil_div(n, per_block), kWarps * 32, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(w), static_cast<A*>(h), order, starts,
        offsets, static_cast<const A*>(scales), static_cast<A>(scale), base, T, static_cast<int>(K), d, r_max);
    return cudaGetLastError();
  });
}

cudaError_t expand(DType dt, const void* h, const void* w, void* y, const int64_t* order, const int64_t* starts,
                   const int64_t* offsets, const void* scales, double scale, int64_t base, int64_t T, int64_t K,
                   int64_t d, int64_t r_max, cudaStream_t stream) {
  const int64_t n = T - base;
  if (n <= 0 || d == 0) return cudaSuccess;
  if ((n + kTokens - 1) / kTokens > 0x7fffffff || (d + kThreads - 1) / kThreads > 65535)
    return cudaErrorInvalidConfiguration;
  const dim3 grid(ceil_div(n, kTokens), ceil_div(d, kThreads));
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    expand_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const A*>(h), static_cast<const scalar_t*>(w), static_cast<scalar_t*>(y), order, starts,
        offsets, static_cast<const A*>(scales), static_cast<A>(scale), base, T, static_cast<int>(K), d, r_max);
    return cudaGetLastError();
  });
}

cudaError_t wgrad(DType dt, const void* h, const void* x, void* out, void* workspace, const int64_t* order,
                  const int64_t* starts, const int64_t* offsets, const void* scales, double scale, int64_t T,
                  int64_t K, int64_t d, int64_t r_max, cudaStream_t stream) {
  if (K == 0 || d == 0 || r_max == 0) return cudaSuccess;
  const int64_t chunks = wgrad_chunks(T, K, d, r_max);
  if (chunks > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  if (K * chunks > 65535 || ceil_div(r_max, kRows) > 65535u || r_max > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(ceil_div(d, kThreads), static_cast<unsigned>(K * chunks), ceil_div(r_max, kRows));
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    wgrad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const A*>(h), static_cast<const scalar_t*>(x), static_cast<scalar_t*>(out),
        static_cast<A*>(workspace), static_cast<int>(chunks), order, starts, offsets, static_cast<const A*>(scales),
        static_cast<A>(scale), d, r_max);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || chunks == 1) return err;
    const dim3 rgrid(ceil_div(d, kThreads), static_cast<unsigned>(K), static_cast<unsigned>(r_max));
    wgrad_reduce_kernel<scalar_t><<<rgrid, kThreads, 0, stream>>>(
        static_cast<const A*>(workspace), static_cast<scalar_t*>(out), static_cast<int>(chunks), offsets,
        static_cast<const A*>(scales), static_cast<A>(scale), d, r_max);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace hetlora
