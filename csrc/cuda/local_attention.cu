// CUDA implementation of cogview::local_attention and cogview::local_attention_backward.
//
// Same schema and semantics as csrc/cpu/local_attention.cpp (reference: cogview/ops/reference.py).
//
// float16/bfloat16 forwards with head_dim a multiple of 8 (<= 128) run on tensor cores (WMMA; see
// local_attention_mma.cuh). Everything else, and the whole backward, runs the SIMT kernels below
// (no tensor cores yet): correct first. Every query (forward, dq) or key
// (dk/dv, text-key gradients) is handled by a group of G lanes (8, or 16 for head_dim > 128) that
// split head_dim, EPL contiguous elements per lane (16-byte loads when rows allow), dot products
// reduced across the group by xor shuffles (identical bits in every lane). Groups of a block cover
// a 2D patch of the grid (8 columns wide), so the keys their windows share are read from L1.
// No score tensor is stored; the only scratch is per-query delta = rowsum(dO * O) - dlse.
//
// Forward: per query, an online softmax over the text keys (+ text_bias), then the window keys
// (clipped to the grid; causal: only keys at or before the query), writing out and lse.
// Backward (recomputes the probabilities from lse): P = exp(s - lse), dS = P * (dO.v - delta):
//   dq kernel   (query-centric)  dq = scale * sum_j dS k_j; also writes delta;
//   dkv kernel  (key-centric)    dk = scale * sum_i dS q_i, dv = sum_i P dO_i over the queries whose
//                                window holds the key (and, for batch-1 k/v, over the batch, in order);
//   text kernel (text-key-centric, per chunk of 512 queries) partial sums, then summed over the
//                                chunks (and the broadcast batch) by ATen's deterministic reduction.
// No atomics anywhere: every gradient is summed in a fixed order (bitwise reproducible).
// head_dim up to 256 on CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/common.cuh"
#include "ops/local_attention_checks.h"

namespace cogview::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileW = 8;          // grid columns per block (queries or keys)
constexpr int kMaxHeadDim = 256;
constexpr int64_t kTextChunk = 512;  // queries per partial sum of the text-key gradients

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, F64>, double, float>;

__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float device_exp(float v) { return expf(v); }
__device__ __forceinline__ double device_exp(double v) { return exp(v); }
__device__ __forceinline__ float device_log(float v) { return logf(v); }
__device__ __forceinline__ double device_log(double v) { return log(v); }

// An input: base pointer and element strides (batch stride 0 broadcasts a batch-1 tensor).
struct Src {
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
};

struct Params {
  int64_t batch = 0, heads = 0, k_batch = 0, text_batch = 0;
  int64_t q_h = 0, q_w = 0, k_h = 0, k_w = 0, rh = 0, rw = 0, sh = 1, sw = 1;
  int64_t d = 0, text = 0, n_q = 0, n_k = 0;
  bool causal = false;
  bool vec = false;  // every row is aligned for EPL-element packs and d % EPL == 0
  int group = 8;     // lanes per query / key
  double scale = 1.0, text_bias = 0.0;
  Src q, k, v, tk, tv;
  void* out = nullptr;  // contiguous [B, H, n_q, d], q's dtype
  void* lse = nullptr;  // contiguous acc [B, H, n_q]
  // backward
  Src go, o;                        // grad_out (ptr null: no gradient reached out) and out
  const void* lse_in = nullptr;     // contiguous acc [B, H, n_q]
  const void* glse = nullptr;       // contiguous acc [B, H, n_q] or null
  void* delta = nullptr;            // contiguous acc [B, H, n_q]: rowsum(dO * O) - dlse
  void* dq = nullptr;               // contiguous [B, H, n_q, d]
  void* dk = nullptr;               // contiguous [k_batch, H, n_k, d]
  void* dv = nullptr;
  void* dtext = nullptr;            // acc partials [2][text_batch, H, chunks, T, d]
  int64_t chunks = 0;
};

// ---- group helpers --------------------------------------------------------------------------

struct Group {
  int lane;       // lane inside the group
  int index;      // group index inside the block
  unsigned mask;  // the group's lanes in the warp
  int size;
};

__device__ __forceinline__ Group make_group(int size) {
  Group g;
  g.size = size;
  g.lane = threadIdx.x % size;
  g.index = threadIdx.x / size;
  const int first = (threadIdx.x % 32) / size * size;
  g.mask = (size == 32 ? 0xffffffffu : ((1u << size) - 1u)) << first;
  return g;
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(const Group& g, acc_t v) {
  for (int m = g.size / 2; m > 0; m >>= 1) v += __shfl_xor_sync(g.mask, v, m);
  return v;
}

// This lane's EPL elements of a row (zeros beyond d).
template <typename T, int EPL, typename acc_t>
__device__ __forceinline__ void load_slice(const void* base, int64_t row_offset, int e0, int64_t d, bool vec,
                                           acc_t (&out)[EPL]) {
  if (vec) {
    if (e0 < d) {
      load_vec<T, EPL>(base, row_offset + e0, out);
    } else {
#pragma unroll
      for (int i = 0; i < EPL; ++i) out[i] = 0;
    }
  } else {
#pragma unroll
    for (int i = 0; i < EPL; ++i) out[i] = e0 + i < d ? load_one<T, acc_t>(base, row_offset + e0 + i) : acc_t(0);
  }
}

template <typename T, int EPL, typename acc_t>
__device__ __forceinline__ void store_slice(void* base, int64_t row_offset, int e0, int64_t d, const acc_t (&in)[EPL]) {
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    if (e0 + i < d) store_one<T>(base, row_offset + e0 + i, in[i]);
  }
}

template <int EPL, typename acc_t>
__device__ __forceinline__ acc_t partial_dot(const acc_t (&a)[EPL], const acc_t (&b)[EPL]) {
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < EPL; ++i) s += a[i] * b[i];
  return s;
}

__device__ __forceinline__ int64_t row_of(const Src& s, int64_t b, int64_t h, int64_t n) {
  return b * s.sb + h * s.sh + n * s.sn;
}

// The window rows/columns of query (y, x): [y0, y1] x [x0, x1] in the key grid.
struct Window {
  int64_t y0, y1, x0, x1;
};

__device__ __forceinline__ Window window_of(const Params& p, int64_t y, int64_t x) {
  const int64_t cy = y / p.sh, cx = x / p.sw;
  Window w{imax(0, cy - p.rh), imin(p.k_h - 1, cy + p.rh), imax(0, cx - p.rw),
           imin(p.k_w - 1, cx + p.rw)};
  if (p.causal) w.y1 = imin(w.y1, y);  // same grid: keys at or before (y, x) in raster order
  return w;
}

// The block's grid cell for this group: tiles of kTileW columns x (groups / kTileW) rows.
__device__ __forceinline__ void cell_of(const Group& g, int64_t tiles_w, int64_t& y, int64_t& x) {
  const int per_block = kThreads / g.size;
  const int rows = per_block / kTileW;
  const int64_t tile = blockIdx.x;
  y = (tile / tiles_w) * rows + g.index / kTileW;
  x = (tile % tiles_w) * kTileW + g.index % kTileW;
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T, int EPL>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p, int64_t tiles_w) {
  using acc_t = acc_of<T>;
  const Group g = make_group(p.group);
  int64_t y, x;
  cell_of(g, tiles_w, y, x);
  if (y >= p.q_h || x >= p.q_w) return;  // whole groups leave together
  const int64_t b = blockIdx.z, h = blockIdx.y, qi = y * p.q_w + x;
  const int e0 = g.lane * EPL;
  const acc_t scale = static_cast<acc_t>(p.scale), bias = static_cast<acc_t>(p.text_bias);
  acc_t q[EPL], kv[EPL], acc[EPL];
  load_slice<T, EPL>(p.q.ptr, row_of(p.q, b, h, qi), e0, p.d, p.vec, q);
#pragma unroll
  for (int i = 0; i < EPL; ++i) acc[i] = 0;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), l = 0;

  auto visit = [&](const Src& ks, const Src& vs, int64_t kb, int64_t n, acc_t add) {
    load_slice<T, EPL>(ks.ptr, row_of(ks, kb, h, n), e0, p.d, p.vec, kv);
    const acc_t s = group_sum(g, partial_dot(q, kv)) * scale + add;
    if (s > m) {  // a new maximum: rescale what is accumulated (exp(-inf) = 0 at the start)
      const acc_t alpha = device_exp(m - s);
      l *= alpha;
#pragma unroll
      for (int i = 0; i < EPL; ++i) acc[i] *= alpha;
      m = s;
    }
    const acc_t w = device_exp(s - m);  // NaN scores poison the row, like the CPU kernel
    l += w;
    load_slice<T, EPL>(vs.ptr, row_of(vs, kb, h, n), e0, p.d, p.vec, kv);
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[i] += w * kv[i];
  };

  const int64_t tb = p.text_batch == 1 ? 0 : b, kb = p.k_batch == 1 ? 0 : b;
  for (int64_t t = 0; t < p.text; ++t) visit(p.tk, p.tv, tb, t, bias);
  const Window w = window_of(p, y, x);
  for (int64_t ky = w.y0; ky <= w.y1; ++ky) {
    const int64_t x1 = (p.causal && ky == y) ? imin(w.x1, x) : w.x1;
    for (int64_t kx = w.x0; kx <= x1; ++kx) visit(p.k, p.v, kb, ky * p.k_w + kx, acc_t(0));
  }

  const acc_t inv = acc_t(1) / l;
#pragma unroll
  for (int i = 0; i < EPL; ++i) acc[i] *= inv;
  const int64_t row = (b * p.heads + h) * p.n_q + qi;
  store_slice<T, EPL>(p.out, row * p.d, e0, p.d, acc);
  if (g.lane == 0) static_cast<acc_t*>(p.lse)[row] = m + device_log(l);
}

// ---- backward: dq (query-centric) ---------------------------------------------------------------

template <typename T, int EPL>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(Params p, int64_t tiles_w) {
  using acc_t = acc_of<T>;
  const Group g = make_group(p.group);
  int64_t y, x;
  cell_of(g, tiles_w, y, x);
  if (y >= p.q_h || x >= p.q_w) return;
  const int64_t b = blockIdx.z, h = blockIdx.y, qi = y * p.q_w + x;
  const int64_t row = (b * p.heads + h) * p.n_q + qi;
  const int e0 = g.lane * EPL;
  const acc_t scale = static_cast<acc_t>(p.scale), bias = static_cast<acc_t>(p.text_bias);
  const bool has_go = p.go.ptr != nullptr;
  acc_t q[EPL], go[EPL], kv[EPL], dq[EPL];
  load_slice<T, EPL>(p.q.ptr, row_of(p.q, b, h, qi), e0, p.d, p.vec, q);
  acc_t delta = 0;
  if (has_go) {
    load_slice<T, EPL>(p.go.ptr, row_of(p.go, b, h, qi), e0, p.d, p.vec, go);
    load_slice<T, EPL>(p.o.ptr, row_of(p.o, b, h, qi), e0, p.d, p.vec, kv);
    delta = group_sum(g, partial_dot(go, kv));
  } else {
#pragma unroll
    for (int i = 0; i < EPL; ++i) go[i] = 0;
  }
  if (p.glse != nullptr) delta -= static_cast<const acc_t*>(p.glse)[row];
  if (g.lane == 0) static_cast<acc_t*>(p.delta)[row] = delta;
  const acc_t lse = static_cast<const acc_t*>(p.lse_in)[row];
#pragma unroll
  for (int i = 0; i < EPL; ++i) dq[i] = 0;

  auto visit = [&](const Src& ks, const Src& vs, int64_t kb, int64_t n, acc_t add) {
    acc_t dp = 0;
    if (has_go) {
      load_slice<T, EPL>(vs.ptr, row_of(vs, kb, h, n), e0, p.d, p.vec, kv);
      dp = group_sum(g, partial_dot(go, kv));
    }
    load_slice<T, EPL>(ks.ptr, row_of(ks, kb, h, n), e0, p.d, p.vec, kv);
    const acc_t s = group_sum(g, partial_dot(q, kv)) * scale + add;
    const acc_t ds = device_exp(s - lse) * (dp - delta);
#pragma unroll
    for (int i = 0; i < EPL; ++i) dq[i] += ds * kv[i];
  };

  const int64_t tb = p.text_batch == 1 ? 0 : b, kb = p.k_batch == 1 ? 0 : b;
  for (int64_t t = 0; t < p.text; ++t) visit(p.tk, p.tv, tb, t, bias);
  const Window w = window_of(p, y, x);
  for (int64_t ky = w.y0; ky <= w.y1; ++ky) {
    const int64_t x1 = (p.causal && ky == y) ? imin(w.x1, x) : w.x1;
    for (int64_t kx = w.x0; kx <= x1; ++kx) visit(p.k, p.v, kb, ky * p.k_w + kx, acc_t(0));
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) dq[i] *= scale;
  store_slice<T, EPL>(p.dq, row * p.d, e0, p.d, dq);
}

// ---- backward: dk, dv (key-centric) -------------------------------------------------------------

template <typename T, int EPL>
__global__ void __launch_bounds__(kThreads) backward_dkv_kernel(Params p, int64_t tiles_w) {
  using acc_t = acc_of<T>;
  const Group g = make_group(p.group);
  int64_t ky, kx;
  cell_of(g, tiles_w, ky, kx);
  if (ky >= p.k_h || kx >= p.k_w) return;
  const int64_t kb = blockIdx.z, h = blockIdx.y, kj = ky * p.k_w + kx;
  const int e0 = g.lane * EPL;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const bool has_go = p.go.ptr != nullptr;
  acc_t k[EPL], v[EPL], qv[EPL], go[EPL], dk[EPL], dv[EPL];
  load_slice<T, EPL>(p.k.ptr, row_of(p.k, kb, h, kj), e0, p.d, p.vec, k);
  load_slice<T, EPL>(p.v.ptr, row_of(p.v, kb, h, kj), e0, p.d, p.vec, v);
#pragma unroll
  for (int i = 0; i < EPL; ++i) dk[i] = dv[i] = 0;
  // The queries whose window holds this key: rows y with |y / sh - ky| <= rh, columns alike.
  int64_t y0 = imax(0, (ky - p.rh) * p.sh), y1 = imin(p.q_h - 1, (ky + p.rh + 1) * p.sh - 1);
  const int64_t x0 = imax(0, (kx - p.rw) * p.sw), x1 = imin(p.q_w - 1, (kx + p.rw + 1) * p.sw - 1);
  if (p.causal) y0 = imax(y0, ky);
  const int64_t b_first = p.k_batch == 1 ? 0 : kb, b_last = p.k_batch == 1 ? p.batch - 1 : kb;
  for (int64_t b = b_first; b <= b_last; ++b) {
    const acc_t* lse = static_cast<const acc_t*>(p.lse_in) + (b * p.heads + h) * p.n_q;
    const acc_t* delta = static_cast<const acc_t*>(p.delta) + (b * p.heads + h) * p.n_q;
    for (int64_t y = y0; y <= y1; ++y) {
      const int64_t xs = (p.causal && y == ky) ? imax(x0, kx) : x0;
      for (int64_t x = xs; x <= x1; ++x) {
        const int64_t qi = y * p.q_w + x;
        load_slice<T, EPL>(p.q.ptr, row_of(p.q, b, h, qi), e0, p.d, p.vec, qv);
        const acc_t s = group_sum(g, partial_dot(qv, k)) * scale;
        const acc_t pr = device_exp(s - lse[qi]);
        acc_t dp = 0;
        if (has_go) {
          load_slice<T, EPL>(p.go.ptr, row_of(p.go, b, h, qi), e0, p.d, p.vec, go);
          dp = group_sum(g, partial_dot(go, v));
#pragma unroll
          for (int i = 0; i < EPL; ++i) dv[i] += pr * go[i];
        }
        const acc_t ds = pr * (dp - delta[qi]);
#pragma unroll
        for (int i = 0; i < EPL; ++i) dk[i] += ds * qv[i];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) dk[i] *= scale;
  const int64_t row = (kb * p.heads + h) * p.n_k + kj;
  store_slice<T, EPL>(p.dk, row * p.d, e0, p.d, dk);
  store_slice<T, EPL>(p.dv, row * p.d, e0, p.d, dv);
}

// ---- backward: text keys (one group per (text key, chunk of queries)) -------------------------------

template <typename T, int EPL>
__global__ void __launch_bounds__(kThreads) backward_text_kernel(Params p) {
  using acc_t = acc_of<T>;
  const Group g = make_group(p.group);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads / g.size) + g.index;
  if (item >= p.text * p.chunks) return;
  const int64_t t = item % p.text, c = item / p.text;
  const int64_t tb = blockIdx.z, h = blockIdx.y;
  const int e0 = g.lane * EPL;
  const acc_t scale = static_cast<acc_t>(p.scale), bias = static_cast<acc_t>(p.text_bias);
  const bool has_go = p.go.ptr != nullptr;
  acc_t k[EPL], v[EPL], qv[EPL], go[EPL], dk[EPL], dv[EPL];
  load_slice<T, EPL>(p.tk.ptr, row_of(p.tk, tb, h, t), e0, p.d, p.vec, k);
  load_slice<T, EPL>(p.tv.ptr, row_of(p.tv, tb, h, t), e0, p.d, p.vec, v);
#pragma unroll
  for (int i = 0; i < EPL; ++i) dk[i] = dv[i] = 0;
  const int64_t q0 = c * kTextChunk, q1 = imin(p.n_q, q0 + kTextChunk);
  const int64_t b_first = p.text_batch == 1 ? 0 : tb, b_last = p.text_batch == 1 ? p.batch - 1 : tb;
  for (int64_t b = b_first; b <= b_last; ++b) {
    const acc_t* lse = static_cast<const acc_t*>(p.lse_in) + (b * p.heads + h) * p.n_q;
    const acc_t* delta = static_cast<const acc_t*>(p.delta) + (b * p.heads + h) * p.n_q;
    for (int64_t qi = q0; qi < q1; ++qi) {
      load_slice<T, EPL>(p.q.ptr, row_of(p.q, b, h, qi), e0, p.d, p.vec, qv);
      const acc_t s = group_sum(g, partial_dot(qv, k)) * scale + bias;
      const acc_t pr = device_exp(s - lse[qi]);
      acc_t dp = 0;
      if (has_go) {
        load_slice<T, EPL>(p.go.ptr, row_of(p.go, b, h, qi), e0, p.d, p.vec, go);
        dp = group_sum(g, partial_dot(go, v));
#pragma unroll
        for (int i = 0; i < EPL; ++i) dv[i] += pr * go[i];
      }
      const acc_t ds = pr * (dp - delta[qi]);
#pragma unroll
      for (int i = 0; i < EPL; ++i) dk[i] += ds * qv[i];
    }
  }
  // partials [2][text_batch, H, chunks, T, d]
  acc_t* part = static_cast<acc_t*>(p.dtext);
  const int64_t half = p.text_batch * p.heads * p.chunks * p.text * p.d;
  const int64_t at = (((tb * p.heads + h) * p.chunks + c) * p.text + t) * p.d;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    if (e0 + i < p.d) {
      part[at + e0 + i] = dk[i] * scale;
      part[half + at + e0 + i] = dv[i];
    }
  }
}

}  // namespace
}  // namespace cogview::cuda

#include "cuda/local_attention_mma.cuh"

namespace cogview::cuda {
namespace {

// ---- host -----------------------------------------------------------------------------------------

// COGVIEW_LOCAL_ATTENTION_SIMT=1 sends float16/bfloat16 forwards to the SIMT kernel too (A/B checks).
bool simt_forced() {
  const char* v = std::getenv("COGVIEW_LOCAL_ATTENTION_SIMT");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous(); }

Src src_of(const at::Tensor& t) {
  return {t.data_ptr(), t.size(0) == 1 ? 0 : t.stride(0), t.stride(1), t.stride(2)};
}

// Rows of t start on multiples of `bytes` (all tensors are [B, H, N, d] with unit stride on d).
bool rows_aligned(const at::Tensor& t, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1 && (t.stride(i) * t.element_size()) % bytes != 0) return false;
  }
  return true;
}

struct Config {
  int group, epl;
};

Config config_for(int64_t d, at::ScalarType type) {
  if (type == at::kDouble) return {16, 16};
  if (d <= 64) return {8, 8};
  if (d <= 128) return {8, 16};
  return {16, 16};
}

bool vec_ok(const std::vector<const at::Tensor*>& tensors, const Config& c, int64_t d) {
  if (d % c.epl != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    const int64_t bytes = std::min<int64_t>(16, c.epl * t->element_size());
    if (!rows_aligned(*t, bytes)) return false;
  }
  return true;
}

template <typename Fn>
void dispatch(at::ScalarType type, const Config& c, Fn&& fn) {
  switch (type) {
    case at::kDouble: fn(F64{}, std::integral_constant<int, 16>{}); return;
    case at::kHalf:
      if (c.epl == 8) fn(F16{}, std::integral_constant<int, 8>{}); else fn(F16{}, std::integral_constant<int, 16>{});
      return;
    case at::kBFloat16:
      if (c.epl == 8) fn(BF16{}, std::integral_constant<int, 8>{}); else fn(BF16{}, std::integral_constant<int, 16>{});
      return;
    default:
      if (c.epl == 8) fn(F32{}, std::integral_constant<int, 8>{}); else fn(F32{}, std::integral_constant<int, 16>{});
      return;
  }
}

// Blocks over a grid of rows x cols cells, kThreads / group cells per block, kTileW columns wide.
dim3 grid_blocks(int64_t rows, int64_t cols, int group, int64_t heads, int64_t batch, int64_t* tiles_w) {
  const int64_t tile_rows = kThreads / group / kTileW;
  *tiles_w = (cols + kTileW - 1) / kTileW;
  const int64_t tiles = *tiles_w * ((rows + tile_rows - 1) / tile_rows);
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max() && heads <= 65535 && batch <= 65535,
              "cogview: local_attention is too large for one launch");
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
}

void fill_common(Params& p, const ops::LocalAttentionDims& d, bool causal, double text_bias, double scale) {
  p.batch = d.batch;
  p.heads = d.heads;
  p.k_batch = d.k_batch;
  p.text_batch = d.text_batch;
  p.q_h = d.q_h;
  p.q_w = d.q_w;
  p.k_h = d.k_h;
  p.k_w = d.k_w;
  p.rh = d.win_h / 2;
  p.rw = d.win_w / 2;
  p.sh = d.q_h / d.k_h;
  p.sw = d.q_w / d.k_w;
  p.d = d.head_dim;
  p.text = d.text;
  p.n_q = d.n_q;
  p.n_k = d.n_k;
  p.causal = causal;
  p.text_bias = text_bias;
  p.scale = scale;
}

std::tuple<at::Tensor, at::Tensor> local_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, at::IntArrayRef grid_q,
                                                        at::IntArrayRef grid_kv, at::IntArrayRef window, bool causal,
                                                        const std::optional<at::Tensor>& text_k,
                                                        const std::optional<at::Tensor>& text_v, double text_bias,
                                                        double scale) {
  const ops::LocalAttentionDims d =
      ops::check_local_attention(q_in, k_in, v_in, grid_q, grid_kv, window, causal, text_k, text_v, text_bias, scale);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "cogview: local_attention (CUDA) got `q` on ", q_in.device());
  TORCH_CHECK_VALUE(d.head_dim <= kMaxHeadDim, "cogview: local_attention on CUDA supports head_dim up to ",
                    kMaxHeadDim, ", got ", d.head_dim);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::ScalarType acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.n_q}, q_in.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor tk = d.text > 0 ? unit_last(*text_k) : at::Tensor();
  const at::Tensor tv = d.text > 0 ? unit_last(*text_v) : at::Tensor();
  Params p;
  fill_common(p, d, causal, text_bias, scale);
  if (d.text == 0) p.text = 0;
  const Config c = config_for(d.head_dim, q.scalar_type());
  p.group = c.group;
  p.vec = vec_ok({&q, &k, &v, &tk, &tv}, c, d.head_dim);
  p.q = src_of(q);
  p.k = src_of(k);
  p.v = src_of(v);
  if (d.text > 0) {
    p.tk = src_of(tk);
    p.tv = src_of(tv);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  const bool low = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const bool sm80 = at::cuda::getCurrentDeviceProperties()->major >= 8;
  if (low && sm80 && d.head_dim % 8 == 0 && d.head_dim <= kMmaMaxHeadDim && !simt_forced()) {
    // Tensor cores: 8 x 8 query patches, keys in chunks of 64 (local_attention_mma.cuh).
    p.vec = vec_ok({&q, &k, &v, &tk, &tv}, Config{8, 8}, d.head_dim);
    const MmaLayout layout = mma_layout(d.head_dim);
    const int64_t tiles_w = (d.q_w + kMmaPatch - 1) / kMmaPatch, tiles_h = (d.q_h + kMmaPatch - 1) / kMmaPatch;
    TORCH_CHECK(tiles_w * tiles_h <= std::numeric_limits<int32_t>::max() && d.heads <= 65535 && d.batch <= 65535,
                "cogview: local_attention is too large for one launch");
    const dim3 grid(static_cast<unsigned>(tiles_w * tiles_h), static_cast<unsigned>(d.heads),
                    static_cast<unsigned>(d.batch));
    auto launch = [&](auto kernel) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(layout.bytes)));
      kernel<<<grid, kMmaThreads, layout.bytes, at::cuda::getCurrentCUDAStream()>>>(p, tiles_w, layout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (q.scalar_type() == at::kHalf) {
      launch(forward_mma_kernel<F16>);
    } else {
      launch(forward_mma_kernel<BF16>);
    }
    return {out, lse};
  }
  int64_t tiles_w = 0;
  const dim3 grid = grid_blocks(d.q_h, d.q_w, c.group, d.heads, d.batch, &tiles_w);
  dispatch(q.scalar_type(), c, [&](auto t, auto epl) {
    using T = decltype(t);
    forward_kernel<T, decltype(epl)::value><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, tiles_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_backward_cuda(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    at::IntArrayRef grid_q, at::IntArrayRef grid_kv, at::IntArrayRef window, bool causal,
    const std::optional<at::Tensor>& text_k, const std::optional<at::Tensor>& text_v, double text_bias,
    double scale) {
  const ops::LocalAttentionDims d =
      ops::check_local_attention(q_in, k_in, v_in, grid_q, grid_kv, window, causal, text_k, text_v, text_bias, scale);
  ops::check_local_attention_backward(d, q_in, grad_out, grad_lse, out_in, lse_in);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "cogview: local_attention_backward (CUDA) got `q` on ", q_in.device());
  TORCH_CHECK_VALUE(d.head_dim <= kMaxHeadDim, "cogview: local_attention on CUDA supports head_dim up to ",
                    kMaxHeadDim, ", got ", d.head_dim);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::ScalarType type = q_in.scalar_type();
  const at::ScalarType acc = type == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dq = at::empty(q_in.sizes(), q_in.options());
  at::Tensor dk = at::empty(k_in.sizes(), k_in.options());
  at::Tensor dv = at::empty(v_in.sizes(), v_in.options());
  const bool has_text = text_k.has_value();
  at::Tensor dtk = has_text ? at::empty(text_k->sizes(), text_k->options()) : q_in.new_empty({0});
  at::Tensor dtv = has_text ? at::empty(text_v->sizes(), text_v->options()) : q_in.new_empty({0});
  if (dq.numel() == 0) {  // no queries: nothing reaches k, v or the text keys
    dk.zero_();
    dv.zero_();
    if (has_text) {
      dtk.zero_();
      dtv.zero_();
    }
    return {dq, dk, dv, dtk, dtv};
  }
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor tk = d.text > 0 ? unit_last(*text_k) : at::Tensor();
  const at::Tensor tv = d.text > 0 ? unit_last(*text_v) : at::Tensor();
  const at::Tensor go = grad_out ? unit_last(grad_out->to(type)) : at::Tensor();
  const at::Tensor o = grad_out ? unit_last(out_in.to(type)) : at::Tensor();
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor glse = grad_lse ? grad_lse->to(acc).contiguous() : at::Tensor();
  at::Tensor delta = at::empty({d.batch, d.heads, d.n_q}, q.options().dtype(acc));

  Params p;
  fill_common(p, d, causal, text_bias, scale);
  const Config c = config_for(d.head_dim, type);
  p.group = c.group;
  p.vec = vec_ok({&q, &k, &v, &tk, &tv, &go, &o}, c, d.head_dim);
  p.q = src_of(q);
  p.k = src_of(k);
  p.v = src_of(v);
  if (d.text > 0) {
    p.tk = src_of(tk);
    p.tv = src_of(tv);
  }
  if (go.defined()) {
    p.go = src_of(go);
    p.o = src_of(o);
  }
  p.lse_in = lse.data_ptr();
  p.glse = glse.defined() ? glse.data_ptr() : nullptr;
  p.delta = delta.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.chunks = (d.n_q + kTextChunk - 1) / kTextChunk;
  at::Tensor partials;
  if (d.text > 0) {
    partials = at::empty({2, d.text_batch, d.heads, p.chunks, d.text, d.head_dim}, q.options().dtype(acc));
    p.dtext = partials.data_ptr();
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  int64_t q_tiles_w = 0, k_tiles_w = 0;
  const dim3 q_grid = grid_blocks(d.q_h, d.q_w, c.group, d.heads, d.batch, &q_tiles_w);
  const dim3 k_grid = grid_blocks(d.k_h, d.k_w, c.group, d.heads, d.k_batch, &k_tiles_w);
  dispatch(type, c, [&](auto t, auto epl) {
    using T = decltype(t);
    constexpr int E = decltype(epl)::value;
    backward_dq_kernel<T, E><<<q_grid, kThreads, 0, stream>>>(p, q_tiles_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_dkv_kernel<T, E><<<k_grid, kThreads, 0, stream>>>(p, k_tiles_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (d.text > 0) {
      const int64_t per_block = kThreads / c.group;
      const int64_t blocks = (d.text * p.chunks + per_block - 1) / per_block;
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "cogview: local_attention: too many text keys");
      backward_text_kernel<T, E><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(d.heads),
                                        static_cast<unsigned>(d.text_batch)),
                                   kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (d.text > 0) {
    // Sum over the query chunks: ATen's reduction, deterministic for a fixed shape.
    const at::Tensor sums = partials.sum(3);  // [2, text_batch, H, T, d]
    dtk.copy_(sums[0]);
    dtv.copy_(sums[1]);
  } else if (has_text) {
    dtk.zero_();
    dtv.zero_();
  }
  return {dq, dk, dv, dtk, dtv};
}

}  // namespace
}  // namespace cogview::cuda

TORCH_LIBRARY_IMPL(cogview, CUDA, m) {
  m.impl("local_attention", &cogview::cuda::local_attention_cuda);
  m.impl("local_attention_backward", &cogview::cuda::local_attention_backward_cuda);
}
