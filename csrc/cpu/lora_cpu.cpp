// C++ CPU implementations of the segmented mixed-rank LoRA GEMMs (see csrc/ops.h):
// the same three primitives as the CUDA kernels (shrink, expand, wgrad), parallelised
// over tokens or output rows with at::parallel_for.  Each output element is computed by
// one thread in a fixed order, so results do not depend on the thread count.
#include <vector>

#include "../ops.h"
#include "common.h"

namespace hetlora {

using cpu::find_segment;
using cpu::grain_for;

at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t base, int64_t r_max) {
  const int64_t T = x.size(0), d = x.size(1), K = starts.numel() - 1;
  auto opts = x.options().dtype(acc_type(x.scalar_type()));
  // rows of -1 tokens are never written by the loop: zero them up front
  at::Tensor h = base > 0 ? at::zeros({T, r_max}, opts) : at::empty({T, r_max}, opts);
  if (T == base) return h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hetlora_shrink_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const int64_t* op = order.const_data_ptr<int64_t>();
    const int64_t* sp = starts.const_data_ptr<int64_t>();
    const int64_t* fp = offsets.const_data_ptr<int64_t>();
    const acc_t* scp = scales ? scales->const_data_ptr<acc_t>() : nullptr;
    acc_t* hp = h.mutable_data_ptr<acc_t>();
    at::parallel_for(base, T, grain_for(d * r_max), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k = find_segment(sp, K, p);
        const int64_t tok = op[p];
        const acc_t s = scp ? scp[k] : static_cast<acc_t>(scale);
        const int64_t r0 = fp[k], rk = fp[k + 1] - r0;
        const scalar_t* xr = xp + tok * d;
        acc_t* hr = hp + tok * r_max;
        for (int64_t j = 0; j < rk; ++j) hr[j] = cpu::dot<acc_t>(xr, wp + (r0 + j) * d, d) * s;
        for (int64_t j = rk; j < r_max; ++j) hr[j] = acc_t(0);
      }
    });
  });
  return h;
}

at::Tensor expand_cpu(const at::Tensor& h, const at::Tensor& w, const at::Tensor& order, const at::Tensor& starts,
                      const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                      int64_t base) {
  const int64_t T = h.size(0), r_max = h.size(1), d = w.size(1), K = starts.numel() - 1;
  at::Tensor y = base > 0 ? at::zeros({T, d}, w.options()) : at::empty({T, d}, w.options());
  if (T == base || d == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "hetlora_expand_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* hp = h.const_data_ptr<acc_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const int64_t* op = order.const_data_ptr<int64_t>();
    const int64_t* sp = starts.const_data_ptr<int64_t>();
    const int64_t* fp = offsets.const_data_ptr<int64_t>();
    const acc_t* scp = scales ? scales->const_data_ptr<acc_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(base, T, grain_for(d * r_max), [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> acc(d);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k = find_segment(sp, K, p);
        const int64_t tok = op[p];
        const acc_t s = scp ? scp[k] : static_cast<acc_t>(scale);
        const int64_t r0 = fp[k], rk = fp[k + 1] - r0;
        const acc_t* hr = hp + tok * r_max;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < rk; ++j) {
          const acc_t hv = hr[j];
          const scalar_t* wr = wp + (r0 + j) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += hv * static_cast<acc_t>(wr[c]);
        }
        scalar_t* yr = yp + tok * d;
        for (int64_t c = 0; c < d; ++c) yr[c] = static_cast<scalar_t>(acc[c] * s);
      }
    });
  });
  return y;
}

at::Tensor wgrad_cpu(const at::Tensor& h, const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts,
                     const at::Tensor& offsets, const std::optional<at::Tensor>& scales, double scale,
                     int64_t total_rank) {
  const int64_t r_max = h.size(1), d = x.size(1), K = starts.numel() - 1;
  at::Tensor out = at::empty({total_rank, d}, x.options());
  if (total_rank == 0 || d == 0) return out;
  // Work items: (adapter k, block of kCols columns).  Each token's x block is converted
  // once and added into all r_k accumulator rows (a rank-r_k outer-product update that
  // stays in cache), tokens in `order`: a fixed summation order per output element.
  constexpr int64_t kCols = 128;
  const int64_t nblk = (d + kCols - 1) / kCols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hetlora_wgrad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* hp = h.const_data_ptr<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* op = order.const_data_ptr<int64_t>();
    const int64_t* sp = starts.const_data_ptr<int64_t>();
    const int64_t* fp = offsets.const_data_ptr<int64_t>();
    const acc_t* scp = scales ? scales->const_data_ptr<acc_t>() : nullptr;
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, K * nblk, 1, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> acc(r_max * kCols);
      acc_t xb[kCols];
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / nblk, c0 = (i % nblk) * kCols, nc = std::min(kCols, d - c0);
        const int64_t r0 = fp[k], rk = fp[k + 1] - r0;
        const acc_t s = scp ? scp[k] : static_cast<acc_t>(scale);
        std::fill(acc.begin(), acc.begin() + rk * kCols, acc_t(0));
        for (int64_t p = sp[k]; p < sp[k + 1]; ++p) {
          const int64_t tok = op[p];
          const scalar_t* xr = xp + tok * d + c0;
          for (int64_t c = 0; c < nc; ++c) xb[c] = static_cast<acc_t>(xr[c]);
          const acc_t* hr = hp + tok * r_max;
          for (int64_t j = 0; j < rk; ++j) {
            const acc_t hv = hr[j];
            acc_t* a = acc.data() + j * kCols;
            for (int64_t c = 0; c < nc; ++c) a[c] += hv * xb[c];
          }
        }
        for (int64_t j = 0; j < rk; ++j) {
          const acc_t* a = acc.data() + j * kCols;
          scalar_t* o = outp + (r0 + j) * d + c0;
          for (int64_t c = 0; c < nc; ++c) o[c] = static_cast<scalar_t>(a[c] * s);
        }
      }
    });
  });
  return out;
}

}  // namespace hetlora
