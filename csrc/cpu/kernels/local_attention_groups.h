// Local attention's query groups, shared by the kernels of csrc/cpu/kernels/local_attention*.cpp:
// the geometry of a group of queries and their strip of key columns, the group's lane masks, and
// the exact masked softmax over one query's window and text scores. Compiled into each ISA's
// translation units (the enclosing namespace is the ISA's).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

// Queries per group: the scores of one group live in one small buffer.
constexpr int64_t kGroup = 8;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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
};

// The union of the strip columns that queries [m0, m0 + mm) of a group see: [lo, hi) in every
// window row but the causal last one, [lo, hi_last) there. The value pass and the rank updates
// run over it per register block of queries (12 columns for 4 queries and a 9-wide window,
// where the whole group of 8 spans 16).
struct BlockCols {
  int64_t lo, hi, hi_last;
};

inline Group make_group(const LocalAttentionShape& s, int64_t c0, int64_t row, int64_t col, int64_t count) {
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
  for (int64_t m = 0; m < count; ++m) {
    const int64_t x = col + m, bw = sw == 1 ? x : x / sw;
    g.lo[m] = std::max<int64_t>(bw - rw, 0) - c0;
    g.hi[m] = std::min<int64_t>(bw + rw, s.k_w - 1) + 1 - c0;
    g.hi_last[m] = s.causal ? std::min<int64_t>(g.hi[m], x + 1 - c0) : g.hi[m];
  }
  return g;
}

inline BlockCols block_cols(const Group& g, int64_t m0, int64_t mm) {
  BlockCols c{g.lo[m0], g.hi[m0], g.hi_last[m0]};
  for (int64_t m = m0 + 1; m < m0 + mm; ++m) {
    c.lo = std::min(c.lo, g.lo[m]);
    c.hi = std::max(c.hi, g.hi[m]);
    c.hi_last = std::max(c.hi_last, g.hi_last[m]);
  }
  return c;
}

inline int64_t group_hi(const Group& g, int64_t m, int64_t ri) {
  return g.causal_last && ri == g.nr - 1 ? g.hi_last[m] : g.hi[m];
}
inline int64_t block_hi(const Group& g, const BlockCols& c, int64_t ri) {
  return g.causal_last && ri == g.nr - 1 ? c.hi_last : c.hi;
}

// Lane masks of a group, computed once per group (not per key row and vector): per query, the
// strip vectors of an ordinary window row and of the causal last row; and the text vectors.
template <typename T>
struct GroupMasks {
  using M = typename Vec<T>::Mask;
  struct Slot {  // a vector of a struct keeps the mask type's alignment (no ignored attributes)
    M m;
  };
  int64_t nv = 0, ntv = 0;
  std::vector<Slot> row, last, text;
  GroupMasks(const LocalAttentionPlan& p, int64_t text_keys)
      : nv(p.strip / p.lanes), ntv(p.tpad / p.lanes), row(kGroup * nv), last(kGroup * nv), text(ntv) {
    for (int64_t t = 0; t < ntv; ++t) text[t].m = Vec<T>::range_mask(-t * p.lanes, text_keys - t * p.lanes);
  }
  void set(const Group& g) {
    const int64_t L = Vec<T>::L;
    for (int64_t m = 0; m < g.count; ++m) {
      for (int64_t j = 0; j < nv; ++j) {
        row[m * nv + j].m = Vec<T>::range_mask(g.lo[m] - j * L, g.hi[m] - j * L);
        if (g.causal_last) last[m * nv + j].m = Vec<T>::range_mask(g.lo[m] - j * L, g.hi_last[m] - j * L);
      }
    }
  }
};

// Softmax of one query's scores in place: window key row ri at [ri * strip, (ri + 1) * strip),
// text at nr * strip (text_bias added). Leaves exp(s - max), exactly 0 outside the window and
// beyond the text keys; returns log-sum-exp and 1 / sum. Masks come precomputed per group;
// two independent max and sum chains. With kBf16 (float on AVX-512), exp(s - max) goes to
// `rounded` instead, rounded to bfloat16 at the same positions (the sums stay unrounded).
template <typename T, bool kBf16 = false>
void softmax_masked(const Group& g, const GroupMasks<T>& mk, int64_t m, int64_t strip, T bias, T* sm,
                    T* lse, T* inv, uint16_t* rounded = nullptr) {
  using V = Vec<T>;
  static_assert(!kBf16 || (std::is_same_v<T, float> && V::L == 16), "bfloat16 probabilities: float, AVX-512");
  const auto put = [&](int64_t i, typename V::R e) {
    if constexpr (kBf16) {
#if defined(__AVX512F__)
      // (exp gives finite values or quiet NaNs: the rounding alone, without float_to_bf16's NaN case)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + i), _mm512_cvtepi32_epi16(bf16_rounded_bits16(e)));
#endif
    } else {
      V::store(sm + i, e);
    }
  };
  using R = typename V::R;
  constexpr int L = V::L;
  const R ninf = V::set1(-std::numeric_limits<T>::infinity()), zero = V::zero();
  const int64_t nv = mk.nv;
  using Slot = typename GroupMasks<T>::Slot;
  const Slot* rm = mk.row.data() + m * nv;
  const Slot* lm = g.causal_last ? mk.last.data() + m * nv : rm;
  R mx0 = ninf, mx1 = ninf;
  for (int64_t ri = 0; ri < g.nr; ++ri) {
    const T* sr = sm + ri * strip;
    const Slot* k = ri == g.nr - 1 ? lm : rm;
    for (int64_t j = 0; j < nv; ++j) {
      const R x = V::select(k[j].m, V::load(sr + j * L), ninf);
      if ((ri + j) & 1) {
        mx1 = V::max(mx1, x);
      } else {
        mx0 = V::max(mx0, x);
      }
    }
  }
  T* st = sm + g.nr * strip;
  const R vb = V::set1(bias);
  for (int64_t t = 0; t < mk.ntv; ++t) {
    const R x = V::add(V::load(st + t * L), vb);
    V::store(st + t * L, x);
    mx1 = V::max(mx1, V::select(mk.text[t].m, x, ninf));
  }
  const T mxs = V::hmax(V::max(mx0, mx1));
  const R mv = V::set1(mxs);
  R sum0 = zero, sum1 = zero;
  for (int64_t ri = 0; ri < g.nr; ++ri) {
    const T* sr = sm + ri * strip;
    const Slot* k = ri == g.nr - 1 ? lm : rm;
    for (int64_t j = 0; j < nv; ++j) {
      const R e = V::select(k[j].m, V::exp(V::sub(V::load(sr + j * L), mv)), zero);
      put(ri * strip + j * L, e);
      if ((ri + j) & 1) {
        sum1 = V::add(sum1, e);
      } else {
        sum0 = V::add(sum0, e);
      }
    }
  }
  for (int64_t t = 0; t < mk.ntv; ++t) {
    const R e = V::select(mk.text[t].m, V::exp(V::sub(V::load(st + t * L), mv)), zero);
    put(g.nr * strip + t * L, e);
    sum1 = V::add(sum1, e);
  }
  const T total = V::hsum(V::add(sum0, sum1));
  *lse = mxs + std::log(total);
  *inv = T(1) / total;
}

#if defined(__AVX512F__)
// In-register transpose of a 16x16 float block (rows r[0..15] become columns).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}
#endif

}  // namespace
}  // namespace cogview::cpu::COGVIEW_ISA
