// SIMD helpers shared by the C++ CPU kernels: a portable vector type (GCC/Clang vector
// extensions, lowered to the instruction set of the function they are inlined into) and the
// run-time choice of instruction set (AVX-512 / AVX2+FMA / baseline, HETLORA_CPU_ISA caps it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

namespace hetlora {
namespace cpu {

#if defined(__GNUC__) || defined(__clang__)
#define HL_INLINE inline __attribute__((always_inline))
#define HL_VECTOR_EXT 1
#else
#define HL_INLINE inline
#define HL_VECTOR_EXT 0
#endif

#if HL_VECTOR_EXT && defined(__x86_64__)
#define HL_X86_MULTI 1
#define HL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define HL_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#else
#define HL_X86_MULTI 0
#endif

#if HL_VECTOR_EXT && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types never cross a non-inlined call
#endif

// __builtin_shufflevector (Clang; GCC >= 12): hsum_many folds N vectors at once
#define HL_SHUFFLE 0
#if HL_VECTOR_EXT && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#undef HL_SHUFFLE
#define HL_SHUFFLE 1
#endif
#endif

// ------------------------------------------------------------------------------------------
// a SIMD vector of B bytes of T: GCC/Clang vector extensions (lowered to the instruction set of
// the function they are inlined into), else a plain array with the same lane-wise arithmetic
// ------------------------------------------------------------------------------------------
template <typename T, int B>
struct Vec {
  static constexpr int N = B / static_cast<int>(sizeof(T));
#if HL_VECTOR_EXT
  typedef T type __attribute__((vector_size(B)));
  static HL_INLINE type zero() { return type{}; }
  static HL_INLINE void fma(type& a, T s, const type& w) { a += s * w; }
  static HL_INLINE void fma(type& a, const type& x, const type& w) { a += x * w; }
  static HL_INLINE type mul(const type& a, T s) { return a * s; }
  static HL_INLINE T lane(const type& a, int i) { return a[i]; }
#else
  struct type {
    T l[N];
  };
  static HL_INLINE type zero() { return type{}; }
  static HL_INLINE void fma(type& a, T s, const type& w) {
    for (int i = 0; i < N; ++i) a.l[i] += s * w.l[i];
  }
  static HL_INLINE void fma(type& a, const type& x, const type& w) {
    for (int i = 0; i < N; ++i) a.l[i] += x.l[i] * w.l[i];
  }
  static HL_INLINE type mul(const type& a, T s) {
    type r;
    for (int i = 0; i < N; ++i) r.l[i] = a.l[i] * s;
    return r;
  }
  static HL_INLINE T lane(const type& a, int i) { return a.l[i]; }
#endif
  static HL_INLINE type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(type));
    return v;
  }
  static HL_INLINE void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(type)); }
  // lanes summed by a fixed pairwise tree: l[i] += l[i + w] for w = N/2, ..., 1
  static HL_INLINE T hsum(const type& v) {
    T l[N];
    std::memcpy(l, &v, sizeof(type));
    for (int w = N / 2; w > 0; w /= 2) {
      for (int i = 0; i < w; ++i) l[i] += l[i + w];
    }
    return l[0];
  }
  // out[p] = hsum(v[p]) for p < P, bitwise: the same tree, for N vectors at a time by lane shuffles
  // (level S: each vector holds N/S sub-vectors of S lanes; two vectors fold into one whose
  // sub-vectors, first's then second's, are the sums of their halves, lane i + lane i + S/2)
  template <int P>
  static HL_INLINE void hsum_many(const type* v, T* out) {
#if HL_SHUFFLE
    for (int p0 = 0; p0 < P; p0 += N) {
      type w[N];
#pragma GCC unroll 16
      for (int i = 0; i < N; ++i) w[i] = p0 + i < P ? v[p0 + i] : zero();
      fold_all<N>(w);
      T l[N];
      std::memcpy(l, &w[0], sizeof(type));
      for (int i = 0; i < N && p0 + i < P; ++i) out[p0 + i] = l[i];
    }
#else
    for (int p = 0; p < P; ++p) out[p] = hsum(v[p]);
#endif
  }
#if HL_SHUFFLE
  template <int S>
  static constexpr int fold_index(int t, int h) {
    const int half = S / 2, s = t / half, o = t % half, per = N / S;
    return s < per ? s * S + o + h : N + (s - per) * S + o + h;
  }
  template <int S, int... I>
  static HL_INLINE type fold(const type& x, const type& y, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(x, y, fold_index<S>(I, 0)...) +
           __builtin_shufflevector(x, y, fold_index<S>(I, S / 2)...);
  }
  template <int S>
  static HL_INLINE void fold_all(type* w) {
    if constexpr (S > 1) {
#pragma GCC unroll 16
      for (int i = 0; i < S / 2; ++i) w[i] = fold<S>(w[2 * i], w[2 * i + 1], std::make_integer_sequence<int, N>{});
      fold_all<S / 2>(w);
    }
  }
#endif
};

// acc[m][j] = the lane-wise products a[m][c] * b[j][c] summed over c in [c0, c1): lane l over the columns
// c = c0 + l mod N in increasing c, the last partial vector zero-padded (exact zeros in the other lanes);
// M x J register tiles (shrink's tokens x ranks, the Gram panels' rows x rows).  With PF the same columns
// of the rows pf[0 .. J) are prefetched meanwhile.
template <typename T, int VB, int M, int J, bool PF = false>
HL_INLINE void dot_tile(typename Vec<T, VB>::type (&acc)[M][J], const T* const* a, const T* const* b, int64_t c0,
                        int64_t c1, const T* const* pf = nullptr) {
  using V = Vec<T, VB>;
  using vt = typename V::type;
  constexpr int N = V::N;
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) acc[m][j] = V::zero();
  int64_t c = c0;
  for (; c + N <= c1; c += N) {
    if constexpr (PF) {
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) __builtin_prefetch(pf[j] + c, 0, 3);
    }
    vt av[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) av[m] = V::load(a[m] + c);
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const vt w = V::load(b[j] + c);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) V::fma(acc[m][j], av[m], w);
    }
  }
  if (c < c1) {
    const int64_t n = c1 - c;
    T buf[N];
    vt av[M];
    for (int m = 0; m < M; ++m) {
      for (int i = 0; i < N; ++i) buf[i] = i < n ? a[m][c + i] : T(0);
      av[m] = V::load(buf);
    }
    for (int j = 0; j < J; ++j) {
      for (int i = 0; i < N; ++i) buf[i] = i < n ? b[j][c + i] : T(0);
      const vt w = V::load(buf);
      for (int m = 0; m < M; ++m) V::fma(acc[m][j], av[m], w);
    }
  }
}

// 0 = baseline, 1 = AVX2+FMA, 2 = AVX-512 (F/VL/DQ/BW); capped by HETLORA_CPU_ISA
inline int isa_level() {
  int level = 0;
#if HL_X86_MULTI
  static const int detected = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  level = detected;
#endif
  if (const char* env = std::getenv("HETLORA_CPU_ISA")) {
    const std::string v(env);
    if (v == "generic" || v == "baseline") level = 0;
    if (v == "avx2") level = std::min(level, 1);
  }
  return level;
}

}  // namespace cpu
}  // namespace hetlora
