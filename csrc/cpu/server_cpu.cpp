// C++ CPU implementations of the server-side ops (see csrc/ops.h): per-component norms,
// ||B_k^T A_k||_F^2 by the Gram identity, zero-pad + weighted aggregation, each over all
// layers of a model in one call.
#include <cmath>
#include <vector>

#include "../ops.h"
#include "common.h"

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

at::Tensor delta_fro_sq_cpu(const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
                            const at::Tensor& offsets, int64_t /*r_max: the offsets were checked against it*/) {
  const int64_t L = static_cast<int64_t>(As.size()), K = offsets.numel() - 1;
  at::Tensor out = at::empty({L, K}, As[0].options().dtype(acc_type(As[0].scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, As[0].scalar_type(), "hetlora_delta_fro_sq_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* fp = offsets.const_data_ptr<int64_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, L * K, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t l = i / K, k = i % K;
        const scalar_t* ap = As[l].const_data_ptr<scalar_t>();
        const scalar_t* bp = Bs[l].const_data_ptr<scalar_t>();
        const int64_t d_in = As[l].size(1), d_out = Bs[l].size(1);
        const int64_t r0 = fp[k], rk = fp[k + 1] - r0;
        acc_t sum = 0;
        for (int64_t a = 0; a < rk; ++a) {
          for (int64_t b = a; b < rk; ++b) {  // Gram matrices are symmetric: off-diagonal counts twice
            const acc_t ga = cpu::dot<acc_t>(ap + (r0 + a) * d_in, ap + (r0 + b) * d_in, d_in);
            const acc_t gb = cpu::dot<acc_t>(bp + (r0 + a) * d_out, bp + (r0 + b) * d_out, d_out);
            sum += (a == b ? acc_t(1) : acc_t(2)) * ga * gb;
          }
        }
        op[i] = sum;
      }
    });
  });
  return out;
}

}  // namespace hetlora
