// CUDA implementation of cogview::kv_cache_write and cogview::decode_attention (cached decoding).
//
// Same schemas and semantics as csrc/cpu/kv_cache_write.cpp and csrc/cpu/decode_attention.cpp, with
// one difference forced by the device: `start` and `lengths` live on the GPU and are read only by
// the kernels (no host synchronisation, so a decoding step can be captured in a CUDA graph). The
// CPU op raises on an out-of-range value; here nothing out of range is ever touched instead:
//   kv_cache_write   a sequence whose positions start[b] .. start[b] + n - 1 do not fit the cache
//                    is not written at all (the other sequences are);
//   decode_attention a sequence whose lengths[b] lies outside [n, max_len] gets NaN outputs.
//
// kv_cache_write: one thread per 16-byte pack (same dtype on both sides, aligned rows) or per element
// (dtype conversion through double, or unaligned rows); both caches in one launch.
//
// decode_attention (flash-decoding): the cache positions of each (b, h, query) are cut into chunks of
// `chunk` keys; one block of 128 threads per (row, chunk). Inside a block a key is handled by a
// group of L lanes (L = the power of two covering head_dim / VEC, VEC elements = 16 bytes per lane
// and load), so a warp works on 32 / L keys at a time and the block on 128 / L; every thread issues
// the K and V loads of U = 4 keys before using them. Each group runs an online softmax over its keys
// (scores reduced across its L lanes by xor shuffles), then the groups are combined through shared
// memory in a fixed order. With one chunk the block writes the output; otherwise it writes a partial
// (acc[d], max, sum) and a merge kernel (one warp per query) combines the chunks in a fixed order.
// No atomics: the same inputs on the same device give bitwise the same output. K and V are each read
// once per query (n = 1 per decoding step; with n > 1 each query re-reads its chunk, from L2).
// Rows that are not 16-byte aligned, head sizes that are no multiple of VEC, float64 caches and
// float64 queries take a scalar variant of the same kernel (VEC = 1, up to 8 elements per lane).
// head_dim is limited to 256 on CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops/decoding_checks.h"

namespace cogview::cuda {
namespace {

// ---- shared helpers -------------------------------------------------------------------------

Kind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Kind::f16;
    case at::kBFloat16: return Kind::bf16;
    case at::kDouble: return Kind::f64;
    default: return Kind::f32;
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_one_dyn(void* base, Kind kind, int64_t offset, acc_t v) {
  switch (kind) {
    case Kind::f16: store_one<F16>(base, offset, v); break;
    case Kind::bf16: store_one<BF16>(base, offset, v); break;
    case Kind::f64: store_one<F64>(base, offset, v); break;
    default: store_one<F32>(base, offset, v); break;
  }
}

__device__ __forceinline__ float device_exp(float v) { return expf(v); }
__device__ __forceinline__ double device_exp(double v) { return exp(v); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row of `t` ([B, H, rows, d], unit stride along d) starts on a 16-byte boundary.
bool rows_aligned16(const at::Tensor& t) {
  if (!aligned16(t.data_ptr())) return false;
  const int64_t size = t.element_size();
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1 && (t.stride(i) * size) % 16 != 0) return false;
  }
  return true;
}

at::Tensor unit_last(const at::Tensor& t) { return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous(); }

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---- kv_cache_write -------------------------------------------------------------------------

struct WriteParams {
  int64_t batch = 0, heads = 0, n = 0, dim = 0, max_len = 0;
  int64_t packs_per_row = 0, packs = 0;  // per tensor
  const int64_t* start = nullptr;        // [B], device
  void* cache[2] = {nullptr, nullptr};
  int64_t cache_stride[2][3] = {};  // b, h, position (elements)
  const void* src[2] = {nullptr, nullptr};
  Kind src_kind[2] = {Kind::f32, Kind::f32};
  int64_t src_stride[2][3] = {};
};

constexpr int kWriteThreads = 256;

// blockIdx.y: 0 = keys, 1 = values. VEC > 1 only when the source has the cache's dtype (raw copy).
template <typename CT, int VEC>
__global__ void __launch_bounds__(kWriteThreads) kv_cache_write_kernel(WriteParams p) {
  const int which = blockIdx.y;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < p.packs; idx += stride) {
    const int64_t row = idx / p.packs_per_row;
    const int64_t e = (idx - row * p.packs_per_row) * VEC;
    const int64_t i = row % p.n;
    const int64_t bh = row / p.n;
    const int64_t h = bh % p.heads, b = bh / p.heads;
    const int64_t s = p.start[b];
    if (s < 0 || s > p.max_len - p.n) continue;  // would overrun: this sequence is not written
    const int64_t dst = b * p.cache_stride[which][0] + h * p.cache_stride[which][1] +
                        (s + i) * p.cache_stride[which][2] + e;
    const int64_t src = b * p.src_stride[which][0] + h * p.src_stride[which][1] + i * p.src_stride[which][2] + e;
    if constexpr (VEC > 1) {
      using P = typename Pack<CT, VEC>::Type;
      *reinterpret_cast<P*>(static_cast<typename CT::bits*>(p.cache[which]) + dst) =
          *reinterpret_cast<const P*>(static_cast<const typename CT::bits*>(p.src[which]) + src);
    } else {
      if (p.src_kind[which] == CT::kind) {  // same dtype: copy the bits (NaN payloads and all)
        static_cast<typename CT::bits*>(p.cache[which])[dst] =
            static_cast<const typename CT::bits*>(p.src[which])[src];
      } else {  // through double: exact for every source, one rounding to the cache dtype
        const double v = load_one_dyn<double>(Ref{p.src[which], p.src_kind[which]}, src);
        static_cast<typename CT::bits*>(p.cache[which])[dst] = CT::from_acc(v);
      }
    }
  }
}

template <typename CT, int VEC>
void launch_write(WriteParams& p) {
  p.packs_per_row = p.dim / VEC;
  p.packs = p.batch * p.heads * p.n * p.packs_per_row;
  const int64_t blocks = std::min<int64_t>((p.packs + kWriteThreads - 1) / kWriteThreads, 65535);
  if (blocks == 0) return;
  kv_cache_write_kernel<CT, VEC><<<dim3(static_cast<unsigned>(blocks), 2), kWriteThreads, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename CT>
void dispatch_write(WriteParams& p, bool vec) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(typename CT::bits));
  if (vec) {
    launch_write<CT, kVec>(p);
  } else {
    launch_write<CT, 1>(p);
  }
}

void kv_cache_write_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new_in,
                         const at::Tensor& v_new_in, const at::Tensor& start_in) {
  ops::check_kv_cache_write(k_cache, v_cache, k_new_in, v_new_in, start_in);
  TORCH_CHECK_VALUE(k_cache.is_cuda(), "cogview: kv_cache_write (CUDA) got a cache on ", k_cache.device());
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const int64_t batch = k_cache.size(0), heads = k_cache.size(1), max_len = k_cache.size(2), dim = k_cache.size(3);
  const int64_t n = k_new_in.size(2);
  if (batch * heads * n * dim == 0) return;
  const at::Tensor start = start_in.to(at::kLong).contiguous();  // on the device: no synchronisation
  const at::Tensor k_new = unit_last(k_new_in), v_new = unit_last(v_new_in);
  const at::Tensor* caches[2] = {&k_cache, &v_cache};
  const at::Tensor* news[2] = {&k_new, &v_new};
  if (k_cache.stride(3) != 1 && dim > 1) {
    // Rare layout: a contiguous staging copy of the caches, written and copied back.
    at::Tensor k_tmp = k_cache.contiguous(), v_tmp = v_cache.contiguous();
    kv_cache_write_cuda(k_tmp, v_tmp, k_new, v_new, start);
    k_cache.copy_(k_tmp);
    v_cache.copy_(v_tmp);
    return;
  }
  WriteParams p;
  p.batch = batch;
  p.heads = heads;
  p.n = n;
  p.dim = dim;
  p.max_len = max_len;
  p.start = start.data_ptr<int64_t>();
  bool vec = dim % (16 / k_cache.element_size()) == 0;
  for (int t = 0; t < 2; ++t) {
    p.cache[t] = caches[t]->data_ptr();
    p.src[t] = news[t]->data_ptr();
    p.src_kind[t] = kind_of(*news[t]);
    for (int i = 0; i < 3; ++i) {
      p.cache_stride[t][i] = caches[t]->stride(i);
      p.src_stride[t][i] = news[t]->stride(i);
    }
    vec = vec && news[t]->scalar_type() == k_cache.scalar_type() && rows_aligned16(*caches[t]) &&
          rows_aligned16(*news[t]);
  }
  switch (k_cache.scalar_type()) {
    case at::kHalf: dispatch_write<F16>(p, vec); break;
    case at::kBFloat16: dispatch_write<BF16>(p, vec); break;
    case at::kDouble: dispatch_write<F64>(p, vec); break;
    default: dispatch_write<F32>(p, vec); break;
  }
}

// ---- decode_attention -----------------------------------------------------------------------

constexpr int kAttnThreads = 128;
constexpr int kUnroll = 4;       // keys per group per iteration (their loads are issued together)
constexpr int kMaxHeadDim = 256;
constexpr int kMergeWarps = 4;

struct AttnParams {
  int64_t heads = 0, n = 0, dim = 0, max_len = 0;
  const void* q = nullptr;
  Kind q_kind = Kind::f32;
  int64_t q_stride[3] = {};  // b, h, i
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_stride[3] = {}, v_stride[3] = {};  // b, h, position
  const int64_t* lengths = nullptr;            // [B], device
  double scale = 1.0, text_bias = 0.0;
  int64_t text_len = 0;
  void* out = nullptr;  // [B, H, n, d] contiguous, q's dtype
  Kind out_kind = Kind::f32;
  int64_t chunk = 0;
  int chunks = 1;
  void* partials = nullptr;  // acc [B * H * n, chunks, d + 2] (unused with one chunk)
  int lanes = 1;             // lanes per key: a power of two <= 32
};

// The row (b, h, i) of a flat query index and its visible length; false when lengths[b] is out of range.
struct QueryRow {
  int64_t b, h, i, len;
  bool ok;
};

__device__ __forceinline__ QueryRow query_row(const AttnParams& p, int64_t row) {
  QueryRow r;
  r.i = row % p.n;
  const int64_t bh = row / p.n;
  r.h = bh % p.heads;
  r.b = bh / p.heads;
  r.len = p.lengths[r.b];
  r.ok = r.len >= p.n && r.len <= p.max_len;
  return r;
}

// One (query row, chunk) per block. VEC elements per lane and load, P loads per lane per key row.
template <typename KV, typename acc_t, int VEC, int P>
__global__ void __launch_bounds__(kAttnThreads) decode_chunk_kernel(AttnParams p) {
  using bits = typename KV::bits;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr int kSlots = kAttnThreads * VEC * P;  // group rows in shared memory (>= groups * d)
  __shared__ acc_t acc_s[kSlots];
  __shared__ acc_t m_s[kAttnThreads], l_s[kAttnThreads], f_s[kAttnThreads];

  const int64_t row = blockIdx.x / p.chunks;
  const int c = static_cast<int>(blockIdx.x % p.chunks);
  const QueryRow r = query_row(p, row);
  const int64_t d = p.dim;
  const bool direct = p.chunks == 1;
  if (!r.ok) {
    if (direct) {
      for (int64_t e = threadIdx.x; e < d; e += kAttnThreads) {
        store_one_dyn(p.out, p.out_kind, row * d + e, std::numeric_limits<acc_t>::quiet_NaN());
      }
    }
    return;  // split: the merge kernel writes the NaNs
  }
  const int64_t qpos = r.len - p.n + r.i;  // this query sees positions <= qpos
  const int64_t c0 = static_cast<int64_t>(c) * p.chunk;
  if (c0 > qpos) return;  // nothing visible in this chunk: no partial (the merge does not read it)
  const int64_t c1 = min(c0 + p.chunk, qpos + 1);

  const int L = p.lanes;
  const int groups = kAttnThreads / L;
  const int group = threadIdx.x / L, lane = threadIdx.x % L;

  acc_t q[P][VEC], acc[P][VEC];
  const int64_t q_off = r.b * p.q_stride[0] + r.h * p.q_stride[1] + r.i * p.q_stride[2];
#pragma unroll
  for (int pp = 0; pp < P; ++pp) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int64_t e = (static_cast<int64_t>(pp) * L + lane) * VEC + v;
      q[pp][v] = e < d ? load_one_dyn<acc_t>(Ref{p.q, p.q_kind}, q_off + e) : acc_t(0);
      acc[pp][v] = 0;
    }
  }
  const bits* k_base = static_cast<const bits*>(p.k) + r.b * p.k_stride[0] + r.h * p.k_stride[1];
  const bits* v_base = static_cast<const bits*>(p.v) + r.b * p.v_stride[0] + r.h * p.v_stride[1];
  const acc_t scale = static_cast<acc_t>(p.scale), bias = static_cast<acc_t>(p.text_bias);
  acc_t m = kNegInf, l = 0;

  // Uniform trip count for the whole block (shuffles below need every lane of a warp).
  for (int64_t base = c0; base < c1; base += static_cast<int64_t>(kUnroll) * groups) {
    bits kr[kUnroll][P][VEC], vr[kUnroll][P][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + static_cast<int64_t>(u) * groups + group;
#pragma unroll
      for (int pp = 0; pp < P; ++pp) {
        const int64_t e = (static_cast<int64_t>(pp) * L + lane) * VEC;
        if (j < c1 && e < d) {
          load_raw<KV, VEC>(k_base, j * p.k_stride[2] + e, kr[u][pp]);
          load_raw<KV, VEC>(v_base, j * p.v_stride[2] + e, vr[u][pp]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) kr[u][pp][v] = vr[u][pp][v] = 0;
        }
      }
    }
    acc_t s[kUnroll];
    acc_t m_new = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc_t dot = 0;
#pragma unroll
      for (int pp = 0; pp < P; ++pp) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) dot += q[pp][v] * to_acc<KV, acc_t>(kr[u][pp][v]);
      }
      for (int w = L / 2; w > 0; w >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, w);
      const int64_t j = base + static_cast<int64_t>(u) * groups + group;
      s[u] = j < c1 ? dot * scale + (j < p.text_len ? bias : acc_t(0)) : kNegInf;
      m_new = s[u] > m_new ? s[u] : m_new;  // NaN never wins (it still poisons the sums, as on the CPU)
    }
    if (m_new == kNegInf) continue;  // only -inf logits so far
    const acc_t alpha = device_exp(m - m_new);  // 0 while m is -inf
    l *= alpha;
#pragma unroll
    for (int pp = 0; pp < P; ++pp) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[pp][v] *= alpha;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const acc_t w = device_exp(s[u] - m_new);  // 0 for the missing keys (-inf)
      l += w;
#pragma unroll
      for (int pp = 0; pp < P; ++pp) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[pp][v] += w * to_acc<KV, acc_t>(vr[u][pp][v]);
      }
    }
    m = m_new;
  }

  // Combine the groups: row `group` of acc_s holds the group's accumulator by element index.
  const int width = L * VEC * P;
#pragma unroll
  for (int pp = 0; pp < P; ++pp) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc_s[group * width + (pp * L + lane) * VEC + v] = acc[pp][v];
  }
  if (lane == 0) {
    m_s[group] = m;
    l_s[group] = l;
  }
  __syncthreads();
  acc_t top = kNegInf;
  for (int g = 0; g < groups; ++g) top = m_s[g] > top ? m_s[g] : top;
  if (threadIdx.x < groups) {
    const acc_t mg = m_s[threadIdx.x];
    f_s[threadIdx.x] = mg == kNegInf ? acc_t(0) : device_exp(mg - top);
  }
  __syncthreads();
  acc_t total = 0;
  for (int g = 0; g < groups; ++g) total += l_s[g] * f_s[g];
  acc_t* part = direct ? nullptr : static_cast<acc_t*>(p.partials) + (row * p.chunks + c) * (d + 2);
  for (int64_t e = threadIdx.x; e < d; e += kAttnThreads) {
    acc_t num = 0;
    for (int g = 0; g < groups; ++g) num += acc_s[g * width + e] * f_s[g];
    if (direct) {
      store_one_dyn(p.out, p.out_kind, row * d + e, num / total);
    } else {
      part[e] = num;
    }
  }
  if (!direct && threadIdx.x == 0) {
    part[d] = top;
    part[d + 1] = total;
  }
}

// One warp per query row: combines the partials of the chunks it sees, in chunk order.
template <typename acc_t>
__global__ void __launch_bounds__(kMergeWarps * 32) decode_merge_kernel(AttnParams p, int64_t rows) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const QueryRow r = query_row(p, row);
  const int64_t d = p.dim;
  if (!r.ok) {
    for (int64_t e = lane; e < d; e += 32) {
      store_one_dyn(p.out, p.out_kind, row * d + e, std::numeric_limits<acc_t>::quiet_NaN());
    }
    return;
  }
  const int64_t qpos = r.len - p.n + r.i;
  const int seen = static_cast<int>(qpos / p.chunk) + 1;  // chunks 0 .. seen-1 wrote a partial
  const acc_t* first = static_cast<const acc_t*>(p.partials) + row * p.chunks * (d + 2);
  acc_t top = kNegInf;
  for (int c = lane; c < seen; c += 32) {
    const acc_t mc = first[c * (d + 2) + d];
    top = mc > top ? mc : top;
  }
  top = warp_max(top);
  acc_t den = 0;
  for (int c = lane; c < seen; c += 32) {
    const acc_t* part = first + c * (d + 2);
    if (part[d + 1] > 0) den += device_exp(part[d] - top) * part[d + 1];
  }
  den = warp_sum(den);
  for (int64_t e = lane; e < d; e += 32) {
    acc_t num = 0;
    for (int c = 0; c < seen; ++c) {
      const acc_t* part = first + c * (d + 2);
      if (part[d + 1] > 0) num += device_exp(part[d] - top) * part[e];
    }
    store_one_dyn(p.out, p.out_kind, row * d + e, num / den);
  }
}

template <typename KV, typename acc_t, int VEC, int P>
void launch_chunks(const AttnParams& p, int64_t rows) {
  const int64_t blocks = rows * p.chunks;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "cogview: decode_attention is too large for one launch");
  decode_chunk_kernel<KV, acc_t, VEC, P><<<static_cast<unsigned>(blocks), kAttnThreads, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void run_attention(AttnParams& p, int64_t rows, at::ScalarType kv_type, bool fast) {
  // General (scalar) variant: VEC = 1, up to 8 elements per lane.
  auto general = [&](auto kv) {
    using KV = decltype(kv);
    p.lanes = static_cast<int>(std::min<int64_t>(32, next_pow2(p.dim)));
    launch_chunks<KV, acc_t, 1, 8>(p, rows);
  };
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fast) {
      auto vectorized = [&](auto kv) {
        using KV = decltype(kv);
        constexpr int kVec = 16 / static_cast<int>(sizeof(typename KV::bits));
        p.lanes = next_pow2(p.dim / kVec);
        launch_chunks<KV, float, kVec, 1>(p, rows);
      };
      switch (kv_type) {
        case at::kHalf: vectorized(F16{}); break;
        case at::kBFloat16: vectorized(BF16{}); break;
        default: vectorized(F32{}); break;
      }
    } else {
      switch (kv_type) {
        case at::kHalf: general(F16{}); break;
        case at::kBFloat16: general(BF16{}); break;
        case at::kDouble: general(F64{}); break;
        default: general(F32{}); break;
      }
    }
  } else {
    switch (kv_type) {
      case at::kHalf: general(F16{}); break;
      case at::kBFloat16: general(BF16{}); break;
      case at::kDouble: general(F64{}); break;
      default: general(F32{}); break;
    }
  }
  if (p.chunks > 1) {
    const int64_t blocks = (rows + kMergeWarps - 1) / kMergeWarps;
    decode_merge_kernel<acc_t><<<static_cast<unsigned>(blocks), kMergeWarps * 32, 0,
                                 at::cuda::getCurrentCUDAStream()>>>(p, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& lengths_in, double scale, int64_t text_len, double text_bias) {
  ops::check_decode_attention(q_in, k_in, v_in, lengths_in, scale, text_bias);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "cogview: decode_attention (CUDA) got `q` on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t batch = k_in.size(0), heads = k_in.size(1), max_len = k_in.size(2), dim = k_in.size(3);
  const int64_t n = q_in.size(2);
  TORCH_CHECK_VALUE(dim <= kMaxHeadDim, "cogview: decode_attention on CUDA supports head_dim up to ", kMaxHeadDim,
                    ", got ", dim);
  at::Tensor out = at::empty({batch, heads, n, dim}, q_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor lengths = lengths_in.to(at::kLong).contiguous();  // stays on the device
  const bool f64 = q.scalar_type() == at::kDouble;
  const int64_t rows = batch * heads * n;

  AttnParams p;
  p.heads = heads;
  p.n = n;
  p.dim = dim;
  p.max_len = max_len;
  p.q = q.data_ptr();
  p.q_kind = kind_of(q);
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.lengths = lengths.data_ptr<int64_t>();
  p.scale = scale;
  p.text_bias = text_bias;
  p.text_len = text_len;
  p.out = out.data_ptr();
  p.out_kind = kind_of(out);

  // Split so that about four blocks per multiprocessor are in flight (one sequence fills the GPU);
  // chunks of at least 64 keys, a multiple of 32. Depends on shapes and the device only.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (4 * sms + rows - 1) / rows);
  int64_t chunk = (max_len + want - 1) / want;
  chunk = std::max<int64_t>(64, (chunk + 31) / 32 * 32);
  p.chunk = chunk;
  p.chunks = static_cast<int>((max_len + chunk - 1) / chunk);
  at::Tensor partials;
  if (p.chunks > 1) {
    partials = at::empty({rows * p.chunks * (dim + 2)}, q.options().dtype(f64 ? at::kDouble : at::kFloat));
    p.partials = partials.data_ptr();
  }
  const at::ScalarType kv_type = k.scalar_type();
  const int64_t vec = 16 / k.element_size();
  const bool fast = !f64 && kv_type != at::kDouble && dim % vec == 0 && dim / vec <= 32 && rows_aligned16(k) &&
                    rows_aligned16(v);
  if (f64) {
    run_attention<double>(p, rows, kv_type, false);
  } else {
    run_attention<float>(p, rows, kv_type, fast);
  }
  return out;
}

}  // namespace
}  // namespace cogview::cuda

TORCH_LIBRARY_IMPL(cogview, CUDA, m) {
  m.impl("kv_cache_write", &cogview::cuda::kv_cache_write_cuda);
  m.impl("decode_attention", &cogview::cuda::decode_attention_cuda);
}
