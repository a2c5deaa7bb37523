// Element types the CPU kernels read and write, and their conversions to the fp32/fp64 accumulator.
// Torch-free on purpose: these headers are compiled once per instruction set (see isa.h), and
// everything here has internal linkage so the AVX2/AVX-512 copies never leak into the baseline.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cogview::cpu {

enum class ElemType : int32_t { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

namespace {

inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// Round to nearest even, NaN stays NaN (quiet).
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded);
}

#if defined(__AVX512F__)
// float_to_bf16's rounding on 16 lanes, the bf16 bits in the low half of each 32-bit lane, without
// its NaN case: right for values that are finite or quiet NaNs (what arithmetic produces).
inline __m512i bf16_rounded_bits16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
}

// float_to_bf16 on 16 lanes: the same 16 bit patterns.
inline __m256i float_to_bf16_16(__m512 v) {
  const __m512i quieted = _mm512_mask_mov_epi32(bf16_rounded_bits16(v), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                                _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(quieted);
}
#endif

#if defined(__FLT16_MANT_DIG__)
// The compiler's _Float16 converts with F16C instructions where the ISA has them.
inline float f16_to_float(uint16_t bits) {
  _Float16 half;
  std::memcpy(&half, &bits, sizeof(half));
  return static_cast<float>(half);
}
inline uint16_t float_to_f16(float value) {
  _Float16 half = static_cast<_Float16>(value);
  uint16_t bits;
  std::memcpy(&bits, &half, sizeof(bits));
  return bits;
}
#else
#error "cogview's CPU kernels need a compiler with _Float16 (GCC >= 12 or Clang >= 15)"
#endif

// Converts n elements of `type` at `src` into the accumulator type.
template <typename acc_t>
inline void load_row(acc_t* __restrict dst, const void* src, ElemType type, int64_t n) {
  switch (type) {
    case ElemType::f32: {
      const float* s = static_cast<const float*>(src);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(s[i]);
      break;
    }
    case ElemType::f64: {
      const double* s = static_cast<const double*>(src);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(s[i]);
      break;
    }
    case ElemType::bf16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(bf16_to_float(s[i]));
      break;
    }
    case ElemType::f16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(f16_to_float(s[i]));
      break;
    }
  }
}

// Writes n accumulator values to `dst` as `type` (rounding to nearest even).
template <typename acc_t>
inline void store_row(void* dst, const acc_t* __restrict src, ElemType type, int64_t n) {
  switch (type) {
    case ElemType::f32: {
      float* d = static_cast<float*>(dst);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(src[i]);
      break;
    }
    case ElemType::f64: {
      double* d = static_cast<double*>(dst);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i]);
      break;
    }
    case ElemType::bf16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(static_cast<float>(src[i]));
      break;
    }
    case ElemType::f16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_f16(static_cast<float>(src[i]));
      break;
    }
  }
}

inline int64_t elem_size(ElemType type) {
  switch (type) {
    case ElemType::f64: return 8;
    case ElemType::f32: return 4;
    default: return 2;
  }
}

}  // namespace
}  // namespace cogview::cpu
