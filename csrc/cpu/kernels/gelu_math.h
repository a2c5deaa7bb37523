// gelu_tanh's forward math, shared by the gelu kernel and the fused epilogue of tile_linear
// (internal linkage, see scalar_types.h).
//
// gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3): the same function as
// 0.5 x (1 + tanh(u)), written through one exp of a non-positive argument (vec_math.h) so that
// the loops vectorize without libm calls and nothing overflows: with e = exp(-|2u|),
// sigmoid(2u) = 1 / (1 + e) for u >= 0 and e / (1 + e) otherwise.
#pragma once

#include <cstdint>

#include "cpu/kernels/vec_math.h"

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

}  // namespace
}  // namespace cogview::cpu
