// Local (2D neighbourhood) attention with joint text keys: compiled once per ISA, see kernels.h.
//
// Blocking. A tile is a rectangle of neighbouring queries: tile_h rows by tile_w columns. All
// queries of one tile row see the same key rows, and their windows' columns together form one
// `strip` of key columns (a multiple of the vector width). For a 9x9 window and 16-lane
// vectors a tile row is 8 queries wide and its strip 16 keys wide, so one score vector covers
// one key row of the window for all 8 queries at once. Keys are packed per key row as
// [head_dim][columns] ("transposed"; once per call, or per head in per-task scratch), so the
// score micro-kernel reads 16 consecutive keys per head_dim step and broadcasts query elements
// (a register-tiled GEMM of up to 8 queries x 3 key vectors). Scores of one group of <= 8
// queries (window rows x strip + text) stay in a small L1-resident buffer; the softmax over
// window and text keys is exact two-pass over that buffer (vector exp, lane masks for the
// window edges); the value pass is a second register-tiled micro-kernel (4 queries x 4 head_dim
// vectors, broadcasting probabilities) over the union of those 4 queries' windows only.
// Nothing grows with the number of queries or keys beyond the packed copies of k and v.
//
// Backward (one band of query rows per call): recomputes P from the forward's log-sum-exp,
// dP = dO.V^T with the same score kernel over transposed V, dS = P * (dP - (sum P dP - dlse)),
// and three register-tiled passes: dV += P^T dO and dK += dS^T (q * scale) into accumulator
// rows (rank-4 updates), dQ = scale * dS K. Bands two apart never touch the same key rows; the
// torch layer either gives each task whole heads (bands in order: even, then odd) or runs all
// even bands in parallel, then all odd ones. Either way no two threads write one key row and
// every key gradient is summed in the same order.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/local_attention_groups.h"
#include "cpu/kernels/vec.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

// ---- register tiles ------------------------------------------------------------------------
#if defined(__AVX512F__)
// 32 registers: scores 8 queries x 3 key vectors (24 accumulators); value pass and rank
// updates 4 queries x 4 head_dim vectors (16 accumulators).
constexpr int kScoreM = 8, kScoreNV = 3, kPvM = 4, kPvNDV = 4;
#elif defined(__AVX2__)
// 16 registers: scores 4 x 2 (8 accumulators), value pass / rank updates 4 x 2.
constexpr int kScoreM = 4, kScoreNV = 2, kPvM = 4, kPvNDV = 2;
#else
constexpr int kScoreM = 4, kScoreNV = 2, kPvM = 2, kPvNDV = 2;
#endif

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

// Backward of one query: sm holds its scores, dm its dP = dO . v. Leaves P = exp(s - lse) in sm
// and dS = P * (dP - delta) in dm, both exactly 0 outside the window and beyond the text keys,
// with delta = sum_j P_j dP_j - dlse. (sum_j P_j dP_j equals rowsum(dO * out) in exact
// arithmetic; taken from the tile it cancels exactly where the softmax backward does, e.g. a
// query that sees one key gets dS = dlse, and `out` is not read.)
template <typename T>
void grad_scores_row(const Group& g, int64_t m, int64_t strip, int64_t text, int64_t tpad, T bias, T lse,
                     T grad_lse, T* sm, T* dm) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const typename V::R zero = V::zero(), lv = V::set1(lse), vb = V::set1(bias);
  const int64_t lo = g.lo[m];
  T* st = sm + g.nr * strip;
  T* dt = dm + g.nr * strip;
  typename V::R acc = zero;
  for (int64_t ri = 0; ri < g.nr; ++ri) {
    T* sr = sm + ri * strip;
    const T* dr = dm + ri * strip;
    const int64_t hi = group_hi(g, m, ri);
    for (int64_t j = 0; j < strip; j += L) {
      const typename V::R pr = V::keep(V::exp(V::sub(V::load(sr + j), lv)), lo - j, hi - j, zero);
      V::store(sr + j, pr);
      acc = V::fma(pr, V::keep(V::load(dr + j), lo - j, hi - j, zero), acc);
    }
  }
  for (int64_t t = 0; t < tpad; t += L) {
    const typename V::R pr = V::keep(V::exp(V::sub(V::add(V::load(st + t), vb), lv)), -t, text - t, zero);
    V::store(st + t, pr);
    acc = V::fma(pr, V::keep(V::load(dt + t), -t, text - t, zero), acc);
  }
  const typename V::R dv = V::set1(V::hsum(acc) - grad_lse);
  for (int64_t ri = 0; ri < g.nr; ++ri) {
    const T* sr = sm + ri * strip;
    T* dr = dm + ri * strip;
    const int64_t hi = group_hi(g, m, ri);
    for (int64_t j = 0; j < strip; j += L) {
      V::store(dr + j, V::keep(V::mul(V::load(sr + j), V::sub(V::load(dr + j), dv)), lo - j, hi - j, zero));
    }
  }
  for (int64_t t = 0; t < tpad; t += L) {
    V::store(dt + t, V::keep(V::mul(V::load(st + t), V::sub(V::load(dt + t), dv)), -t, text - t, zero));
  }
}

// Per-task scratch, sized for one group.
template <typename T>
struct Scratch {
  int64_t sld = 0, dp = 0;
  std::vector<T> q, s, ds, o, dout;
  std::vector<T> lse, inv, aux;
  explicit Scratch(const LocalAttentionShape& shape, const LocalAttentionPlan& plan, bool backward) {
    sld = shape.win_h * plan.strip + plan.tpad;
    dp = plan.dp;
    q.assign(kGroup * dp, T(0));
    s.assign(kGroup * sld, T(0));
    o.assign(kGroup * dp, T(0));
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
  constexpr ElemType acc = std::is_same_v<T, double> ? ElemType::f64 : ElemType::f32;
  for (int64_t m = 0; m < g.count; ++m) {
    T* row = q + m * dp;
    const char* src = base + (g.row * q_w + g.col + m) * sn * esz;
    if (type == acc) {  // one pass: scale while loading
      const T* x = reinterpret_cast<const T*>(src);
#pragma omp simd
      for (int64_t d = 0; d < depth; ++d) row[d] = x[d] * mul;
    } else {
      load_row(row, src, type, depth);
#pragma omp simd
      for (int64_t d = 0; d < depth; ++d) row[d] *= mul;
    }
    for (int64_t d = depth; d < dp; ++d) row[d] = T(0);
  }
}

// ---- pack -----------------------------------------------------------------------------------------

// Writes tile[c][d] (nc keys x depth, row stride ld) to out[d * row_width + c].
template <typename T>
void transpose_tile(const T* tile, int64_t ld, int64_t nc, int64_t depth, T* out, int64_t row_width) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (nc == 16) {
      __m512 r[16];
      for (; d0 + 16 <= depth; d0 += 16) {
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(tile + i * ld + d0);
        transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + (d0 + j) * row_width, r[j]);
      }
    }
  }
#endif
  for (int64_t d = d0; d < depth; ++d) {
    T* o = out + d * row_width;
    for (int64_t c = 0; c < nc; ++c) o[c] = tile[c * ld + d];
  }
}

template <typename T>
void pack_rows(const LocalAttentionPackArgs& a, int64_t begin, int64_t end) {
  const int64_t depth = a.head_dim, esz = elem_size(a.src_type);
  constexpr int64_t kBlock = 16;
  constexpr ElemType acc = std::is_same_v<T, double> ? ElemType::f64 : ElemType::f32;
  std::vector<T> tile(kBlock * depth);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / a.rows, r = item % a.rows;
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const char* src = static_cast<const char*>(a.src) + (b * a.sb + h * a.sh + r * a.cols * a.sn) * esz;
    if (a.transposed != nullptr) {
      T* dst = static_cast<T*>(a.transposed) + item * depth * a.row_width;
      for (int64_t c0 = 0; c0 < a.cols; c0 += kBlock) {
        const int64_t nc = std::min<int64_t>(kBlock, a.cols - c0);
        if (a.src_type == acc) {  // transpose straight from the source rows
          transpose_tile(reinterpret_cast<const T*>(src) + c0 * a.sn, a.sn, nc, depth, dst + a.pad + c0,
                         a.row_width);
          continue;
        }
        for (int64_t c = 0; c < nc; ++c) load_row(tile.data() + c * depth, src + (c0 + c) * a.sn * esz, a.src_type, depth);
        transpose_tile(tile.data(), depth, nc, depth, dst + a.pad + c0, a.row_width);
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

// Packs head (b, h) of `src` (rows x cols tokens) into the transposed layout and/or rows.
template <typename T>
void pack_head(const LocalAttentionSource& src, int64_t b, int64_t h, int64_t rows, int64_t cols,
               int64_t depth, int64_t pad, int64_t row_width, int64_t dp, T* transposed, T* rowmajor) {
  LocalAttentionPackArgs pk;
  pk.batch = 1;
  pk.heads = 1;
  pk.rows = rows;
  pk.cols = cols;
  pk.head_dim = depth;
  pk.src = static_cast<const char*>(src.data) + (b * src.sb + h * src.sh) * elem_size(src.type);
  pk.src_type = src.type;
  pk.sn = src.sn;
  pk.transposed = transposed;
  pk.pad = pad;
  pk.row_width = row_width;
  pk.rowmajor = rowmajor;
  pk.dp = dp;
  pk.f64 = std::is_same_v<T, double>;
  pack_rows<T>(pk, 0, rows);
}

// Queries per register block of the forward value pass: two queries' windows (10 columns for a
// 9-wide window) waste less than four (12) where the pass is bound by its multiply-adds.
constexpr int64_t kFwdPvM = std::min<int64_t>(kPvM, 2);

// Query rows [y0, y1) x tile columns [tc0, tc1) of head (b, h), row by row (so q and out are
// read and written in order).
template <typename T>
void forward_rows(const LocalAttentionForwardArgs& a, Scratch<T>& sc, GroupMasks<T>& mk,
                  std::vector<Segment<T>>& segs, int64_t b, int64_t h, int64_t y0, int64_t y1, int64_t tc0,
                  int64_t tc1) {
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const int64_t n_q = s.q_h * s.q_w, depth = s.head_dim, dp = p.dp, T_ = s.text;
  const int64_t sw = s.q_w / s.k_w;
  const int64_t q_esz = elem_size(a.q_type);
  const int64_t sld = sc.sld;
  const T scale = static_cast<T>(a.scale), bias = static_cast<T>(a.text_bias);
  const int64_t bh = b * a.heads + h;
  const char* q_bh = static_cast<const char*>(a.q) + (b * a.q_sb + h * a.q_sh) * q_esz;
  const T* kt_bh = static_cast<const T*>(a.kt) + b * a.kt_sb + h * a.kt_sh;
  const T* v_bh = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  const T* tkt = T_ > 0 ? static_cast<const T*>(a.text_kt) + b * a.tk_sb + h * a.tk_sh : nullptr;
  const T* tv = T_ > 0 ? static_cast<const T*>(a.text_v) + b * a.tv_sb + h * a.tv_sh : nullptr;
  char* out_bh = static_cast<char*>(a.out) + bh * n_q * depth * q_esz;
  T* lse_bh = static_cast<T*>(a.lse) + bh * n_q;
  // The value pass writes `out` directly when it has the accumulator type and no padding.
  const bool direct = dp == depth && a.q_type == (std::is_same_v<T, double> ? ElemType::f64 : ElemType::f32);

  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t tc = tc0; tc < tc1; ++tc) {
      const int64_t w0 = tc * p.tile_w, w1 = std::min(s.q_w, w0 + p.tile_w);
      const int64_t c0 = w0 / sw - s.win_w / 2;
      for (int64_t x0 = w0; x0 < w1; x0 += kGroup) {
        const Group g = make_group(s, c0, y, x0, std::min<int64_t>(kGroup, w1 - x0));
        mk.set(g);
        load_queries(g, s.q_w, depth, dp, q_bh, a.q_type, a.q_sn, scale, sc.q.data());
        group_scores(s, p, g, sc.q.data(), dp, kt_bh, tkt, sc.s.data(), sld);
        // Exact softmax over window and text keys; invalid strip entries become 0.
        for (int64_t m = 0; m < g.count; ++m) {
          softmax_masked(g, mk, m, p.strip, bias, sc.s.data() + m * sld, &sc.lse[m], &sc.inv[m]);
        }
        const int64_t n0 = y * s.q_w + x0;
        T* o = direct ? reinterpret_cast<T*>(out_bh) + n0 * depth : sc.o.data();
        // out = P V / sum, per register block of queries over the union of their windows, then text.
        for (int64_t m0 = 0; m0 < g.count; m0 += kFwdPvM) {
          const int64_t mm = std::min<int64_t>(kFwdPvM, g.count - m0);
          const BlockCols bc = block_cols(g, m0, mm);
          int nseg = 0;
          for (int64_t ri = 0; ri < g.nr; ++ri) {
            segs[nseg++] = {v_bh + ((g.r_lo + ri) * s.k_w + g.c0 + bc.lo) * a.v_sn, a.v_sn,
                            ri * p.strip + bc.lo, block_hi(g, bc, ri) - bc.lo};
          }
          if (T_ > 0) segs[nseg++] = {tv, dp, g.nr * p.strip, T_};
          combine(mm, dp, p.lanes, segs.data(), nseg, sc.s.data() + m0 * sld, sld, sc.inv.data() + m0,
                  o + m0 * dp, dp);
        }
        for (int64_t m = 0; m < g.count; ++m) {
          if (!direct) store_row(out_bh + (n0 + m) * depth * q_esz, sc.o.data() + m * dp, a.q_type, depth);
          lse_bh[n0 + m] = sc.lse[m];
        }
      }
    }
  }
}

// ---- forward over shared (parent) windows ---------------------------------------------------------
//
// A cross-resolution window (keys on a coarser grid, each key cell the parent of an sh x sw block
// of queries) is the same for every query of the block. Its in-grid keys are packed once per
// block, compacted into one [head_dim][keys] tile: the 25 keys of a 5x5 window fill two 16-lane
// vectors, where the strip layout above spends five vectors (80 lanes) per query on them. Used
// without text keys and causality, when blocks have >= 4 queries.

constexpr int64_t kMinParentQueries = 4;
constexpr int64_t kMaxParentKeyVectors = 8;

bool parent_windows(const LocalAttentionShape& s, const LocalAttentionPlan& p) {
  const int64_t sh = s.q_h / s.k_h, sw = s.q_w / s.k_w, kw = round_up(s.win_h * s.win_w, p.lanes);
  // (the scores of a query go to a Scratch::s row of win_h * strip + tpad elements)
  return !s.causal && s.text == 0 && sh * sw >= kMinParentQueries && kw <= kMaxParentKeyVectors * p.lanes &&
         kw <= s.win_h * p.strip;
}

// Per-task buffers of the parent path: the packed window and the queries of one block (the
// scores go to Scratch::s, <= kGroup queries at a time). The packed window's rows are
// `stride` = (the window's keys rounded up to whole vectors) + one vector apart: window rows are
// copied one vector at a time (a fixed-size copy compiles to one move, a variable one to a library
// call per row), and what a copy writes beyond its row's keys is overwritten by the next row or
// lies in padding.
template <typename T>
struct ParentScratch {
  int64_t stride = 0;             // elements per head_dim row of `keys`
  std::vector<T> keys;            // [head_dim][stride]
  std::vector<int64_t> queries;   // query indices of the block, raster order
  explicit ParentScratch(const LocalAttentionShape& s)
      : stride(round_up(s.win_h * s.win_w, Vec<T>::L) + Vec<T>::L), keys(s.head_dim * stride, T(0)) {}
};

// Exact softmax over keys [0, n) of one query's scores (padding lanes beyond n become 0).
template <typename T>
void softmax_keys(T* sm, int64_t n, T* lse, T* inv) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int L = V::L;
  const R ninf = V::set1(-std::numeric_limits<T>::infinity()), zero = V::zero();
  R mx = ninf;
  for (int64_t j = 0; j < n; j += L) mx = V::max(mx, V::keep(V::load(sm + j), 0, n - j, ninf));
  const T mxs = V::hmax(mx);
  const R mv = V::set1(mxs);
  R sum = zero;
  for (int64_t j = 0; j < n; j += L) {
    const R e = V::keep(V::exp(V::sub(V::load(sm + j), mv)), 0, n - j, zero);
    V::store(sm + j, e);
    sum = V::add(sum, e);
  }
  const T total = V::hsum(sum);
  *lse = mxs + std::log(total);
  *inv = T(1) / total;
}

// Queries in rows [y0, y1) x columns [x0, x1) of head (b, h), parent block by parent block.
template <typename T>
void forward_parents(const LocalAttentionForwardArgs& a, Scratch<T>& sc, ParentScratch<T>& ps,
                     std::vector<Segment<T>>& segs, int64_t b, int64_t h, int64_t y0, int64_t y1, int64_t x0,
                     int64_t x1) {
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const int64_t L = p.lanes, depth = s.head_dim, dp = p.dp, sld = sc.sld;
  const int64_t sh = s.q_h / s.k_h, sw = s.q_w / s.k_w, rh = s.win_h / 2, rw = s.win_w / 2;
  const int64_t n_q = s.q_h * s.q_w, key_row = depth * p.row_width, q_esz = elem_size(a.q_type);
  const T scale = static_cast<T>(a.scale);
  const int64_t bh = b * a.heads + h;
  const char* q_bh = static_cast<const char*>(a.q) + (b * a.q_sb + h * a.q_sh) * q_esz;
  const T* kt_bh = static_cast<const T*>(a.kt) + b * a.kt_sb + h * a.kt_sh;
  const T* v_bh = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  char* out_bh = static_cast<char*>(a.out) + bh * n_q * depth * q_esz;
  T* lse_bh = static_cast<T*>(a.lse) + bh * n_q;
  const T* kp[kScoreNV];
  int64_t soff[kScoreNV];

  for (int64_t py = y0 / sh; py * sh < y1; ++py) {
    for (int64_t px = x0 / sw; px * sw < x1; ++px) {
      // The window's in-grid keys, row by row, compacted: keys [n, n + count) of `segs[i]`.
      const int64_t r_lo = std::max<int64_t>(py - rh, 0), r_hi = std::min<int64_t>(py + rh, s.k_h - 1);
      const int64_t c_lo = std::max<int64_t>(px - rw, 0), c_hi = std::min<int64_t>(px + rw, s.k_w - 1);
      const int64_t cols = c_hi - c_lo + 1;
      int nseg = 0;
      int64_t n = 0;
      constexpr int64_t VL = Vec<T>::L;
      // (strides in locals: the copies below store through T*, which could alias the plan's fields)
      const int64_t src_stride = p.row_width, dst_stride = ps.stride;
      T* keys = ps.keys.data();
      for (int64_t r = r_lo; r <= r_hi; ++r, n += cols) {
        // (a transposed key row has >= strip >= VL columns right of the grid, so the vector read
        // from c_lo stays inside it)
        const T* src = kt_bh + r * key_row + p.pad + c_lo;
        T* dst = keys + n;
        for (int64_t d = 0; d < depth; ++d) {
          if (cols <= VL) {
            Vec<T>::store(dst + d * dst_stride, Vec<T>::load(src + d * src_stride));
          } else {
            std::copy(src + d * src_stride, src + d * src_stride + cols, dst + d * dst_stride);
          }
        }
        segs[nseg++] = {v_bh + (r * s.k_w + c_lo) * a.v_sn, a.v_sn, n, cols};
      }
      const int64_t nvec = (n + L - 1) / L;
      for (int64_t d = 0; d < depth; ++d) Vec<T>::store(keys + d * dst_stride + n, Vec<T>::zero());

      ps.queries.clear();
      for (int64_t y = std::max(py * sh, y0); y < std::min(py * sh + sh, y1); ++y) {
        for (int64_t x = std::max(px * sw, x0); x < std::min(px * sw + sw, x1); ++x) ps.queries.push_back(y * s.q_w + x);
      }
      for (std::size_t first = 0; first < ps.queries.size(); first += kGroup) {
        const int64_t count = std::min<int64_t>(kGroup, static_cast<int64_t>(ps.queries.size() - first));
        const int64_t* qi = ps.queries.data() + first;
        for (int64_t m = 0; m < count; ++m) {
          T* row = sc.q.data() + m * dp;
          load_row(row, q_bh + qi[m] * a.q_sn * q_esz, a.q_type, depth);
          for (int64_t d = 0; d < depth; ++d) row[d] *= scale;
          std::fill(row + depth, row + dp, T(0));
        }
        for (int64_t mb = 0; mb < count; mb += kScoreM) {
          const int mm = static_cast<int>(std::min<int64_t>(kScoreM, count - mb));
          for (int64_t f = 0; f < nvec; f += kScoreNV) {
            const int cnt = static_cast<int>(std::min<int64_t>(kScoreNV, nvec - f));
            for (int j = 0; j < cnt; ++j) {
              kp[j] = ps.keys.data() + (f + j) * L;
              soff[j] = (f + j) * L;
            }
            score<T>(mm, cnt, sc.q.data() + mb * dp, dp, depth, kp, ps.stride, sc.s.data() + mb * sld, sld, soff);
          }
        }
        for (int64_t m = 0; m < count; ++m) softmax_keys(sc.s.data() + m * sld, n, &sc.lse[m], &sc.inv[m]);
        combine(count, dp, L, segs.data(), nseg, sc.s.data(), sld, sc.inv.data(), sc.o.data(), dp);
        for (int64_t m = 0; m < count; ++m) {
          store_row(out_bh + qi[m] * depth * q_esz, sc.o.data() + m * dp, a.q_type, depth);
          lse_bh[qi[m]] = sc.lse[m];
        }
      }
    }
  }
}

// Carves per-task pack buffers out of the scratch the torch layer allocated.
template <typename T>
struct ScratchCursor {
  T* next;
  T* take(int64_t n) {
    T* out = next;
    next += n;
    return out;
  }
};

template <typename T>
int64_t head_scratch(const LocalAttentionShape& s, const LocalAttentionPlan& p, bool backward) {
  const int64_t keys = s.k_h * s.head_dim * p.row_width, rows = s.k_h * s.k_w * p.dp;
  const int64_t text_t = s.head_dim * p.tpad, text_rows = s.text * p.dp;
  return backward ? 2 * keys + rows + 2 * text_t + text_rows : keys + rows + text_t + text_rows;
}

template <typename T>
void forward_tasks(const LocalAttentionForwardArgs& a, int64_t begin, int64_t end, void* scratch) {
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const TaskGrid tg = task_grid(s, p);
  Scratch<T> sc(s, p, false);
  GroupMasks<T> mk(p, s.text);
  std::vector<Segment<T>> segs(s.win_h + 1);
  const bool parents = p.parents;
  ParentScratch<T> ps(parents ? s : LocalAttentionShape{});
  if (!a.per_head) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tc = task % tg.cols, tr = (task / tg.cols) % tg.rows;
      const int64_t bh = task / (tg.cols * tg.rows);
      const int64_t y0 = tr * p.tile_h, y1 = std::min(s.q_h, y0 + p.tile_h);
      if (parents) {
        const int64_t x0 = tc * p.tile_w;
        forward_parents(a, sc, ps, segs, bh / a.heads, bh % a.heads, y0, y1, x0, std::min(s.q_w, x0 + p.tile_w));
      } else {
        forward_rows(a, sc, mk, segs, bh / a.heads, bh % a.heads, y0, y1, tc, tc + 1);
      }
    }
    return;
  }
  // One head per task: pack what the torch layer left null into per-task scratch (it stays in
  // L2 while the head's tiles run), then all tiles of the head.
  const int64_t depth = s.head_dim, n_k = s.k_h * s.k_w;
  ScratchCursor<T> cur{static_cast<T*>(scratch)};
  T* kt = a.kt == nullptr ? cur.take(s.k_h * depth * p.row_width) : nullptr;
  T* v = a.v == nullptr ? cur.take(n_k * p.dp) : nullptr;
  T* tkt = s.text > 0 && a.text_kt == nullptr ? cur.take(depth * p.tpad) : nullptr;
  T* tv = s.text > 0 && a.text_v == nullptr ? cur.take(s.text * p.dp) : nullptr;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.heads, h = task % a.heads;
    LocalAttentionForwardArgs la = a;
    if (a.kt == nullptr) {
      pack_head<T>(a.k_src, b, h, s.k_h, s.k_w, depth, p.pad, p.row_width, p.dp, kt, nullptr);
      la.kt = kt;
      la.kt_sb = la.kt_sh = 0;
    }
    if (a.v == nullptr) {
      pack_head<T>(a.v_src, b, h, s.k_h, s.k_w, depth, 0, 0, p.dp, nullptr, v);
      la.v = v;
      la.v_sb = la.v_sh = 0;
      la.v_sn = p.dp;
    }
    if (s.text > 0 && a.text_kt == nullptr) {
      pack_head<T>(a.text_k_src, b, h, 1, s.text, depth, 0, p.tpad, p.dp, tkt, nullptr);
      la.text_kt = tkt;
      la.tk_sb = la.tk_sh = 0;
    }
    if (s.text > 0 && a.text_v == nullptr) {
      pack_head<T>(a.text_v_src, b, h, 1, s.text, depth, 0, 0, p.dp, nullptr, tv);
      la.text_v = tv;
      la.tv_sb = la.tv_sh = 0;
    }
    if (parents) {
      forward_parents(la, sc, ps, segs, b, h, 0, s.q_h, 0, s.q_w);
    } else {
      forward_rows(la, sc, mk, segs, b, h, 0, s.q_h, 0, tg.cols);
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
  const int64_t q_esz = elem_size(a.q_type);
  const int64_t go_esz = elem_size(a.grad_out_type);
  Scratch<T> sc(s, p, true);
  const int64_t sld = sc.sld;
  const T scale = static_cast<T>(a.scale), bias = static_cast<T>(a.text_bias);
  const int64_t bh = b * a.heads + h;

  const char* q_bh = static_cast<const char*>(a.q) + (b * a.q_sb + h * a.q_sh) * q_esz;
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
        // dO (zero without a gradient of `out`), lse and dlse of each query.
        for (int64_t m = 0; m < g.count; ++m) {
          const int64_t n = y * s.q_w + x0 + m;
          T* dr = dout + m * dp;
          if (go_bh != nullptr) {
            load_row(dr, go_bh + n * a.go_sn * go_esz, a.grad_out_type, depth);
          } else {
            std::fill(dr, dr + depth, T(0));
          }
          std::fill(dr + depth, dr + dp, T(0));
          sc.aux[m] = glse_bh != nullptr ? glse_bh[n] : T(0);
          sc.lse[m] = lse_bh[n];
        }
        group_scores(s, p, g, qs, dp, kt_bh, tkt, pm, sld);
        group_scores(s, p, g, dout, dp, vt_bh, tvt, dsm, sld);
        // P = exp(S - lse) and dS = P * (dP - D), both 0 outside the window.
        for (int64_t m = 0; m < g.count; ++m) {
          grad_scores_row(g, m, p.strip, T_, p.tpad, bias, sc.lse[m], sc.aux[m], pm + m * sld, dsm + m * sld);
        }
        // Per register block of queries: the key rows its windows touch, then the text keys.
        for (int64_t m = 0; m < g.count; ++m) sc.inv[m] = scale;
        for (int64_t m0 = 0; m0 < g.count; m0 += kPvM) {
          const int64_t mm = std::min<int64_t>(kPvM, g.count - m0);
          const BlockCols bc = block_cols(g, m0, mm);
          int nseg = 0;
          for (int64_t ri = 0; ri < g.nr; ++ri) {
            const int64_t first = (g.r_lo + ri) * s.k_w + g.c0 + bc.lo;
            const int64_t col = ri * p.strip + bc.lo, n = block_hi(g, bc, ri) - bc.lo;
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
          update(mm, dp, p.lanes, wsegs.data(), nseg, pm + m0 * sld, sld, dout + m0 * dp, dp);
          // dK += dS^T (q * scale)
          for (int64_t i = 0; i < nwin; ++i) wsegs[i].base = gk_bh + (wsegs[i].base - gv_bh);
          if (T_ > 0) wsegs[nwin].base = gtk;
          update(mm, dp, p.lanes, wsegs.data(), nseg, dsm + m0 * sld, sld, qs + m0 * dp, dp);
          // dQ = scale * dS K
          combine(mm, dp, p.lanes, segs.data(), nseg, dsm + m0 * sld, sld, sc.inv.data() + m0,
                  sc.o.data() + m0 * dp, dp);
        }
        for (int64_t m = 0; m < g.count; ++m) {
          const int64_t n = y * s.q_w + x0 + m;
          store_row(gq_bh + n * depth * q_esz, sc.o.data() + m * dp, a.q_type, depth);
        }
      }
    }
  }
}

// Whole heads per task; bands in the order the phased schedule uses (per batch: even bands,
// then odd bands), so both schedules sum every key gradient in the same order.
template <typename T>
void backward_heads(const LocalAttentionBackwardArgs& a, int64_t begin, int64_t end, void* scratch) {
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const int64_t depth = s.head_dim, n_k = s.k_h * s.k_w;
  const int64_t bands = a.bands;
  const int64_t key_pack = s.k_h * depth * p.row_width;
  ScratchCursor<T> cur{static_cast<T*>(scratch)};
  T* kt = a.kt == nullptr ? cur.take(key_pack) : nullptr;
  T* vt = a.vt == nullptr ? cur.take(key_pack) : nullptr;
  T* kr = a.k == nullptr ? cur.take(n_k * p.dp) : nullptr;
  T* tkt = s.text > 0 && a.text_kt == nullptr ? cur.take(depth * p.tpad) : nullptr;
  T* tvt = s.text > 0 && a.text_vt == nullptr ? cur.take(depth * p.tpad) : nullptr;
  T* tkr = s.text > 0 && a.text_k == nullptr ? cur.take(s.text * p.dp) : nullptr;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = a.kv_broadcast ? task : task % a.heads;
    const int64_t b_first = a.kv_broadcast ? 0 : task / a.heads;
    const int64_t b_last = a.kv_broadcast ? a.batch : b_first + 1;
    LocalAttentionBackwardArgs la = a;
    // Packs of head h for batch b (broadcast sources have batch stride 0).
    auto pack_kv = [&](int64_t b) {
      if (a.kt == nullptr || a.k == nullptr) {
        pack_head<T>(a.k_src, b, h, s.k_h, s.k_w, depth, p.pad, p.row_width, p.dp,
                     a.kt == nullptr ? kt : nullptr, a.k == nullptr ? kr : nullptr);
      }
      if (a.kt == nullptr) {
        la.kt = kt;
        la.kt_sb = la.kt_sh = 0;
      }
      if (a.vt == nullptr) {
        pack_head<T>(a.v_src, b, h, s.k_h, s.k_w, depth, p.pad, p.row_width, p.dp, vt, nullptr);
        la.vt = vt;
      }
      if (a.k == nullptr) {
        la.k = kr;
        la.k_sb = la.k_sh = 0;
        la.k_sn = p.dp;
      }
    };
    auto pack_text = [&](int64_t b) {
      if (s.text == 0) return;
      if (a.text_kt == nullptr || a.text_k == nullptr) {
        pack_head<T>(a.text_k_src, b, h, 1, s.text, depth, 0, p.tpad, p.dp,
                     a.text_kt == nullptr ? tkt : nullptr, a.text_k == nullptr ? tkr : nullptr);
      }
      if (a.text_vt == nullptr) {
        pack_head<T>(a.text_v_src, b, h, 1, s.text, depth, 0, p.tpad, p.dp, tvt, nullptr);
      }
      if (a.text_kt == nullptr) la.text_kt = tkt;
      if (a.text_vt == nullptr) la.text_vt = tvt;
      if (a.text_kt == nullptr || a.text_vt == nullptr) la.tt_sb = la.tt_sh = 0;
      if (a.text_k == nullptr) {
        la.text_k = tkr;
        la.tk_sb = la.tk_sh = 0;
      }
    };
    for (int64_t b = b_first; b < b_last; ++b) {
      // k/v are the same for every batch when broadcast; text may still differ per batch.
      if (b == b_first) pack_kv(b);
      if (b == b_first || a.text_k_src.sb != 0) pack_text(b);
      for (int64_t color = 0; color < 2; ++color) {
        for (int64_t band = color; band < bands; band += 2) backward_band<T>(la, b, h, band);
      }
    }
  }
}

}  // namespace

LocalAttentionPlan local_attention_plan(const LocalAttentionShape& shape) {
  LocalAttentionPlan plan = make_plan(shape);
  plan.parents = parent_windows(shape, plan);
  plan.pair_cols = (plan.row_width + 1) / 2;
  return plan;
}

void local_attention_pack(const LocalAttentionPackArgs& args, int64_t begin, int64_t end) {
  if (args.f64) {
    pack_rows<double>(args, begin, end);
  } else {
    pack_rows<float>(args, begin, end);
  }
}

int64_t local_attention_forward_tasks(const LocalAttentionForwardArgs& args) {
  const TaskGrid tg = task_grid(args.shape, args.plan);
  return args.batch * args.heads * (args.per_head ? 1 : tg.rows * tg.cols);
}

int64_t local_attention_head_scratch(const LocalAttentionShape& shape, const LocalAttentionPlan& plan,
                                     bool backward) {
  return shape.f64 ? head_scratch<double>(shape, plan, backward) : head_scratch<float>(shape, plan, backward);
}

void local_attention_forward(const LocalAttentionForwardArgs& args, int64_t begin, int64_t end,
                             void* scratch) {
  if (args.shape.f64) {
    forward_tasks<double>(args, begin, end, scratch);
  } else {
    forward_tasks<float>(args, begin, end, scratch);
  }
}

void local_attention_backward_heads(const LocalAttentionBackwardArgs& args, int64_t begin, int64_t end,
                                    void* scratch) {
  if (args.shape.f64) {
    backward_heads<double>(args, begin, end, scratch);
  } else {
    backward_heads<float>(args, begin, end, scratch);
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
