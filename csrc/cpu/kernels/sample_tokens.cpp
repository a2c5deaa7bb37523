// sample_tokens rows: compiled once per ISA, see kernels.h. The definition of the draw is in
// cogview/ops/sampling.py; cogview/ops/reference.py computes it with sorts and cumulative sums.
//
// Per row, the allowed logits [lo, hi) are read once into an L1/L2-resident float buffer
// (NaN -> -inf, -0 -> +0). Logits are compared through order keys: int32 values ordered like the
// floats, so "how many are >= t" and "how much weight is >= t" are branch-free vector loops, and
// thresholds are found by bisection on the key (~31 such loops, over a few hundred candidates with
// top-k; over the whole range for top-p without top-k, the slowest configuration).
// - top_k < range: a bounded selection without sorting the range. Split the ids into g = 2k
//   interleaved groups (id mod g) and take each group's maximum (elementwise max over slices).
//   The k-th largest group maximum b is a lower bound of the k-th largest logit (k groups each
//   hold a logit >= b), so only logits >= b can be among the top k: a vector compare collects them
//   (typically ~1.4 k of them, in id order), and the k-th largest key among those, with ties
//   broken by id, cuts them to exactly k.
// - otherwise every id is a candidate, and block sums of the weights walk the draw.
// top-p: the largest key t whose weight at or above t reaches top_p of the total, then the ties
// at t in id order. The draw runs over the kept ids in id order. Nothing is ever sorted.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec_math.h"
#include "ops/philox.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

constexpr int64_t kBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Scratch {
  std::vector<float> row;         // the converted row, padded to whole blocks with -inf
  std::vector<float> group_max;   // top-k bound
  std::vector<int32_t> keys;      // candidates' order keys ...
  std::vector<int32_t> ids;       // ... their ids (ascending) ...
  std::vector<double> weights;    // ... and weights (0 once dropped)
  std::vector<double> block_sums;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// An int32 ordered like the float (no NaN; -0 was made +0), and back.
inline int32_t order_key(float x) {
  const int32_t b = std::bit_cast<int32_t>(x);
  return b ^ ((b >> 31) & 0x7fffffff);
}
inline float key_value(int32_t key) { return std::bit_cast<float>(key ^ ((key >> 31) & 0x7fffffff)); }

// Converts the row to float32 with NaN -> -inf and -0 -> +0 (so equal floats have equal keys),
// padded with -inf to a multiple of kBlock. Returns the number of blocks.
int64_t load_row_blocks(Scratch& s, const char* src, ElemType type, int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  s.row.resize(static_cast<size_t>(blocks * kBlock));
  float* x = s.row.data();
  load_row(x, src, type, n);
  for (int64_t j = n; j < blocks * kBlock; ++j) x[j] = kNegInf;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] != x[j] ? kNegInf : x[j] + 0.0f;
  return blocks;
}

// Bit j set when x[j] >= threshold, for a block of 64.
inline uint64_t at_least_mask(const float* x, float threshold) {
  uint64_t mask = 0;
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(threshold);
  for (int q = 0; q < 4; ++q) {
    mask |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + 16 * q), t, _CMP_GE_OQ)) << (16 * q);
  }
#elif defined(__AVX2__)
  const __m256 t = _mm256_set1_ps(threshold);
  for (int q = 0; q < 8; ++q) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8 * q), t, _CMP_GE_OQ));
    mask |= static_cast<uint64_t>(static_cast<uint32_t>(bits)) << (8 * q);
  }
#elif defined(__SSE2__)
  const __m128 t = _mm_set1_ps(threshold);
  for (int q = 0; q < 16; ++q) {
    const int bits = _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(x + 4 * q), t));
    mask |= static_cast<uint64_t>(static_cast<uint32_t>(bits)) << (4 * q);
  }
#else
  for (int j = 0; j < kBlock; ++j) mask |= static_cast<uint64_t>(x[j] >= threshold) << j;
#endif
  return mask;
}

// x / temperature in float32; an overflow to +-inf becomes +-FLT_MAX unless x itself is -inf.
// Written with integer ops on the bits so that loops over it vectorize (x is never NaN here).
inline float scaled(float x, float temperature) {
  const int32_t bits = std::bit_cast<int32_t>(x / temperature);
  const int32_t is_inf = (bits & 0x7fffffff) == 0x7f800000;
  const int32_t x_is_neg_inf = std::bit_cast<int32_t>(x) == std::bit_cast<int32_t>(kNegInf);
  return std::bit_cast<float>(bits - (is_inf & (1 - x_is_neg_inf)));  // inf bits - 1 = FLT_MAX bits
}

// w[i] = exp(scaled(x[i]) - top) for i < count, through two simple loops that vectorize.
inline void weights_of(double* __restrict w, const float* __restrict x, int64_t count, float temperature,
                       double top) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) w[i] = static_cast<double>(scaled(x[i], temperature)) - top;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) w[i] = exp_nonpositive(w[i]);
}

inline double sum_of(const double* __restrict w, int64_t count) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += w[i];
  return sum;
}

inline int64_t count_at_least(const int32_t* __restrict keys, int64_t count, int32_t t) {
  int32_t c = 0;  // counts stay below 2^31 (ranges are checked); 32-bit lanes vectorize twice as wide
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < count; ++i) c += keys[i] >= t;
  return c;
}

inline double weight_at_least(const int32_t* __restrict keys, const double* __restrict w, int64_t count,
                              int32_t t) {
  double m = 0;
#pragma omp simd reduction(+ : m)
  for (int64_t i = 0; i < count; ++i) m += keys[i] >= t ? w[i] : 0.0;
  return m;
}

// The largest t in [lo, hi] for which ok(t) holds, given that ok(lo) holds (or is assumed to)
// and ok is monotone (true up to some t, false after).
template <typename Ok>
int32_t largest_key(int32_t lo, int32_t hi, Ok ok) {
  int64_t a = lo, b = hi;
  while (a < b) {
    const int64_t mid = a + (b - a + 1) / 2;
    if (ok(static_cast<int32_t>(mid))) {
      a = mid;
    } else {
      b = mid - 1;
    }
  }
  return static_cast<int32_t>(a);
}

inline void key_range(const int32_t* __restrict keys, int64_t count, int32_t* lo, int32_t* hi) {
  int32_t mn = std::numeric_limits<int32_t>::max(), mx = std::numeric_limits<int32_t>::min();
#pragma omp simd reduction(min : mn) reduction(max : mx)
  for (int64_t i = 0; i < count; ++i) {
    mn = keys[i] < mn ? keys[i] : mn;
    mx = keys[i] > mx ? keys[i] : mx;
  }
  *lo = mn;
  *hi = mx;
}

// Lowest id holding the largest logit, or -1 when every logit is -inf/NaN.
int64_t argmax(const char* row, ElemType type, int64_t n) {
  alignas(64) float x[kBlock];
  float best = kNegInf;
  int64_t best_id = -1;
  const int64_t bytes = elem_size(type);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min(kBlock, n - start);
    load_row(x, row + start * bytes, type, count);
    float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < count; ++j) block_max = x[j] > block_max ? x[j] : block_max;  // NaN never wins
    if (block_max > best) {
      int64_t j = 0;
      while (x[j] != block_max) ++j;
      best = block_max;
      best_id = start + j;
    }
  }
  return best_id;
}

// top_k < n: the k best finite logits (canonical order: larger first, then lower id) of x[0, n)
// into s.keys/s.ids in id order. Returns how many (fewer than k when fewer are finite).
int64_t select_top_k(Scratch& s, int64_t n, int64_t blocks, int64_t k) {
  const float* x = s.row.data();
  // Group maxima over the interleaved groups {j, j + g, j + 2g, ...}, as keys.
  const int64_t groups = std::min(n, 2 * k);
  s.group_max.assign(x, x + groups);
  float* gm = s.group_max.data();
  for (int64_t start = groups; start < n; start += groups) {
    const float* slice = x + start;
    const int64_t count = std::min(groups, n - start);
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) gm[j] = slice[j] > gm[j] ? slice[j] : gm[j];
  }
  s.keys.resize(static_cast<size_t>(std::max(groups, blocks * kBlock)));
  int32_t* keys = s.keys.data();
#pragma omp simd
  for (int64_t j = 0; j < groups; ++j) keys[j] = order_key(gm[j]);
  int32_t lo, hi;
  key_range(keys, groups, &lo, &hi);
  const float bound = key_value(largest_key(lo, hi, [&](int32_t t) { return count_at_least(keys, groups, t) >= k; }));
  // The logits >= bound (and finite): a superset of the top k, collected in id order.
  const float threshold = bound == kNegInf ? std::numeric_limits<float>::lowest() : bound;
  s.ids.resize(static_cast<size_t>(blocks * kBlock));
  int32_t* ids = s.ids.data();
  int64_t count = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = x + blk * kBlock;
    uint64_t mask = at_least_mask(xb, threshold);
    while (mask != 0) {
      const int j = __builtin_ctzll(mask);
      mask &= mask - 1;
      keys[count] = order_key(xb[j]);
      ids[count++] = static_cast<int32_t>(blk * kBlock + j);
    }
  }
  if (count <= k) return count;
  // Cut to exactly k: every key above the k-th largest key t, then the lowest ids among the ties.
  key_range(keys, count, &lo, &hi);
  const int32_t t = largest_key(lo, hi, [&](int32_t v) { return count_at_least(keys, count, v) >= k; });
  int64_t ties_wanted = k - (t == hi ? 0 : count_at_least(keys, count, t + 1));
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    const bool keep = keys[i] > t || (keys[i] == t && ties_wanted-- > 0);
    keys[kept] = keys[i];
    ids[kept] = ids[i];
    kept += keep;
  }
  return kept;
}

// top-p over candidates (keys, weights; ids ascending): zeroes the weights of the candidates
// outside the nucleus. A candidate is in it when the weight of the candidates before it in
// canonical order is < target (= top_p * total), and the canonical first one always is.
void drop_outside_nucleus(const int32_t* keys, double* w, int64_t count, double target) {
  int32_t lo, hi;
  key_range(keys, count, &lo, &hi);
  // The largest key t whose weight at or above it reaches the target: every candidate above t is
  // in the nucleus, every one below t is out, and the ties at t join in id order.
  const int32_t t = largest_key(lo, hi, [&](int32_t v) { return weight_at_least(keys, w, count, v) >= target; });
  double before = t == hi ? 0.0 : weight_at_least(keys, w, count, t + 1);
  bool first = t == hi;  // then the first tie is the canonical first candidate
  for (int64_t i = 0; i < count; ++i) {
    if (keys[i] > t) continue;
    if (keys[i] == t && (before < target || first)) {
      before += w[i];
      first = false;
      continue;
    }
    w[i] = 0.0;
  }
}

int64_t sample_row(const SampleTokensArgs& a, int64_t r, bool* invalid) {
  const int64_t n = a.vocab_hi - a.vocab_lo;
  const int64_t bytes = elem_size(a.logits_type);
  const char* row = static_cast<const char*>(a.logits) + (r * a.row_stride + a.vocab_lo) * bytes;
  const float temperature = a.temperature ? a.temperature[r] : a.temperature_value;
  const int64_t top_k = a.top_k ? a.top_k[r] : a.top_k_value;
  const double top_p = a.top_p ? a.top_p[r] : a.top_p_value;
  const double u = philox::row_uniform(a.seed, a.offset, static_cast<uint64_t>(r));

  if (temperature == 0.0f) {
    const int64_t id = argmax(row, a.logits_type, n);
    *invalid = id < 0;
    return id < 0 ? 0 : id;
  }
  Scratch& s = scratch();
  const int64_t blocks = load_row_blocks(s, row, a.logits_type, n);
  const float* x = s.row.data();
  const int64_t k = (top_k <= 0 || top_k >= n) ? n : top_k;

  if (k < n) {
    const int64_t count = select_top_k(s, n, blocks, k);
    *invalid = count == 0;
    if (count == 0) return 0;
    const int32_t* keys = s.keys.data();
    const int32_t* ids = s.ids.data();
    int32_t lo, hi;
    key_range(keys, count, &lo, &hi);
    const double top = static_cast<double>(scaled(key_value(hi), temperature));
    s.row.resize(static_cast<size_t>(blocks * kBlock + count));  // candidate values after the row
    float* values = s.row.data() + blocks * kBlock;
    for (int64_t i = 0; i < count; ++i) values[i] = key_value(keys[i]);
    s.weights.resize(static_cast<size_t>(count));
    double* w = s.weights.data();
    weights_of(w, values, count, temperature, top);
    if (top_p < 1.0) drop_outside_nucleus(keys, w, count, top_p * sum_of(w, count));
    // The draw, in id order.
    double total = 0;
    for (int64_t i = 0; i < count; ++i) total += w[i];
    const double target = u * total;
    double cum = 0;
    int64_t last = 0;
    for (int64_t i = 0; i < count; ++i) {
      if (w[i] > 0) last = i;
      cum += w[i];
      if (cum > target) return ids[i];
    }
    return ids[last];  // unreachable: u < 1 keeps the target below the final running sum
  }

  // Every id is a candidate.
  float best = kNegInf;
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < n; ++j) best = x[j] > best ? x[j] : best;
  *invalid = best == kNegInf;
  if (best == kNegInf) return 0;
  const double top = static_cast<double>(scaled(best, temperature));
  const int64_t padded = blocks * kBlock;
  s.weights.resize(static_cast<size_t>(padded));
  double* w = s.weights.data();
  weights_of(w, x, padded, temperature, top);
  if (top_p < 1.0) {
    s.keys.resize(static_cast<size_t>(padded));
    int32_t* keys = s.keys.data();
#pragma omp simd
    for (int64_t j = 0; j < padded; ++j) keys[j] = order_key(x[j]);
    drop_outside_nucleus(keys, w, padded, top_p * sum_of(w, padded));
  }
  // The draw, in id order: find the block where the running sum passes u * total, then the id.
  s.block_sums.resize(static_cast<size_t>(blocks));
  double total = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    s.block_sums[blk] = sum_of(w + blk * kBlock, kBlock);
    total += s.block_sums[blk];
  }
  const double target = u * total;
  double cum = 0;
  int64_t last = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    if (cum + s.block_sums[blk] <= target) {
      cum += s.block_sums[blk];
      continue;
    }
    for (int64_t j = blk * kBlock; j < (blk + 1) * kBlock; ++j) {
      if (w[j] > 0) last = j;
      cum += w[j];
      if (cum > target) return j;
    }
    return last;  // the block sum's rounding: its last positive weight
  }
  for (int64_t j = padded - 1; j >= 0; --j) {  // rounding left the target at the total
    if (w[j] > 0) return j;
  }
  return 0;  // unreachable: the maximum has weight 1
}

}  // namespace

void sample_tokens(const SampleTokensArgs& args, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    bool invalid = false;
    const int64_t id = sample_row(args, r, &invalid);
    args.tokens[r] = args.vocab_lo + id;
    if (invalid && args.invalid != nullptr) args.invalid[r] = true;
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
