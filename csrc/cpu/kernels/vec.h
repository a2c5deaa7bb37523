// One SIMD register of accumulator elements for the per-ISA kernels: Vec<float> and Vec<double>
// wrap AVX-512 or AVX2 intrinsics, or a portable array for the baseline build, behind the same
// small set of operations, so one kernel template serves every instruction set.
//
// Internal linkage in the ISA's namespace (see kernels.h): each per-ISA object file has its own copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/vec_math.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

// Softmax weights below exp(kExpFlush) of the row's maximum are exactly 0 (vec_math.h says why),
// in double too, so that every ISA and dtype drops the same keys.
template <typename T>
inline T flushed_exp(T x) {  // (a NaN argument stays NaN)
  return x < static_cast<T>(kExpFlush) ? T(0) : static_cast<T>(std::exp(x));
}

template <typename T, int N>
struct PortableVec {
  static constexpr int L = N;
  struct R {
    T v[N];
  };
  static R zero() {
    R r;
    for (int i = 0; i < N; ++i) r.v[i] = T(0);
    return r;
  }
  static R load(const T* p) {
    R r;
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(T* p, R a) {
    for (int i = 0; i < N; ++i) p[i] = a.v[i];
  }
  static R set1(T x) {
    R r;
    for (int i = 0; i < N; ++i) r.v[i] = x;
    return r;
  }
  static R fma(R a, R b, R c) {
    for (int i = 0; i < N; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static R mul(R a, R b) {
    for (int i = 0; i < N; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static R add(R a, R b) {
    for (int i = 0; i < N; ++i) a.v[i] += b.v[i];
    return a;
  }
  static R sub(R a, R b) {
    for (int i = 0; i < N; ++i) a.v[i] -= b.v[i];
    return a;
  }
  static R max(R a, R b) {
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static T hmax(R a) {
    T m = a.v[0];
    for (int i = 1; i < N; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
  }
  static T hsum(R a) {
    T m = a.v[0];
    for (int i = 1; i < N; ++i) m += a.v[i];
    return m;
  }
  // Lanes i with lo <= i < hi keep x, the others get `fill`.
  static R keep(R x, int64_t lo, int64_t hi, R fill) {
    for (int i = 0; i < N; ++i) x.v[i] = (i >= lo && i < hi) ? x.v[i] : fill.v[i];
    return x;
  }
  static R exp(R x) {
    // arguments are x - max <= 0
    for (int i = 0; i < N; ++i) x.v[i] = x.v[i] < static_cast<T>(kExpFlush) ? T(0) : exp_nonpositive(x.v[i]);
    return x;
  }
  // A lane mask computed once and applied many times: select(m, x, fill) is keep() with m =
  // range_mask(lo, hi).
  struct Mask {
    bool b[N];
  };
  static Mask range_mask(int64_t lo, int64_t hi) {
    Mask m;
    for (int i = 0; i < N; ++i) m.b[i] = i >= lo && i < hi;
    return m;
  }
  static R select(const Mask& m, R x, R fill) {
    for (int i = 0; i < N; ++i) x.v[i] = m.b[i] ? x.v[i] : fill.v[i];
    return x;
  }
};

template <typename T>
struct Vec;

// Bit mask of lanes [lo, hi) within a vector of `lanes` lanes (lo, hi may lie outside it).
inline uint32_t lane_range_mask(int64_t lo, int64_t hi, int lanes) {
  const int64_t a = std::clamp<int64_t>(lo, 0, lanes), b = std::clamp<int64_t>(hi, 0, lanes);
  if (b <= a) return 0u;
  const uint32_t upto_b = b >= 32 ? 0xffffffffu : ((1u << b) - 1u);
  return upto_b & ~((1u << a) - 1u);
}

#if defined(__AVX512F__)
template <>
struct Vec<float> {
  static constexpr int L = 16;
  using R = __m512;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R a) { _mm512_storeu_ps(p, a); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static float hmax(R a) { return _mm512_reduce_max_ps(a); }
  static float hsum(R a) { return _mm512_reduce_add_ps(a); }
  static R keep(R x, int64_t lo, int64_t hi, R fill) {
    return _mm512_mask_blend_ps(lane_range_mask(lo, hi, L), fill, x);
  }
  using Mask = __mmask16;
  static Mask range_mask(int64_t lo, int64_t hi) { return static_cast<Mask>(lane_range_mask(lo, hi, L)); }
  static R select(Mask m, R x, R fill) { return _mm512_mask_blend_ps(m, fill, x); }
  // vec_math.h's reduction and polynomial (exp_reduced16) on 16 lanes; scalef applies 2^n.
  static R exp(R x) {
    const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(static_cast<float>(kExpFlush)), _CMP_NLT_UQ);
    // Operand order matters: max/min return their second operand when either is NaN, so a NaN
    // score stays NaN (and poisons the row's sum) instead of being clamped to a finite weight.
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_scalef_ps(kept, exp_reduced16(x, n), n);
  }
};
template <>
struct Vec<double> {
  static constexpr int L = 8;
  using R = __m512d;
  static R zero() { return _mm512_setzero_pd(); }
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, R a) { _mm512_storeu_pd(p, a); }
  static R set1(double x) { return _mm512_set1_pd(x); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }
  static double hmax(R a) { return _mm512_reduce_max_pd(a); }
  static double hsum(R a) { return _mm512_reduce_add_pd(a); }
  static R keep(R x, int64_t lo, int64_t hi, R fill) {
    return _mm512_mask_blend_pd(static_cast<__mmask8>(lane_range_mask(lo, hi, L)), fill, x);
  }
  using Mask = __mmask8;
  static Mask range_mask(int64_t lo, int64_t hi) { return static_cast<Mask>(lane_range_mask(lo, hi, L)); }
  static R select(Mask m, R x, R fill) { return _mm512_mask_blend_pd(m, fill, x); }
  static R exp(R x) {
    alignas(64) double t[8];
    _mm512_store_pd(t, x);
    for (double& e : t) e = flushed_exp(e);
    return _mm512_load_pd(t);
  }
};
#elif defined(__AVX2__)
// Lanes [lo, hi) of 8 as an all-ones int32 vector mask.
inline __m256i lane_range_mask256(int64_t lo, int64_t hi, int lanes) {
  alignas(32) static const int32_t table[24] = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1,
                                                -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t a = std::clamp<int64_t>(lo, 0, lanes), b = std::clamp<int64_t>(hi, 0, lanes);
  const __m256i from_a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - a));
  const __m256i below_b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 16 - b));
  return _mm256_and_si256(from_a, below_b);
}
template <>
struct Vec<float> {
  static constexpr int L = 8;
  using R = __m256;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R a) { _mm256_storeu_ps(p, a); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float hmax(R a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hsum(R a) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static R keep(R x, int64_t lo, int64_t hi, R fill) {
    return _mm256_blendv_ps(fill, x, _mm256_castsi256_ps(lane_range_mask256(lo, hi, L)));
  }
  using Mask = __m256;
  static Mask range_mask(int64_t lo, int64_t hi) { return _mm256_castsi256_ps(lane_range_mask256(lo, hi, L)); }
  static R select(Mask m, R x, R fill) { return _mm256_blendv_ps(fill, x, m); }
  static R exp(R x) {
    const R kept = _mm256_cmp_ps(x, _mm256_set1_ps(static_cast<float>(kExpFlush)), _CMP_NLT_UQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));  // NaN stays NaN
    const R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    R p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(kept, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
};
template <>
struct Vec<double> {
  static constexpr int L = 4;
  using R = __m256d;
  static R zero() { return _mm256_setzero_pd(); }
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R a) { _mm256_storeu_pd(p, a); }
  static R set1(double x) { return _mm256_set1_pd(x); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static double hmax(R a) {
    alignas(32) double t[4];
    _mm256_store_pd(t, a);
    return std::max(std::max(t[0], t[1]), std::max(t[2], t[3]));
  }
  static double hsum(R a) {
    alignas(32) double t[4];
    _mm256_store_pd(t, a);
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
  static R keep(R x, int64_t lo, int64_t hi, R fill) {
    alignas(32) double t[4], f[4];
    _mm256_store_pd(t, x);
    _mm256_store_pd(f, fill);
    for (int i = 0; i < 4; ++i) t[i] = (i >= lo && i < hi) ? t[i] : f[i];
    return _mm256_load_pd(t);
  }
  using Mask = __m256d;
  static Mask range_mask(int64_t lo, int64_t hi) {
    return _mm256_castsi256_pd(_mm256_set_epi64x(-int64_t{3 >= lo && 3 < hi}, -int64_t{2 >= lo && 2 < hi},
                                                 -int64_t{1 >= lo && 1 < hi}, -int64_t{0 >= lo && 0 < hi}));
  }
  static R select(Mask m, R x, R fill) { return _mm256_blendv_pd(fill, x, m); }
  static R exp(R x) {
    alignas(32) double t[4];
    _mm256_store_pd(t, x);
    for (double& e : t) e = flushed_exp(e);
    return _mm256_load_pd(t);
  }
};
#else
template <>
struct Vec<float> : PortableVec<float, 4> {};
template <>
struct Vec<double> : PortableVec<double, 2> {};
#endif

}  // namespace
}  // namespace cogview::cpu::COGVIEW_ISA
