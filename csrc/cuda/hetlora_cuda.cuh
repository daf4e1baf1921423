// Torch-free entry points of the hetlora CUDA kernels.
//
// Everything here takes raw device pointers, sizes and a cudaStream_t, so the .cu
// files compile with nvcc alone (no torch headers: ~1.5 s per arch instead of ~70 s)
// and are bound to torch by csrc/cuda/bindings_cuda.cpp.
//
// Conventions (DESIGN.md section 2, rank-major packed layout):
//   * All tensors are dense row-major (contiguous).  Element type `dt` is one of
//     float32 / float16 / bfloat16 / float64; "acc" is float for the first three and
//     double for float64: every sum is accumulated in acc.
//   * order   [T]   int64: token indices grouped by adapter, the -1 tokens first.
//     starts  [K+1] int64: tokens of adapter k are order[starts[k]:starts[k+1]];
//                   starts[0] == base (number of -1 tokens), starts[K] == T.
//     offsets [K+1] int64: adapter k owns packed rows offsets[k]:offsets[k+1].
//   * scales: nullable acc-typed [K] device array; when null, the scalar `scale`
//     is used for every adapter.
//   * Each launcher returns the launch's cudaError_t (cudaGetLastError()).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace hetlora {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// h[t, j] = s_k * sum_c x[t, c] * w[offsets[k] + j, c]  for routed tokens t of adapter k,
// j < r_k; h[t, j] = 0 for r_k <= j < r_max.  Rows of -1 tokens are not written.
//   x [T, d] dt, w [R, d] dt, h [T, r_max] acc.
cudaError_t shrink(DType dt, const void* x, const void* w, void* h, const int64_t* order,
                   const int64_t* starts, const int64_t* offsets, const void* scales, double scale,
                   int64_t base, int64_t T, int64_t K, int64_t d, int64_t r_max, cudaStream_t stream);

// y[t, c] = s_k * sum_{j < r_k} h[t, j] * w[offsets[k] + j, c]  for routed tokens t.
// Rows of -1 tokens are not written (the caller zero-fills y when base > 0).
//   h [T, r_max] acc, w [R, d] dt, y [T, d] dt.
cudaError_t expand(DType dt, const void* h, const void* w, void* y, const int64_t* order,
                   const int64_t* starts, const int64_t* offsets, const void* scales, double scale,
                   int64_t base, int64_t T, int64_t K, int64_t d, int64_t r_max, cudaStream_t stream);

// out[offsets[k] + j, c] = s_k * sum_{t in group k} h[t, j] * x[t, c], every packed row
// written (zeros for an adapter with no tokens).  Deterministic: each output element is
// one thread's sequential sum over the group's tokens in `order` or, where groups are long
// and the grid small (wgrad_chunks > 1), over each of C equal slices of the group into
// `workspace`, then the C partial sums added in slice order by a second kernel.
//   h [T, r_max] acc, x [T, d] dt, out [R, d] dt, workspace [K * C, r_max, d] acc (or null
//   when wgrad_workspace(...) is 0).
cudaError_t wgrad(DType dt, const void* h, const void* x, void* out, void* workspace, const int64_t* order,
                  const int64_t* starts, const int64_t* offsets, const void* scales, double scale,
                  int64_t T, int64_t K, int64_t d, int64_t r_max, cudaStream_t stream);

// Slices per group of the two-pass weight gradient: 1 (one pass) unless the mean group holds
// more than 512 tokens and one pass would launch fewer than 1024 blocks (one thread then
// walks every token of its group: 16384 tokens of one adapter took 18 ms on an H200); then
// enough slices of >= 256 tokens for ~2048 blocks, with the workspace under 2^28 elements.
inline int64_t wgrad_chunks(int64_t T, int64_t K, int64_t d, int64_t r_max) {
  if (K <= 0 || T <= 0 || d <= 0 || r_max <= 0) return 1;
  const int64_t mean = T / K;
  const int64_t blocks = K * ((d + 255) / 256) * ((r_max + 7) / 8);
  if (mean <= 512 || blocks >= 1024) return 1;
  int64_t c = (mean + 255) / 256;
  const int64_t want = (2048 + blocks - 1) / blocks;
  if (want < c) c = want;
  while (c > 1 && (K * c > 65535 || K * c * r_max * d > (int64_t(1) << 28))) --c;
  return c < 1 ? 1 : c;
}

// Elements (of the accumulation dtype) of the workspace `wgrad` needs: 0 for one pass.
inline int64_t wgrad_workspace(int64_t T, int64_t K, int64_t d, int64_t r_max) {
  const int64_t c = wgrad_chunks(T, K, d, r_max);
  return c > 1 ? K * c * r_max * d : 0;
}

// Server ops over all L layers of a model in one launch.  Layers share the layout (R rows,
// offsets) and the dtype but not the widths, so each kernel reads its layer's pointers and
// widths from a device table of int64 (pointers stored as integers):
//   factor table [L, 4] = {A_l, B_l, d_in_l, d_out_l}       A_l [R, d_in_l], B_l [R, d_out_l] dt
//   tensor table [n, 3] = {t_i, out_i, d_i}                   t_i [R, d_i] dt, out_i [out_rank, d_i] dt

// na[l, r] = ||A_l[r]||, nb[l, r] = ||B_l[r]||, out[l, k, j] = na[l, offsets[k]+j] * nb[l, offsets[k]+j].
// Entries of out past r_k are not written (the caller zero-fills out).   out [L, K, r_max], na/nb [L, R] acc.
cudaError_t component_norms(DType dt, const int64_t* table, int64_t L, void* out, void* na, void* nb,
                            const int64_t* offsets, int64_t R, int64_t K, int64_t r_max, cudaStream_t stream);

// out_i[j, c] = sum_{k : j < r_k} w_k * t_i[offsets[k] + j, c]   (zero-pad to out_rank, weigh, sum),
// summed in adapter order (deterministic).  weights [K] acc; max_d = max_i d_i.
cudaError_t weighted_aggregate(DType dt, const int64_t* table, int64_t n, int64_t max_d, const void* weights,
                               const int64_t* offsets, int64_t K, int64_t out_rank, cudaStream_t stream);

// out[l, k] = sum_{i,j < r_k} (a_i . a_j)(b_i . b_j) = ||B_k^T A_k||_F^2 of layer l (Gram identity).
// Each adapter's two Gram matrices are cut into 16 x 16 tiles; a block computes one tile pair
// (ti <= tj: the Grams are symmetric) of A_k A_k^T and B_k B_k^T over all columns, or over one
// of `delta_fro_splits` column ranges when there are too few tiles to fill the GPU, into
// `workspace`; a second kernel adds each adapter's tiles (and splits) in a fixed order.
// r_max must be >= every rank: an adapter of a larger rank gets NaN, not a partial sum.
//   out [L, K] acc, workspace [delta_fro_workspace(...)] acc, max_d = max_l max(d_in_l, d_out_l).
cudaError_t delta_fro_sq(DType dt, const int64_t* table, int64_t L, void* out, void* workspace,
                         const int64_t* offsets, int64_t K, int64_t r_max, int64_t max_d, cudaStream_t stream);

// Tile pairs (ti <= tj) of one adapter's r_max x r_max Gram matrix, 16 x 16 tiles.
inline int64_t gram_tile_pairs(int64_t r_max) {
  const int64_t nt = (r_max + 15) / 16;
  return nt * (nt + 1) / 2;
}

// Column ranges per tile pair: 1 unless the L * K * pairs blocks (of 64 threads) of one pass
// are under 1024 (a few layers, few adapters: most of an H200's 132 SMs would idle while each
// block walks d = 4096 columns); then enough ranges for ~2048 blocks, each at least one
// 64-column step.
inline int64_t delta_fro_splits(int64_t L, int64_t K, int64_t r_max, int64_t max_d) {
  if (L <= 0 || K <= 0 || r_max <= 0 || max_d <= 0) return 1;
  const int64_t blocks = L * K * gram_tile_pairs(r_max);
  if (blocks >= 1024) return 1;
  int64_t s = (2048 + blocks - 1) / blocks;
  const int64_t steps = (max_d + 63) / 64;
  if (s > steps) s = steps;
  return s < 1 ? 1 : s;
}

// Elements (acc) of delta_fro_sq's workspace: one partial sum per tile pair in one pass; with
// S > 1 column ranges, both 16 x 16 Gram tiles of every pair and range.
inline int64_t delta_fro_workspace(int64_t L, int64_t K, int64_t r_max, int64_t max_d) {
  const int64_t cells = L * K * gram_tile_pairs(r_max);
  const int64_t s = delta_fro_splits(L, K, r_max, max_d);
  return s > 1 ? cells * s * 2 * 256 : cells;
}

}  // namespace cuda
}  // namespace hetlora
