// C++ CPU implementations of the server-side ops (see csrc/ops.h): per-component norms,
// ||B_k^T A_k||_F^2 by the Gram identity, zero-pad + weighted aggregation.
#include <cmath>
#include <vector>

#include "../ops.h"
#include "common.h"

namespace hetlora {

using cpu::find_segment;
using cpu::grain_for;

std::tuple<at::Tensor, at::Tensor, at::Tensor> component_norms_cpu(const at::Tensor& A, const at::Tensor& B,
                                                                   const at::Tensor& offsets, int64_t r_max) {
  const int64_t R = A.size(0), d_in = A.size(1), d_out = B.size(1), K = offsets.numel() - 1;
  auto opts = A.options().dtype(acc_type(A.scalar_type()));
  at::Tensor out = at::zeros({K, r_max}, opts);
  at::Tensor na = at::empty({R}, opts), nb = at::empty({R}, opts);
  if (R == 0) return {out, na, nb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "hetlora_component_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = A.const_data_ptr<scalar_t>();
    const scalar_t* bp = B.const_data_ptr<scalar_t>();
    const int64_t* fp = offsets.const_data_ptr<int64_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    acc_t* nap = na.mutable_data_ptr<acc_t>();
    acc_t* nbp = nb.mutable_data_ptr<acc_t>();
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
  });
  return {out, na, nb};
}

at::Tensor weighted_aggregate_cpu(const at::Tensor& t, const at::Tensor& offsets, const at::Tensor& weights,
                                  int64_t out_rank) {
  const int64_t d = t.size(1), K = offsets.numel() - 1;
  at::Tensor out = at::empty({out_rank, d}, t.options());
  if (out_rank == 0 || d == 0) return out;
  constexpr int64_t kCols = 256;
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
        for (int64_t k = 0; k < K; ++k) {  // adapter order: deterministic
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
  return out;
}

at::Tensor delta_fro_sq_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& offsets) {
  const int64_t d_in = A.size(1), d_out = B.size(1), K = offsets.numel() - 1;
  at::Tensor out = at::empty({K}, A.options().dtype(acc_type(A.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "hetlora_delta_fro_sq_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = A.const_data_ptr<scalar_t>();
    const scalar_t* bp = B.const_data_ptr<scalar_t>();
    const int64_t* fp = offsets.const_data_ptr<int64_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = fp[k], rk = fp[k + 1] - r0;
        acc_t sum = 0;
        for (int64_t i = 0; i < rk; ++i) {
          for (int64_t j = i; j < rk; ++j) {  // Gram matrices are symmetric: off-diagonal counts twice
            const acc_t ga = cpu::dot<acc_t>(ap + (r0 + i) * d_in, ap + (r0 + j) * d_in, d_in);
            const acc_t gb = cpu::dot<acc_t>(bp + (r0 + i) * d_out, bp + (r0 + j) * d_out, d_out);
            sum += (i == j ? acc_t(1) : acc_t(2)) * ga * gb;
          }
        }
        op[k] = sum;
      }
    });
  });
  return out;
}

}  // namespace hetlora
