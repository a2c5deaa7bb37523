// Fused (sandwich) LayerNorm rows: compiled once per ISA, see kernels.h.
//
// Each row is read from memory once; every later pass (variance, normalisation, the second
// LayerNorm) runs over L1-resident data, so memory sees exactly one read per input and one write
// per output. With AVX2 / AVX-512 (fp32 accumulation), fp32 rows are used in place and fp16/bf16
// rows converted once into a buffer; the generic loops below serve fp64 and the baseline ISA,
// where each row is first converted into an accumulator buffer.
#include <cmath>
#include <cstring>
#include <memory>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/kernels.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

template <typename acc_t>
struct RowStats {
  acc_t mean;
  acc_t rstd;
};

// 1/sqrt(var + eps) from the sum of squared deviations `sq` of a row of n. With PB-relax
// (CogView), the row is normalised as x / c with c = max|x| / 8; LayerNorm is scale-invariant, so
// that equals LayerNorm(x) with eps * c^2, computed here without the division. An all-zero row
// keeps c = 1.
template <typename acc_t>
RowStats<acc_t> finish_stats(acc_t mean, acc_t sq, acc_t amax, int64_t n, double eps, bool pb_relax) {
  acc_t eps_eff = static_cast<acc_t>(eps);
  if (pb_relax) {
    const acc_t c = amax / acc_t(8);
    if (c > acc_t(0) && std::isfinite(c)) eps_eff *= c * c;
  }
  const acc_t var = sq / static_cast<acc_t>(n);
  return {mean, acc_t(1) / std::sqrt(var + eps_eff)};
}

// Mean and 1/sqrt(var + eps) of a row already in the buffer (two passes: mean, then deviations).
template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* __restrict x, int64_t n, double eps, bool pb_relax) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const acc_t mean = sum / static_cast<acc_t>(n);
  acc_t sq = 0, amax = 0;
  if (pb_relax) {
#pragma omp simd reduction(+ : sq) reduction(max : amax)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = x[i] - mean;
      sq += d * d;
      amax = std::fabs(x[i]) > amax ? std::fabs(x[i]) : amax;
    }
  } else {
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = x[i] - mean;
      sq += d * d;
    }
  }
  return finish_stats(mean, sq, amax, n, eps, pb_relax);
}

// y = (x - mean) * rstd * w + b (+ residual when given).
template <typename acc_t>
void normalize(acc_t* __restrict y, const acc_t* __restrict x, RowStats<acc_t> s,
               const acc_t* __restrict w, const acc_t* __restrict b, const acc_t* __restrict residual,
               int64_t n) {
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = residual[i] + ((x[i] - s.mean) * s.rstd * w[i] + b[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - s.mean) * s.rstd * w[i] + b[i];
  }
}

template <typename acc_t>
void forward_rows(const LayerNormForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.hidden;
  std::unique_ptr<acc_t[]> storage(new acc_t[3 * n]);
  acc_t* x = storage.get();
  acc_t* y = x + n;
  acc_t* res = y + n;
  const auto* w_out = static_cast<const acc_t*>(a.w_out);
  const auto* b_out = static_cast<const acc_t*>(a.b_out);
  const auto* w_next = static_cast<const acc_t*>(a.w_next);
  const auto* b_next = static_cast<const acc_t*>(a.b_next);
  const bool has_next = w_next != nullptr;
  const int64_t stat_cols = has_next ? 4 : 2;
  auto* stats = static_cast<acc_t*>(a.stats);
  const int64_t out_size = elem_size(a.out_type), normed_size = elem_size(a.normed_type);
  const int64_t branch_size = elem_size(a.branch_type), res_size = elem_size(a.residual_type);
  // The second LayerNorm must see the new residual exactly as stored (rounded to its dtype), so
  // `normed` equals LN(new_residual) of the unfused composition. Storing in the accumulator's
  // own precision rounds nothing, and the buffer can be used as it is.
  const bool out_is_exact = a.out_type == (a.f64 ? ElemType::f64 : ElemType::f32);

  for (int64_t r = begin; r < end; ++r) {
    const char* branch = static_cast<const char*>(a.branch) + r * a.branch_stride * branch_size;
    char* out = static_cast<char*>(a.out) + r * n * out_size;
    load_row(x, branch, a.branch_type, n);
    const RowStats<acc_t> s1 = row_stats(x, n, a.eps, a.pb_relax);
    const acc_t* residual = nullptr;
    if (a.residual != nullptr) {
      load_row(res, static_cast<const char*>(a.residual) + r * a.residual_stride * res_size,
               a.residual_type, n);
      residual = res;
    }
    normalize(y, x, s1, w_out, b_out, residual, n);
    store_row(out, y, a.out_type, n);
    stats[r * stat_cols + 0] = s1.mean;
    stats[r * stat_cols + 1] = s1.rstd;
    if (!has_next) continue;
    if (!out_is_exact) load_row(y, out, a.out_type, n);
    const RowStats<acc_t> s2 = row_stats(y, n, a.eps, a.pb_relax);
    normalize(x, y, s2, w_next, b_next, static_cast<const acc_t*>(nullptr), n);
    store_row(static_cast<char*>(a.normed) + r * n * normed_size, x, a.normed_type, n);
    stats[r * stat_cols + 2] = s2.mean;
    stats[r * stat_cols + 3] = s2.rstd;
  }
}

// dx of y = (x - mean) * rstd * w + b given dy, with the weight-gradient partials accumulated:
//   xhat = (x - mean) * rstd,  g = dy * w,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw += dy * xhat,  db += dy.
// `x` is overwritten with xhat.
template <typename acc_t>
void layer_norm_row_backward(acc_t* __restrict dx, acc_t* __restrict x, const acc_t* __restrict dy,
                             RowStats<acc_t> s, const acc_t* __restrict w, acc_t* __restrict dw,
                             acc_t* __restrict db, int64_t n) {
  acc_t sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xhat = (x[i] - s.mean) * s.rstd;
    const acc_t g = dy[i] * w[i];
    x[i] = xhat;
    dx[i] = g;  // kept, not recomputed: g - mean(g) must cancel exactly where it should (hidden 1)
    sum_g += g;
    sum_gx += g * xhat;
    dw[i] += dy[i] * xhat;
    db[i] += dy[i];
  }
  const acc_t mean_g = sum_g / static_cast<acc_t>(n);
  const acc_t mean_gx = sum_gx / static_cast<acc_t>(n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = s.rstd * ((dx[i] - mean_g) - x[i] * mean_gx);
}

template <typename acc_t>
void backward_rows(const LayerNormBackwardArgs& a, int64_t begin, int64_t end, int64_t chunk) {
  const int64_t n = a.hidden;
  std::unique_ptr<acc_t[]> storage(new acc_t[4 * n]);
  acc_t* x = storage.get();
  acc_t* g = x + n;
  acc_t* dr = g + n;
  acc_t* dx = dr + n;
  const auto* w_out = static_cast<const acc_t*>(a.w_out);
  const auto* w_next = static_cast<const acc_t*>(a.w_next);
  const auto* stats = static_cast<const acc_t*>(a.stats);
  acc_t* partial = static_cast<acc_t*>(a.partials) + chunk * 4 * n;
  acc_t *dw_out = partial, *db_out = partial + n, *dw_next = partial + 2 * n, *db_next = partial + 3 * n;
  const int64_t stat_cols = a.has_next ? 4 : 2;
  const int64_t go_size = elem_size(a.grad_out_type), gn_size = elem_size(a.grad_normed_type);
  const int64_t branch_size = elem_size(a.branch_type), out_size = elem_size(a.out_type);
  const int64_t gb_size = elem_size(a.branch_type), gr_size = elem_size(a.grad_residual_type);

  for (int64_t r = begin; r < end; ++r) {
    const acc_t* st = stats + r * stat_cols;
    // Gradient reaching the new residual: its own, plus what flows back through LN_next.
    if (a.grad_out != nullptr) {
      load_row(dr, static_cast<const char*>(a.grad_out) + r * a.grad_out_stride * go_size,
               a.grad_out_type, n);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dr[i] = 0;
    }
    if (a.has_next && a.grad_normed != nullptr) {
      load_row(g, static_cast<const char*>(a.grad_normed) + r * a.grad_normed_stride * gn_size,
               a.grad_normed_type, n);
      load_row(x, static_cast<const char*>(a.out) + r * a.out_stride * out_size, a.out_type, n);
      layer_norm_row_backward(dx, x, g, RowStats<acc_t>{st[2], st[3]}, w_next, dw_next, db_next, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dr[i] += dx[i];
    }
    if (a.grad_residual != nullptr) {
      store_row(static_cast<char*>(a.grad_residual) + r * n * gr_size, dr, a.grad_residual_type, n);
    }
    load_row(x, static_cast<const char*>(a.branch) + r * a.branch_stride * branch_size,
             a.branch_type, n);
    layer_norm_row_backward(dx, x, dr, RowStats<acc_t>{st[0], st[1]}, w_out, dw_out, db_out, n);
    store_row(static_cast<char*>(a.grad_branch) + r * n * gb_size, dx, a.branch_type, n);
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// ---- fp32 rows with AVX2 / AVX-512 intrinsics ----
//
// Every pass works on fp32 rows: the input itself when it is fp32, else an L1-resident copy made
// by one vectorised conversion. Reductions keep four independent vector accumulators so they run
// at load throughput rather than at the latency of one dependent add chain. Partial vectors at a
// row's end are masked (zeros in, nothing out), never read or written past the row.

#if defined(__AVX512F__)
constexpr int64_t kW = 16;
using vf = __m512;
using Tail = __mmask16;
inline Tail tail_mask(int64_t k) { return static_cast<__mmask16>((1u << k) - 1u); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float v) { return _mm512_set1_ps(v); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const float* p, Tail m) { return _mm512_maskz_loadu_ps(m, p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void vstream(float* p, vf v) { _mm512_stream_ps(p, v); }
inline void vstore(float* p, vf v, Tail m) { _mm512_mask_storeu_ps(p, m, v); }
inline vf vkeep(vf v, Tail m) { return _mm512_maskz_mov_ps(m, v); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vabs(vf a) { return _mm512_abs_ps(a); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline float vmaxval(vf a) { return _mm512_reduce_max_ps(a); }

// 16 bf16 / f16 <-> fp32.
inline vf from_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf load_half(const uint16_t* p, bool bf16) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return bf16 ? from_bf16(h) : _mm512_cvtph_ps(h);
}
inline vf load_half(const uint16_t* p, bool bf16, Tail m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return bf16 ? from_bf16(h) : _mm512_cvtph_ps(h);
}
inline __m256i half_bits(vf v, bool bf16) {
  return bf16 ? float_to_bf16_16(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline void store_half(uint16_t* p, vf v, bool bf16) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half_bits(v, bf16));
}
inline void store_half(uint16_t* p, vf v, bool bf16, Tail m) { _mm256_mask_storeu_epi16(p, m, half_bits(v, bf16)); }
#else
constexpr int64_t kW = 8;
using vf = __m256;
using Tail = __m256i;
inline Tail tail_mask(int64_t k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float v) { return _mm256_set1_ps(v); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const float* p, Tail m) { return _mm256_maskload_ps(p, m); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstream(float* p, vf v) { _mm256_stream_ps(p, v); }
inline void vstore(float* p, vf v, Tail m) { _mm256_maskstore_ps(p, m, v); }
inline vf vkeep(vf v, Tail m) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vmaxval(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline vf load_half(const uint16_t* p, bool bf16) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}
inline void store_half(uint16_t* p, vf v, bool bf16) {
  __m128i h;
  if (bf16) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  } else {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
// AVX2 has no 16-bit masked loads and stores: the last partial vector goes through a buffer.
inline vf load_half(const uint16_t* p, bool bf16, int64_t k) {
  alignas(16) uint16_t tmp[kW] = {};
  std::memcpy(tmp, p, static_cast<size_t>(k) * sizeof(uint16_t));
  return load_half(tmp, bf16);
}
inline void store_half(uint16_t* p, vf v, bool bf16, int64_t k) {
  alignas(16) uint16_t tmp[kW];
  store_half(tmp, v, bf16);
  std::memcpy(p, tmp, static_cast<size_t>(k) * sizeof(uint16_t));
}
#endif

inline auto half_tail(int64_t k) {
#if defined(__AVX512F__)
  return tail_mask(k);
#else
  return k;
#endif
}

// fp32 <- bf16 / f16 (fp32 sources are read in place and never converted).
void convert_in(float* __restrict dst, const uint16_t* __restrict src, bool bf16, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(dst + i, load_half(src + i, bf16));
  if (i < n) vstore(dst + i, load_half(src + i, bf16, half_tail(n - i)), tail_mask(n - i));
}

void convert_out(uint16_t* __restrict dst, const float* __restrict src, bool bf16, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store_half(dst + i, vload(src + i), bf16);
  if (i < n) store_half(dst + i, vload(src + i, tail_mask(n - i)), bf16, half_tail(n - i));
}

float row_sum(const float* __restrict x, int64_t n) {
  vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    s0 = vadd(s0, vload(x + i));
    s1 = vadd(s1, vload(x + i + kW));
    s2 = vadd(s2, vload(x + i + 2 * kW));
    s3 = vadd(s3, vload(x + i + 3 * kW));
  }
  for (; i + kW <= n; i += kW) s0 = vadd(s0, vload(x + i));
  if (i < n) s1 = vadd(s1, vload(x + i, tail_mask(n - i)));
  return vsum(vadd(vadd(s0, s1), vadd(s2, s3)));
}

// Sum of (x - mean)^2, and max |x| when `amax` is given.
template <bool kMax>
float row_sq_dev(const float* __restrict x, float mean, int64_t n, float* amax) {
  const vf m = vset(mean);
  vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
  vf a0 = vzero(), a1 = vzero();
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    const vf x0 = vload(x + i), x1 = vload(x + i + kW), x2 = vload(x + i + 2 * kW), x3 = vload(x + i + 3 * kW);
    const vf d0 = vsub(x0, m), d1 = vsub(x1, m), d2 = vsub(x2, m), d3 = vsub(x3, m);
    s0 = vfma(d0, d0, s0);
    s1 = vfma(d1, d1, s1);
    s2 = vfma(d2, d2, s2);
    s3 = vfma(d3, d3, s3);
    if constexpr (kMax) {
      a0 = vmax(a0, vmax(vabs(x0), vabs(x1)));
      a1 = vmax(a1, vmax(vabs(x2), vabs(x3)));
    }
  }
  for (; i + kW <= n; i += kW) {
    const vf x0 = vload(x + i), d0 = vsub(x0, m);
    s0 = vfma(d0, d0, s0);
    if constexpr (kMax) a0 = vmax(a0, vabs(x0));
  }
  if (i < n) {
    const Tail t = tail_mask(n - i);
    const vf x0 = vload(x + i, t), d0 = vkeep(vsub(x0, m), t);
    s1 = vfma(d0, d0, s1);
    if constexpr (kMax) a1 = vmax(a1, vabs(x0));
  }
  if constexpr (kMax) *amax = vmaxval(vmax(a0, a1));
  return vsum(vadd(vadd(s0, s1), vadd(s2, s3)));
}

RowStats<float> row_stats_f32(const float* __restrict x, float mean, int64_t n, double eps, bool pb_relax) {
  float amax = 0.0f;
  const float sq = pb_relax ? row_sq_dev<true>(x, mean, n, &amax) : row_sq_dev<false>(x, mean, n, nullptr);
  return finish_stats(mean, sq, amax, n, eps, pb_relax);
}

// y = (x - mean) * rstd * w + b (+ residual); returns the sum of the y written. With kStream, y
// is written with non-temporal stores (n a multiple of kW, y aligned to the vector) and, when
// `copy` is given, also to `copy` through the cache for a later pass.
template <bool kResidual, bool kStream = false>
float row_normalize(float* __restrict y, const float* __restrict x, RowStats<float> s,
                    const float* __restrict w, const float* __restrict b, const float* __restrict res,
                    int64_t n, float* __restrict copy = nullptr) {
  const vf m = vset(s.mean), r = vset(s.rstd);
  vf t0 = vzero(), t1 = vzero();
  auto one = [&](int64_t i) {
    vf v = vfma(vmul(vsub(vload(x + i), m), r), vload(w + i), vload(b + i));
    if constexpr (kResidual) v = vadd(vload(res + i), v);
    if constexpr (kStream) {
      vstream(y + i, v);
      if (copy != nullptr) vstore(copy + i, v);
    } else {
      vstore(y + i, v);
    }
    return v;
  };
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    t0 = vadd(t0, one(i));
    t1 = vadd(t1, one(i + kW));
  }
  for (; i + kW <= n; i += kW) t0 = vadd(t0, one(i));
  if (i < n) {
    const Tail t = tail_mask(n - i);
    vf v = vfma(vmul(vsub(vload(x + i, t), m), r), vload(w + i, t), vload(b + i, t));
    if constexpr (kResidual) v = vadd(vload(res + i, t), v);
    vstore(y + i, v, t);
    t1 = vadd(t1, vkeep(v, t));
  }
  return vsum(vadd(t0, t1));
}

// Backward of y = (x - mean) * rstd * w + b for one row, in two passes over L1-resident data:
//   xhat = (x - mean) * rstd,  g = dy * w,  dw += dy * xhat,  db += dy,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// `g` is kept in `gbuf` rather than recomputed so g - mean(g) cancels exactly where it should
// (hidden 1); `add` (optional) is added to dx, which is written to `dx`.
void row_backward(float* __restrict dx, float* __restrict gbuf, const float* __restrict x,
                  const float* __restrict dy, RowStats<float> s, const float* __restrict w,
                  float* __restrict dw, float* __restrict db, const float* __restrict add, int64_t n) {
  const vf m = vset(s.mean), r = vset(s.rstd);
  vf sg0 = vzero(), sg1 = vzero(), sx0 = vzero(), sx1 = vzero();
  int64_t i = 0;
  auto pass_a = [&](int64_t j, vf& sg, vf& sx) {
    const vf d = vload(dy + j), xh = vmul(vsub(vload(x + j), m), r), g = vmul(d, vload(w + j));
    vstore(gbuf + j, g);
    vstore(dw + j, vfma(d, xh, vload(dw + j)));
    vstore(db + j, vadd(vload(db + j), d));
    sg = vadd(sg, g);
    sx = vfma(g, xh, sx);
  };
  for (; i + 2 * kW <= n; i += 2 * kW) {
    pass_a(i, sg0, sx0);
    pass_a(i + kW, sg1, sx1);
  }
  for (; i + kW <= n; i += kW) pass_a(i, sg0, sx0);
  if (i < n) {
    const Tail t = tail_mask(n - i);
    const vf d = vload(dy + i, t), xh = vkeep(vmul(vsub(vload(x + i, t), m), r), t);
    const vf g = vmul(d, vload(w + i, t));
    vstore(gbuf + i, g, t);
    vstore(dw + i, vfma(d, xh, vload(dw + i, t)), t);
    vstore(db + i, vadd(vload(db + i, t), d), t);
    sg1 = vadd(sg1, g);
    sx1 = vfma(g, xh, sx1);
  }
  const float nf = static_cast<float>(n);
  const vf mean_g = vset(vsum(vadd(sg0, sg1)) / nf), mean_gx = vset(vsum(vadd(sx0, sx1)) / nf);
  auto pass_b = [&](int64_t j) {
    const vf xh = vmul(vsub(vload(x + j), m), r);
    vf v = vmul(r, vsub(vsub(vload(gbuf + j), mean_g), vmul(xh, mean_gx)));
    if (add != nullptr) v = vadd(vload(add + j), v);
    return v;
  };
  for (i = 0; i + kW <= n; i += kW) vstore(dx + i, pass_b(i));
  if (i < n) {
    const Tail t = tail_mask(n - i);
    const vf xh = vmul(vsub(vload(x + i, t), m), r);
    vf v = vmul(r, vsub(vsub(vload(gbuf + i, t), mean_g), vmul(xh, mean_gx)));
    if (add != nullptr) v = vadd(vload(add + i, t), v);
    vstore(dx + i, v, t);
  }
}

// fp32 outputs of at least this many bytes are written with non-temporal stores: twice a core's
// L2, so they would not stay there anyway, and streaming them spares the read-for-ownership of
// every output line and keeps the inputs in cache.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// A row of `type` as fp32: in place when it is fp32, else converted into `buf`.
inline const float* row_in(const void* src, ElemType type, float* buf, int64_t n) {
  if (type == ElemType::f32) return static_cast<const float*>(src);
  convert_in(buf, static_cast<const uint16_t*>(src), type == ElemType::bf16, n);
  return buf;
}

// Where a row of `type` is computed: the destination itself when it is fp32, else `buf`
// (written out by row_out).
inline float* row_dst(void* dst, ElemType type, float* buf) {
  return type == ElemType::f32 ? static_cast<float*>(dst) : buf;
}
inline void row_out(void* dst, ElemType type, const float* buf, int64_t n) {
  if (type != ElemType::f32) convert_out(static_cast<uint16_t*>(dst), buf, type == ElemType::bf16, n);
}

void forward_rows_f32(const LayerNormForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.hidden;
  std::unique_ptr<float[]> storage(new float[4 * n]);
  float* xb = storage.get();
  float* rb = xb + n;
  float* yb = rb + n;
  float* zb = yb + n;
  const auto* w_out = static_cast<const float*>(a.w_out);
  const auto* b_out = static_cast<const float*>(a.b_out);
  const auto* w_next = static_cast<const float*>(a.w_next);
  const auto* b_next = static_cast<const float*>(a.b_next);
  const bool has_next = w_next != nullptr;
  const int64_t stat_cols = has_next ? 4 : 2;
  auto* stats = static_cast<float*>(a.stats);
  const int64_t out_size = elem_size(a.out_type), normed_size = elem_size(a.normed_type);
  const int64_t branch_size = elem_size(a.branch_type), res_size = elem_size(a.residual_type);
  const float nf = static_cast<float>(n);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % (kW * sizeof(float)) == 0; };
  const bool stream = a.out_type == ElemType::f32 && n % kW == 0 && aligned(a.out) &&
                      (!has_next || (a.normed_type == ElemType::f32 && aligned(a.normed))) &&
                      a.rows * n * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;

  for (int64_t r = begin; r < end; ++r) {
    const float* x = row_in(static_cast<const char*>(a.branch) + r * a.branch_stride * branch_size,
                            a.branch_type, xb, n);
    const RowStats<float> s1 = row_stats_f32(x, row_sum(x, n) / nf, n, a.eps, a.pb_relax);
    char* out = static_cast<char*>(a.out) + r * n * out_size;
    float* y = row_dst(out, a.out_type, yb);
    float y_sum;
    if (stream) {
      // Outputs go around the cache; the second LayerNorm reads its copy in yb.
      y = yb;
      const float* res = a.residual == nullptr
                             ? nullptr
                             : row_in(static_cast<const char*>(a.residual) + r * a.residual_stride * res_size,
                                      a.residual_type, rb, n);
      y_sum = res != nullptr
                  ? row_normalize<true, true>(reinterpret_cast<float*>(out), x, s1, w_out, b_out, res, n,
                                                     has_next ? yb : nullptr)
                  : row_normalize<false, true>(reinterpret_cast<float*>(out), x, s1, w_out, b_out, nullptr, n,
                                               has_next ? yb : nullptr);
    } else if (a.residual != nullptr) {
      const float* res = row_in(static_cast<const char*>(a.residual) + r * a.residual_stride * res_size,
                                a.residual_type, rb, n);
      y_sum = row_normalize<true>(y, x, s1, w_out, b_out, res, n);
    } else {
      y_sum = row_normalize<false>(y, x, s1, w_out, b_out, nullptr, n);
    }
    stats[r * stat_cols + 0] = s1.mean;
    stats[r * stat_cols + 1] = s1.rstd;
    if (a.out_type != ElemType::f32) {
      row_out(out, a.out_type, yb, n);
      if (!has_next) continue;
      // The second LayerNorm sees the new residual as stored (rounded to its dtype), like the
      // unfused composition.
      convert_in(yb, reinterpret_cast<const uint16_t*>(out), a.out_type == ElemType::bf16, n);
      y_sum = row_sum(yb, n);
    }
    if (!has_next) continue;
    const RowStats<float> s2 = row_stats_f32(y, y_sum / nf, n, a.eps, a.pb_relax);
    char* normed = static_cast<char*>(a.normed) + r * n * normed_size;
    if (stream) {
      row_normalize<false, true>(reinterpret_cast<float*>(normed), y, s2, w_next, b_next, nullptr, n);
    } else {
      row_normalize<false>(row_dst(normed, a.normed_type, zb), y, s2, w_next, b_next, nullptr, n);
    }
    row_out(normed, a.normed_type, zb, n);
    stats[r * stat_cols + 2] = s2.mean;
    stats[r * stat_cols + 3] = s2.rstd;
  }
  if (stream) _mm_sfence();  // order the non-temporal stores before the task reports done
}

void backward_rows_f32(const LayerNormBackwardArgs& a, int64_t begin, int64_t end, int64_t chunk) {
  const int64_t n = a.hidden;
  std::unique_ptr<float[]> storage(new float[6 * n]);
  float* gbuf = storage.get();
  float* xb = gbuf + n;
  float* yb = xb + n;
  float* gnb = yb + n;
  float* grb = gnb + n;
  float* dxb = grb + n;
  const auto* w_out = static_cast<const float*>(a.w_out);
  const auto* w_next = static_cast<const float*>(a.w_next);
  const auto* stats = static_cast<const float*>(a.stats);
  float* partial = static_cast<float*>(a.partials) + chunk * 4 * n;
  float *dw_out = partial, *db_out = partial + n, *dw_next = partial + 2 * n, *db_next = partial + 3 * n;
  const int64_t stat_cols = a.has_next ? 4 : 2;
  const int64_t go_size = elem_size(a.grad_out_type), gn_size = elem_size(a.grad_normed_type);
  const int64_t branch_size = elem_size(a.branch_type), out_size = elem_size(a.out_type);
  const int64_t gr_size = elem_size(a.grad_residual_type);
  const bool through_next = a.has_next && a.grad_normed != nullptr;
  if (a.grad_out == nullptr && !through_next) std::memset(grb, 0, static_cast<size_t>(n) * sizeof(float));

  for (int64_t r = begin; r < end; ++r) {
    const float* st = stats + r * stat_cols;
    // Gradient reaching the new residual, dr: its own, plus what flows back through LN_next.
    const float* gr = a.grad_out == nullptr
                          ? nullptr
                          : row_in(static_cast<const char*>(a.grad_out) + r * a.grad_out_stride * go_size,
                                   a.grad_out_type, grb, n);
    char* grad_res = a.grad_residual == nullptr
                         ? nullptr
                         : static_cast<char*>(a.grad_residual) + r * n * gr_size;
    const float* dr = gr == nullptr ? grb : gr;
    if (through_next) {
      const float* gn = row_in(static_cast<const char*>(a.grad_normed) + r * a.grad_normed_stride * gn_size,
                               a.grad_normed_type, gnb, n);
      const float* y = row_in(static_cast<const char*>(a.out) + r * a.out_stride * out_size, a.out_type,
                              yb, n);
      // dr goes straight into grad_residual when that is fp32 (and stays in L1 for the next step).
      float* drw = grad_res != nullptr ? row_dst(grad_res, a.grad_residual_type, dxb) : dxb;
      row_backward(drw, gbuf, y, gn, RowStats<float>{st[2], st[3]}, w_next, dw_next, db_next, gr, n);
      dr = drw;
      if (grad_res != nullptr) row_out(grad_res, a.grad_residual_type, drw, n);
    } else if (grad_res != nullptr) {
      if (a.grad_residual_type == ElemType::f32) {
        std::memcpy(grad_res, dr, static_cast<size_t>(n) * sizeof(float));
      } else {
        convert_out(reinterpret_cast<uint16_t*>(grad_res), dr, a.grad_residual_type == ElemType::bf16, n);
      }
    }
    const float* x = row_in(static_cast<const char*>(a.branch) + r * a.branch_stride * branch_size,
                            a.branch_type, xb, n);
    char* grad_branch = static_cast<char*>(a.grad_branch) + r * n * branch_size;
    // dxb may hold dr: the first LayerNorm's gradient then goes through yb (its row is done).
    float* dx_buf = dr == dxb ? yb : dxb;
    row_backward(row_dst(grad_branch, a.branch_type, dx_buf), gbuf, x, dr, RowStats<float>{st[0], st[1]},
                 w_out, dw_out, db_out, nullptr, n);
    row_out(grad_branch, a.branch_type, dx_buf, n);
  }
}
#endif  // __AVX512F__ || __AVX2__

}  // namespace

void layer_norm_forward(const LayerNormForwardArgs& args, int64_t begin, int64_t end) {
  if (args.f64) {
    forward_rows<double>(args, begin, end);
  } else {
#if defined(__AVX512F__) || defined(__AVX2__)
    return forward_rows_f32(args, begin, end);
#endif
    forward_rows<float>(args, begin, end);
  }
}

void layer_norm_backward(const LayerNormBackwardArgs& args, int64_t begin, int64_t end,
                         int64_t chunk) {
  if (args.f64) {
    backward_rows<double>(args, begin, end, chunk);
  } else {
#if defined(__AVX512F__) || defined(__AVX2__)
    return backward_rows_f32(args, begin, end, chunk);
#endif
    backward_rows<float>(args, begin, end, chunk);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
