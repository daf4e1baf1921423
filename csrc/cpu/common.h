// Helpers shared by the C++ CPU kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace hetlora {
namespace cpu {

// Largest k in [0, n) with bounds[k] <= q (bounds non-decreasing, bounds[0] <= q < bounds[n]);
// empty segments are skipped, as in the CUDA kernels.
inline int64_t find_segment(const int64_t* bounds, int64_t n, int64_t q) {
  return static_cast<int64_t>(std::upper_bound(bounds, bounds + n + 1, q) - bounds) - 1;
}

// Dot product in acc_t with 8 independent partial sums combined in a fixed order: the
// compiler can vectorise it without -ffast-math, and the result is the same on every run.
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t n) {
  acc_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int u = 0; u < 8; ++u) p[u] += static_cast<acc_t>(a[c + u]) * static_cast<acc_t>(b[c + u]);
  }
  for (; c < n; ++c) p[0] += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// Rows per parallel_for chunk so that each chunk does roughly `work` multiply-adds.
inline int64_t grain_for(int64_t per_item, int64_t work = 1 << 15) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, per_item));
}

// Runs items [0, n) on at::parallel_for's threads, each thread taking the next item from a shared
// counter and calling item(i, scratch) with its own scratch of scratch_size Ts.  An item owns its
// outputs, so results do not depend on which thread ran it; below 2^16 multiply-adds of `work` one
// thread runs them all (threads would cost more than they save).
template <typename T, typename F>
void parallel_items(int64_t n, int64_t work, int64_t scratch_size, F&& item) {
  if (n <= 0) return;
  auto run = [&](std::atomic<int64_t>* next) {
    std::vector<T> scratch(scratch_size);
    for (int64_t i = next->fetch_add(1); i < n; i = next->fetch_add(1)) item(i, scratch.data());
  };
  std::atomic<int64_t> next{0};
  const int64_t nthreads = work < (int64_t{1} << 16) ? 1 : std::min<int64_t>(n, at::get_num_threads());
  if (nthreads <= 1) {
    run(&next);
    return;
  }
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) { run(&next); });
}

}  // namespace cpu
}  // namespace hetlora
