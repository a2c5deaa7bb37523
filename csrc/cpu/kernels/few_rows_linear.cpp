// few_rows_linear (y = x W^T + b for a decode step's few rows): compiled once per ISA, see kernels.h.
//
// A pass takes NB weight rows and all R rows of x: R x NB vector accumulators walk the input
// features together, so each weight vector is loaded once and used R times, and x (a few KiB)
// stays in L1. The product is then bound by reading W, which is why at one row it beats a GEMM
// library's general path (and, split over the threads by output features, uses both cores'
// bandwidth where MKL's matrix-vector product runs on one).
#include <algorithm>
#include <utility>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

#if defined(__AVX512F__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

// Weight rows per pass for R rows of x: R * NB accumulators + R x vectors + one weight vector.
template <int R>
constexpr int rows_per_pass() {
  return std::clamp((kRegisters - R - 1) / R, 1, 4);
}

// Input features converted to the accumulator type at a time when W is stored narrower.
constexpr int64_t kChunk = 256;

template <typename T, int R>
void linear_rows(const FewRowsLinearArgs& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  constexpr int L = V::L;
  constexpr int NB = rows_per_pass<R>();
  static_assert(kChunk % L == 0, "a chunk must hold whole vectors");
  const int64_t in = a.in, x_size = elem_size(a.x_type), w_size = elem_size(a.weight_type);
  const int64_t y_size = elem_size(a.y_type);
  // x and W are read in place when stored in the accumulator type, else converted a chunk at a time.
  const ElemType acc_type = a.f64 ? ElemType::f64 : ElemType::f32;
  const bool x_direct = a.x_type == acc_type, w_direct = a.weight_type == acc_type;
  const int64_t chunk = x_direct && w_direct ? in : kChunk;
  alignas(64) T x_converted[R][kChunk];
  alignas(64) T w_converted[NB][kChunk];
  for (int64_t n0 = begin; n0 < end; n0 += NB) {
    const int nb = static_cast<int>(std::min<int64_t>(NB, end - n0));
    typename V::R acc[R][NB];
    T tail[R][NB];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NB; ++j) {
        acc[r][j] = V::zero();
        tail[r][j] = T(0);
      }
    }
    for (int64_t k0 = 0; k0 < in; k0 += chunk) {
      const int64_t kc = std::min(chunk, in - k0);
      const T* x[R];
      for (int r = 0; r < R; ++r) {
        const char* row = static_cast<const char*>(a.x) + (r * in + k0) * x_size;
        if (x_direct) {
          x[r] = reinterpret_cast<const T*>(row);
        } else {
          load_row(x_converted[r], row, a.x_type, kc);
          x[r] = x_converted[r];
        }
      }
      const T* w[NB];  // rows past the end repeat the last one (computed, not stored)
      for (int j = 0; j < NB; ++j) {
        const char* row = static_cast<const char*>(a.weight) + ((n0 + std::min(j, nb - 1)) * in + k0) * w_size;
        if (w_direct) {
          w[j] = reinterpret_cast<const T*>(row);
        } else {
          if (j < nb) load_row(w_converted[j], row, a.weight_type, kc);
          w[j] = w_converted[std::min(j, nb - 1)];
        }
      }
      int64_t k = 0;
      for (; k + L <= kc; k += L) {
        typename V::R xv[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) xv[r] = V::load(x[r] + k);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) {
          const typename V::R wv = V::load(w[j] + k);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) acc[r][j] = V::fma(xv[r], wv, acc[r][j]);
        }
      }
      for (; k < kc; ++k) {
        for (int r = 0; r < R; ++r) {
          for (int j = 0; j < NB; ++j) tail[r][j] += x[r][k] * w[j][k];
        }
      }
    }
    T bias[NB] = {};
    if (a.bias != nullptr) load_row(bias, static_cast<const char*>(a.bias) + n0 * w_size, a.weight_type, nb);
    for (int r = 0; r < R; ++r) {
      T y[NB];
      for (int j = 0; j < nb; ++j) y[j] = (V::hsum(acc[r][j]) + tail[r][j]) + bias[j];
      store_row(static_cast<char*>(a.y) + (r * a.out + n0) * y_size, y, a.y_type, nb);
    }
  }
}

template <typename T, int... R>
void dispatch_rows(const FewRowsLinearArgs& a, int64_t begin, int64_t end, std::integer_sequence<int, R...>) {
  using Fn = void (*)(const FewRowsLinearArgs&, int64_t, int64_t);
  static constexpr Fn table[] = {&linear_rows<T, R + 1>...};
  table[a.rows - 1](a, begin, end);
}

}  // namespace

void few_rows_linear(const FewRowsLinearArgs& args, int64_t begin, int64_t end) {
  constexpr auto rows = std::make_integer_sequence<int, static_cast<int>(kFewRowsMax)>{};
  if (args.f64) {
    dispatch_rows<double>(args, begin, end, rows);
  } else {
    dispatch_rows<float>(args, begin, end, rows);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
