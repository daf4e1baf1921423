// C++ CPU implementations of the segmented mixed-rank LoRA GEMMs (see csrc/ops.h): the same
// three primitives as the CUDA kernels (shrink, expand, wgrad).
//
// Each op is a list of independent work items (adapter k x a block of tokens or columns) that
// own disjoint output elements; the threads of at::parallel_for take items from a shared
// counter.  Inside an item, register tiles (several tokens/ranks x several SIMD vectors) are
// accumulated in a fixed order:
//   shrink  h[t, j]: SIMD lanes over d (lane l sums the columns c = l mod N in increasing c),
//           the N lanes then reduced by a fixed pairwise tree, then times s_k;
//   expand  y[t, c]: one lane per column c, sum over j = 0 .. r_k-1 in order, then times s_k;
//   wgrad   out[r, c]: one lane per column c, sum over the segment's tokens in `order`, then
//           times s_k.
// So each output element is computed by one thread in a fixed order, and results are bitwise
// the same for every run and thread count (and however items are handed out).  They can differ
// in the last bits between instruction sets: the kernels are compiled three times (x86:
// AVX-512, AVX2+FMA and the baseline; elsewhere the baseline only, e.g. NEON through the
// vector extensions) and the widest variant the CPU supports is chosen at run time, with no
// -march flag; HETLORA_CPU_ISA=generic or =avx2 caps the choice (for tests).  Half and bfloat16
// operands accumulate in float32 as before: x is converted in the kernels (shrink: the item's
// rows; wgrad: while packing), w up front, and expand rounds each y element once (to nearest
// even, as torch's .to()); wgrad's output is computed in float32 and converted at the end.
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "common.h"
#include "simd.h"

namespace hetlora {
namespace {

using cpu::isa_level;
using cpu::Vec;

// Register-tile sizes per vector width (bytes): AVX-512 has 32 vector registers, AVX2/SSE 16.
template <int VB>
struct Tiles {
  static constexpr int kShrinkM = VB == 64 ? 4 : 3;  // tokens x ranks, lanes over d
  static constexpr int kShrinkJ = VB == 64 ? 6 : 4;
  static constexpr int kExpandM = 6;  // tokens x kExpandNV vectors of columns
  static constexpr int kExpandNV = VB == 64 ? 4 : 2;
  static constexpr int kWgradM = 6;  // ranks x kWgradNV vectors of columns
  static constexpr int kWgradNV = VB == 64 ? 4 : 2;
};

// ------------------------------------------------------------------------------------------
// micro-kernels
// ------------------------------------------------------------------------------------------
// shrink: h[m][j] = s * (x_m . w_j) for M token rows and J weight rows of length d
template <typename T, int VB, int M, int J>
HL_INLINE void shrink_tile(const T* const* xr, const T* const* wr, int64_t d, T s, T* const* hr, int64_t j0) {
  typename Vec<T, VB>::type acc[M][J];
  cpu::dot_tile<T, VB, M, J>(acc, xr, wr, 0, d);
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) hr[m][j0 + j] = Vec<T, VB>::hsum(acc[m][j]) * s;
}

// expand: y_m[c .. c + NV*N) = s * sum_j h_m[j] w[j, c ..] for M token rows
template <typename T, int VB, int M, int NV>
HL_INLINE void expand_tile(const T* const* hr, const T* w, int64_t ldw, int64_t rk, T s, T* const* yr, int64_t c) {
  using V = Vec<T, VB>;
  using vt = typename V::type;
  constexpr int N = V::N;
  vt acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = V::zero();
  for (int64_t j = 0; j < rk; ++j) {
    vt wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = V::load(w + j * ldw + c + v * N);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const T hv = hr[m][j];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::fma(acc[m][v], hv, wv[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::store(yr[m] + c + v * N, V::mul(acc[m][v], s));
}

// wgrad, one chunk of a segment's tokens: acc[j][c .. c + NV*N) (+)= sum_p h[tok_p][j0 + j] xb[p][c ..]
// for M rank rows, xb the chunk's packed x columns.  `first`: start from 0, else from the
// partial sums in ob; `last`: write s * acc to out, else the partial sums to ob.
template <typename T, int VB, int M, int NV>
HL_INLINE void wgrad_tile(const T* hp, int64_t ldh, const int64_t* tok, const T* xb, int64_t ldx, int64_t n,
                          int64_t j0, int64_t c, T* ob, int64_t ldob, bool first, bool last, T s, T* out,
                          int64_t ldo) {
  using V = Vec<T, VB>;
  using vt = typename V::type;
  constexpr int N = V::N;
  vt acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = first ? V::zero() : V::load(ob + m * ldob + c + v * N);
  }
  const T* xrow = xb + c;
  for (int64_t p = 0; p < n; ++p, xrow += ldx) {
    const T* hrow = hp + tok[p] * ldh + j0;
    vt xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = V::load(xrow + v * N);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const T hv = hrow[m];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::fma(acc[m][v], hv, xv[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (last) {
        V::store(out + m * ldo + c + v * N, V::mul(acc[m][v], s));
      } else {
        V::store(ob + m * ldob + c + v * N, acc[m][v]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// work items
// ------------------------------------------------------------------------------------------
template <typename T, typename S>
struct Args {
  const T* a;  // shrink: x [T, d]; expand: h [T, r_max]; wgrad: h [T, r_max]
  const T* b;  // shrink: w [R, d]; expand: w [R, d];     wgrad: x [T, d]
  T* out;      // shrink: h [T, r_max]; expand: y [T, d]; wgrad: out [R, d]
  const int64_t* order;
  const int64_t* starts;
  const int64_t* offsets;
  const T* scales;
  T scale;
  int64_t d, r_max;
  // work items: adapter k owns items [item0[k], item0[k+1]); expand's are (token block,
  // column block) pairs with nblk_b column blocks, shrink's token blocks, wgrad's column blocks
  const int64_t* item0;
  int64_t nblk_b;
  // half/bfloat16 storage (S != T): shrink's x and wgrad's x are read from xs and converted in
  // the kernels, expand writes y to ys (a, b, out then hold only the acc-typed operands)
  const S* xs;
  S* ys;
  T s(int64_t k) const { return scales ? scales[k] : scale; }
};

// the adapter of item i (item0 non-decreasing, item0[0] = 0)
inline int64_t item_adapter(const int64_t* item0, int64_t K, int64_t i) { return cpu::find_segment(item0, K, i); }

constexpr int64_t kShrinkTokens = 64;   // tokens per shrink item
constexpr int64_t kExpandTokens = 64;   // tokens per expand item
constexpr int64_t kExpandCols = 128;    // columns per expand item (multiple of every NV*N)
constexpr int64_t kWgradCols = 256;     // columns per wgrad item (multiple of every NV*N)

// tokens [0, n) (row pointers xr, hr) against weight rows w[j0 .. j0 + J): J-row tiles outer, so
// the J weight rows stay in L1 while the token tiles stream past them
template <typename T, int VB, int M, int J>
HL_INLINE void shrink_tokens(const T* const* xr, T* const* hr, int64_t n, const T* const* wr, int64_t d, T s,
                             int64_t j0) {
  int64_t p = 0;
  for (; p + M <= n; p += M) shrink_tile<T, VB, M, J>(xr + p, wr, d, s, hr + p, j0);
  for (; p < n; ++p) shrink_tile<T, VB, 1, J>(xr + p, wr, d, s, hr + p, j0);
}

template <typename T, typename S, int VB>
HL_INLINE void shrink_items(const Args<T, S>& a, int64_t K, int64_t i, T* scratch) {
  constexpr int M = Tiles<VB>::kShrinkM, J = Tiles<VB>::kShrinkJ;
  const int64_t k = item_adapter(a.item0, K, i);
  const int64_t p0 = a.starts[k] + (i - a.item0[k]) * kShrinkTokens;
  const int64_t n = std::min(a.starts[k + 1], p0 + kShrinkTokens) - p0;
  const int64_t r0 = a.offsets[k], rk = a.offsets[k + 1] - r0, d = a.d, r_max = a.r_max;
  const T s = a.s(k);
  const T* w = a.b + r0 * d;
  const T* xr[kShrinkTokens];
  T* hr[kShrinkTokens];
  for (int64_t p = 0; p < n; ++p) {
    if constexpr (std::is_same_v<S, T>) {
      xr[p] = a.a + a.order[p0 + p] * d;
    } else {  // the item's x rows, converted once
      const S* src = a.xs + a.order[p0 + p] * d;
      T* dst = scratch + p * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c]);
      xr[p] = dst;
    }
    hr[p] = a.out + a.order[p0 + p] * r_max;
  }
  const T* wr[J];
  int64_t j = 0;
  for (; j + J <= rk; j += J) {
    for (int u = 0; u < J; ++u) wr[u] = w + (j + u) * d;
    shrink_tokens<T, VB, M, J>(xr, hr, n, wr, d, s, j);
  }
  for (; j + 2 <= rk; j += 2) {
    wr[0] = w + j * d;
    wr[1] = w + (j + 1) * d;
    shrink_tokens<T, VB, M, 2>(xr, hr, n, wr, d, s, j);
  }
  if (j < rk) {
    wr[0] = w + j * d;
    shrink_tokens<T, VB, M, 1>(xr, hr, n, wr, d, s, j);
  }
  for (int64_t p = 0; p < n; ++p) {
    for (int64_t jj = rk; jj < r_max; ++jj) hr[p][jj] = T(0);
  }
}

// w rows [0, rk) (row stride d), columns [c, c + nc) -> wb [rk, width], zero-padded past nc
template <typename T>
HL_INLINE void pack_strip(const T* w, int64_t d, int64_t rk, int64_t c, int64_t nc, int64_t width, T* wb) {
  for (int64_t j = 0; j < rk; ++j) {
    const T* src = w + j * d + c;
    T* dst = wb + j * width;
    for (int64_t u = 0; u < nc; ++u) dst[u] = src[u];
    for (int64_t u = nc; u < width; ++u) dst[u] = T(0);
  }
}

// M token rows against the item's packed block wb [rk, ldw] of w: columns [0, nc), y at column c0
template <typename T, int VB, int M>
HL_INLINE void expand_cols(const T* const* hr, T* const* yr, const T* wb, int64_t ldw, int64_t rk, T s,
                           int64_t c0, int64_t nc, T* tmp) {
  constexpr int N = Vec<T, VB>::N, NV = Tiles<VB>::kExpandNV;
  T* yc[M];
  for (int m = 0; m < M; ++m) yc[m] = yr[m] + c0;
  int64_t c = 0;
  for (; c + NV * N <= nc; c += NV * N) expand_tile<T, VB, M, NV>(hr, wb, ldw, rk, s, yc, c);
  for (; c + N <= nc; c += N) expand_tile<T, VB, M, 1>(hr, wb, ldw, rk, s, yc, c);
  if (c < nc) {  // a partial vector (wb is zero-padded): through a temporary row
    T* yt[1] = {tmp};
    for (int m = 0; m < M; ++m) {
      expand_tile<T, VB, 1, 1>(hr + m, wb, ldw, rk, s, yt, c);
      for (int64_t u = c; u < nc; ++u) yc[m][u] = tmp[u];
    }
  }
}

template <typename T, typename S, int VB>
HL_INLINE void expand_items(const Args<T, S>& a, int64_t K, int64_t i, T* scratch) {
  constexpr int M = Tiles<VB>::kExpandM, N = Vec<T, VB>::N;
  const int64_t k = item_adapter(a.item0, K, i);
  const int64_t local = i - a.item0[k];
  const int64_t p0 = a.starts[k] + (local / a.nblk_b) * kExpandTokens;
  const int64_t n = std::min(a.starts[k + 1], p0 + kExpandTokens) - p0;
  const int64_t c0 = (local % a.nblk_b) * kExpandCols, nc = std::min(a.d, c0 + kExpandCols) - c0;
  const int64_t r0 = a.offsets[k], rk = a.offsets[k + 1] - r0, d = a.d, r_max = a.r_max;
  const T s = a.s(k);
  // half/bfloat16 output: the item's y block is computed in T (ybuf) and converted at the end
  constexpr bool direct = std::is_same_v<S, T>;
  T* ybuf = scratch;
  if constexpr (!direct) scratch += kExpandTokens * kExpandCols;
  const int64_t cy = direct ? c0 : 0;  // column of the block in the rows yr points at
  auto yrow = [&](int64_t p) -> T* {
    if constexpr (direct) {
      return a.out + a.order[p] * d;
    } else {
      return ybuf + (p - p0) * kExpandCols;
    }
  };
  // the item's block of w, packed contiguously (padded row stride: no cache-set conflicts from
  // a power-of-two d) and reused by every token tile
  const int64_t ldw = (nc + N - 1) / N * N + N;
  T* wb = scratch;
  T* tmp = scratch + rk * ldw;
  pack_strip(a.b + r0 * d, d, rk, c0, nc, ldw, wb);
  const T* hr[M];
  T* yr[M];
  int64_t p = p0;
  const int64_t p1 = p0 + n;
  for (; p + M <= p1; p += M) {
    for (int m = 0; m < M; ++m) {
      hr[m] = a.a + a.order[p + m] * r_max;
      yr[m] = yrow(p + m);
    }
    expand_cols<T, VB, M>(hr, yr, wb, ldw, rk, s, cy, nc, tmp);
  }
  if (M > 4 && p + 4 <= p1) {
    for (int m = 0; m < 4; ++m) {
      hr[m] = a.a + a.order[p + m] * r_max;
      yr[m] = yrow(p + m);
    }
    expand_cols<T, VB, 4>(hr, yr, wb, ldw, rk, s, cy, nc, tmp);
    p += 4;
  }
  for (; p + 2 <= p1; p += 2) {
    for (int m = 0; m < 2; ++m) {
      hr[m] = a.a + a.order[p + m] * r_max;
      yr[m] = yrow(p + m);
    }
    expand_cols<T, VB, 2>(hr, yr, wb, ldw, rk, s, cy, nc, tmp);
  }
  if (p < p1) {
    hr[0] = a.a + a.order[p] * r_max;
    yr[0] = yrow(p);
    expand_cols<T, VB, 1>(hr, yr, wb, ldw, rk, s, cy, nc, tmp);
  }
  if constexpr (!direct) {
    for (int64_t q = p0; q < p1; ++q) {
      const T* src = ybuf + (q - p0) * kExpandCols;
      S* dst = a.ys + a.order[q] * d + c0;
      for (int64_t u = 0; u < nc; ++u) dst[u] = static_cast<S>(src[u]);
    }
  }
}

constexpr int64_t kWgradChunk = 64;  // tokens per packed chunk of x in wgrad

// rank rows [j0, j0 + M) of one chunk: columns [cb, nc) of the item (out points at row r0, column c0)
template <typename T, typename S, int VB, int M>
HL_INLINE void wgrad_rows(const Args<T, S>& a, const int64_t* tok, const T* xb, int64_t n, int64_t cb, int64_t nc,
                          int64_t j0, T* ob, bool first, bool last, T s, T* out) {
  constexpr int N = Vec<T, VB>::N, NV = Tiles<VB>::kWgradNV;
  constexpr int64_t L = kWgradCols;
  const int64_t d = a.d, ldh = a.r_max;
  T* obj = ob + j0 * L;
  T* oj = out + j0 * d;
  int64_t c = cb;
  for (; c + NV * N <= nc; c += NV * N)
    wgrad_tile<T, VB, M, NV>(a.a, ldh, tok, xb, L, n, j0, c, obj, L, first, last, s, oj, d);
  for (; c + N <= nc; c += N) wgrad_tile<T, VB, M, 1>(a.a, ldh, tok, xb, L, n, j0, c, obj, L, first, last, s, oj, d);
  if (c < nc) {  // a partial vector (xb is zero-padded): sums kept in ob, scaled from there
    wgrad_tile<T, VB, M, 1>(a.a, ldh, tok, xb, L, n, j0, c, obj, L, first, false, s, oj, d);
    if (last) {
      for (int m = 0; m < M; ++m) {
        for (int64_t u = c; u < nc; ++u) oj[m * d + u] = obj[m * L + u] * s;
      }
    }
  }
}

template <typename T, typename S, int VB>
HL_INLINE void wgrad_items(const Args<T, S>& a, int64_t K, int64_t i, T* scratch) {
  constexpr int M = Tiles<VB>::kWgradM, N = Vec<T, VB>::N, NV = Tiles<VB>::kWgradNV;
  constexpr int64_t L = kWgradCols;
  const int64_t k = item_adapter(a.item0, K, i);
  const int64_t c0 = (i - a.item0[k]) * L, nc = std::min(a.d, c0 + L) - c0;
  const int64_t ncp = (nc + N - 1) / N * N;
  const int64_t r0 = a.offsets[k], rk = a.offsets[k + 1] - r0, d = a.d;
  const T s = a.s(k);
  const int64_t* tok = a.order + a.starts[k];
  const int64_t n = a.starts[k + 1] - a.starts[k];
  T* xb = scratch;               // [kWgradChunk, L] packed x columns of one chunk of tokens
  T* ob = xb + kWgradChunk * L;  // [rk, L] partial sums between chunks
  T* out = a.out + r0 * d + c0;
  // chunks of tokens in `order`; the partial sums are stored exactly, so the sum over the
  // segment is the same as in one pass.  An empty segment still writes s * 0.
  for (int64_t q = 0;; q += kWgradChunk) {
    const int64_t np = std::min(kWgradChunk, n - q);
    const bool first = q == 0, last = q + kWgradChunk >= n;
    for (int64_t p = 0; p < np; ++p) {
      T* xo = xb + p * L;
      if constexpr (std::is_same_v<S, T>) {
        const T* xr = a.b + tok[q + p] * d + c0;
        for (int64_t u = 0; u < nc; ++u) xo[u] = xr[u];
      } else {
        const S* xr = a.xs + tok[q + p] * d + c0;
        for (int64_t u = 0; u < nc; ++u) xo[u] = static_cast<T>(xr[u]);
      }
      for (int64_t u = nc; u < ncp; ++u) xo[u] = T(0);
    }
    // column slabs of NV vectors (kept in L1) outer, rank tiles inner
    for (int64_t cb = 0; cb < nc; cb += NV * N) {
      const int64_t ce = std::min(nc, cb + NV * N);
      int64_t j = 0;
      for (; j + M <= rk; j += M) wgrad_rows<T, S, VB, M>(a, tok + q, xb, np, cb, ce, j, ob, first, last, s, out);
      if (M > 4 && j + 4 <= rk) {
        wgrad_rows<T, S, VB, 4>(a, tok + q, xb, np, cb, ce, j, ob, first, last, s, out);
        j += 4;
      }
      if (M > 2 && j + 2 <= rk) {
        wgrad_rows<T, S, VB, 2>(a, tok + q, xb, np, cb, ce, j, ob, first, last, s, out);
        j += 2;
      }
      if (j < rk) wgrad_rows<T, S, VB, 1>(a, tok + q, xb, np, cb, ce, j, ob, first, last, s, out);
    }
    if (last) break;
  }
}

// ------------------------------------------------------------------------------------------
// one entry point per instruction set: the always-inline kernels above are compiled into it
// ------------------------------------------------------------------------------------------
enum class Op { kShrink, kExpand, kWgrad };

template <int VB, typename T, typename S>
HL_INLINE void run_items(Op op, const Args<T, S>& a, int64_t K, int64_t i, T* scratch) {
  switch (op) {
    case Op::kShrink:
      return shrink_items<T, S, VB>(a, K, i, scratch);
    case Op::kExpand:
      return expand_items<T, S, VB>(a, K, i, scratch);
    case Op::kWgrad:
      return wgrad_items<T, S, VB>(a, K, i, scratch);
  }
}

template <typename T, typename S>
void items_generic(Op op, const Args<T, S>& a, int64_t K, int64_t i, T* scratch) {
  run_items<16>(op, a, K, i, scratch);
}
#if HL_X86_MULTI
template <typename T, typename S>
HL_TARGET_AVX2 void items_avx2(Op op, const Args<T, S>& a, int64_t K, int64_t i, T* scratch) {
  run_items<32>(op, a, K, i, scratch);
}
template <typename T, typename S>
HL_TARGET_AVX512 void items_avx512(Op op, const Args<T, S>& a, int64_t K, int64_t i, T* scratch) {
  run_items<64>(op, a, K, i, scratch);
}
#endif

// Runs items [0, n) on at::parallel_for's threads; each item is one call of its op.
template <typename T, typename S>
void run_parallel(Op op, const Args<T, S>& a, int64_t K, int64_t n, int64_t work) {
  const int level = isa_level();
  (void)level;  // unused where only the baseline variant exists
  // per-thread scratch: expand's packed block of w (+ a row, + its y block for half/bfloat16 output),
  // wgrad's packed x chunk and partial sums, shrink's converted half/bfloat16 x rows
  const int64_t scratch_size = std::max({kExpandTokens * kExpandCols + a.r_max * (kExpandCols + 32) + kExpandCols + 32,
                                         (kWgradChunk + a.r_max) * kWgradCols, kShrinkTokens * a.d});
  cpu::parallel_items<T>(n, work, scratch_size, [&](int64_t i, T* scratch) {
#if HL_X86_MULTI
    if (level == 2) return items_avx512<T, S>(op, a, K, i, scratch);
    if (level == 1) return items_avx2<T, S>(op, a, K, i, scratch);
#endif
    items_generic<T, S>(op, a, K, i, scratch);
  });
}

// item0[k] for adapters with tokens: ceil(n_k / per_item) * nblk items each
std::vector<int64_t> token_items(const int64_t* sp, int64_t K, int64_t per_item, int64_t nblk) {
  std::vector<int64_t> item0(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = sp[k + 1] - sp[k];
    item0[k + 1] = item0[k] + (n + per_item - 1) / per_item * nblk;
  }
  return item0;
}

template <typename T, typename S>
Args<T, S> make_args(const at::Tensor& order, const at::Tensor& starts, const at::Tensor& offsets,
                     const std::optional<at::Tensor>& scales, double scale, int64_t d, int64_t r_max) {
  Args<T, S> r{};
  r.order = order.const_data_ptr<int64_t>();
  r.starts = starts.const_data_ptr<int64_t>();
  r.offsets = offsets.const_data_ptr<int64_t>();
  r.scales = scales ? scales->const_data_ptr<T>() : nullptr;
  r.scale = static_cast<T>(scale);
  r.d = d;
  r.r_max = r_max;
  return r;
}

}  // namespace

at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t base, int64_t r_max) {
  const int64_t T = x.size(0), d = x.size(1), K = starts.numel() - 1;
  const auto acc = acc_type(x.scalar_type());
  auto opts = x.options().dtype(acc);
  // rows of -1 tokens are never written by the items: zero them up front
  at::Tensor h = base > 0 ? at::zeros({T, r_max}, opts) : at::empty({T, r_max}, opts);
  if (T == base) return h;
  const at::Tensor wa = w.to(acc);  // x: converted row by row in the kernel
  const auto item0 = token_items(starts.const_data_ptr<int64_t>(), K, kShrinkTokens, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hetlora_shrink_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<acc_t, scalar_t>(order, starts, offsets, scales, scale, d, r_max);
    a.xs = x.const_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<acc_t, scalar_t>) a.a = x.const_data_ptr<acc_t>();
    a.b = wa.const_data_ptr<acc_t>();
    a.out = h.mutable_data_ptr<acc_t>();
    a.item0 = item0.data();
    run_parallel(Op::kShrink, a, K, item0[K], (T - base) * std::max<int64_t>(d, 1) * r_max);
  });
  return h;
}

at::Tensor expand_cpu(const at::Tensor& h, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t base) {
  const int64_t T = h.size(0), r_max = h.size(1), d = w.size(1), K = starts.numel() - 1;
  const auto acc = acc_type(w.scalar_type());
  at::Tensor y = base > 0 ? at::zeros({T, d}, w.options()) : at::empty({T, d}, w.options());
  if (T == base || d == 0) return y;
  const at::Tensor wa = w.to(acc);
  const int64_t nblk = (d + kExpandCols - 1) / kExpandCols;
  const auto item0 = token_items(starts.const_data_ptr<int64_t>(), K, kExpandTokens, nblk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "hetlora_expand_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<acc_t, scalar_t>(order, starts, offsets, scales, scale, d, r_max);
    a.a = h.const_data_ptr<acc_t>();
    a.b = wa.const_data_ptr<acc_t>();
    a.ys = y.mutable_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<acc_t, scalar_t>) a.out = y.mutable_data_ptr<acc_t>();
    a.item0 = item0.data();
    a.nblk_b = nblk;
    run_parallel(Op::kExpand, a, K, item0[K], (T - base) * d * std::max<int64_t>(r_max, 1));
  });
  return y;
}

at::Tensor wgrad_cpu(const at::Tensor& h, const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts,
                     const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                     int64_t total_rank) {
  const int64_t r_max = h.size(1), d = x.size(1), K = starts.numel() - 1;
  const auto acc = acc_type(x.scalar_type());
  const bool direct = acc == x.scalar_type();
  at::Tensor out = at::empty({total_rank, d}, x.options().dtype(acc));
  if (total_rank == 0 || d == 0) return direct ? out : out.to(x.scalar_type());
  const int64_t nblk = (d + kWgradCols - 1) / kWgradCols;
  // every adapter has items (an adapter without tokens writes 0 * s_k)
  std::vector<int64_t> item0(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) item0[k + 1] = item0[k] + nblk;
  const int64_t* sp = starts.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hetlora_wgrad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<acc_t, scalar_t>(order, starts, offsets, scales, scale, d, r_max);
    a.a = h.const_data_ptr<acc_t>();
    a.xs = x.const_data_ptr<scalar_t>();  // converted while packed in the kernel
    if constexpr (std::is_same_v<acc_t, scalar_t>) a.b = x.const_data_ptr<acc_t>();
    a.out = out.mutable_data_ptr<acc_t>();
    a.item0 = item0.data();
    a.nblk_b = nblk;
    run_parallel(Op::kWgrad, a, K, item0[K], (sp[K] - sp[0] + 1) * d * std::max<int64_t>(r_max, 1));
  });
  return direct ? out : out.to(x.scalar_type());
}

}  // namespace hetlora
