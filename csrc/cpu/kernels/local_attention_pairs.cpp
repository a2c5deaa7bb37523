// Local attention forward on bfloat16 dot products: compiled once per ISA, see kernels.h. Only the
// avx512 build has the code, enabled per function (target "avx512bf16"), so that build still runs
// on CPUs without it; the torch layer takes this path for bfloat16 inputs on CPUs that have it.
//
// The blocking is the strip kernel's (local_attention.cpp): groups of 8 queries of one row, their
// window's key rows as 16-key strips, scores in a small buffer, the masked softmax of
// local_attention_groups.h. What changes is the arithmetic: VDPBF16PS multiplies two bf16 pairs
// per 32-bit lane and sums both products into a float accumulator, so one instruction does the
// work of two float multiply-adds, and the packs stay in bf16 (half the bytes):
//   scores: a query's head_dim pairs are broadcast, keys are packed as [head_dim / 2][columns]
//           words (each word: the key's elements 2 dd and 2 dd + 1), so one vector holds one
//           head_dim pair of 16 keys; the scale is applied to the sums;
//   values: the probabilities are rounded to bf16 (as flash attention rounds P before its value
//           product) and read as pairs of neighbouring keys; values are packed as
//           [column pairs][head_dim] words (each word: element d of the two keys), so one vector
//           holds 16 head_dim elements of two keys. Pairs start at even padded columns; a
//           group's strip starts at one (tiles are an even number of key columns wide) and its
//           probabilities outside a query's window are exactly 0, so a block's columns can be
//           widened to whole pairs. The sum is normalised by the float sum of the unrounded
//           probabilities.
// Only the forward: the backward recomputes probabilities in float from the log-sum-exp.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__x86_64__)
#include <immintrin.h>
#define COGVIEW_PAIRS_CODE 1
#endif

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/local_attention_groups.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

#if defined(COGVIEW_PAIRS_CODE)
#define COGVIEW_BF16_DOT __attribute__((target("avx512bf16")))

constexpr int kL = 16;                      // float lanes = 32-bit words per vector
constexpr int kScoreM = 8, kScoreNV = 3;    // score tile: 8 queries x 3 key vectors
constexpr int kPvM = 2, kPvNDV = 4;         // value tile: 2 queries x up to 4 head_dim vectors

inline __m512bh as_pairs(__m512i x) { return (__m512bh)x; }

uint32_t load_word(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// s[m * sld + soff[j] + lane] = scale * sum_dd dot(q[m * qld + dd], kp[j][dd * kstride + lane]).
template <int M, int NV>
COGVIEW_BF16_DOT void score_tile(const uint32_t* __restrict q, int64_t qld, int64_t pairs,
                                 const uint32_t* const* kp, int64_t kstride, float scale, float* __restrict s,
                                 int64_t sld, const int64_t* soff) {
  __m512 acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_setzero_ps();
  }
  for (int64_t dd = 0; dd < pairs; ++dd) {
    __m512bh kv[NV];
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) kv[j] = as_pairs(_mm512_loadu_si512(kp[j] + dd * kstride));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512bh qb = as_pairs(_mm512_set1_epi32(static_cast<int>(q[m * qld + dd])));
#pragma GCC unroll 3
      for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], qb, kv[j]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 3
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(s + m * sld + soff[j], _mm512_mul_ps(acc[m][j], sc));
  }
}

// A run of key pairs: pair i's words at base + i * stride, its probabilities for query m at
// word coef[m * cld + col + i].
struct PairSegment {
  const uint32_t* base;
  int64_t stride;
  int64_t col;
  int64_t n;
};

// acc[m][j] += dot(coef pair of query m, value pair)[vector j] for one pair of keys.
template <int M, int NDV>
COGVIEW_BF16_DOT inline void add_pair(__m512 (&acc)[M][NDV], const uint32_t* row, const uint32_t* c, int64_t cld) {
  __m512bh vv[NDV];
#pragma GCC unroll 4
  for (int j = 0; j < NDV; ++j) vv[j] = as_pairs(_mm512_loadu_si512(row + j * kL));
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    const __m512bh p = as_pairs(_mm512_set1_epi32(static_cast<int>(c[m * cld])));
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], p, vv[j]);
  }
}

// o[m * old + d] = oscale[m] * sum_segments sum_i dot(coef pair, value pair)[d] for head_dim
// vectors [d0, d0 + NDV * 16). Even and odd pairs go to separate accumulators: with 2 queries x
// 2 vectors, one set would be 4 dependency chains, too few to cover the instruction's latency.
template <int M, int NDV>
COGVIEW_BF16_DOT void combine_tile(const PairSegment* segs, int nseg, const uint32_t* __restrict coef, int64_t cld,
                                   int64_t d0, const float* oscale, float* __restrict o, int64_t old) {
  __m512 even[M][NDV], odd[M][NDV];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) even[m][j] = odd[m][j] = _mm512_setzero_ps();
  }
  for (int g = 0; g < nseg; ++g) {
    const PairSegment& sg = segs[g];
    const uint32_t* row = sg.base + d0;
    const uint32_t* c = coef + sg.col;
    int64_t i = 0;
    for (; i + 1 < sg.n; i += 2, row += 2 * sg.stride) {
      add_pair<M, NDV>(even, row, c + i, cld);
      add_pair<M, NDV>(odd, row + sg.stride, c + i + 1, cld);
    }
    if (i < sg.n) add_pair<M, NDV>(even, row, c + i, cld);
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    const __m512 sc = _mm512_set1_ps(oscale[m]);
#pragma GCC unroll 4
    for (int j = 0; j < NDV; ++j) {
      _mm512_storeu_ps(o + m * old + d0 + j * kL, _mm512_mul_ps(_mm512_add_ps(even[m][j], odd[m][j]), sc));
    }
  }
}

using ScoreFn = void (*)(const uint32_t*, int64_t, int64_t, const uint32_t* const*, int64_t, float, float*,
                         int64_t, const int64_t*);
using CombineFn = void (*)(const PairSegment*, int, const uint32_t*, int64_t, int64_t, const float*, float*,
                           int64_t);

template <std::size_t... I>
constexpr std::array<ScoreFn, sizeof...(I)> score_table(std::index_sequence<I...>) {
  return {&score_tile<static_cast<int>(I) / kScoreNV + 1, static_cast<int>(I) % kScoreNV + 1>...};
}
template <std::size_t... I>
constexpr std::array<CombineFn, sizeof...(I)> combine_table(std::index_sequence<I...>) {
  return {&combine_tile<static_cast<int>(I) / kPvNDV + 1, static_cast<int>(I) % kPvNDV + 1>...};
}

void score(int m, int nv, const uint32_t* q, int64_t qld, int64_t pairs, const uint32_t* const* kp, int64_t kstride,
           float scale, float* s, int64_t sld, const int64_t* soff) {
  static constexpr auto table = score_table(std::make_index_sequence<kScoreM * kScoreNV>{});
  table[(m - 1) * kScoreNV + (nv - 1)](q, qld, pairs, kp, kstride, scale, s, sld, soff);
}

void combine(int64_t count, int64_t dp, const PairSegment* segs, int nseg, const uint32_t* coef, int64_t cld,
             const float* oscale, float* o, int64_t old) {
  static constexpr auto table = combine_table(std::make_index_sequence<kPvM * kPvNDV>{});
  const int64_t nvec = dp / kL;
  for (int64_t m0 = 0; m0 < count; m0 += kPvM) {
    const int mm = static_cast<int>(std::min<int64_t>(kPvM, count - m0));
    for (int64_t v0 = 0; v0 < nvec; v0 += kPvNDV) {
      const int nd = static_cast<int>(std::min<int64_t>(kPvNDV, nvec - v0));
      table[(mm - 1) * kPvNDV + (nd - 1)](segs, nseg, coef + m0 * cld, cld, v0 * kL, oscale + m0, o + m0 * old, old);
    }
  }
}

// ---- packs ------------------------------------------------------------------------------------

// Key row `src` (cols keys, element stride sn) -> words [dd][pad + c] of a row_width-wide pack.
void pack_transposed_pairs(const uint16_t* src, int64_t sn, int64_t cols, int64_t half, int64_t pad,
                           int64_t row_width, uint32_t* dst) {
  for (int64_t dd = 0; dd < half; ++dd) {
    uint32_t* out = dst + dd * row_width;
    std::fill(out, out + pad, 0u);
    std::fill(out + pad + cols, out + row_width, 0u);
  }
  for (int64_t c0 = 0; c0 < cols; c0 += kL) {
    const int64_t nc = std::min<int64_t>(kL, cols - c0);
    int64_t dd0 = 0;
    if (nc == kL) {  // 16 keys x 16 words at a time, transposed in registers
      for (; dd0 + kL <= half; dd0 += kL) {
        __m512 r[kL];
        for (int i = 0; i < kL; ++i) r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(src + (c0 + i) * sn + 2 * dd0));
        transpose16(r);
        for (int j = 0; j < kL; ++j) {
          _mm512_storeu_si512(dst + (dd0 + j) * row_width + pad + c0, _mm512_castps_si512(r[j]));
        }
      }
    }
    for (int64_t dd = dd0; dd < half; ++dd) {
      uint32_t* out = dst + dd * row_width + pad + c0;
      for (int64_t c = 0; c < nc; ++c) out[c] = load_word(src + (c0 + c) * sn + 2 * dd);
    }
  }
}

// 16 elements of a key row from d (zero beyond depth or for a missing key), widened to words.
__m512i widen(const uint16_t* key, int64_t d, int64_t depth) {
  if (key == nullptr || d >= depth) return _mm512_setzero_si512();
  const __mmask16 keep = depth - d >= kL ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (depth - d)) - 1);
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, key + d));
}

// Key row `src` -> pair_cols x dp words: word (j, d) = element d of the keys at columns 2 j - pad
// (low half) and 2 j + 1 - pad (high half).
void pack_value_pairs(const uint16_t* src, int64_t sn, int64_t cols, int64_t depth, int64_t pad, int64_t pair_cols,
                      int64_t dp, uint32_t* dst) {
  for (int64_t j = 0; j < pair_cols; ++j) {
    const int64_t ca = 2 * j - pad, cb = ca + 1;
    const uint16_t* ka = ca >= 0 && ca < cols ? src + ca * sn : nullptr;
    const uint16_t* kb = cb >= 0 && cb < cols ? src + cb * sn : nullptr;
    uint32_t* out = dst + j * dp;
    for (int64_t d = 0; d < dp; d += kL) {
      const __m512i w = _mm512_or_si512(widen(ka, d, depth), _mm512_slli_epi32(widen(kb, d, depth), 16));
      _mm512_storeu_si512(out + d, w);
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------

struct PairScratch {
  int64_t sld = 0, half = 0;
  std::vector<uint32_t> q;   // [kGroup][half] query pairs
  std::vector<float> s;      // [kGroup][sld] scores (the text's with text_bias added)
  std::vector<uint16_t> p;   // [kGroup][sld] exp(s - max), rounded to bf16
  std::vector<float> o;      // [kGroup][dp]
  float lse[kGroup] = {}, inv[kGroup] = {};
  PairScratch(const LocalAttentionShape& shape, const LocalAttentionPlan& plan)
      : sld(shape.win_h * plan.strip + plan.tpad), half(shape.head_dim / 2), q(kGroup * half, 0u),
        s(kGroup * sld, 0.f), p(kGroup * sld, 0), o(kGroup * plan.dp, 0.f) {}
};

// Query rows [y0, y1) of tile column tc of head (b, h).
COGVIEW_BF16_DOT void forward_tile(const LocalAttentionForwardArgs& a, PairScratch& sc, GroupMasks<float>& mk,
                                   std::vector<PairSegment>& segs, int64_t b, int64_t h, int64_t y0, int64_t y1,
                                   int64_t tc) {
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const int64_t n_q = s.q_h * s.q_w, depth = s.head_dim, half = sc.half, dp = p.dp, T_ = s.text;
  const int64_t sw = s.q_w / s.k_w, sld = sc.sld, nv = p.strip / kL;
  const int64_t key_row = half * p.row_width, value_row = p.pair_cols * dp;
  const float scale = static_cast<float>(a.scale), bias = static_cast<float>(a.text_bias);
  const int64_t bh = b * a.heads + h;
  const uint16_t* q_bh = static_cast<const uint16_t*>(a.q) + b * a.q_sb + h * a.q_sh;
  const uint32_t* kt_bh = static_cast<const uint32_t*>(a.kt) + b * a.kt_sb + h * a.kt_sh;
  const uint32_t* v_bh = static_cast<const uint32_t*>(a.v) + b * a.v_sb + h * a.v_sh;
  const uint32_t* tkt = T_ > 0 ? static_cast<const uint32_t*>(a.text_kt) + b * a.tk_sb + h * a.tk_sh : nullptr;
  const uint32_t* tv = T_ > 0 ? static_cast<const uint32_t*>(a.text_v) + b * a.tv_sb + h * a.tv_sh : nullptr;
  char* out_bh = static_cast<char*>(a.out) + bh * n_q * depth * elem_size(a.q_type);
  float* lse_bh = static_cast<float*>(a.lse) + bh * n_q;
  const uint32_t* kp[kScoreNV];
  int64_t soff[kScoreNV];
  const uint32_t* probs = reinterpret_cast<const uint32_t*>(sc.p.data());  // pairs: sld / 2 words per query

  const int64_t w0 = tc * p.tile_w, w1 = std::min(s.q_w, w0 + p.tile_w);
  const int64_t c0 = w0 / sw - s.win_w / 2;  // c0 + pad = w0 / sw: even, a whole number of tiles
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x0 = w0; x0 < w1; x0 += kGroup) {
      const Group g = make_group(s, c0, y, x0, std::min<int64_t>(kGroup, w1 - x0));
      mk.set(g);
      for (int64_t m = 0; m < g.count; ++m) {  // (a word loop: a memcpy of this size is a library call)
        const uint16_t* src = q_bh + (y * s.q_w + x0 + m) * a.q_sn;
        uint32_t* dst = sc.q.data() + m * half;
        for (int64_t dd = 0; dd < half; ++dd) dst[dd] = load_word(src + 2 * dd);
      }
      // scores of the window's strips, then of the text keys
      const int mm = static_cast<int>(g.count);
      const int64_t nvec = g.nr * nv;
      for (int64_t f = 0; f < nvec; f += kScoreNV) {
        const int cnt = static_cast<int>(std::min<int64_t>(kScoreNV, nvec - f));
        for (int j = 0; j < cnt; ++j) {
          const int64_t ri = (f + j) / nv, v = (f + j) % nv;
          kp[j] = kt_bh + (g.r_lo + ri) * key_row + p.pad + g.c0 + v * kL;
          soff[j] = (f + j) * kL;
        }
        score(mm, cnt, sc.q.data(), half, half, kp, p.row_width, scale, sc.s.data(), sld, soff);
      }
      for (int64_t f = 0; f < p.tpad / kL; f += kScoreNV) {
        const int cnt = static_cast<int>(std::min<int64_t>(kScoreNV, p.tpad / kL - f));
        for (int j = 0; j < cnt; ++j) {
          kp[j] = tkt + (f + j) * kL;
          soff[j] = g.nr * p.strip + (f + j) * kL;
        }
        score(mm, cnt, sc.q.data(), half, half, kp, p.tpad, scale, sc.s.data(), sld, soff);
      }
      for (int64_t m = 0; m < g.count; ++m) {
        softmax_masked<float, true>(g, mk, m, p.strip, bias, sc.s.data() + m * sld, &sc.lse[m], &sc.inv[m],
                                    sc.p.data() + m * sld);
      }
      // out = P V / sum per block of queries, over the union of their windows widened to pairs
      for (int64_t m0 = 0; m0 < g.count; m0 += kPvM) {
        const int64_t cnt = std::min<int64_t>(kPvM, g.count - m0);
        const BlockCols bc = block_cols(g, m0, cnt);
        const int64_t lo = bc.lo & ~int64_t{1};
        int nseg = 0;
        for (int64_t ri = 0; ri < g.nr; ++ri) {
          const int64_t hi = round_up(block_hi(g, bc, ri), 2);
          segs[nseg++] = {v_bh + (g.r_lo + ri) * value_row + (g.c0 + p.pad + lo) / 2 * dp, dp,
                          (ri * p.strip + lo) / 2, (hi - lo) / 2};
        }
        if (T_ > 0) segs[nseg++] = {tv, dp, g.nr * p.strip / 2, (T_ + 1) / 2};
        combine(cnt, dp, segs.data(), nseg, probs + m0 * (sld / 2), sld / 2, sc.inv + m0, sc.o.data() + m0 * dp, dp);
      }
      const int64_t n0 = y * s.q_w + x0;
      for (int64_t m = 0; m < g.count; ++m) {
        store_row(out_bh + (n0 + m) * depth * elem_size(a.q_type), sc.o.data() + m * dp, a.q_type, depth);
        lse_bh[n0 + m] = sc.lse[m];
      }
    }
  }
}
#endif  // COGVIEW_PAIRS_CODE

}  // namespace

bool local_attention_pack_pairs(const LocalAttentionPackArgs& a, int64_t begin, int64_t end) {
#if defined(COGVIEW_PAIRS_CODE)
  const int64_t half = a.head_dim / 2;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / a.rows, r = item % a.rows;
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const uint16_t* src = static_cast<const uint16_t*>(a.src) + b * a.sb + h * a.sh + r * a.cols * a.sn;
    if (a.transposed != nullptr) {
      pack_transposed_pairs(src, a.sn, a.cols, half, a.pad, a.row_width,
                            static_cast<uint32_t*>(a.transposed) + item * half * a.row_width);
    }
    if (a.rowmajor != nullptr) {
      pack_value_pairs(src, a.sn, a.cols, a.head_dim, a.pad, a.pair_cols, a.dp,
                       static_cast<uint32_t*>(a.rowmajor) + item * a.pair_cols * a.dp);
    }
  }
  return true;
#else
  (void)a;
  (void)begin;
  (void)end;
  return false;
#endif
}

bool local_attention_forward_pairs(const LocalAttentionForwardArgs& a, int64_t begin, int64_t end, void* scratch) {
#if defined(COGVIEW_PAIRS_CODE)
  const LocalAttentionShape& s = a.shape;
  const LocalAttentionPlan& p = a.plan;
  const int64_t tile_rows = (s.q_h + p.tile_h - 1) / p.tile_h, tile_cols = (s.q_w + p.tile_w - 1) / p.tile_w;
  PairScratch sc(s, p);
  GroupMasks<float> mk(p, s.text);
  std::vector<PairSegment> segs(s.win_h + 1);
  if (!a.per_head) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tc = task % tile_cols, tr = (task / tile_cols) % tile_rows, bh = task / (tile_cols * tile_rows);
      const int64_t y0 = tr * p.tile_h, y1 = std::min(s.q_h, y0 + p.tile_h);
      forward_tile(a, sc, mk, segs, bh / a.heads, bh % a.heads, y0, y1, tc);
    }
    return true;
  }
  // One head per task: its k and v pair packs are built in this thread's scratch (they stay in
  // L2 while the head's tiles run).
  const int64_t half = s.head_dim / 2, key_words = s.k_h * half * p.row_width;
  uint32_t* kt = static_cast<uint32_t*>(scratch);
  uint32_t* vp = kt + key_words;
  LocalAttentionForwardArgs la = a;
  la.kt = kt;
  la.v = vp;
  la.kt_sb = la.kt_sh = la.v_sb = la.v_sh = 0;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const uint16_t* k = static_cast<const uint16_t*>(a.k_src.data) + b * a.k_src.sb + h * a.k_src.sh;
    const uint16_t* v = static_cast<const uint16_t*>(a.v_src.data) + b * a.v_src.sb + h * a.v_src.sh;
    for (int64_t r = 0; r < s.k_h; ++r) {
      pack_transposed_pairs(k + r * s.k_w * a.k_src.sn, a.k_src.sn, s.k_w, half, p.pad, p.row_width,
                            kt + r * half * p.row_width);
      pack_value_pairs(v + r * s.k_w * a.v_src.sn, a.v_src.sn, s.k_w, s.head_dim, p.pad, p.pair_cols, p.dp,
                       vp + r * p.pair_cols * p.dp);
    }
    for (int64_t tr = 0; tr < tile_rows; ++tr) {
      const int64_t y0 = tr * p.tile_h, y1 = std::min(s.q_h, y0 + p.tile_h);
      for (int64_t tc = 0; tc < tile_cols; ++tc) forward_tile(la, sc, mk, segs, b, h, y0, y1, tc);
    }
  }
  return true;
#else
  (void)a;
  (void)begin;
  (void)end;
  (void)scratch;
  return false;
#endif
}

}  // namespace cogview::cpu::COGVIEW_ISA
