// sample_tokens rows: compiled once per ISA, see kernels.h. The definition of the draw is in
// cogview/ops/sampling.py; cogview/ops/reference.py computes it with sorts and cumulative sums.
//
// One pass per row over the allowed ids [lo, hi), 64 logits at a time:
// - top_k < range: a bounded selection. Logits above the running threshold (the k-th best seen so
//   far) are appended to a candidate buffer; when it holds 2k, nth_element keeps the best k and
//   raises the threshold. A vector compare finds the few logits of a block above the threshold.
// - otherwise every finite logit is a candidate: the row is kept in a scratch buffer, and the
//   top-p set (if any) is taken from a heap, popped in order until the mass reaches top_p.
// Only the candidates are ever sorted; weights and sums are in double.
#include <algorithm>
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
constexpr float kFloatMax = std::numeric_limits<float>::max();

struct Candidate {
  float x;     // the logit as float32, NaN -> -inf
  int32_t id;  // relative to lo
};

// The canonical order: larger logit first, then lower id.
inline bool before(const Candidate& a, const Candidate& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); }
inline bool by_id(const Candidate& a, const Candidate& b) { return a.id < b.id; }

struct Scratch {
  std::vector<Candidate> candidates;
  std::vector<float> row;
  std::vector<double> block_sums;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Converts `count` <= kBlock logits to float32 (NaN -> -inf); pads the block with -inf.
inline void load_block(float* __restrict dst, const char* src, ElemType type, int64_t count) {
  load_row(dst, src, type, count);
#pragma omp simd
  for (int64_t j = 0; j < kBlock; ++j) {
    const float v = j < count ? dst[j] : kNegInf;
    dst[j] = v != v ? kNegInf : v;
  }
}

// Bit j set when x[j] > threshold, for a block of 64.
inline uint64_t greater_mask(const float* x, float threshold) {
  uint64_t mask = 0;
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(threshold);
  for (int q = 0; q < 4; ++q) {
    mask |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + 16 * q), t, _CMP_GT_OQ)) << (16 * q);
  }
#elif defined(__AVX2__)
  const __m256 t = _mm256_set1_ps(threshold);
  for (int q = 0; q < 8; ++q) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8 * q), t, _CMP_GT_OQ));
    mask |= static_cast<uint64_t>(static_cast<uint32_t>(bits)) << (8 * q);
  }
#elif defined(__SSE2__)
  const __m128 t = _mm_set1_ps(threshold);
  for (int q = 0; q < 16; ++q) {
    const int bits = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(x + 4 * q), t));
    mask |= static_cast<uint64_t>(static_cast<uint32_t>(bits)) << (4 * q);
  }
#else
  for (int j = 0; j < kBlock; ++j) mask |= static_cast<uint64_t>(x[j] > threshold) << j;
#endif
  return mask;
}

// x / temperature in float32, kept finite (+-FLT_MAX) unless x is -inf.
inline float scaled(float x, float temperature) {
  const float s = x / temperature;
  const float clamped = s > kFloatMax ? kFloatMax : (s < -kFloatMax ? -kFloatMax : s);
  return x == kNegInf ? kNegInf : clamped;
}

inline double weight(float x, float temperature, double top) {
  return exp_nonpositive(static_cast<double>(scaled(x, temperature)) - top);
}

// Lowest id holding the largest logit, or -1 when every logit is -inf/NaN.
int64_t argmax(const char* row, ElemType type, int64_t n) {
  alignas(64) float x[kBlock];
  float best = kNegInf;
  int64_t best_id = -1;
  const int64_t bytes = elem_size(type);
  for (int64_t start = 0; start < n; start += kBlock) {
    load_block(x, row + start * bytes, type, std::min(kBlock, n - start));
    float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < kBlock; ++j) block_max = x[j] > block_max ? x[j] : block_max;
    if (block_max > best) {
      int64_t j = 0;
      while (x[j] != block_max) ++j;
      best = block_max;
      best_id = start + j;
    }
  }
  return best_id;
}

// The candidates in id order; returns the drawn one's id: the first whose running weight exceeds
// u times the total (a zero-weight candidate can never be first to exceed it).
int64_t draw_in_id_order(std::vector<Candidate>& kept, float temperature, double top, double u) {
  std::sort(kept.begin(), kept.end(), by_id);
  double total = 0;
  for (const Candidate& c : kept) total += weight(c.x, temperature, top);
  const double target = u * total;
  double cum = 0;
  for (const Candidate& c : kept) {
    cum += weight(c.x, temperature, top);
    if (cum > target) return c.id;
  }
  return kept.back().id;  // unreachable: u < 1 keeps target below the final running sum
}

// top_k < n: bounded selection of the k best (canonical order) finite logits.
void select_top_k(std::vector<Candidate>& cand, const char* row, ElemType type, int64_t n, int64_t k) {
  alignas(64) float x[kBlock];
  const size_t keep = static_cast<size_t>(k);
  const size_t capacity = std::max<size_t>(2 * keep, keep + kBlock);
  cand.clear();
  cand.reserve(capacity);
  float threshold = kNegInf;
  const int64_t bytes = elem_size(type);
  for (int64_t start = 0; start < n; start += kBlock) {
    load_block(x, row + start * bytes, type, std::min(kBlock, n - start));
    uint64_t mask = greater_mask(x, threshold);
    while (mask != 0) {
      const int j = __builtin_ctzll(mask);
      mask &= mask - 1;
      if (!(x[j] > threshold)) continue;  // the threshold rose within this block
      cand.push_back(Candidate{x[j], static_cast<int32_t>(start + j)});
      if (cand.size() >= capacity) {
        std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.end(), before);
        cand.resize(keep);
        threshold = cand[keep - 1].x;  // later ids tied with it rank below every kept one
      }
    }
  }
  if (cand.size() > keep) {
    std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.end(), before);
    cand.resize(keep);
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
  std::vector<Candidate>& cand = s.candidates;
  const int64_t k = (top_k <= 0 || top_k >= n) ? n : top_k;

  if (k < n) {
    select_top_k(cand, row, a.logits_type, n, k);
    if (cand.empty()) {
      *invalid = true;
      return 0;
    }
    float best = kNegInf;
    for (const Candidate& c : cand) best = std::max(best, c.x);
    const double top = static_cast<double>(scaled(best, temperature));
    if (top_p < 1.0) {
      // Nucleus: the canonical prefix whose mass first reaches top_p of the kept mass.
      std::sort(cand.begin(), cand.end(), before);
      double total = 0;
      for (const Candidate& c : cand) total += weight(c.x, temperature, top);
      const double target = top_p * total;
      double cum = 0;
      size_t size = 0;
      while (size < cand.size()) {
        cum += weight(cand[size].x, temperature, top);
        ++size;
        if (cum >= target) break;
      }
      cand.resize(size);
    }
    *invalid = false;
    return draw_in_id_order(cand, temperature, top, u);
  }

  // Every id is a candidate: keep the converted row, its maximum, and block sums of the weights.
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  s.row.resize(static_cast<size_t>(blocks * kBlock));
  s.block_sums.resize(static_cast<size_t>(blocks));
  float* x = s.row.data();
  float best = kNegInf;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    float* xb = x + blk * kBlock;
    load_block(xb, row + blk * kBlock * bytes, a.logits_type, std::min(kBlock, n - blk * kBlock));
#pragma omp simd reduction(max : best)
    for (int64_t j = 0; j < kBlock; ++j) best = xb[j] > best ? xb[j] : best;
  }
  if (best == kNegInf) {
    *invalid = true;
    return 0;
  }
  *invalid = false;
  const double top = static_cast<double>(scaled(best, temperature));
  double total = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = x + blk * kBlock;
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < kBlock; ++j) sum += weight(xb[j], temperature, top);
    s.block_sums[blk] = sum;
    total += sum;
  }

  if (top_p < 1.0) {
    // Pop candidates in canonical order from a heap until their mass reaches top_p.
    cand.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (x[j] != kNegInf) cand.push_back(Candidate{x[j], static_cast<int32_t>(j)});
    }
    auto after = [](const Candidate& p, const Candidate& q) { return before(q, p); };
    std::make_heap(cand.begin(), cand.end(), after);
    const double target = top_p * total;
    double cum = 0;
    auto end = cand.end();
    while (end != cand.begin()) {
      std::pop_heap(cand.begin(), end, after);  // moves the canonical first to *(end - 1)
      --end;
      cum += weight(end->x, temperature, top);
      if (cum >= target) break;
    }
    std::vector<Candidate> kept(end, cand.end());
    cand.assign(kept.begin(), kept.end());
    return draw_in_id_order(cand, temperature, top, u);
  }

  // The whole range in id order: find the block where the running sum passes u * total, then
  // the id inside it.
  const double target = u * total;
  double cum = 0;
  int64_t last_positive = -1;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    if (s.block_sums[blk] > 0) last_positive = blk;
    if (cum + s.block_sums[blk] <= target) {
      cum += s.block_sums[blk];
      continue;
    }
    const float* xb = x + blk * kBlock;
    int64_t fallback = -1;
    for (int64_t j = 0; j < kBlock; ++j) {
      const double w = weight(xb[j], temperature, top);
      if (w > 0) fallback = j;
      cum += w;
      if (cum > target) return blk * kBlock + j;
    }
    if (fallback >= 0) return blk * kBlock + fallback;  // rounding of the block sum
  }
  // Rounding left the target at the total: the last id with positive weight.
  const float* xb = x + last_positive * kBlock;
  for (int64_t j = kBlock - 1; j >= 0; --j) {
    if (weight(xb[j], temperature, top) > 0) return last_positive * kBlock + j;
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
