// C++ CPU implementations of the server-side ops (see csrc/ops.h): per-component norms,
// ||B_k^T A_k||_F^2 by the Gram identity, zero-pad + weighted aggregation, each over all
// layers of a model in one call.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "common.h"
#include "simd.h"

namespace hetlora {

using cpu::find_segment;
using cpu::grain_for;

std::tuple<at::Tensor, at::Tensor, at::Tensor> component_norms_cpu(const std::vector<at::Tensor>& As,
                                                                   const std::vector<at::Tensor>& Bs,
                                                                   const at::Tensor& offsets, int64_t r_max) {
  const int64_t L = static_cast<int64_t>(As.size()), R = As[0].size(0), K = offsets.numel() - 1;
  auto opts = As[0].options().dtype(acc_type(As[0].scalar_type()));
  at::Tensor out = at::zeros({L, K, r_max}, opts);
  at::Tensor na = at::empty({L, R}, opts), nb = at::empty({L, R}, opts);
  if (R == 0) return {out, na, nb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, As[0].scalar_type(), "hetlora_component_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* fp = offsets.const_data_ptr<int64_t>();
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t* ap = As[l].const_data_ptr<scalar_t>();
      const scalar_t* bp = Bs[l].const_data_ptr<scalar_t>();
      const int64_t d_in = As[l].size(1), d_out = Bs[l].size(1);
      acc_t* op = out.mutable_data_ptr<acc_t>() + l * K * r_max;
      acc_t* nap = na.mutable_data_ptr<acc_t>() + l * R;
      acc_t* nbp = nb.mutable_data_ptr<acc_t>() + l * R;
      at::parallel_for(0, R, grain_for(d_in + d_out), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* a = ap + r * d_in;
          const scalar_t* b = bp + r * d_out;
          const acc_t x = std::sqrt(cpu::dot<acc_t>(a, a, d_in));
          const acc_t y = std::sqrt(cpu::dot<acc_t>(b, b, d_out));
          const int64_t k = find_segment(fp, K, r);
          nap[r] = x;
          nbp[r] = y;
          op[k * r_max + (r - fp[k])] = x * y;
        }
      });
    }
  });
  return {out, na, nb};
}

std::vector<at::Tensor> weighted_aggregate_cpu(const std::vector<at::Tensor>& ts, const at::Tensor& offsets,
                                               const at::Tensor& weights, int64_t out_rank) {
  const int64_t K = offsets.numel() - 1;
  constexpr int64_t kCols = 256;
  std::vector<at::Tensor> outs;
  outs.reserve(ts.size());
  for (const at::Tensor& t : ts) {
    const int64_t d = t.size(1);
    at::Tensor out = at::empty({out_rank, d}, t.options());
    outs.push_back(out);
    if (out_rank == 0 || d == 0) continue;
    const int64_t nblk = (d + kCols - 1) / kCols;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "hetlora_weighted_aggregate_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const int64_t* fp = offsets.const_data_ptr<int64_t>();
      const acc_t* wp = weights.const_data_ptr<acc_t>();
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, out_rank * nblk, grain_for(kCols * K), [&](int64_t i0, int64_t i1) {
        acc_t acc[kCols];
        for (int64_t it = i0; it < i1; ++it) {
          const int64_t i = it / nblk, c0 = (it % nblk) * kCols, nc = std::min(kCols, d - c0);
          std::fill(acc, acc + nc, acc_t(0));
          for (int64_t k = 0; k < K; ++k) {        // adapter order: deterministic
            if (i >= fp[k + 1] - fp[k]) continue;  // zero padding contributes nothing
            const acc_t wk = wp[k];
            const scalar_t* row = tp + (fp[k] + i) * d + c0;
            for (int64_t c = 0; c < nc; ++c) acc[c] += wk * static_cast<acc_t>(row[c]);
          }
          scalar_t* o = outp + i * d + c0;
          for (int64_t c = 0; c < nc; ++c) o[c] = static_cast<scalar_t>(acc[c]);
        }
      });
    });
  }
  return outs;
}

// ------------------------------------------------------------------------------------------
// delta_fro_sq: ||B_k^T A_k||_F^2 = sum_ij G_ij H_ij with G = A_k A_k^T, H = B_k B_k^T (r_k x r_k),
// = sum_i G_ii H_ii + 2 sum_{i<j} G_ij H_ij.
//
// Work item: one panel = (layer l, adapter k, rows [i0, i0 + m) of the adapter, m <= GramTiles::kM).
// It computes G_ij and H_ij for its rows i against the rows j >= i0 in register tiles (m rows x
// GramTiles::kJ rows, SIMD lanes over the columns, as lora_cpu.cpp's shrink tile; simd.h's Vec and
// its AVX-512 / AVX2+FMA / baseline choice at run time), over column chunks
// of kGramChunkBytes so that the panel's own rows stay in L1 while the other rows stream past
// (prefetched one tile ahead).  Each G_ij is summed in a fixed order (lane l over the columns
// c = l mod N of a chunk in increasing c, the lanes by a fixed pairwise tree, the chunks in
// increasing order), and so is the panel's sum of w_ij G_ij H_ij (w = 1 on the diagonal, 2 for
// j > i; the entries j < i of the diagonal tiles are computed but skipped).  The panels'
// partial sums are then added per (layer, adapter) in panel order by one thread: the result is
// bitwise the same for any thread count and however the panels were handed out (it can differ
// in the last bits between instruction sets, as the LoRA kernels' results do).  float16 and
// bfloat16 inputs are converted to float32 up front.
// ------------------------------------------------------------------------------------------
namespace {

using cpu::isa_level;
using cpu::Vec;

// Register tiles per vector width (bytes): rows of the panel x rows it is multiplied with.
// AVX-512 (32 registers): 4 x 4 accumulators; AVX2/SSE (16): 3 x 4.
template <int VB>
struct GramTiles {
  static constexpr int kM = VB == 64 ? 4 : 3;
  static constexpr int kJ = 4;
};
constexpr int kGramMaxM = 4;
constexpr int64_t kGramChunkBytes = 4096;  // columns per chunk: 1024 float / 512 double (a multiple of every N)

// g[m * ldg + j] (= or +=) sum_{c in [c0, c1)} ar[m][c] br[j][c], for M x J rows; meanwhile the
// same columns of the rows pf[0 .. J) (the next tile's) are prefetched: the first panel of an
// adapter reads its rows from memory, in short rows the hardware prefetchers do not run ahead in
template <typename T, int VB, int M, int J>
HL_INLINE void gram_tile(const T* const* ar, const T* const* br, const T* const* pf, int64_t c0, int64_t c1, T* g,
                         int64_t ldg, bool first) {
  using V = Vec<T, VB>;
  typename V::type acc[M][J];
  cpu::dot_tile<T, VB, M, J, true>(acc, ar, br, c0, c1, pf);
  T sums[M * J];
  V::template hsum_many<M * J>(&acc[0][0], sums);
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) g[m * ldg + j] = first ? sums[m * J + j] : g[m * ldg + j] + sums[m * J + j];
  }
}

// g[m * n + j] = x_{i0+m} . x_{i0+j} for m < M, j < n = rk - i0 (x: the adapter's rows, stride d)
template <typename T, int VB, int M>
HL_INLINE void gram_panel(const T* x, int64_t d, int64_t i0, int64_t n, T* g) {
  constexpr int J = GramTiles<VB>::kJ;
  constexpr int64_t C = kGramChunkBytes / static_cast<int64_t>(sizeof(T));
  const T* ar[M];
  for (int m = 0; m < M; ++m) ar[m] = x + (i0 + m) * d;
  const T* br[J];
  const T* pf[J];
  // rows i0 + j + u of the tile at j, and the rows to prefetch meanwhile (the next tile's, clamped)
  auto rows = [&](int64_t j, int cnt) {
    for (int u = 0; u < cnt; ++u) {
      br[u] = x + (i0 + j + u) * d;
      pf[u] = x + (i0 + std::min(j + cnt + u, n - 1)) * d;
    }
  };
  for (int64_t c0 = 0;; c0 += C) {  // d == 0: one pass that writes zeros
    const int64_t c1 = std::min(d, c0 + C);
    const bool first = c0 == 0;
    int64_t j = 0;
    for (; j + J <= n; j += J) {
      rows(j, J);
      gram_tile<T, VB, M, J>(ar, br, pf, c0, c1, g + j, n, first);
    }
    for (; j + 2 <= n; j += 2) {
      rows(j, 2);
      gram_tile<T, VB, M, 2>(ar, br, pf, c0, c1, g + j, n, first);
    }
    if (j < n) {
      rows(j, 1);
      gram_tile<T, VB, M, 1>(ar, br, pf, c0, c1, g + j, n, first);
    }
    if (c1 >= d) break;
  }
}

template <typename T, int VB>
HL_INLINE void gram_rows(int m, const T* x, int64_t d, int64_t i0, int64_t n, T* g) {
  switch (m) {
    case 1:
      return gram_panel<T, VB, 1>(x, d, i0, n, g);
    case 2:
      return gram_panel<T, VB, 2>(x, d, i0, n, g);
    case 3:
      return gram_panel<T, VB, 3>(x, d, i0, n, g);
    default:
      if constexpr (GramTiles<VB>::kM >= 4) return gram_panel<T, VB, 4>(x, d, i0, n, g);
  }
}

template <typename T>
struct FroArgs {
  const T* const* a;  // per layer: A [R, d_in[l]], acc-typed
  const T* const* b;  // per layer: B [R, d_out[l]]
  const int64_t* d_in;
  const int64_t* d_out;
  const int64_t* offsets;  // [K + 1]
  int64_t K;
  const int64_t* item0;  // (layer l, adapter k) pair q = l * K + k owns panels [item0[q], item0[q + 1])
  int64_t pairs;         // L * K
  int M;                 // rows per panel (GramTiles<VB>::kM of the chosen VB)
  T* partial;            // one sum per panel
};

// panel i: its rows' Gram entries for A and B (g: 2 * kGramMaxM * max r_k scratch), then the weighted sum
template <typename T, int VB>
HL_INLINE void fro_panel(const FroArgs<T>& a, int64_t i, T* g) {
  const int64_t q = cpu::find_segment(a.item0, a.pairs, i);
  const int64_t l = q / a.K, k = q % a.K;
  const int64_t r0 = a.offsets[k], rk = a.offsets[k + 1] - r0;
  const int64_t i0 = (i - a.item0[q]) * a.M, n = rk - i0;
  const int m = static_cast<int>(std::min<int64_t>(a.M, n));
  T* ga = g;
  T* gb = g + kGramMaxM * n;
  gram_rows<T, VB>(m, a.a[l] + r0 * a.d_in[l], a.d_in[l], i0, n, ga);
  gram_rows<T, VB>(m, a.b[l] + r0 * a.d_out[l], a.d_out[l], i0, n, gb);
  // rows i0 + u against columns j >= i0 + u: the diagonal once, the rest twice (H is symmetric too)
  T diag = 0, off = 0;
  for (int u = 0; u < m; ++u) {
    diag += ga[u * n + u] * gb[u * n + u];
    for (int64_t j = u + 1; j < n; ++j) off += ga[u * n + j] * gb[u * n + j];
  }
  a.partial[i] = diag + T(2) * off;
}

template <typename T>
void fro_generic(const FroArgs<T>& a, int64_t i, T* g) {
  fro_panel<T, 16>(a, i, g);
}
#if HL_X86_MULTI
template <typename T>
HL_TARGET_AVX2 void fro_avx2(const FroArgs<T>& a, int64_t i, T* g) {
  fro_panel<T, 32>(a, i, g);
}
template <typename T>
HL_TARGET_AVX512 void fro_avx512(const FroArgs<T>& a, int64_t i, T* g) {
  fro_panel<T, 64>(a, i, g);
}
#endif

}  // namespace

at::Tensor delta_fro_sq_cpu(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                            const at::Tensor& offsets, int64_t /*r_max: the offsets were checked against it*/) {
  const int64_t L = static_cast<int64_t>(As.size()), K = offsets.numel() - 1;
  const auto acc = acc_type(As[0].scalar_type());
  at::Tensor out = at::empty({L, K}, As[0].options().dtype(acc));
  // acc-typed operands (no copy for float32/float64)
  std::vector<at::Tensor> Aa, Ba;
  std::vector<int64_t> d_in(L), d_out(L);
  for (int64_t l = 0; l < L; ++l) {
    Aa.push_back(As[l].to(acc).contiguous());
    Ba.push_back(Bs[l].to(acc).contiguous());
    d_in[l] = As[l].size(1);
    d_out[l] = Bs[l].size(1);
  }
  const int level = isa_level();
  (void)level;  // unused where only the baseline variant exists
  const int M = level == 2 ? GramTiles<64>::kM : level == 1 ? GramTiles<32>::kM : GramTiles<16>::kM;
  const int64_t* fp = offsets.const_data_ptr<int64_t>();
  // panels per (layer, adapter) pair, and the multiply-adds they do (to decide on threads)
  std::vector<int64_t> item0(L * K + 1, 0);
  int64_t work = 0, r_top = 1;
  for (int64_t k = 0; k < K; ++k) r_top = std::max(r_top, fp[k + 1] - fp[k]);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t rk = fp[k + 1] - fp[k], np = (rk + M - 1) / M;
      item0[l * K + k + 1] = item0[l * K + k] + np;
      for (int64_t p = 0; p < np; ++p) work += std::min<int64_t>(M, rk - p * M) * (rk - p * M) * (d_in[l] + d_out[l]);
    }
  }
  const int64_t n_items = item0[L * K];
  AT_DISPATCH_FLOATING_TYPES(acc, "hetlora_delta_fro_sq_cpu", [&] {
    using T = scalar_t;  // the acc type
    std::vector<const T*> ap(L), bp(L);
    for (int64_t l = 0; l < L; ++l) {
      ap[l] = Aa[l].const_data_ptr<T>();
      bp[l] = Ba[l].const_data_ptr<T>();
    }
    std::vector<T> partial(n_items);
    FroArgs<T> a{ap.data(), bp.data(), d_in.data(), d_out.data(), fp, K, item0.data(), L * K, M, partial.data()};
    cpu::parallel_items<T>(n_items, work, 2 * kGramMaxM * r_top, [&](int64_t i, T* g) {
#if HL_X86_MULTI
      if (level == 2) return fro_avx512<T>(a, i, g);
      if (level == 1) return fro_avx2<T>(a, i, g);
#endif
      fro_generic<T>(a, i, g);
    });
    // the panels of each pair in order: the same sum whichever thread computed which panel
    T* op = out.mutable_data_ptr<T>();
    for (int64_t q = 0; q < L * K; ++q) {
      T s = 0;
      for (int64_t i = item0[q]; i < item0[q + 1]; ++i) s += partial[i];
      op[q] = s;
    }
  });
  return out;
}

}  // namespace hetlora
