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

// Gram tiles of delta_fro_sq: 16 x 16 entries per block of 64 threads, a 2 x 2 block of entries
// per thread (4 shared-memory loads feed 4 FMAs; one entry per thread needed 2 loads per FMA);
// columns staged through shared memory 64 at a time (coalesced rows in).
constexpr int kGram = 16;
constexpr int kGramCols = 64;
constexpr int kGramThreads = 64;
static_assert((kGram / 2) * (kGram / 2) == kGramThreads, "a 2 x 2 block of tile entries per thread");
static_assert(kGram * kGram == kThreads, "the sum kernel: one thread per Gram tile entry");

// Tile pair p (row-major over the upper triangle of an nt x nt tile grid) -> (ti, tj), ti <= tj.
__device__ __forceinline__ void tile_pair(int p, int nt, int& ti, int& tj) {
  ti = 0;
  while (p >= nt - ti) p -= nt - ti++;
  tj = ti + p;
}

// 2 for an entry above the diagonal of the symmetric Gram product, 1 on it, 0 below: the
// upper triangle, doubled, is the whole sum.
template <typename A> __device__ __forceinline__ A gram_weight(int ti, int tj, int i, int j) {
  if (ti < tj) return A(2);
  return i < j ? A(2) : (i == j ? A(1) : A(0));
}

// Block sum of one value per thread over kW warps, in a fixed order (warp butterflies, then
// the warps in order); the result is valid in thread 0.
template <int kW, typename A> __device__ __forceinline__ A block_sum(A v, A* part) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  A total = A(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int q = 0; q < kW; ++q) total += part[q];
  }
  return total;
}

// g[u][v] = sum_c m[r0 + 16 ti + 2a + u, c] * m[r0 + 16 tj + 2b + v, c] over columns
// [c_begin, c_end), for this thread's (a, b) = (tx / 8, tx % 8); rows at or past rk read as zero.
template <typename T, typename A>
__device__ __forceinline__ void gram_block(const T* __restrict__ m, int64_t d, int64_t r0, int64_t rk, int ti,
                                           int tj, int64_t c_begin, int64_t c_end, A (*si)[kGramCols + 1],
                                           A (*sj)[kGramCols + 1], A (&g)[2][2]) {
  const int a = threadIdx.x / (kGram / 2), b = threadIdx.x % (kGram / 2);
#pragma unroll
  for (int u = 0; u < 2; ++u) g[u][0] = g[u][1] = A(0);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kGramCols) {
#pragma unroll 8
    for (int q = 0; q < 2 * kGram * kGramCols / kGramThreads; ++q) {
      const int e = threadIdx.x + q * kGramThreads;
      const int half = e / (kGram * kGramCols), rr = (e / kGramCols) % kGram, cc = e % kGramCols;
      const int64_t row = (half ? tj : ti) * kGram + rr, col = c0 + cc;
      const A v = (row < rk && col < c_end) ? to_acc(m[(r0 + row) * d + col]) : A(0);
      (half ? sj : si)[rr][cc] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < kGramCols; ++cc) {
      const A x0 = si[2 * a][cc], x1 = si[2 * a + 1][cc], y0 = sj[2 * b][cc], y1 = sj[2 * b + 1][cc];
      g[0][0] += x0 * y0;
      g[0][1] += x0 * y1;
      g[1][0] += x1 * y0;
      g[1][1] += x1 * y1;
    }
    __syncthreads();
  }
}

// grid.x: adapter k x tile pair p, grid.y: column range s of S, grid.z: layer.  Tile pairs
// outside r_k x r_k exit at once (the sum kernel never reads their cells).  With S == 1 the
// block adds its weighted products (a_i . a_j)(b_i . b_j) into one partial sum; with S > 1 it
// stores its range's two Gram tiles (entry i * 16 + j) and the sum kernel adds the ranges first.
template <typename T>
__global__ void __launch_bounds__(kGramThreads)
gram_tiles_kernel(const int64_t* __restrict__ table, typename Acc<T>::type* __restrict__ ws,
                  const int64_t* __restrict__ offsets, int K, int nt, int npairs) {
  using A = typename Acc<T>::type;
  // +1: the rows one warp reads (4 of si, 8 of sj, 65 words apart) fall in distinct banks
  __shared__ A si[kGram][kGramCols + 1];
  __shared__ A sj[kGram][kGramCols + 1];
  __shared__ A part[kGramThreads / 32];
  const int k = static_cast<int>(blockIdx.x / npairs), p = static_cast<int>(blockIdx.x % npairs);
  const int s = blockIdx.y, S = gridDim.y;
  const int64_t l = blockIdx.z;
  int ti, tj;
  tile_pair(p, nt, ti, tj);
  const int64_t r0 = offsets[k], rk = offsets[k + 1] - r0;
  if (static_cast<int64_t>(tj) * kGram >= rk) return;  // the whole block: no barrier skipped
  A g[2][2][2];  // [A or B][u][v]
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int64_t d = table[4 * l + 2 + m];
    const int64_t steps = (d + kGramCols - 1) / kGramCols, per = (steps + S - 1) / S;
    const int64_t c_begin = s * per * kGramCols;
    const int64_t c_end = c_begin + per * kGramCols < d ? c_begin + per * kGramCols : d;
    gram_block<T, A>(ptr_at<T>(table, 4 * l + m), d, r0, rk, ti, tj, c_begin, c_end, si, sj, g[m]);
  }
  const int i0 = 2 * (threadIdx.x / (kGram / 2)), j0 = 2 * (threadIdx.x % (kGram / 2));
  const int64_t cell = (l * K + k) * npairs + p;
  if (S > 1) {
    A* out = ws + (cell * S + s) * 2 * kThreads;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        out[(i0 + u) * kGram + j0 + v] = g[0][u][v];
        out[kThreads + (i0 + u) * kGram + j0 + v] = g[1][u][v];
      }
    }
    return;
  }
  A v = A(0);
#pragma unroll
  for (int u = 0; u < 2; ++u) {
#pragma unroll
    for (int w = 0; w < 2; ++w) v += gram_weight<A>(ti, tj, i0 + u, j0 + w) * g[0][u][w] * g[1][u][w];
  }
  const A total = block_sum<kGramThreads / 32>(v, part);
  if (threadIdx.x == 0) ws[cell] = total;
}

// grid.x: adapter k, grid.y: layer.  Adds the adapter's tile pairs in pair order (and, with
// S > 1, each entry's S column ranges in range order before multiplying the two Grams).
template <typename A>
__global__ void __launch_bounds__(kThreads)
gram_sum_kernel(const A* __restrict__ ws, A* __restrict__ out, const int64_t* __restrict__ offsets, int K, int nt,
                int npairs, int S) {
  __shared__ A part[kWarps];
  const int k = blockIdx.x;
  const int64_t l = blockIdx.y;
  const int64_t rk = offsets[k + 1] - offsets[k];
  const int64_t cell0 = (l * K + k) * npairs;
  if (rk > static_cast<int64_t>(nt) * kGram) {  // r_max understated: refuse loudly
    if (threadIdx.x == 0) out[l * K + k] = sqrt(A(-1));
    return;
  }
  if (S == 1) {
    if (threadIdx.x == 0) {
      A total = A(0);
      int p = 0;
      for (int ti = 0; ti < nt; ++ti)
        for (int tj = ti; tj < nt; ++tj, ++p)
          if (static_cast<int64_t>(tj) * kGram < rk) total += ws[cell0 + p];
      out[l * K + k] = total;
    }
    return;
  }
  const int i = threadIdx.x / kGram, j = threadIdx.x % kGram;
  A acc = A(0);
  int p = 0;
  for (int ti = 0; ti < nt; ++ti) {
    for (int tj = ti; tj < nt; ++tj, ++p) {
      if (static_cast<int64_t>(tj) * kGram >= rk) continue;
      const A* g = ws + (cell0 + p) * S * 2 * kThreads + threadIdx.x;
      A ga = A(0), gb = A(0);
      for (int s = 0; s < S; ++s) {
        ga += g[s * 2 * kThreads];
        gb += g[s * 2 * kThreads + kThreads];
      }
      acc += gram_weight<A>(ti, tj, i, j) * ga * gb;
    }
  }
  const A total = block_sum<kWarps>(acc, part);
  if (threadIdx.x == 0) out[l * K + k] = total;
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

cudaError_t delta_fro_sq(DType dt, const int64_t* table, int64_t L, void* out, void* workspace,
                         const int64_t* offsets, int64_t K, int64_t r_max, int64_t max_d, cudaStream_t stream) {
  if (K == 0 || L == 0) return cudaSuccess;
  if (r_max < 1 || max_d < 0 || L > 65535) return cudaErrorInvalidConfiguration;
  const int64_t nt = (r_max + kGram - 1) / kGram, npairs = gram_tile_pairs(r_max);
  const int64_t S = delta_fro_splits(L, K, r_max, max_d);
  if (K * npairs > INT32_MAX || K > INT32_MAX || S > 65535) return cudaErrorInvalidConfiguration;
  const dim3 tiles(static_cast<unsigned>(K * npairs), static_cast<unsigned>(S), static_cast<unsigned>(L));
  const dim3 sums(static_cast<unsigned>(K), static_cast<unsigned>(L));
  return HETLORA_DISPATCH_DT(dt, [&] {
    using A = typename Acc<scalar_t>::type;
    gram_tiles_kernel<scalar_t><<<tiles, kGramThreads, 0, stream>>>(table, static_cast<A*>(workspace), offsets,
                                                                static_cast<int>(K), static_cast<int>(nt),
                                                                static_cast<int>(npairs));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    gram_sum_kernel<A><<<sums, kThreads, 0, stream>>>(static_cast<const A*>(workspace), static_cast<A*>(out),
                                                      offsets, static_cast<int>(K), static_cast<int>(nt),
                                                      static_cast<int>(npairs), static_cast<int>(S));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace hetlora
