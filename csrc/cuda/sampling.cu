// CUDA implementation of cogview::sample_tokens (definition: cogview/ops/sampling.py).
//
// One block of 512 threads per row; nothing of the vocabulary is sorted and nothing leaves the
// device: seed, offset and the per-row parameters may be device tensors, read by the kernel, so the
// call can be captured in a CUDA graph. The row's uniform is the same Philox4x32-10 word as on the
// CPU (csrc/ops/philox.h), so CPU and CUDA draw the same tokens from the same logits (up to
// rounding-level differences of the float64 sums, see below).
//
// Per row, over the allowed ids [lo, hi) read straight from the logits (converted to float32, NaN as
// -inf, -0 as +0) and compared through int32 order keys (ordered like the floats):
//  1. one pass: the largest key with its lowest id (the argmax, the whole answer for temperature 0)
//     and the number of finite logits;
//  2. top-k < the finite count: radix select of the k-th largest key (4 passes of 8-bit digits,
//     shared-memory histograms of integer counts), then, if ties at that key must be cut, the id of
//     the last tie kept (ties are kept in id order: the canonical order);
//  3a. at most kCap kept ids (the usual top-k case): they are compacted in id order into shared
//     memory, bitonic-sorted into canonical order (key descending, id ascending), weighted
//     exp(s - max s) in float64, top-p is an exclusive scan in canonical order, and the draw an
//     inclusive scan in id order;
//  3b. more: top-p (if on) by a radix select on the weights (8 passes of 4-bit digits, per-bin sums
//     reduced in a fixed order) for the largest key whose weight at or above it reaches top_p of the
//     total, then its ties in id order; the draw walks tiles of 4096 ids in id order (tile sums
//     first, then a scan inside the tile that holds the target).
// Every sum is formed in a fixed order (no floating-point atomics), so results are deterministic.
// The order of the float64 additions differs from the reference's cumulative sums: a token can only
// differ where u falls within rounding (~1e-16 relative) of a boundary.
//
// Values that the CPU op rejects with an exception but that can only be seen on the device
// (a per-row temperature that is negative or not finite, a negative top_k, a top_p outside [0, 1])
// make that row return lo and set invalid[row] (when given), like a row without finite logits.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "cuda/common.cuh"
#include "ops/decoding_checks.h"
#include "ops/philox.h"

namespace cogview::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 8;                 // ids per thread in one ordered tile
constexpr int kTile = kThreads * kPerThread;  // ids per ordered tile (id order: warp, then row, then lane)
constexpr int kCap = 1024;                    // kept ids handled (sorted) in shared memory
constexpr int kNotFound = std::numeric_limits<int32_t>::max();
constexpr int32_t kNegInfKey = static_cast<int32_t>(0x807FFFFFu);  // order key of -inf
constexpr uint32_t kFullMask = 0xffffffffu;

struct SampleParams {
  const void* logits = nullptr;
  int64_t row_stride = 0;
  int64_t lo = 0;
  int32_t n = 0;  // ids in the range
  const float* temperature = nullptr;  // device, or nullptr: temperature_value
  int64_t t_stride = 0;
  float temperature_value = 1.0f;
  const int64_t* top_k = nullptr;
  int64_t k_stride = 0;
  int64_t top_k_value = 0;
  const double* top_p = nullptr;
  int64_t p_stride = 0;
  double top_p_value = 1.0;
  const int64_t* seed = nullptr;  // device, or nullptr: seed_value
  const int64_t* offset = nullptr;
  uint64_t seed_value = 0, offset_value = 0;
  int64_t* tokens = nullptr;
  bool* invalid = nullptr;
};

// ---- keys and weights -----------------------------------------------------------------------

__device__ __forceinline__ int32_t order_key(float x) {
  const int32_t b = __float_as_int(x);
  return b ^ ((b >> 31) & 0x7fffffff);
}
__device__ __forceinline__ float key_value(int32_t key) { return __int_as_float(key ^ ((key >> 31) & 0x7fffffff)); }
// Unsigned digits ordered like the signed keys.
__device__ __forceinline__ uint32_t ukey(int32_t key) { return static_cast<uint32_t>(key) ^ 0x80000000u; }
__device__ __forceinline__ int32_t from_ukey(uint32_t u) { return static_cast<int32_t>(u ^ 0x80000000u); }

// x / temperature in float32; an overflow to +-inf becomes +-FLT_MAX unless x itself is -inf.
__device__ __forceinline__ float scaled(float x, float temperature) {
  const float s = x / temperature;
  return (isinf(s) && x != -INFINITY) ? copysignf(FLT_MAX, s) : s;
}

template <typename T>
struct RowView {
  const typename T::bits* x;
  int32_t n;
  // The order key of id j (NaN -> -inf, -0 -> +0).
  __device__ __forceinline__ int32_t key(int32_t j) const {
    const float v = static_cast<float>(T::to_float(x[j]));
    return v != v ? kNegInfKey : order_key(v + 0.0f);
  }
};

// The ids kept by top-k (and by top-p): key > t, or key == t and id <= cut; never -inf.
struct Keep {
  int32_t t = kNegInfKey + 1;
  int32_t cut = kNotFound;
  __device__ __forceinline__ bool operator()(int32_t key, int32_t id) const {
    return key > t || (key == t && id <= cut);
  }
};

struct Weighting {
  float temperature;
  double top;  // scaled value of the largest key
  __device__ __forceinline__ double operator()(int32_t key) const {
    return exp(static_cast<double>(scaled(key_value(key), temperature)) - top);
  }
};

// ---- block reductions (every thread gets the same bits; fixed order) -------------------------

struct Scratch {
  double d[kWarps][16];
  int32_t i[kWarps][16];
  double total_d[16];
  int32_t total_i[16];
  int32_t hist[256];
  int32_t misc[8];
  double miscd[4];
};

__device__ __forceinline__ int32_t warp_sum_int(int32_t v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

__device__ int32_t block_sum_int(int32_t v, Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum_int(v);
  if (lane == 0) s.i[warp][0] = v;
  __syncthreads();
  int32_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += s.i[w][0];
  __syncthreads();
  return total;
}

__device__ int32_t block_min_int(int32_t v, Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, m));
  if (lane == 0) s.i[warp][1] = v;
  __syncthreads();
  int32_t best = kNotFound;
  for (int w = 0; w < kWarps; ++w) best = min(best, s.i[w][1]);
  __syncthreads();
  return best;
}

__device__ int32_t block_max_int(int32_t v, Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, m));
  if (lane == 0) s.i[warp][2] = v;
  __syncthreads();
  int32_t best = std::numeric_limits<int32_t>::min();
  for (int w = 0; w < kWarps; ++w) best = max(best, s.i[w][2]);
  __syncthreads();
  return best;
}

// Inclusive scan over the lanes of a warp (Hillis-Steele; fixed order).
__device__ __forceinline__ double warp_inclusive_scan(double v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    const double o = __shfl_up_sync(kFullMask, v, m);
    if (lane >= m) v += o;
  }
  return v;
}

__device__ __forceinline__ int32_t tile_id(int32_t tile0, int i) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  return tile0 + warp * 32 * kPerThread + i * 32 + lane;
}

// ---- ordered passes ---------------------------------------------------------------------------

// The id of the nth (1-based) id in id order with pred(key, id), or kNotFound.
template <typename T, typename Pred>
__device__ int32_t find_nth(const RowView<T>& row, Pred pred, int32_t nth, Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int32_t seen = 0;
  for (int32_t tile0 = 0; tile0 < row.n; tile0 += kTile) {
    uint32_t ballots[kPerThread];
    int32_t warp_count = 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int32_t id = tile_id(tile0, i);
      const bool f = id < row.n && pred(row.key(id), id);
      ballots[i] = __ballot_sync(kFullMask, f);
      warp_count += __popc(ballots[i]);
    }
    if (lane == 0) s.i[warp][3] = warp_count;
    __syncthreads();
    int32_t before = 0, tile_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? s.i[w][3] : 0;
      tile_total += s.i[w][3];
    }
    if (threadIdx.x == 0) s.misc[0] = kNotFound;
    __syncthreads();
    if (seen + tile_total >= nth) {
      int32_t need = nth - seen - before;  // rank inside this warp's range
      if (need >= 1 && need <= warp_count) {
        for (int i = 0; i < kPerThread; ++i) {
          const int32_t c = __popc(ballots[i]);
          if (need <= c) {
            const bool mine = ((ballots[i] >> lane) & 1u) && __popc(ballots[i] & ((2u << lane) - 1u)) == need;
            if (mine) s.misc[0] = tile_id(tile0, i);
            break;
          }
          need -= c;
        }
      }
      __syncthreads();
      const int32_t found = s.misc[0];
      __syncthreads();
      return found;
    }
    seen += tile_total;
  }
  return kNotFound;
}

// Kept ids (pred) compacted in id order into keys_out/ids_out (at most `capacity`); returns the count.
template <typename T, typename Pred>
__device__ int32_t compact(const RowView<T>& row, Pred pred, int32_t* keys_out, int32_t* ids_out,
                           int32_t capacity, Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int32_t written = 0;
  for (int32_t tile0 = 0; tile0 < row.n; tile0 += kTile) {
    uint32_t ballots[kPerThread];
    int32_t keys[kPerThread];
    int32_t warp_count = 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int32_t id = tile_id(tile0, i);
      keys[i] = id < row.n ? row.key(id) : kNegInfKey;
      ballots[i] = __ballot_sync(kFullMask, id < row.n && pred(keys[i], id));
      warp_count += __popc(ballots[i]);
    }
    if (lane == 0) s.i[warp][4] = warp_count;
    __syncthreads();
    int32_t pos = written, tile_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      pos += w < warp ? s.i[w][4] : 0;
      tile_total += s.i[w][4];
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if ((ballots[i] >> lane) & 1u) {
        const int32_t at = pos + __popc(ballots[i] & ((1u << lane) - 1u));
        if (at < capacity) {
          keys_out[at] = keys[i];
          ids_out[at] = tile_id(tile0, i);
        }
      }
      pos += __popc(ballots[i]);
    }
    written += tile_total;
    __syncthreads();
  }
  return written;
}

// Weights (0 where !pred) of this thread's ids of a tile, with their prefix sums in id order:
// prefix[i] = sum of the weights of the tile's ids up to and including this one. The tile's total
// is exactly the prefix of its last id. Returns the tile total.
template <typename T, typename Pred>
__device__ double tile_prefix(const RowView<T>& row, Pred pred, const Weighting& weight, int32_t tile0,
                              double (&w)[kPerThread], double (&prefix)[kPerThread], Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double row_before = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int32_t id = tile_id(tile0, i);
    double v = 0;
    if (id < row.n) {
      const int32_t key = row.key(id);
      if (key != kNegInfKey && pred(key, id)) v = weight(key);
    }
    w[i] = v;
    const double incl = warp_inclusive_scan(v);
    const double row_total = __shfl_sync(kFullMask, incl, 31);
    prefix[i] = row_before + incl;
    row_before = row_before + row_total;  // same additions as prefix[i] at lane 31
  }
  if (lane == 0) s.d[warp][5] = row_before;
  __syncthreads();
  double before = 0, total = 0;
  for (int wi = 0; wi < kWarps; ++wi) {
    if (wi < warp) before = before + s.d[wi][5];
    total = total + s.d[wi][5];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) prefix[i] = before + prefix[i];
  return total;
}

// Sum of the weights of the ids with pred, tile by tile in id order.
template <typename T, typename Pred>
__device__ double ordered_total(const RowView<T>& row, Pred pred, const Weighting& weight, Scratch& s) {
  double total = 0;
  double w[kPerThread], prefix[kPerThread];
  for (int32_t tile0 = 0; tile0 < row.n; tile0 += kTile) total += tile_prefix(row, pred, weight, tile0, w, prefix, s);
  return total;
}

// The draw over the ids with pred, in id order: the first id whose running weight exceeds u * total.
template <typename T, typename Pred>
__device__ int32_t ordered_draw(const RowView<T>& row, Pred pred, const Weighting& weight, double u, Scratch& s) {
  const double total = ordered_total(row, pred, weight, s);
  const double target = u * total;
  double cum = 0;
  double w[kPerThread], prefix[kPerThread];
  int32_t last_positive = kNotFound;
  for (int32_t tile0 = 0; tile0 < row.n; tile0 += kTile) {
    const double tile_total = tile_prefix(row, pred, weight, tile0, w, prefix, s);
    int32_t mine = kNotFound, pos = -1;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (w[i] > 0) pos = tile_id(tile0, i);
      if (w[i] > 0 && cum + prefix[i] > target && mine == kNotFound) mine = tile_id(tile0, i);
    }
    const int32_t found = block_min_int(mine, s);
    if (found != kNotFound) return found;
    const int32_t last = block_max_int(pos, s);
    if (last >= 0) last_positive = last;
    cum += tile_total;
  }
  return last_positive;  // only through rounding (the target stays below the total)
}

// ---- radix selections -------------------------------------------------------------------------

// The k-th largest key over the whole range (1 <= k <= n): writes the key, the number of ids with
// that key, and how many of them the first k in canonical order take.
template <typename T>
__device__ void select_kth(const RowView<T>& row, int32_t k, int32_t& key_out, int32_t& ties_total,
                           int32_t& ties_wanted, Scratch& s) {
  const int lane = threadIdx.x % 32;
  uint32_t prefix = 0, mask = 0;
  int32_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) s.hist[b] = 0;
    __syncthreads();
    for (int32_t j = threadIdx.x; j < row.n; j += kThreads) {
      const uint32_t u = ukey(row.key(j));
      if ((u & mask) == prefix) atomicAdd(&s.hist[(u >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns the bins 255 - 8l .. 248 - 8l (from the top); a scan over lanes finds the bin.
      int32_t sum = 0;
      for (int i = 0; i < 8; ++i) sum += s.hist[255 - 8 * lane - i];
      int32_t incl = sum;
#pragma unroll
      for (int m = 1; m < 32; m <<= 1) {
        const int32_t o = __shfl_up_sync(kFullMask, incl, m);
        if (lane >= m) incl += o;
      }
      const int32_t excl = incl - sum;  // integers: exact
      if (excl < remaining && remaining <= incl) {
        int32_t cum = excl;
        for (int i = 0; i < 8; ++i) {
          const int bin = 255 - 8 * lane - i;
          const int32_t c = s.hist[bin];
          if (cum + c >= remaining) {
            s.misc[1] = bin;
            s.misc[2] = remaining - cum;
            s.misc[3] = c;
            break;
          }
          cum += c;
        }
      }
    }
    __syncthreads();
    const uint32_t digit = static_cast<uint32_t>(s.misc[1]);
    remaining = s.misc[2];
    ties_total = s.misc[3];
    prefix |= digit << shift;
    mask |= 255u << shift;
    __syncthreads();
  }
  key_out = from_ukey(prefix);
  ties_wanted = remaining;
}

// top-p over the kept ids (more than kCap of them): the largest key t whose kept weight at or above
// it reaches `target`, the kept weight above t, and the number of kept ids with key t.
template <typename T>
__device__ void select_nucleus_key(const RowView<T>& row, const Keep& keep, const Weighting& weight, double target,
                                   int32_t& key_out, double& above_out, int32_t& ties_out, Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t prefix = 0, mask = 0;
  double above = 0;
  int32_t ties = 0;
  for (int shift = 28; shift >= 0; shift -= 4) {
    double wb[16];
    int32_t cb[16];
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      wb[b] = 0;
      cb[b] = 0;
    }
    for (int32_t j = threadIdx.x; j < row.n; j += kThreads) {
      const int32_t key = row.key(j);
      const uint32_t u = ukey(key);
      if (key == kNegInfKey || !keep(key, j) || (u & mask) != prefix) continue;
      const uint32_t digit = (u >> shift) & 15u;
      const double v = weight(key);
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        wb[b] += digit == static_cast<uint32_t>(b) ? v : 0.0;
        cb[b] += digit == static_cast<uint32_t>(b) ? 1 : 0;
      }
    }
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      wb[b] = warp_sum(wb[b]);
      cb[b] = warp_sum_int(cb[b]);
    }
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        s.d[warp][b] = wb[b];
        s.i[warp][b] = cb[b];
      }
    }
    __syncthreads();
    if (threadIdx.x < 16) {
      double tw = 0;
      int32_t tc = 0;
      for (int w = 0; w < kWarps; ++w) {
        tw += s.d[w][threadIdx.x];
        tc += s.i[w][threadIdx.x];
      }
      s.total_d[threadIdx.x] = tw;
      s.total_i[threadIdx.x] = tc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // The highest non-empty bin whose weight, with everything above it, reaches the target;
      // when rounding leaves none, the lowest non-empty bin.
      double acc = above, acc_lowest = above;
      int chosen = -1, lowest = -1;
      for (int b = 15; b >= 0; --b) {
        if (s.total_i[b] == 0) continue;
        if (acc + s.total_d[b] >= target) {
          chosen = b;
          break;
        }
        lowest = b;
        acc_lowest = acc;
        acc += s.total_d[b];
      }
      if (chosen < 0) {
        chosen = lowest;
        acc = acc_lowest;
      }
      s.misc[4] = chosen;
      s.miscd[0] = acc;
    }
    __syncthreads();
    const int chosen = s.misc[4];
    above = s.miscd[0];
    ties = chosen >= 0 ? s.total_i[chosen] : 0;
    prefix |= static_cast<uint32_t>(chosen < 0 ? 0 : chosen) << shift;
    mask |= 15u << shift;
    __syncthreads();
  }
  key_out = from_ukey(prefix);
  above_out = above;
  ties_out = ties;
}

// ---- shared-memory candidates (at most kCap) ----------------------------------------------------

struct Candidates {
  int32_t keys[kCap];   // in id order
  int32_t ids[kCap];
  uint64_t order[kCap];  // canonical order: (~ukey << 32 | position), ascending
  double w_canon[kCap];  // weights in canonical order
  double w_id[kCap];     // kept weights in id order (position)
};

// In-place scan of a[0, len) in shared memory (inclusive or exclusive), contiguous per thread.
__device__ void block_scan(double* a, int32_t len, bool exclusive, Scratch& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t per = (len + kThreads - 1) / kThreads;
  const int32_t begin = min(len, static_cast<int32_t>(threadIdx.x) * per), end = min(len, begin + per);
  double local = 0;
  for (int32_t i = begin; i < end; ++i) local += a[i];
  const double incl = warp_inclusive_scan(local);
  double excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) excl = 0;
  if (lane == 31) s.d[warp][6] = incl;
  __syncthreads();
  double run = 0;
  for (int w = 0; w < warp; ++w) run += s.d[w][6];
  run += excl;
  for (int32_t i = begin; i < end; ++i) {
    const double v = a[i];
    if (exclusive) {
      a[i] = run;
      run += v;
    } else {
      run += v;
      a[i] = run;
    }
  }
  __syncthreads();
}

__device__ void bitonic_sort(uint64_t* a, int32_t size) {  // size: a power of two
  for (int32_t k = 2; k <= size; k <<= 1) {
    for (int32_t j = k >> 1; j > 0; j >>= 1) {
      for (int32_t i = threadIdx.x; i < size; i += kThreads) {
        const int32_t partner = i ^ j;
        if (partner > i) {
          const uint64_t x = a[i], y = a[partner];
          const bool ascending = (i & k) == 0;
          if ((x > y) == ascending) {
            a[i] = y;
            a[partner] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Steps 3a: the kept ids are c.keys/c.ids[0, count). Returns the drawn id.
__device__ int32_t draw_candidates(Candidates& c, int32_t count, const Weighting& weight, double top_p, double u,
                                   Scratch& s) {
  int32_t size = 1;
  while (size < count) size <<= 1;
  for (int32_t i = threadIdx.x; i < size; i += kThreads) {
    c.order[i] = i < count ? (static_cast<uint64_t>(~ukey(c.keys[i])) << 32) | static_cast<uint32_t>(i)
                           : ~uint64_t{0};
  }
  __syncthreads();
  bitonic_sort(c.order, size);
  for (int32_t r = threadIdx.x; r < count; r += kThreads) {
    const int32_t pos = static_cast<int32_t>(c.order[r] & 0xffffffffu);
    c.w_canon[r] = weight(c.keys[pos]);
  }
  __syncthreads();
  if (top_p < 1.0) {
    // Exclusive prefix in canonical order; an id stays iff the weight before it is < top_p * total
    // (the first always stays).
    for (int32_t r = threadIdx.x; r < count; r += kThreads) c.w_id[r] = c.w_canon[r];
    __syncthreads();
    block_scan(c.w_id, count, /*exclusive=*/true, s);  // w_id holds "before" in canonical order for now
    const double total = c.w_id[count - 1] + c.w_canon[count - 1];
    const double target = top_p * total;
    for (int32_t r = threadIdx.x; r < count; r += kThreads) {
      if (!(c.w_id[r] < target) && r != 0) c.w_canon[r] = 0.0;
    }
    __syncthreads();
  }
  for (int32_t r = threadIdx.x; r < count; r += kThreads) {
    c.w_id[static_cast<int32_t>(c.order[r] & 0xffffffffu)] = c.w_canon[r];
  }
  __syncthreads();
  block_scan(c.w_id, count, /*exclusive=*/false, s);  // running weight in id order
  const double target = u * c.w_id[count - 1];
  int32_t mine = kNotFound;
  for (int32_t i = threadIdx.x; i < count; i += kThreads) {
    const double before = i == 0 ? 0.0 : c.w_id[i - 1];
    if (c.w_id[i] > target && c.w_id[i] > before) {
      mine = i;
      break;  // a thread's positions increase
    }
  }
  const int32_t pos = block_min_int(mine, s);
  return pos == kNotFound ? c.ids[count - 1] : c.ids[pos];
}

// ---- the kernel ----------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_tokens_kernel(SampleParams p) {
  __shared__ Scratch s;
  __shared__ Candidates c;
  const int64_t r = blockIdx.x;
  const RowView<T> row{static_cast<const typename T::bits*>(p.logits) + r * p.row_stride + p.lo, p.n};
  const float temperature = p.temperature ? p.temperature[r * p.t_stride] : p.temperature_value;
  const int64_t top_k = p.top_k ? p.top_k[r * p.k_stride] : p.top_k_value;
  const double top_p = p.top_p ? p.top_p[r * p.p_stride] : p.top_p_value;
  const bool bad_params = !(temperature >= 0.0f) || isinf(temperature) || top_k < 0 || !(top_p >= 0.0) ||
                          !(top_p <= 1.0);

  // 1. The largest key (lowest id on ties) and the number of finite logits.
  int32_t best_key = kNegInfKey, best_id = kNotFound, finite = 0;
  for (int32_t j = threadIdx.x; j < p.n; j += kThreads) {
    const int32_t key = row.key(j);
    finite += key != kNegInfKey;
    if (key > best_key) {  // ids increase along a thread: the first of equal keys stays
      best_key = key;
      best_id = j;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const int32_t ok = __shfl_xor_sync(kFullMask, best_key, m), oi = __shfl_xor_sync(kFullMask, best_id, m);
    if (ok > best_key || (ok == best_key && oi < best_id)) {
      best_key = ok;
      best_id = oi;
    }
  }
  if (lane == 0) {
    s.i[warp][7] = best_key;
    s.i[warp][8] = best_id;
  }
  __syncthreads();
  best_key = kNegInfKey;
  best_id = kNotFound;
  for (int w = 0; w < kWarps; ++w) {
    const int32_t ok = s.i[w][7], oi = s.i[w][8];
    if (ok > best_key || (ok == best_key && oi < best_id)) {
      best_key = ok;
      best_id = oi;
    }
  }
  __syncthreads();
  finite = block_sum_int(finite, s);

  int32_t token = 0;
  const bool bad = bad_params || best_key == kNegInfKey;
  if (bad) {
    token = 0;
  } else if (temperature == 0.0f) {
    token = best_id;
  } else {
    const uint64_t seed = p.seed ? static_cast<uint64_t>(*p.seed) : p.seed_value;
    const uint64_t offset = p.offset ? static_cast<uint64_t>(*p.offset) : p.offset_value;
    const double u = philox::row_uniform(seed, offset, static_cast<uint64_t>(r));
    const Weighting weight{temperature, static_cast<double>(scaled(key_value(best_key), temperature))};

    // 2. top-k.
    const int64_t k_eff = (top_k <= 0 || top_k >= p.n) ? p.n : top_k;
    Keep keep;
    int32_t kept = finite;
    if (k_eff < finite) {
      int32_t ties_total = 0, ties_wanted = 0;
      select_kth(row, static_cast<int32_t>(k_eff), keep.t, ties_total, ties_wanted, s);
      if (ties_wanted < ties_total) {
        const int32_t t = keep.t;
        keep.cut = find_nth(row, [t](int32_t key, int32_t) { return key == t; }, ties_wanted, s);
      }
      kept = static_cast<int32_t>(k_eff);
    }
    auto kept_pred = [keep](int32_t key, int32_t id) { return key != kNegInfKey && keep(key, id); };

    if (kept <= kCap) {
      // 3a.
      const int32_t count = min(compact(row, kept_pred, c.keys, c.ids, kCap, s), kCap);
      token = count > 0 ? draw_candidates(c, count, weight, top_p, u, s) : best_id;
    } else {
      // 3b.
      Keep nucleus;
      if (top_p < 1.0) {
        const double total = ordered_total(row, kept_pred, weight, s);
        const double target = top_p * total;
        int32_t t = 0, ties = 0;
        double above = 0;
        select_nucleus_key(row, keep, weight, target, t, above, ties, s);
        // The ties at t join in id order while the weight before them is < target; the first of
        // them always does when t is the largest key (it is then the canonical first id).
        int32_t taken = 0;
        if (threadIdx.x == 0) {
          const double wt = weight(t);
          double before = above;
          while (taken < ties && (before < target || (taken == 0 && t == best_key))) {
            before += wt;
            ++taken;
          }
          s.misc[5] = taken;
        }
        __syncthreads();
        taken = s.misc[5];
        __syncthreads();
        nucleus.t = t;
        nucleus.cut = kNotFound;
        if (taken == 0) {
          nucleus.cut = -1;  // only the keys above t
        } else if (taken < ties) {
          nucleus.cut = find_nth(row, [t, kept_pred](int32_t key, int32_t id) { return key == t && kept_pred(key, id); },
                                 taken, s);
        }
      }
      auto drawn_pred = [kept_pred, nucleus](int32_t key, int32_t id) {
        return kept_pred(key, id) && nucleus(key, id);
      };
      const int32_t id = ordered_draw(row, drawn_pred, weight, u, s);
      token = id == kNotFound ? best_id : id;
    }
  }
  if (threadIdx.x == 0) {
    p.tokens[r] = p.lo + token;
    if (bad && p.invalid != nullptr) p.invalid[r] = true;
  }
}

// ---- host -----------------------------------------------------------------------------------------

// A parameter tensor on the logits' device as `type` with stride 0 (one value) or 1 (per row); a
// one-element CPU tensor is read on the host instead (returns an undefined tensor, sets *value).
// Per-row values given as a CPU tensor are checked on the host, with the CPU op's messages.
void check_values(const at::Tensor& d) {
  if (d.scalar_type() == at::kFloat) {
    TORCH_CHECK_VALUE((at::isfinite(d) & (d >= 0)).all().item<bool>(),
                      "cogview: `temperature` must be finite and >= 0");
  } else if (d.scalar_type() == at::kLong) {
    TORCH_CHECK_VALUE((d >= 0).all().item<bool>(), "cogview: `top_k` must be >= 0 (0 = off)");
  } else {
    TORCH_CHECK_VALUE(((d >= 0) & (d <= 1)).all().item<bool>(), "cogview: `top_p` must lie in [0, 1]");
  }
}

template <typename V>
at::Tensor device_param(const std::optional<at::Tensor>& t, at::ScalarType type, const at::Device& device,
                        V* value, int64_t* stride) {
  *stride = 0;
  if (!t) return at::Tensor();
  if (!t->is_cuda() && t->numel() == 1) {
    *value = t->to(type).item().to<V>();
    return at::Tensor();
  }
  TORCH_CHECK_VALUE(!t->is_cuda() || t->device() == device, "cogview: sample_tokens parameters must be on the "
                    "logits' device ", device, ", got ", t->device());
  at::Tensor d = t->to(type).contiguous().reshape({-1});
  if (!d.is_cuda()) check_values(d);  // host values: checked like the CPU op does
  d = d.to(device);
  *stride = d.numel() == 1 ? 0 : 1;
  return d;
}

at::Tensor seed_param(const at::Tensor& t, const at::Device& device, uint64_t* value) {
  if (!t.is_cuda()) {
    *value = static_cast<uint64_t>(t.to(at::kLong).item<int64_t>());
    return at::Tensor();
  }
  TORCH_CHECK_VALUE(t.device() == device, "cogview: sample_tokens `seed`/`offset` on ", t.device(),
                    " but `logits` is on ", device);
  return t.to(at::kLong).reshape({1}).contiguous();
}

at::Tensor sample_tokens_cuda(const at::Tensor& logits_in, const at::Tensor& seed, const at::Tensor& offset,
                              const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
                              const std::optional<at::Tensor>& top_p, double temperature_value, int64_t top_k_value,
                              double top_p_value, int64_t vocab_lo, int64_t vocab_hi,
                              const std::optional<at::Tensor>& invalid) {
  ops::check_sample_tokens(logits_in, seed, offset, temperature, top_k, top_p, temperature_value, top_k_value,
                           top_p_value, vocab_lo, vocab_hi, invalid);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "cogview: sample_tokens (CUDA) got `logits` on ", logits_in.device());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Device device = logits_in.device();
  const int64_t rows = logits_in.size(0);
  const int64_t hi = vocab_hi < 0 ? logits_in.size(1) : vocab_hi;
  at::Tensor tokens = at::empty({rows}, logits_in.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), "cogview: sample_tokens: too many rows (", rows, ")");
  // Ids are int32 in the kernel, and loops step past the range by up to two tiles.
  TORCH_CHECK_VALUE(hi - vocab_lo <= std::numeric_limits<int32_t>::max() - 2 * kTile,
                    "cogview: sample_tokens on CUDA supports vocab ranges up to ",
                    std::numeric_limits<int32_t>::max() - 2 * kTile, " ids, got ", hi - vocab_lo);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();

  SampleParams p;
  p.logits = logits.data_ptr();
  p.row_stride = rows > 1 ? logits.stride(0) : 0;
  p.lo = vocab_lo;
  p.n = static_cast<int32_t>(hi - vocab_lo);
  p.temperature_value = static_cast<float>(temperature_value);
  p.top_k_value = top_k_value;
  p.top_p_value = top_p_value;
  const at::Tensor t_dev = device_param(temperature, at::kFloat, device, &p.temperature_value, &p.t_stride);
  const at::Tensor k_dev = device_param(top_k, at::kLong, device, &p.top_k_value, &p.k_stride);
  const at::Tensor p_dev = device_param(top_p, at::kDouble, device, &p.top_p_value, &p.p_stride);
  // Host-side values (scalars, one-element CPU tensors) are checked like the CPU op does.
  TORCH_CHECK_VALUE(std::isfinite(p.temperature_value) && p.temperature_value >= 0,
                    "cogview: `temperature` must be finite and >= 0, got ", p.temperature_value);
  TORCH_CHECK_VALUE(p.top_k_value >= 0, "cogview: `top_k` must be >= 0 (0 = off), got ", p.top_k_value);
  TORCH_CHECK_VALUE(p.top_p_value >= 0 && p.top_p_value <= 1, "cogview: `top_p` must lie in [0, 1], got ",
                    p.top_p_value);
  if (t_dev.defined()) p.temperature = t_dev.data_ptr<float>();
  if (k_dev.defined()) p.top_k = k_dev.data_ptr<int64_t>();
  if (p_dev.defined()) p.top_p = p_dev.data_ptr<double>();
  const at::Tensor seed_dev = seed_param(seed, device, &p.seed_value);
  const at::Tensor offset_dev = seed_param(offset, device, &p.offset_value);
  if (seed_dev.defined()) p.seed = seed_dev.data_ptr<int64_t>();
  if (offset_dev.defined()) p.offset = offset_dev.data_ptr<int64_t>();
  p.tokens = tokens.data_ptr<int64_t>();
  at::Tensor flags;
  if (invalid) {
    flags = invalid->is_contiguous() ? *invalid : invalid->contiguous();
    p.invalid = flags.data_ptr<bool>();
  }

  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(rows);
  switch (logits.scalar_type()) {
    case at::kHalf: sample_tokens_kernel<F16><<<blocks, kThreads, 0, stream>>>(p); break;
    case at::kBFloat16: sample_tokens_kernel<BF16><<<blocks, kThreads, 0, stream>>>(p); break;
    case at::kDouble: sample_tokens_kernel<F64><<<blocks, kThreads, 0, stream>>>(p); break;
    default: sample_tokens_kernel<F32><<<blocks, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (flags.defined() && !flags.is_same(*invalid)) invalid->copy_(flags);
  return tokens;
}

}  // namespace
}  // namespace cogview::cuda

TORCH_LIBRARY_IMPL(cogview, CUDA, m) { m.impl("sample_tokens", &cogview::cuda::sample_tokens_cuda); }
