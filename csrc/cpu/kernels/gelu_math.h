// gelu_tanh's forward math, shared by the gelu kernel and the fused epilogue of tile_linear
// (internal linkage, see scalar_types.h).
//
// gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3): the same function as
// 0.5 x (1 + tanh(u)), written through one exp of a non-positive argument (vec_math.h) so that
// the loops vectorize without libm calls and nothing overflows: with e = exp(-|2u|),
// sigmoid(2u) = 1 / (1 + e) for u >= 0 and e / (1 + e) otherwise.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/kernels/vec_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cogview::cpu {
namespace {

template <typename acc_t>
struct GeluCoefficients {
  static constexpr acc_t kBeta = static_cast<acc_t>(0.79788456080286535588);  // sqrt(2 / pi)
  static constexpr acc_t kKappa = static_cast<acc_t>(0.044715);
};

template <typename acc_t>
void gelu_forward_block(acc_t* __restrict x, int64_t n) {
  using C = GeluCoefficients<acc_t>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = x[i];
    const acc_t z = static_cast<acc_t>(2) * C::kBeta * (v + C::kKappa * v * v * v);
    const acc_t e = exp_nonpositive(z > 0 ? -z : z);
    const acc_t s = (z >= 0 ? static_cast<acc_t>(1) : e) / (static_cast<acc_t>(1) + e);
    x[i] = v * s;
  }
}

#if defined(__AVX512F__)
// gelu_tanh of 16 floats (AVX-512), the function above without its division: 1 / (1 + e) is the
// reciprocal estimate (relative error 2^-14) after one Newton step (2^-28), which frees the
// division unit that bounds the loop above (one division per 16 elements, a sixteenth of a
// multiply-add's throughput).
inline __m512 gelu16(__m512 v) {
  using C = GeluCoefficients<float>;
  const __m512 z = _mm512_mul_ps(_mm512_set1_ps(2 * C::kBeta),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(C::kKappa), v), _mm512_mul_ps(v, v), v));
  // e = exp(-|z|) (exactly 0 below kExpFlush, as in exp_nonpositive: gelu(-inf) is NaN, gelu(-3e4) -0)
  const __m512 e = exp_nonpositive16(_mm512_or_ps(z, _mm512_set1_ps(-0.0f)));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
  __m512 inv = _mm512_rcp14_ps(d);
  inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(2.0f)));
  // sigmoid(z) = 1 / (1 + e) for z >= 0, e / (1 + e) below
  const __m512 s = _mm512_mask_mul_ps(inv, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), inv, e);
  return _mm512_mul_ps(v, s);
}

// gelu_forward_block for float through gelu16 (the same function to a unit or two in the last
// place); the tail too, so an element's result does not depend on where it falls.
inline void gelu_forward_block16(float* __restrict x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, gelu16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, tail, gelu16(_mm512_maskz_loadu_ps(tail, x + i)));
  }
}
#endif

// The forward over a block in the accumulator type: gelu16 for float on AVX-512, the portable loop
// otherwise.
template <typename acc_t>
void gelu_forward_rows(acc_t* __restrict x, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    gelu_forward_block16(x, n);
    return;
  }
#endif
  gelu_forward_block(x, n);
}

}  // namespace
}  // namespace cogview::cpu
