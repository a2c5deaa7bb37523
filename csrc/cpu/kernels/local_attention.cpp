// Local (2D neighbourhood) attention with joint text keys: compiled once per ISA, see kernels.h.
//
// Blocking. A tile is a rectangle of neighbouring queries: tile_h rows by tile_w columns. All
// queries of one tile row see the same key rows, and their windows' columns together form one
// `strip` of key columns (a multiple of the vector width). For a 9x9 window and 16-lane
// vectors a tile row is 8 queries wide and its strip 16 keys wide, so one score vector covers
// one key row of the window for all 8 queries at once. Keys are packed once per call, per key
// row, as [head_dim][columns] ("transposed"), so the score micro-kernel reads 16 consecutive
// keys per head_dim step and broadcasts query elements (a register-tiled GEMM of up to 8
// queries x 3 key vectors). Scores of one group of <= 8 queries (window rows x strip + text)
// stay in a small L1-resident buffer; the softmax over window and text keys is exact two-pass
// over that buffer; the value pass is a second register-tiled micro-kernel (queries x head_dim
// vectors, broadcasting probabilities). No buffer grows with the number of keys.
//
// Backward (per band of query rows, owned by one task): recomputes the probabilities from the
// forward's log-sum-exp, dP = dO.V^T with the same score kernel over transposed V, dS, and three
// rank updates: dV += P^T dO and dK += dS^T (q * scale) into accumulator rows, dQ = dS K.
// Bands two apart never touch the same key rows, so the torch layer runs even bands, then odd
// bands, each in parallel, without races and with a fixed summation order.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/kernels.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

// ---- vector registers -------------------------------------------------------------------------
// Vec<T>::R is one register of L accumulator elements; the micro-kernels use only these five
// operations, so the same templates serve AVX-512, AVX2 and the portable baseline.

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
};

template <typename T>
struct Vec;

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
};
// 32 registers: scores 8 queries x 3 key vectors (24 accumulators); value pass and rank
// updates 4 queries x 4 head_dim vectors (16 accumulators).
constexpr int kScoreM = 8, kScoreNV = 3, kPvM = 4, kPvNDV = 4;
#elif defined(__AVX2__)
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
};
// 16 registers: scores 4 x 2 (8 accumulators), value pass / rank updates 4 x 2.
constexpr int kScoreM = 4, kScoreNV = 2, kPvM = 4, kPvNDV = 2;
#else
template <>
struct Vec<float> : PortableVec<float, 4> {};
template <>
struct Vec<double> : PortableVec<double, 2> {};
constexpr int kScoreM = 4, kScoreNV = 2, kPvM = 2, kPvNDV = 2;
#endif

// Queries per group: the scores of one group live in one small buffer.
constexpr int64_t kGroup = 8;

// ---- exp ----------------------------------------------------------------------------------------
// exp for the softmax, written so `#pragma omp simd` loops vectorize it (no libm call): Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, and a degree-7 Taylor polynomial (relative error
// below 1e-8, under one float ulp). Inputs below -87 give about 1e-38 instead of a denormal;
// masked entries never reach it (they are selected to 0 separately).
inline float exp_acc(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}
inline double exp_acc(double x) { return std::exp(x); }

// ---- micro-kernels ------------------------------------------------------------------------------

// Scores: for m < M queries and NV key vectors,
//   s[m * sld + soff[j] + lane] = sum_dd q[m * qld + dd] * kp[j][dd * kstride + lane].
template <typename T, int M, int NV>
void score_tile(const T* __restrict q, int64_t qld, int64_t depth, const T* const* kp,
                int64_t kstride, T* __restrict s, int64_t sld, const int64_t* soff) {
  using V = Vec<T>;
  typename V::R acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) acc[m][j] = V::zero();
  }
  const T* k[NV];
  for (int j = 0; j < NV; ++j) k[j] = kp[j];
  for (int64_t dd = 0; dd < depth; ++dd) {
    typename V::R kv[NV];
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) kv[j] = V::load(k[j] + dd * kstride);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const typename V::R qb = V::set1(q[m * qld + dd]);
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) acc[m][j] = V::fma(qb, kv[j], acc[m][j]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) V::store(s + m * sld + soff[j], acc[m][j]);
  }
}

// A run of consecutive keys: key i has its row at base + i * stride and its coefficient for
// query m at coef[m * cld + col + i].
template <typename T>
struct Segment {
  const T* base;
  int64_t stride;
  int64_t col;
  int64_t n;
};
template <typename T>
struct WSegment {
  T* base;
  int64_t stride;
  int64_t col;
  int64_t n;
};

// Weighted sum of key rows: for m < M and head_dim vectors [d0, d0 + NDV*L),
//   o[m * old + d] = oscale[m] * sum_segments sum_i coef[m * cld + col + i] * row_i[d].
template <typename T, int M, int NDV>
void combine_tile(const Segment<T>* segs, int nseg, const T* __restrict coef, int64_t cld,
                  int64_t d0, const T* oscale, T* __restrict o, int64_t old) {
  using V = Vec<T>;
  constexpr int L = V::L;
  typename V::R acc[M][NDV];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) acc[m][j] = V::zero();
  }
  for (int g = 0; g < nseg; ++g) {
    const Segment<T>& sg = segs[g];
    const T* row = sg.base + d0;
    const T* c = coef + sg.col;
    for (int64_t i = 0; i < sg.n; ++i, row += sg.stride) {
      typename V::R vv[NDV];
#pragma GCC unroll 4
      for (int j = 0; j < NDV; ++j) vv[j] = V::load(row + j * L);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const typename V::R p = V::set1(c[m * cld + i]);
#pragma GCC unroll 4
        for (int j = 0; j < NDV; ++j) acc[m][j] = V::fma(p, vv[j], acc[m][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    const typename V::R sc = V::set1(oscale[m]);
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) V::store(o + m * old + d0 + j * L, V::mul(acc[m][j], sc));
  }
}

// Rank-M update of key rows: row_i[d] += sum_m coef[m * cld + col + i] * src[m * sld + d] for
// head_dim vectors [d0, d0 + NDV*L). `src` rows stay in registers.
template <typename T, int M, int NDV>
void update_tile(const WSegment<T>* segs, int nseg, const T* __restrict coef, int64_t cld,
                 const T* __restrict src, int64_t sld, int64_t d0) {
  using V = Vec<T>;
  constexpr int L = V::L;
  typename V::R x[M][NDV];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) x[m][j] = V::load(src + m * sld + d0 + j * L);
  }
  for (int g = 0; g < nseg; ++g) {
    const WSegment<T>& sg = segs[g];
    T* row = sg.base + d0;
    const T* c = coef + sg.col;
    for (int64_t i = 0; i < sg.n; ++i, row += sg.stride) {
      typename V::R a[NDV];
#pragma GCC unroll 4
      for (int j = 0; j < NDV; ++j) a[j] = V::load(row + j * L);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const typename V::R p = V::set1(c[m * cld + i]);
#pragma GCC unroll 4
        for (int j = 0; j < NDV; ++j) a[j] = V::fma(p, x[m][j], a[j]);
      }
#pragma GCC unroll 4
      for (int j = 0; j < NDV; ++j) V::store(row + j * L, a[j]);
    }
  }
}

// Function tables over the compile-time tile shapes, indexed [(M - 1) * N + (N' - 1)].
template <typename T>
using ScoreFn = void (*)(const T*, int64_t, int64_t, const T* const*, int64_t, T*, int64_t,
                         const int64_t*);
template <typename T>
using CombineFn = void (*)(const Segment<T>*, int, const T*, int64_t, int64_t, const T*, T*, int64_t);
template <typename T>
using UpdateFn = void (*)(const WSegment<T>*, int, const T*, int64_t, const T*, int64_t, int64_t);

template <typename T, std::size_t... I>
constexpr std::array<ScoreFn<T>, sizeof...(I)> score_table(std::index_sequence<I...>) {
  return {&score_tile<T, static_cast<int>(I) / kScoreNV + 1, static_cast<int>(I) % kScoreNV + 1>...};
}
template <typename T, std::size_t... I>
constexpr std::array<CombineFn<T>, sizeof...(I)> combine_table(std::index_sequence<I...>) {
  return {&combine_tile<T, static_cast<int>(I) / kPvNDV + 1, static_cast<int>(I) % kPvNDV + 1>...};
}
template <typename T, std::size_t... I>
constexpr std::array<UpdateFn<T>, sizeof...(I)> update_table(std::index_sequence<I...>) {
  return {&update_tile<T, static_cast<int>(I) / kPvNDV + 1, static_cast<int>(I) % kPvNDV + 1>...};
}

template <typename T>
void score(int m, int nv, const T* q, int64_t qld, int64_t depth, const T* const* kp,
           int64_t kstride, T* s, int64_t sld, const int64_t* soff) {
  static constexpr auto table = score_table<T>(std::make_index_sequence<kScoreM * kScoreNV>{});
  table[(m - 1) * kScoreNV + (nv - 1)](q, qld, depth, kp, kstride, s, sld, soff);
}

// ---- geometry -----------------------------------------------------------------------------------

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

LocalAttentionPlan make_plan(const LocalAttentionShape& s) {
  const int64_t lanes = s.f64 ? Vec<double>::L : Vec<float>::L;
  LocalAttentionPlan p;
  p.lanes = lanes;
  const int64_t sw = s.q_w / s.k_w, sh = s.q_h / s.k_h;
  // At least 4 base columns per tile, so a group fills its score registers.
  p.strip = round_up(s.win_w + 3, lanes);
  p.tile_w = (p.strip - s.win_w + 1) * sw;
  p.tile_h = 8;
  p.pad = s.win_w / 2;
  p.row_width = p.pad + s.k_w + p.strip;
  const int64_t elem = s.f64 ? 8 : 4;
  // A power-of-two row stride maps every head_dim step of a strip onto the same cache sets.
  if ((p.row_width * elem) % 512 == 0) p.row_width += lanes;
  p.dp = round_up(s.head_dim, lanes);
  p.tpad = round_up(s.text, lanes);
  p.band_h = std::max<int64_t>(s.win_h, 4) * sh;
  return p;
}

// One group: <= kGroup consecutive queries of one query row, inside one tile column.
struct Group {
  int64_t row;      // query row
  int64_t col;      // first query column
  int64_t count;    // queries
  int64_t c0;       // key column of strip column 0 (may be negative)
  int64_t r_lo;     // first key row
  int64_t nr;       // key rows
  bool causal_last; // the last key row is the query's own row (causal): columns end at the query
  int64_t lo[kGroup], hi[kGroup], hi_last[kGroup];  // valid strip columns per query
  int64_t ulo, uhi, uhi_last;                       // their union
};

Group make_group(const LocalAttentionShape& s, int64_t c0, int64_t row, int64_t col, int64_t count) {
  const int64_t sh = s.q_h / s.k_h, sw = s.q_w / s.k_w;
  const int64_t rh = s.win_h / 2, rw = s.win_w / 2;
  Group g;
  g.row = row;
  g.col = col;
  g.count = count;
  g.c0 = c0;
  const int64_t bh = row / sh;
  g.r_lo = std::max<int64_t>(bh - rh, 0);
  int64_t r_hi = std::min<int64_t>(bh + rh, s.k_h - 1);
  if (s.causal) r_hi = std::min<int64_t>(r_hi, row);
  g.nr = r_hi - g.r_lo + 1;
  g.causal_last = s.causal;
  g.ulo = std::numeric_limits<int64_t>::max();
  g.uhi = g.uhi_last = 0;
  for (int64_t m = 0; m < count; ++m) {
    const int64_t x = col + m, bw = x / sw;
    g.lo[m] = std::max<int64_t>(bw - rw, 0) - c0;
    g.hi[m] = std::min<int64_t>(bw + rw, s.k_w - 1) + 1 - c0;
    g.hi_last[m] = s.causal ? std::min<int64_t>(g.hi[m], x + 1 - c0) : g.hi[m];
    g.ulo = std::min(g.ulo, g.lo[m]);
    g.uhi = std::max(g.uhi, g.hi[m]);
    g.uhi_last = std::max(g.uhi_last, g.hi_last[m]);
  }
  return g;
}

int64_t group_hi(const Group& g, int64_t m, int64_t ri) {
  return g.causal_last && ri == g.nr - 1 ? g.hi_last[m] : g.hi[m];
}
int64_t group_uhi(const Group& g, int64_t ri) {
  return g.causal_last && ri == g.nr - 1 ? g.uhi_last : g.uhi;
}

// Per-task scratch, sized for one group.
template <typename T>
struct Scratch {
  int64_t sld = 0, dp = 0;
  std::vector<T> q, s, ds, o, dout, tmp;
  std::vector<T> lse, inv, aux;
  explicit Scratch(const LocalAttentionShape& shape, const LocalAttentionPlan& plan, bool backward) {
    sld = shape.win_h * plan.strip + plan.tpad;
    dp = plan.dp;
    q.assign(kGroup * dp, T(0));
    s.assign(kGroup * sld, T(0));
    o.assign(kGroup * dp, T(0));
    tmp.assign(dp, T(0));
    lse.assign(kGroup, T(0));
    inv.assign(kGroup, T(0));
    aux.assign(kGroup, T(0));
    if (backward) {
      ds.assign(kGroup * sld, T(0));
      dout.assign(kGroup * dp, T(0));
    }
  }
};

// Scores of the group's queries (rows of `q`, stride qld) against its window (transposed pack
// `kt_bh`) and the text keys (transposed pack `tkt`), into s[m * sld + ...]: window key row ri
// at columns [ri * strip, (ri + 1) * strip), text at nr * strip.
template <typename T>
void group_scores(const LocalAttentionShape& shape, const LocalAttentionPlan& plan, const Group& g,
                  const T* q, int64_t qld, const T* kt_bh, const T* tkt, T* s, int64_t sld) {
  const int64_t L = plan.lanes, nv = plan.strip / L, depth = shape.head_dim;
  const int64_t key_row = depth * plan.row_width;
  const T* kp[kScoreNV];
  int64_t soff[kScoreNV];
  for (int64_t mb = 0; mb < g.count; mb += kScoreM) {
    const int mm = static_cast<int>(std::min<int64_t>(kScoreM, g.count - mb));
    const int64_t nvec = g.nr * nv;
    for (int64_t f = 0; f < nvec; f += kScoreNV) {
      const int cnt = static_cast<int>(std::min<int64_t>(kScoreNV, nvec - f));
      for (int j = 0; j < cnt; ++j) {
        const int64_t ri = (f + j) / nv, v = (f + j) % nv;
        kp[j] = kt_bh + (g.r_lo + ri) * key_row + plan.pad + g.c0 + v * L;
        soff[j] = (f + j) * L;
      }
      score<T>(mm, cnt, q + mb * qld, qld, depth, kp, plan.row_width, s + mb * sld, sld, soff);
    }
    const int64_t ntv = plan.tpad / L;
    for (int64_t f = 0; f < ntv; f += kScoreNV) {
      const int cnt = static_cast<int>(std::min<int64_t>(kScoreNV, ntv - f));
      for (int j = 0; j < cnt; ++j) {
        kp[j] = tkt + (f + j) * L;
        soff[j] = g.nr * plan.strip + (f + j) * L;
      }
      score<T>(mm, cnt, q + mb * qld, qld, depth, kp, plan.tpad, s + mb * sld, sld, soff);
    }
  }
}

template <typename T>
void combine(int64_t count, int64_t dp, int64_t lanes, const Segment<T>* segs, int nseg,
             const T* coef, int64_t cld, const T* oscale, T* o, int64_t old) {
  static constexpr auto table = combine_table<T>(std::make_index_sequence<kPvM * kPvNDV>{});
  const int64_t nvec = dp / lanes;
  for (int64_t m0 = 0; m0 < count; m0 += kPvM) {
    const int mm = static_cast<int>(std::min<int64_t>(kPvM, count - m0));
    for (int64_t v0 = 0; v0 < nvec; v0 += kPvNDV) {
      const int nd = static_cast<int>(std::min<int64_t>(kPvNDV, nvec - v0));
      table[(mm - 1) * kPvNDV + (nd - 1)](segs, nseg, coef + m0 * cld, cld, v0 * lanes, oscale + m0,
                                          o + m0 * old, old);
    }
  }
}

template <typename T>
void update(int64_t count, int64_t dp, int64_t lanes, const WSegment<T>* segs, int nseg,
            const T* coef, int64_t cld, const T* src, int64_t sld) {
  static constexpr auto table = update_table<T>(std::make_index_sequence<kPvM * kPvNDV>{});
  const int64_t nvec = dp / lanes;
  for (int64_t m0 = 0; m0 < count; m0 += kPvM) {
    const int mm = static_cast<int>(std::min<int64_t>(kPvM, count - m0));
    for (int64_t v0 = 0; v0 < nvec; v0 += kPvNDV) {
      const int nd = static_cast<int>(std::min<int64_t>(kPvNDV, nvec - v0));
      table[(mm - 1) * kPvNDV + (nd - 1)](segs, nseg, coef + m0 * cld, cld, src + m0 * sld, sld,
                                          v0 * lanes);
    }
  }
}

// Loads the group's query rows into q[m * dp + ...] (times `mul`, zero-padded to dp).
template <typename T>
void load_queries(const Group& g, int64_t q_w, int64_t depth, int64_t dp, const char* base,
                  ElemType type, int64_t sn, T mul, T* q) {
  const int64_t esz = elem_size(type);
  for (int64_t m = 0; m < g.count; ++m) {
    T* row = q + m * dp;
    load_row(row, base + (g.row * q_w + g.col + m) * sn * esz, type, depth);
#pragma omp simd
    for (int64_t d = 0; d < depth; ++d) row[d] *= mul;
    for (int64_t d = depth; d < dp; ++d) row[d] = T(0);
  }
}

// ---- pack -----------------------------------------------------------------------------------------

template <typename T>
void pack_rows(const LocalAttentionPackArgs& a, int64_t begin, int64_t end) {
  const int64_t depth = a.head_dim, esz = elem_size(a.src_type);
  constexpr int64_t kBlock = 16;
  std::vector<T> tile(kBlock * depth);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / a.rows, r = item % a.rows;
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const char* src = static_cast<const char*>(a.src) + (b * a.sb + h * a.sh + r * a.cols * a.sn) * esz;
    if (a.transposed != nullptr) {
      T* dst = static_cast<T*>(a.transposed) + item * depth * a.row_width;
      for (int64_t c0 = 0; c0 < a.cols; c0 += kBlock) {
        const int64_t nc = std::min<int64_t>(kBlock, a.cols - c0);
        for (int64_t c = 0; c < nc; ++c) load_row(tile.data() + c * depth, src + (c0 + c) * a.sn * esz, a.src_type, depth);
        for (int64_t d = 0; d < depth; ++d) {
          T* out = dst + d * a.row_width + a.pad + c0;
          for (int64_t c = 0; c < nc; ++c) out[c] = tile[c * depth + d];
        }
      }
      for (int64_t d = 0; d < depth; ++d) {
        T* out = dst + d * a.row_width;
        std::fill(out, out + a.pad, T(0));
        std::fill(out + a.pad + a.cols, out + a.row_width, T(0));
      }
    }
    if (a.rowmajor != nullptr) {
      T* dst = static_cast<T*>(a.rowmajor) + (bh * a.rows + r) * a.cols * a.dp;
      for (int64_t c = 0; c < a.cols; ++c) {
        T* out = dst + c * a.dp;
        load_row(out, src + c * a.sn * esz, a.src_type, depth);
        std::fill(out + depth, out + a.dp, T(0));
      }
    }
  }
}

// ---- forward -------------------------------------------------------------------------------------

struct TaskGrid {
  int64_t rows, cols;  // tiles per head
};

TaskGrid task_grid(const LocalAttentionShape& s, const LocalAttentionPlan& p) {
  return {(s.q_h + p.tile_h - 1) / p.tile_h, (s.q_w + p.tile_w - 1) / p.tile_w};
}

template <typename T>
void forward_tasks(const LocalAttentionForwardArgs& a, int64_t begin, int64_t end) {
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const TaskGrid tg = task_grid(s, p);
  const int64_t n_q = s.q_h * s.q_w, depth = s.head_dim, dp = p.dp, T_ = s.text;
  const int64_t sw = s.q_w / s.k_w;
  const int64_t q_esz = elem_size(a.q_type);
  Scratch<T> sc(s, p, false);
  const int64_t sld = sc.sld;
  const T scale = static_cast<T>(a.scale), bias = static_cast<T>(a.text_bias);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<Segment<T>> segs(s.win_h + 1);

  for (int64_t task = begin; task < end; ++task) {
    const int64_t tc = task % tg.cols, tr = (task / tg.cols) % tg.rows;
    const int64_t bh = task / (tg.cols * tg.rows), b = bh / a.heads, h = bh % a.heads;
    const char* q_bh = static_cast<const char*>(a.q) + (b * a.q_sb + h * a.q_sh) * q_esz;
    const T* kt_bh = static_cast<const T*>(a.kt) + b * a.kt_sb + h * a.kt_sh;
    const T* v_bh = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
    const T* tkt = T_ > 0 ? static_cast<const T*>(a.text_kt) + b * a.tk_sb + h * a.tk_sh : nullptr;
    const T* tv = T_ > 0 ? static_cast<const T*>(a.text_v) + b * a.tv_sb + h * a.tv_sh : nullptr;
    char* out_bh = static_cast<char*>(a.out) + bh * n_q * depth * q_esz;
    T* lse_bh = static_cast<T*>(a.lse) + bh * n_q;
    const int64_t w0 = tc * p.tile_w, w1 = std::min(s.q_w, w0 + p.tile_w);
    const int64_t h0 = tr * p.tile_h, h1 = std::min(s.q_h, h0 + p.tile_h);
    const int64_t c0 = w0 / sw - s.win_w / 2;

    for (int64_t y = h0; y < h1; ++y) {
      for (int64_t x0 = w0; x0 < w1; x0 += kGroup) {
        const Group g = make_group(s, c0, y, x0, std::min<int64_t>(kGroup, w1 - x0));
        load_queries(g, s.q_w, depth, dp, q_bh, a.q_type, a.q_sn, scale, sc.q.data());
        group_scores(s, p, g, sc.q.data(), dp, kt_bh, tkt, sc.s.data(), sld);

        // Exact softmax over window and text keys; invalid strip entries become 0.
        for (int64_t m = 0; m < g.count; ++m) {
          T* sm = sc.s.data() + m * sld;
          const int64_t lo = g.lo[m];
          T mx = neg_inf;
          for (int64_t ri = 0; ri < g.nr; ++ri) {
            const T* sr = sm + ri * p.strip;
            const int64_t hi = group_hi(g, m, ri);
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < p.strip; ++j) {
              const T val = (j >= lo && j < hi) ? sr[j] : neg_inf;
              mx = val > mx ? val : mx;
            }
          }
          T* st = sm + g.nr * p.strip;
#pragma omp simd reduction(max : mx)
          for (int64_t t = 0; t < T_; ++t) {
            st[t] += bias;
            mx = st[t] > mx ? st[t] : mx;
          }
          T sum = 0;
          for (int64_t ri = 0; ri < g.nr; ++ri) {
            T* sr = sm + ri * p.strip;
            const int64_t hi = group_hi(g, m, ri);
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < p.strip; ++j) {
              const T e = exp_acc(sr[j] - mx);
              const T val = (j >= lo && j < hi) ? e : T(0);
              sr[j] = val;
              sum += val;
            }
          }
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < T_; ++t) {
            const T e = exp_acc(st[t] - mx);
            st[t] = e;
            sum += e;
          }
          sc.lse[m] = mx + std::log(sum);
          sc.inv[m] = T(1) / sum;
        }

        // out = P V / sum over the union of the group's windows, then text.
        Segment<T>* sg = segs.data();
        int nseg = 0;
        for (int64_t ri = 0; ri < g.nr; ++ri) {
          const int64_t uhi = group_uhi(g, ri);
          sg[nseg++] = {v_bh + ((g.r_lo + ri) * s.k_w + g.c0 + g.ulo) * a.v_sn, a.v_sn,
                        ri * p.strip + g.ulo, uhi - g.ulo};
        }
        if (T_ > 0) sg[nseg++] = {tv, dp, g.nr * p.strip, T_};
        combine(g.count, dp, p.lanes, sg, nseg, sc.s.data(), sld, sc.inv.data(), sc.o.data(), dp);
        for (int64_t m = 0; m < g.count; ++m) {
          const int64_t n = y * s.q_w + x0 + m;
          store_row(out_bh + n * depth * q_esz, sc.o.data() + m * dp, a.q_type, depth);
          lse_bh[n] = sc.lse[m];
        }
      }
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------

template <typename T>
void backward_band(const LocalAttentionBackwardArgs& a, int64_t b, int64_t h, int64_t band) {
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const int64_t n_q = s.q_h * s.q_w, depth = s.head_dim, dp = p.dp, T_ = s.text;
  const int64_t sw = s.q_w / s.k_w;
  const int64_t q_esz = elem_size(a.q_type), o_esz = elem_size(a.out_type);
  const int64_t go_esz = elem_size(a.grad_out_type);
  Scratch<T> sc(s, p, true);
  const int64_t sld = sc.sld;
  const T scale = static_cast<T>(a.scale), bias = static_cast<T>(a.text_bias);
  const int64_t bh = b * a.heads + h;

  const char* q_bh = static_cast<const char*>(a.q) + (b * a.q_sb + h * a.q_sh) * q_esz;
  const char* o_bh = static_cast<const char*>(a.out) + (b * a.o_sb + h * a.o_sh) * o_esz;
  const char* go_bh = a.grad_out != nullptr
                          ? static_cast<const char*>(a.grad_out) + (b * a.go_sb + h * a.go_sh) * go_esz
                          : nullptr;
  const T* lse_bh = static_cast<const T*>(a.lse) + bh * n_q;
  const T* glse_bh = a.grad_lse != nullptr ? static_cast<const T*>(a.grad_lse) + bh * n_q : nullptr;
  const T* kt_bh = static_cast<const T*>(a.kt) + b * a.kt_sb + h * a.kt_sh;
  const T* vt_bh = static_cast<const T*>(a.vt) + b * a.kt_sb + h * a.kt_sh;
  const T* k_bh = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* tkt = T_ > 0 ? static_cast<const T*>(a.text_kt) + b * a.tt_sb + h * a.tt_sh : nullptr;
  const T* tvt = T_ > 0 ? static_cast<const T*>(a.text_vt) + b * a.tt_sb + h * a.tt_sh : nullptr;
  const T* tk = T_ > 0 ? static_cast<const T*>(a.text_k) + b * a.tk_sb + h * a.tk_sh : nullptr;
  T* gk_bh = static_cast<T*>(a.grad_k) + b * a.gk_sb + h * a.gk_sh;
  T* gv_bh = static_cast<T*>(a.grad_v) + b * a.gk_sb + h * a.gk_sh;
  T* gtk = T_ > 0 ? static_cast<T*>(a.grad_text_k) + (bh * a.bands + band) * T_ * dp : nullptr;
  T* gtv = T_ > 0 ? static_cast<T*>(a.grad_text_v) + (bh * a.bands + band) * T_ * dp : nullptr;
  char* gq_bh = static_cast<char*>(a.grad_q) + bh * n_q * depth * q_esz;

  std::vector<Segment<T>> segs(s.win_h + 1);
  std::vector<WSegment<T>> wsegs(s.win_h + 1);
  T* qs = sc.q.data();
  T* dout = sc.dout.data();
  T* pm = sc.s.data();
  T* dsm = sc.ds.data();
  const int64_t y0 = band * p.band_h, y1 = std::min(s.q_h, y0 + p.band_h);

  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t w0 = 0; w0 < s.q_w; w0 += p.tile_w) {
      const int64_t w1 = std::min(s.q_w, w0 + p.tile_w);
      const int64_t c0 = w0 / sw - s.win_w / 2;
      for (int64_t x0 = w0; x0 < w1; x0 += kGroup) {
        const Group g = make_group(s, c0, y, x0, std::min<int64_t>(kGroup, w1 - x0));
        load_queries(g, s.q_w, depth, dp, q_bh, a.q_type, a.q_sn, scale, qs);
        // dO, and D = rowsum(dO * O) - dlse.
        for (int64_t m = 0; m < g.count; ++m) {
          const int64_t n = y * s.q_w + x0 + m;
          T* dr = dout + m * dp;
          if (go_bh != nullptr) {
            load_row(dr, go_bh + n * a.go_sn * go_esz, a.grad_out_type, depth);
          } else {
            std::fill(dr, dr + depth, T(0));
          }
          std::fill(dr + depth, dr + dp, T(0));
          load_row(sc.tmp.data(), o_bh + n * a.o_sn * o_esz, a.out_type, depth);
          T dot = 0;
          const T* orow = sc.tmp.data();
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < depth; ++d) dot += dr[d] * orow[d];
          sc.aux[m] = dot - (glse_bh != nullptr ? glse_bh[n] : T(0));
          sc.lse[m] = lse_bh[n];
        }
        group_scores(s, p, g, qs, dp, kt_bh, tkt, pm, sld);
        group_scores(s, p, g, dout, dp, vt_bh, tvt, dsm, sld);
        // P = exp(S - lse) and dS = P * (dP - D), both 0 outside the window.
        for (int64_t m = 0; m < g.count; ++m) {
          T* sm = pm + m * sld;
          T* dm = dsm + m * sld;
          const T l = sc.lse[m], dd = sc.aux[m];
          const int64_t lo = g.lo[m];
          for (int64_t ri = 0; ri < g.nr; ++ri) {
            T* sr = sm + ri * p.strip;
            T* dr = dm + ri * p.strip;
            const int64_t hi = group_hi(g, m, ri);
#pragma omp simd
            for (int64_t j = 0; j < p.strip; ++j) {
              const bool valid = j >= lo && j < hi;
              const T pr = exp_acc(sr[j] - l);
              const T pv = valid ? pr : T(0);
              sr[j] = pv;
              dr[j] = valid ? pv * (dr[j] - dd) : T(0);
            }
          }
          T* st = sm + g.nr * p.strip;
          T* dt = dm + g.nr * p.strip;
#pragma omp simd
          for (int64_t t = 0; t < T_; ++t) {
            const T pv = exp_acc(st[t] + bias - l);
            st[t] = pv;
            dt[t] = pv * (dt[t] - dd);
          }
        }
        // Key rows touched by the group's windows, then the text keys.
        int nseg = 0;
        for (int64_t ri = 0; ri < g.nr; ++ri) {
          const int64_t first = (g.r_lo + ri) * s.k_w + g.c0 + g.ulo;
          const int64_t col = ri * p.strip + g.ulo, n = group_uhi(g, ri) - g.ulo;
          segs[nseg] = {k_bh + first * a.k_sn, a.k_sn, col, n};
          wsegs[nseg] = {gv_bh + first * dp, dp, col, n};
          ++nseg;
        }
        const int nwin = nseg;
        if (T_ > 0) {
          segs[nseg] = {tk, dp, g.nr * p.strip, T_};
          wsegs[nseg] = {gtv, dp, g.nr * p.strip, T_};
          ++nseg;
        }
        // dV += P^T dO
        update(g.count, dp, p.lanes, wsegs.data(), nseg, pm, sld, dout, dp);
        // dK += dS^T (q * scale)
        for (int64_t i = 0; i < nwin; ++i) wsegs[i].base = gk_bh + (wsegs[i].base - gv_bh);
        if (T_ > 0) wsegs[nwin].base = gtk;
        update(g.count, dp, p.lanes, wsegs.data(), nseg, dsm, sld, qs, dp);
        // dQ = scale * dS K
        for (int64_t m = 0; m < g.count; ++m) sc.inv[m] = scale;
        combine(g.count, dp, p.lanes, segs.data(), nseg, dsm, sld, sc.inv.data(), sc.o.data(), dp);
        for (int64_t m = 0; m < g.count; ++m) {
          const int64_t n = y * s.q_w + x0 + m;
          store_row(gq_bh + n * depth * q_esz, sc.o.data() + m * dp, a.q_type, depth);
        }
      }
    }
  }
}

}  // namespace

LocalAttentionPlan local_attention_plan(const LocalAttentionShape& shape) { return make_plan(shape); }

void local_attention_pack(const LocalAttentionPackArgs& args, int64_t begin, int64_t end) {
  if (args.f64) {
    pack_rows<double>(args, begin, end);
  } else {
    pack_rows<float>(args, begin, end);
  }
}

int64_t local_attention_forward_tasks(const LocalAttentionForwardArgs& args) {
  const TaskGrid tg = task_grid(args.shape, args.plan);
  return args.batch * args.heads * tg.rows * tg.cols;
}

void local_attention_forward(const LocalAttentionForwardArgs& args, int64_t begin, int64_t end) {
  if (args.shape.f64) {
    forward_tasks<double>(args, begin, end);
  } else {
    forward_tasks<float>(args, begin, end);
  }
}

void local_attention_backward(const LocalAttentionBackwardArgs& args, int64_t b, int64_t h,
                              int64_t band) {
  if (args.shape.f64) {
    backward_band<double>(args, b, h, band);
  } else {
    backward_band<float>(args, b, h, band);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
