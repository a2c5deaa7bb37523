// Vectorizable elementary functions for the per-ISA kernels (internal linkage, see scalar_types.h).
//
// Plain loops over these inline functions vectorize under `#pragma omp simd` with the flags of
// every ISA build (no libm calls, no data-dependent branches): rounding uses the 1.5 * 2^mantissa
// trick instead of nearbyint (SSE2 has no packed round), and 2^n is assembled from its bits.
// The AVX-512 builds also get exp_nonpositive16, the same exp written for 16 lanes at once.
#pragma once

#include <bit>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cogview::cpu {
namespace {

// Float softmax weights below exp(kExpFlush) of the row's maximum (weight 1) are exactly 0: far
// below float precision of the sum, but computing subnormals, or multiplying values by tiny
// weights into subnormals, costs a micro-code assist per operation on x86, which made peaked
// (trained) attention and sampling several times slower than flat (random-weight) ones.
constexpr float kExpFlush = -64.0f;

// exp(x) for x <= 0 (the argument of every softmax weight here, x - max); -inf gives 0, and so
// does x < kExpFlush (above). Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor
// polynomial: relative error about 2 ulp.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187045e-06f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const bool flushed = x < kExpFlush;     // (false for NaN: NaN stays NaN)
  x = flushed ? kExpFlush : x;            // also -inf
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float s = std::bit_cast<float>(static_cast<int32_t>((ni + 127) << 23));  // 2^n, n >= -93: normal
  return flushed ? 0.0f : p * s;
}

// exp(x) for x <= 0 in double: same scheme, degree-13 Taylor polynomial (about 2 ulp).
inline double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  x = x < -746.0 ? -746.0 : x;
  const double t = x * kLog2e + kRound;
  const double n = t - kRound;
  const int64_t ni = std::bit_cast<int64_t>(t) - std::bit_cast<int64_t>(kRound);
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  // Horner, written out: a loop here would keep callers' loops from vectorizing.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t n1 = ni >> 1, n2 = ni - n1;
  const double s1 = std::bit_cast<double>(static_cast<int64_t>((n1 + 1023) << 52));
  const double s2 = std::bit_cast<double>(static_cast<int64_t>((n2 + 1023) << 52));
  return p * s1 * s2;
}

#if defined(__AVX512F__)
// e^r on 16 lanes, where x = n ln2 + r (n a whole number, |r| <= ln2 / 2): the reduction and the
// degree-7 polynomial of exp_nonpositive, shared by exp_nonpositive16 and Vec<float>::exp (vec.h),
// which differ only in how they round n, scale by 2^n and treat the ends of the range.
inline __m512 exp_reduced16(__m512 x, __m512 n) {
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
}

// exp(x) for x <= 0, 16 lanes: the same scheme (and the same results, 0 below kExpFlush) as
// exp_nonpositive(float).
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 round = _mm512_set1_ps(12582912.0f);
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFlush), _CMP_GE_OQ);  // (NaN: 0, as the clamp below)
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpFlush));
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), round);
  const __m512 n = _mm512_sub_ps(t, round);
  const __m512i ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(round));
  const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mul_ps(kept, exp_reduced16(x, n), s);
}
#endif

}  // namespace
}  // namespace cogview::cpu
