// decode_attention chunk tasks and merge: compiled once per ISA, see kernels.h.
//
// One pass over each chunk of the cache: keys and values are read once, in blocks of kBlock rows
// that stay in L1 while every query of the sequence uses them. Per block and query: the scores
// (four keys' dot products side by side, lanes folded as a tree), one rescale of the running
// output (online softmax), the weights through a vectorized exp, and the value rows accumulated
// four (generic) or two (AVX-512) at a time. With AVX-512, float accumulation and head_dim 64 or
// 128, a hand-vectorized block keeps q and the output in registers. The hardware prefetchers
// handle the sequential streams (software prefetch measured no better).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec_math.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

constexpr int64_t kBlock = 32;

// Storage types of the cache, so that each (accumulator, cache) pair gets its own typed loops.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};
template <ElemType T>
struct Storage;
template <>
struct Storage<ElemType::f32> {
  using type = float;
};
template <>
struct Storage<ElemType::f64> {
  using type = double;
};
template <>
struct Storage<ElemType::bf16> {
  using type = bf16_t;
};
template <>
struct Storage<ElemType::f16> {
  using type = f16_t;
};

template <typename acc_t>
inline acc_t to_acc(float v) { return static_cast<acc_t>(v); }
template <typename acc_t>
inline acc_t to_acc(double v) { return static_cast<acc_t>(v); }
template <typename acc_t>
inline acc_t to_acc(bf16_t v) { return static_cast<acc_t>(bf16_to_float(v.bits)); }
template <typename acc_t>
inline acc_t to_acc(f16_t v) { return static_cast<acc_t>(f16_to_float(v.bits)); }

// The inner loops, on restrict-qualified typed pointers so that they vectorize. Dot products
// keep kLanes partial sums per key in a small array and fold it in halves (a log-depth tree);
// a plain `omp simd reduction` lets GCC fold the lanes one by one, a chain of 16 dependent adds.
template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);  // one AVX-512 register, two AVX2 ones

template <typename acc_t>
inline acc_t fold(acc_t* __restrict p) {
#pragma omp simd
  for (int l = 0; l < kLanes<acc_t> / 2; ++l) p[l] += p[l + kLanes<acc_t> / 2];
#pragma omp simd
  for (int l = 0; l < kLanes<acc_t> / 4; ++l) p[l] += p[l + kLanes<acc_t> / 4];
  acc_t sum = 0;
  for (int l = 0; l < kLanes<acc_t> / 4; ++l) sum += p[l];
  return sum;
}

// Scores of four keys at once (independent chains; q is read once for the four).
template <typename acc_t, typename T>
inline void dot4(const acc_t* __restrict q, const T* __restrict k0, const T* __restrict k1,
                 const T* __restrict k2, const T* __restrict k3, int64_t d, acc_t* __restrict out) {
  constexpr int L = kLanes<acc_t>;
  alignas(64) acc_t p0[L] = {}, p1[L] = {}, p2[L] = {}, p3[L] = {};
  int64_t e = 0;
  for (; e + L <= d; e += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      const acc_t qe = q[e + l];
      p0[l] += qe * to_acc<acc_t>(k0[e + l]);
      p1[l] += qe * to_acc<acc_t>(k1[e + l]);
      p2[l] += qe * to_acc<acc_t>(k2[e + l]);
      p3[l] += qe * to_acc<acc_t>(k3[e + l]);
    }
  }
  for (int64_t l = 0; e + l < d; ++l) {
    const acc_t qe = q[e + l];
    p0[l] += qe * to_acc<acc_t>(k0[e + l]);
    p1[l] += qe * to_acc<acc_t>(k1[e + l]);
    p2[l] += qe * to_acc<acc_t>(k2[e + l]);
    p3[l] += qe * to_acc<acc_t>(k3[e + l]);
  }
  out[0] = fold(p0);
  out[1] = fold(p1);
  out[2] = fold(p2);
  out[3] = fold(p3);
}

template <typename acc_t, typename T>
inline acc_t dot(const acc_t* __restrict q, const T* __restrict k, int64_t d) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < d; ++e) sum += q[e] * to_acc<acc_t>(k[e]);
  return sum;
}

// y += p0 v0 + p1 v1 + p2 v2 + p3 v3: one pass over y for four value rows.
template <typename acc_t, typename T>
inline void axpy4(acc_t* __restrict y, const acc_t* __restrict p, const T* __restrict v0, const T* __restrict v1,
                  const T* __restrict v2, const T* __restrict v3, int64_t d) {
  const acc_t a0 = p[0], a1 = p[1], a2 = p[2], a3 = p[3];
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) {
    y[e] += (a0 * to_acc<acc_t>(v0[e]) + a1 * to_acc<acc_t>(v1[e])) +
            (a2 * to_acc<acc_t>(v2[e]) + a3 * to_acc<acc_t>(v3[e]));
  }
}

template <typename acc_t, typename T>
inline void axpy(acc_t* __restrict y, acc_t p, const T* __restrict v, int64_t d) {
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) y[e] += p * to_acc<acc_t>(v[e]);
}

template <typename acc_t>
inline void scale_by(acc_t* __restrict y, acc_t alpha, int64_t d) {
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) y[e] *= alpha;
}

// s[j] = exp(s[j] - top) for j < count; returns their sum.
template <typename acc_t>
inline acc_t exp_shifted(acc_t* __restrict s, acc_t top, int64_t count) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < count; ++j) {
    s[j] = exp_nonpositive(s[j] - top);
    sum += s[j];
  }
  return sum;
}


// What one block of keys needs besides the rows and the running state.
template <typename acc_t>
struct BlockArgs {
  int64_t j0;        // position of the block's first key
  int64_t text_len;  // keys at positions < text_len get `bias`
  acc_t scale, bias;
  int64_t k_stride, v_stride, d;
};

// Scale + text bias on the raw dot products; returns max(m, the block's max).
template <typename acc_t>
inline acc_t finish_scores(const BlockArgs<acc_t>& a, acc_t* __restrict s, int64_t count, acc_t m) {
  const int64_t boosted = std::clamp<int64_t>(a.text_len - a.j0, 0, count);
  acc_t block_max = m;
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < count; ++j) {
    s[j] = s[j] * a.scale + (j < boosted ? a.bias : acc_t(0));
    block_max = s[j] > block_max ? s[j] : block_max;
  }
  return block_max;
}

// One block of `count` <= kBlock keys for one query: scores, online-softmax update of the
// running max m, sum l and (unnormalized) output acc, then the values.
template <typename acc_t, typename kv_t>
void attend_block(const BlockArgs<acc_t>& a, const acc_t* __restrict qi, const kv_t* k_rows, const kv_t* v_rows,
                  int64_t count, acc_t& m, acc_t& l, acc_t* __restrict acc) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  alignas(64) acc_t s[kBlock];
  const int64_t ks = a.k_stride, vs = a.v_stride, d = a.d;
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const kv_t* kr = k_rows + j * ks;
    dot4(qi, kr, kr + ks, kr + 2 * ks, kr + 3 * ks, d, s + j);
  }
  for (; j < count; ++j) s[j] = dot(qi, k_rows + j * ks, d);
  const acc_t m_new = finish_scores(a, s, count, m);
  if (m_new == kNegInf) return;  // only -inf logits so far (non-finite inputs)
  const acc_t sum = exp_shifted(s, m_new, count);
  if (m_new != m) {
    const acc_t alpha = exp_nonpositive(m - m_new);
    l *= alpha;
    scale_by(acc, alpha, d);
    m = m_new;
  }
  l += sum;
  for (j = 0; j + 4 <= count; j += 4) {
    const kv_t* vr = v_rows + j * vs;
    axpy4(acc, s + j, vr, vr + vs, vr + 2 * vs, vr + 3 * vs, d);
  }
  for (; j < count; ++j) axpy(acc, s[j], v_rows + j * vs, d);
}

#if defined(__AVX512F__)
// AVX-512 blocks for float accumulation and head_dim = 16 * NC: q and the output stay in
// registers, four keys' dot products run side by side, and two sets of output accumulators (even
// and odd keys) halve the FMA dependency chains.
template <ElemType KV>
inline __m512 load16(const void* p) {
  if constexpr (KV == ElemType::f32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (KV == ElemType::bf16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  }
}

template <int NC, ElemType KV>
void attend_block_avx512(const BlockArgs<float>& a, const float* __restrict qi, const void* k_rows_v,
                         const void* v_rows_v, int64_t count, float& m, float& l, float* __restrict acc) {
  using kv_t = typename Storage<KV>::type;
  const kv_t* k_rows = static_cast<const kv_t*>(k_rows_v);
  const kv_t* v_rows = static_cast<const kv_t*>(v_rows_v);
  alignas(64) float s[kBlock];
  const int64_t ks = a.k_stride, vs = a.v_stride;
  __m512 q[NC];
  for (int c = 0; c < NC; ++c) q[c] = _mm512_loadu_ps(qi + 16 * c);
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const kv_t* k0 = k_rows + j * ks;
    const kv_t* k1 = k0 + ks;
    const kv_t* k2 = k1 + ks;
    const kv_t* k3 = k2 + ks;
    __m512 s0 = _mm512_mul_ps(q[0], load16<KV>(k0));
    __m512 s1 = _mm512_mul_ps(q[0], load16<KV>(k1));
    __m512 s2 = _mm512_mul_ps(q[0], load16<KV>(k2));
    __m512 s3 = _mm512_mul_ps(q[0], load16<KV>(k3));
    for (int c = 1; c < NC; ++c) {
      s0 = _mm512_fmadd_ps(q[c], load16<KV>(k0 + 16 * c), s0);
      s1 = _mm512_fmadd_ps(q[c], load16<KV>(k1 + 16 * c), s1);
      s2 = _mm512_fmadd_ps(q[c], load16<KV>(k2 + 16 * c), s2);
      s3 = _mm512_fmadd_ps(q[c], load16<KV>(k3 + 16 * c), s3);
    }
    s[j] = _mm512_reduce_add_ps(s0);
    s[j + 1] = _mm512_reduce_add_ps(s1);
    s[j + 2] = _mm512_reduce_add_ps(s2);
    s[j + 3] = _mm512_reduce_add_ps(s3);
  }
  for (; j < count; ++j) {
    const kv_t* k0 = k_rows + j * ks;
    __m512 s0 = _mm512_mul_ps(q[0], load16<KV>(k0));
    for (int c = 1; c < NC; ++c) s0 = _mm512_fmadd_ps(q[c], load16<KV>(k0 + 16 * c), s0);
    s[j] = _mm512_reduce_add_ps(s0);
  }
  const float m_new = finish_scores(a, s, count, m);
  if (m_new == -std::numeric_limits<float>::infinity()) return;
  const float sum = exp_shifted(s, m_new, count);
  const float alpha = m_new != m ? exp_nonpositive(m - m_new) : 1.0f;
  l = l * alpha + sum;
  m = m_new;
  __m512 o0[NC], o1[NC];
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int c = 0; c < NC; ++c) {
    o0[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), scale);
    o1[c] = _mm512_setzero_ps();
  }
  for (j = 0; j + 2 <= count; j += 2) {
    const kv_t* v0 = v_rows + j * vs;
    const kv_t* v1 = v0 + vs;
    const __m512 p0 = _mm512_set1_ps(s[j]), p1 = _mm512_set1_ps(s[j + 1]);
    for (int c = 0; c < NC; ++c) {
      o0[c] = _mm512_fmadd_ps(p0, load16<KV>(v0 + 16 * c), o0[c]);
      o1[c] = _mm512_fmadd_ps(p1, load16<KV>(v1 + 16 * c), o1[c]);
    }
  }
  if (j < count) {
    const kv_t* v0 = v_rows + j * vs;
    const __m512 p0 = _mm512_set1_ps(s[j]);
    for (int c = 0; c < NC; ++c) o0[c] = _mm512_fmadd_ps(p0, load16<KV>(v0 + 16 * c), o0[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + 16 * c, _mm512_add_ps(o0[c], o1[c]));
}

// ---- n = 1, AVX-512, float accumulation: a whole chunk with q and the output in registers ----
//
// Groups of 16 keys: the 16 dot products run side by side (4 or 8 FMAs each), and one transpose-add
// tree folds the 16 accumulators into one vector of 16 scores (15 adds, 30 shuffles, instead of 16
// horizontal reductions). The online softmax then works on that vector: one max reduction, one
// vector exp, a rescale of the register-held output only when the running max grows; the value
// rows are accumulated two at a time into two sets of accumulators. Rows past the end of a group
// are never read (their pointers repeat the group's last row, and their scores are masked).

// Lane j of the result = the sum of the 16 lanes of a[j].
inline __m512 sum16x16(__m512 (&a)[16]) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: a[2i] in floats 0 and 2, a[2i+1] in 1 and 3
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: a[4i .. 4i+3] in floats 0..3
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
    y[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // y[i] holds keys 4i..4i+3 in every 128-bit lane (partial sums over that lane's quarter of d)
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

// Software prefetch distance: about one page ahead. The hardware streamers stop at 4 KiB page
// boundaries, and each (b, h) cache is a stream of whole pages (measured: bf16 caches gain ~1.3x).
constexpr int64_t kPrefetchBytes = 4096;

template <int NC, ElemType KV>
void single_query_chunk_avx512(const BlockArgs<float>& a, const float* __restrict qi, const void* k_rows_v,
                               const void* v_rows_v, int64_t count, float& m_out, float& l_out,
                               float* __restrict acc) {
  using kv_t = typename Storage<KV>::type;
  const kv_t* k_rows = static_cast<const kv_t*>(k_rows_v);
  const kv_t* v_rows = static_cast<const kv_t*>(v_rows_v);
  const int64_t ks = a.k_stride, vs = a.v_stride;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  __m512 q[NC], o0[NC], o1[NC];
  for (int c = 0; c < NC; ++c) {
    q[c] = _mm512_loadu_ps(qi + 16 * c);
    o0[c] = _mm512_setzero_ps();
    o1[c] = _mm512_setzero_ps();
  }
  const __m512 scale = _mm512_set1_ps(a.scale), bias = _mm512_set1_ps(a.bias);
  float m = kNegInf, l = 0.0f;
  alignas(64) float p[16];
  const int64_t ahead = (kPrefetchBytes / (NC * 16 * int64_t(sizeof(kv_t))) + 15) / 16 * 16;
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, count - j0);
    const kv_t* kg = k_rows + j0 * ks;
    if (ahead > 0 && j0 + ahead < count) {  // the rows `ahead` keys on
      const int64_t pend = std::min<int64_t>(16, count - j0 - ahead);
      const char* kp = reinterpret_cast<const char*>(kg + ahead * ks);
      const char* vp = reinterpret_cast<const char*>(v_rows + (j0 + ahead) * vs);
      for (int64_t r = 0; r < pend; ++r) {
        for (int64_t off = 0; off < NC * 16 * int64_t(sizeof(kv_t)); off += 64) {
          _mm_prefetch(kp + r * ks * sizeof(kv_t) + off, _MM_HINT_T0);
          _mm_prefetch(vp + r * vs * sizeof(kv_t) + off, _MM_HINT_T0);
        }
      }
    }
    __m512 s[16];
    if (cnt == 16) {
      for (int j = 0; j < 16; ++j) s[j] = _mm512_mul_ps(q[0], load16<KV>(kg + j * ks));
      for (int c = 1; c < NC; ++c) {
        for (int j = 0; j < 16; ++j) s[j] = _mm512_fmadd_ps(q[c], load16<KV>(kg + j * ks + 16 * c), s[j]);
      }
    } else {
      for (int j = 0; j < 16; ++j) {
        const kv_t* kr = kg + std::min<int64_t>(j, cnt - 1) * ks;
        s[j] = _mm512_mul_ps(q[0], load16<KV>(kr));
        for (int c = 1; c < NC; ++c) s[j] = _mm512_fmadd_ps(q[c], load16<KV>(kr + 16 * c), s[j]);
      }
    }
    // scores: scale, text bias for positions < text_len, -inf past the group's end
    const int64_t boosted = std::clamp<int64_t>(a.text_len - (a.j0 + j0), 0, 16);
    __m512 sc = _mm512_mul_ps(sum16x16(s), scale);
    const __mmask16 boost = static_cast<__mmask16>((1u << boosted) - 1u);
    sc = _mm512_mask_add_ps(sc, boost, sc, bias);
    const __mmask16 live = static_cast<__mmask16>((1u << cnt) - 1u);
    sc = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), live, sc);
    const float group_max = _mm512_reduce_max_ps(sc);
    const float m_new = group_max > m ? group_max : m;
    if (m_new == kNegInf) continue;  // only -inf logits so far (non-finite inputs)
    const __m512 w = exp_nonpositive16(_mm512_sub_ps(sc, _mm512_set1_ps(m_new)));
    if (m_new != m) {
      const float alpha = exp_nonpositive(m - m_new);
      const __m512 al = _mm512_set1_ps(alpha);
      l *= alpha;
      for (int c = 0; c < NC; ++c) {
        o0[c] = _mm512_mul_ps(o0[c], al);
        o1[c] = _mm512_mul_ps(o1[c], al);
      }
      m = m_new;
    }
    l += _mm512_reduce_add_ps(w);
    _mm512_store_ps(p, w);
    const kv_t* vg = v_rows + j0 * vs;
    int j = 0;
    for (; j + 2 <= cnt; j += 2) {
      const kv_t* v0 = vg + j * vs;
      const kv_t* v1 = v0 + vs;
      const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
      for (int c = 0; c < NC; ++c) {
        o0[c] = _mm512_fmadd_ps(p0, load16<KV>(v0 + 16 * c), o0[c]);
        o1[c] = _mm512_fmadd_ps(p1, load16<KV>(v1 + 16 * c), o1[c]);
      }
    }
    if (j < cnt) {
      const kv_t* v0 = vg + j * vs;
      const __m512 p0 = _mm512_set1_ps(p[j]);
      for (int c = 0; c < NC; ++c) o0[c] = _mm512_fmadd_ps(p0, load16<KV>(v0 + 16 * c), o0[c]);
    }
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + 16 * c, _mm512_add_ps(o0[c], o1[c]));
  m_out = m;
  l_out = l;
}
#endif

// A specialised block function for this (accumulator, cache type, head_dim), or nullptr.
template <typename acc_t, typename kv_t>
using FastBlock = void (*)(const BlockArgs<acc_t>&, const acc_t* __restrict, const void*, const void*, int64_t,
                           acc_t&, acc_t&, acc_t* __restrict);

template <typename acc_t, ElemType KV>
FastBlock<acc_t, typename Storage<KV>::type> fast_block(int64_t d) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && KV != ElemType::f64) {
    if (d == 64) return &attend_block_avx512<4, KV>;
    if (d == 128) return &attend_block_avx512<8, KV>;
  }
#endif
  (void)d;
  return nullptr;
}

// The whole-chunk single-query function for this (accumulator, cache type, head_dim), or nullptr.
template <typename acc_t>
using SingleChunk = FastBlock<acc_t, void>;

template <typename acc_t, ElemType KV>
SingleChunk<acc_t> single_chunk(int64_t d) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && KV != ElemType::f64) {
    if (d == 32) return &single_query_chunk_avx512<2, KV>;
    if (d == 64) return &single_query_chunk_avx512<4, KV>;
    if (d == 128) return &single_query_chunk_avx512<8, KV>;
  }
#endif
  (void)d;
  return nullptr;
}

template <typename acc_t, ElemType KV>
void chunk_tasks(const DecodeAttentionArgs& a, const int64_t* tasks, int64_t begin, int64_t end) {
  using kv_t = typename Storage<KV>::type;
  const int64_t d = a.dim, n = a.n;
  const int64_t q_bytes = elem_size(a.q_type), out_bytes = elem_size(a.out_type);
  std::unique_ptr<acc_t[]> q_store(new acc_t[n * d]), acc_store(new acc_t[n * d]);
  std::unique_ptr<acc_t[]> stats(new acc_t[2 * n]);
  acc_t* __restrict q = q_store.get();
  acc_t* __restrict acc = acc_store.get();
  acc_t* __restrict m = stats.get();
  acc_t* __restrict l = m + n;
  const acc_t scale = static_cast<acc_t>(a.scale), bias = static_cast<acc_t>(a.text_bias);
  const auto fast = fast_block<acc_t, KV>(d);
  const auto single = single_chunk<acc_t, KV>(d);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = tasks[3 * t], h = tasks[3 * t + 1], c = tasks[3 * t + 2];
    const int64_t len = a.lengths[b];
    const int64_t chunks = (len + a.chunk - 1) / a.chunk;
    const int64_t c0 = c * a.chunk, c1 = std::min(len, c0 + a.chunk);
    for (int64_t i = 0; i < n; ++i) {
      load_row(q + i * d,
               static_cast<const char*>(a.q) + (b * a.q_stride_b + h * a.q_stride_h + i * a.q_stride_i) * q_bytes,
               a.q_type, d);
      m[i] = kNegInf;
      l[i] = 0;
    }
    for (int64_t e = 0; e < n * d; ++e) acc[e] = 0;
    const kv_t* k_base = static_cast<const kv_t*>(a.k) + b * a.k_stride_b + h * a.k_stride_h;
    const kv_t* v_base = static_cast<const kv_t*>(a.v) + b * a.v_stride_b + h * a.v_stride_h;

    if (single != nullptr && n == 1) {  // the one query sees the whole chunk (c1 <= len)
      const BlockArgs<acc_t> blk{c0, a.text_len, scale, bias, a.k_stride_pos, a.v_stride_pos, d};
      single(blk, q, k_base + c0 * a.k_stride_pos, v_base + c0 * a.v_stride_pos, c1 - c0, m[0], l[0], acc);
    } else {
      for (int64_t j0 = c0; j0 < c1; j0 += kBlock) {
        const int64_t j1 = std::min(c1, j0 + kBlock);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t last = len - n + i;  // query i sees positions <= last
          const int64_t count = std::min(j1, last + 1) - j0;
          if (count <= 0) continue;
          const kv_t* k_rows = k_base + j0 * a.k_stride_pos;
          const kv_t* v_rows = v_base + j0 * a.v_stride_pos;
          const BlockArgs<acc_t> blk{j0, a.text_len, scale, bias, a.k_stride_pos, a.v_stride_pos, d};
          if (fast != nullptr) {
            fast(blk, q + i * d, k_rows, v_rows, count, m[i], l[i], acc + i * d);
          } else {
            attend_block(blk, q + i * d, k_rows, v_rows, count, m[i], l[i], acc + i * d);
          }
        }
      }
    }

    if (chunks == 1) {
      for (int64_t i = 0; i < n; ++i) {
        acc_t* acc_i = acc + i * d;
        scale_by(acc_i, acc_t(1) / l[i], d);
        store_row(static_cast<char*>(a.out) + (((b * a.heads + h) * n) + i) * d * out_bytes, acc_i,
                  a.out_type, d);
      }
    } else {
      acc_t* slot = static_cast<acc_t*>(a.partials) + (a.chunk_base[b] + h * chunks + c) * n * (d + 2);
      for (int64_t i = 0; i < n; ++i) {
        acc_t* dst = slot + i * (d + 2);
        std::memcpy(dst, acc + i * d, d * sizeof(acc_t));
        dst[d] = m[i];
        dst[d + 1] = l[i];
      }
    }
  }
}

template <typename acc_t>
void merge(const DecodeAttentionArgs& a, const int64_t* pairs, int64_t begin, int64_t end) {
  const int64_t d = a.dim, n = a.n, out_bytes = elem_size(a.out_type);
  std::unique_ptr<acc_t[]> num(new acc_t[d]);
  const auto* partials = static_cast<const acc_t*>(a.partials);
  for (int64_t p = begin; p < end; ++p) {
    const int64_t b = pairs[2 * p], h = pairs[2 * p + 1];
    const int64_t chunks = (a.lengths[b] + a.chunk - 1) / a.chunk;
    const acc_t* first = partials + (a.chunk_base[b] + h * chunks) * n * (d + 2);
    for (int64_t i = 0; i < n; ++i) {
      acc_t top = -std::numeric_limits<acc_t>::infinity();
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t mc = first[(c * n + i) * (d + 2) + d];
        top = mc > top ? mc : top;
      }
      acc_t den = 0;
      for (int64_t e = 0; e < d; ++e) num[e] = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t* part = first + (c * n + i) * (d + 2);
        if (!(part[d + 1] > 0)) continue;  // this query sees no key of chunk c
        const acc_t w = exp_nonpositive(part[d] - top);
        den += w * part[d + 1];
        acc_t* nu = num.get();
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) nu[e] += w * part[e];
      }
      const acc_t inv = acc_t(1) / den;
      acc_t* nu = num.get();
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) nu[e] *= inv;
      store_row(static_cast<char*>(a.out) + (((b * a.heads + h) * n) + i) * d * out_bytes, nu, a.out_type, d);
    }
  }
}

template <typename acc_t>
void chunk_tasks_for(const DecodeAttentionArgs& a, const int64_t* tasks, int64_t begin, int64_t end) {
  switch (a.kv_type) {
    case ElemType::f32: return chunk_tasks<acc_t, ElemType::f32>(a, tasks, begin, end);
    case ElemType::f16: return chunk_tasks<acc_t, ElemType::f16>(a, tasks, begin, end);
    case ElemType::bf16: return chunk_tasks<acc_t, ElemType::bf16>(a, tasks, begin, end);
    case ElemType::f64: return chunk_tasks<acc_t, ElemType::f64>(a, tasks, begin, end);
  }
}

}  // namespace

void decode_attention_chunks(const DecodeAttentionArgs& args, const int64_t* tasks, int64_t begin,
                             int64_t end) {
  if (args.f64) {
    chunk_tasks_for<double>(args, tasks, begin, end);
  } else {
    chunk_tasks_for<float>(args, tasks, begin, end);
  }
}

void decode_attention_merge(const DecodeAttentionArgs& args, const int64_t* pairs, int64_t begin,
                            int64_t end) {
  if (args.f64) {
    merge<double>(args, pairs, begin, end);
  } else {
    merge<float>(args, pairs, begin, end);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
