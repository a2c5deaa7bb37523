// Tensor-core forward of cogview::local_attention for float16/bfloat16 (included by local_attention.cu).
//
// A block (4 warps) owns an 8 x 8 patch of queries of one (batch, head). The keys it needs are the
// text keys plus the union rectangle of its queries' windows (clipped to the key grid; causal: to
// rows <= the patch's last row), taken in chunks of 64 keys gathered into shared memory. Per chunk:
//   S = Q K^T          WMMA 16x16x16 (fp32 accumulate); warp w owns query rows 16w .. 16w+15;
//   mask + online softmax on the warp's rows (two lanes per row, 32 keys each), P rounded to the
//                      input dtype, the running output rescaled in shared memory;
//   O += P V           WMMA, accumulators loaded from and stored back to shared memory (fp32).
// After the warp's S is computed only its own rows are touched, so warps sync among themselves
// (__syncwarp) until the next chunk's keys are loaded. out = O / l, lse = m + log l. No score
// leaves shared memory. head_dim up to 128, a multiple of 8 (zero-padded to 16 in shared memory).
#pragma once

#include <mma.h>

namespace cogview::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kMmaThreads = 128;  // 4 warps x 16 query rows
constexpr int kMmaQ = 64;         // queries per block: an 8 x 8 patch
constexpr int kMmaPatch = 8;
constexpr int kMmaK = 64;         // keys per chunk
constexpr int kMmaMaxHeadDim = 128;
constexpr int kSLd = kMmaK + 4;   // fp32 scores row stride
constexpr int kPLd = kMmaK + 8;   // 16-bit probabilities row stride

template <typename T>
struct MmaElem;
template <>
struct MmaElem<F16> {
  using type = __half;
};
template <>
struct MmaElem<BF16> {
  using type = __nv_bfloat16;
};

struct MmaLayout {
  int dpad, ld, ldo;                    // head_dim padded to 16; 16-bit and fp32 row strides
  size_t q, k, v, s, pr, o, stats, bytes;  // byte offsets of each region
};

inline size_t round_up_128(size_t v) { return (v + 127) / 128 * 128; }

inline MmaLayout mma_layout(int64_t d) {
  MmaLayout L;
  L.dpad = static_cast<int>((d + 15) / 16 * 16);
  L.ld = L.dpad + 8;
  L.ldo = L.dpad + 4;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += round_up_128(bytes);
    return here;
  };
  L.q = take(size_t{kMmaQ} * L.ld * 2);
  L.k = take(size_t{kMmaK} * L.ld * 2);
  L.v = take(size_t{kMmaK} * L.ld * 2);
  L.s = take(size_t{kMmaQ} * kSLd * 4);
  L.pr = take(size_t{kMmaQ} * kPLd * 2);
  L.o = take(size_t{kMmaQ} * L.ldo * 4);
  L.stats = take(size_t{3} * kMmaQ * 4);
  L.bytes = at;
  return L;
}

// Rows [0, count) of a 64-row tile from `src` rows (index -> row offset), zero-padded to dpad
// columns and 64 rows; 16-byte loads when `vec`.
template <typename T, typename RowOffset>
__device__ __forceinline__ void load_tile(uint16_t* dst, int ld, const void* src, int count, int64_t d, int dpad,
                                          bool vec, RowOffset row_offset) {
  const uint16_t* base = static_cast<const uint16_t*>(src);
  if (vec) {  // d % 8 == 0 and every row 16-byte aligned
    const int packs = dpad / 8;
    for (int idx = threadIdx.x; idx < kMmaK * packs; idx += kMmaThreads) {
      const int r = idx / packs, e = (idx % packs) * 8;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < count && e < d) val = *reinterpret_cast<const uint4*>(base + row_offset(r) + e);
      *reinterpret_cast<uint4*>(dst + r * ld + e) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kMmaK * dpad; idx += kMmaThreads) {
      const int r = idx / dpad, e = idx % dpad;
      dst[r * ld + e] = (r < count && e < d) ? base[row_offset(r) + e] : uint16_t{0};
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads) forward_mma_kernel(Params p, int64_t tiles_w, MmaLayout L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 WMMA needs sm_80; the host never launches this on older devices
#else
  using elem = typename MmaElem<T>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem + L.q);
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem + L.k);
  uint16_t* vs = reinterpret_cast<uint16_t*>(smem + L.v);
  float* ss = reinterpret_cast<float*>(smem + L.s);
  uint16_t* ps = reinterpret_cast<uint16_t*>(smem + L.pr);
  float* os = reinterpret_cast<float*>(smem + L.o);
  float* m_s = reinterpret_cast<float*>(smem + L.stats);
  float* l_s = m_s + kMmaQ;
  float* a_s = l_s + kMmaQ;

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t ty = (static_cast<int64_t>(blockIdx.x) / tiles_w) * kMmaPatch;
  const int64_t tx = (static_cast<int64_t>(blockIdx.x) % tiles_w) * kMmaPatch;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t d = p.d;
  const int dpad = L.dpad, ld = L.ld, ldo = L.ldo;
  const float scale = static_cast<float>(p.scale), bias = static_cast<float>(p.text_bias);
  const float kNegInf = -INFINITY;

  // The patch's queries (rows of the tile): row r is (ty + r / 8, tx + r % 8).
  auto q_valid = [&](int r) { return ty + r / kMmaPatch < p.q_h && tx + r % kMmaPatch < p.q_w; };
  const int64_t tb = p.text_batch == 1 ? 0 : b, kb = p.k_batch == 1 ? 0 : b;
  load_tile<T>(qs, ld, p.q.ptr, kMmaQ, d, dpad, p.vec, [&](int r) {
    const int64_t y = imin(ty + r / kMmaPatch, p.q_h - 1), x = imin(tx + r % kMmaPatch, p.q_w - 1);
    return row_of(p.q, b, h, y * p.q_w + x);  // rows outside the grid repeat a valid one (never written)
  });
  for (int i = threadIdx.x; i < kMmaQ * ldo; i += kMmaThreads) os[i] = 0.0f;
  if (threadIdx.x < kMmaQ) {
    m_s[threadIdx.x] = kNegInf;
    l_s[threadIdx.x] = 0.0f;
  }

  // The union rectangle of the patch's windows in the key grid.
  const int64_t y_last = imin(ty + kMmaPatch - 1, p.q_h - 1), x_last = imin(tx + kMmaPatch - 1, p.q_w - 1);
  const int64_t ry0 = imax(0, ty / p.sh - p.rh);
  int64_t ry1 = imin(p.k_h - 1, y_last / p.sh + p.rh);
  if (p.causal) ry1 = imin(ry1, y_last);
  const int64_t rx0 = imax(0, tx / p.sw - p.rw), rx1 = imin(p.k_w - 1, x_last / p.sw + p.rw);
  const int64_t uw = rx1 - rx0 + 1;
  const int64_t union_keys = ry1 >= ry0 ? (ry1 - ry0 + 1) * uw : 0;
  const int64_t text_chunks = (p.text + kMmaK - 1) / kMmaK;
  const int64_t chunks = text_chunks + (union_keys + kMmaK - 1) / kMmaK;

  // This lane's row for the softmax step: two lanes per row, 32 keys each.
  const int row = warp * 16 + lane / 2, half = lane % 2;
  const int64_t qy = ty + row / kMmaPatch, qx = tx + row % kMmaPatch;
  const bool row_valid = q_valid(row);
  const int64_t cy = qy / p.sh, cx = qx / p.sw, qi = qy * p.q_w + qx;

  for (int64_t c = 0; c < chunks; ++c) {
    const bool text = c < text_chunks;
    const int64_t first = text ? c * kMmaK : (c - text_chunks) * kMmaK;
    const int count = static_cast<int>(imin(kMmaK, (text ? p.text : union_keys) - first));
    __syncthreads();  // the previous chunk's K/V are no longer read
    if (text) {
      load_tile<T>(ks, ld, p.tk.ptr, count, d, dpad, p.vec, [&](int r) { return row_of(p.tk, tb, h, first + r); });
      load_tile<T>(vs, ld, p.tv.ptr, count, d, dpad, p.vec, [&](int r) { return row_of(p.tv, tb, h, first + r); });
    } else {
      auto key_row = [&](int r) {
        const int64_t f = first + r;
        return (ry0 + f / uw) * p.k_w + rx0 + f % uw;
      };
      load_tile<T>(ks, ld, p.k.ptr, count, d, dpad, p.vec, [&](int r) { return row_of(p.k, kb, h, key_row(r)); });
      load_tile<T>(vs, ld, p.v.ptr, count, d, dpad, p.vec, [&](int r) { return row_of(p.v, kb, h, key_row(r)); });
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMmaK / 16];
#pragma unroll
      for (int n = 0; n < kMmaK / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
      for (int kk = 0; kk < dpad; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, elem, wmma::row_major> a;
        wmma::load_matrix_sync(a, reinterpret_cast<const elem*>(qs + warp * 16 * ld + kk), ld);
#pragma unroll
        for (int n = 0; n < kMmaK / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, elem, wmma::col_major> bt;
          wmma::load_matrix_sync(bt, reinterpret_cast<const elem*>(ks + n * 16 * ld + kk), ld);
          wmma::mma_sync(acc[n], a, bt, acc[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < kMmaK / 16; ++n) {
        wmma::store_matrix_sync(ss + warp * 16 * kSLd + n * 16, acc[n], kSLd, wmma::mem_row_major);
      }
    }
    __syncwarp();

    // Mask, scale and the online softmax of this lane's half row.
    float sv[32];
    float top = kNegInf;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int key = half * 32 + j;
      bool visible = row_valid && key < count;
      if (visible && !text) {
        const int64_t f = first + key;
        const int64_t ky = ry0 + f / uw, kx = rx0 + f % uw;
        visible = (ky - cy <= p.rh && cy - ky <= p.rh && kx - cx <= p.rw && cx - kx <= p.rw) &&
                  (!p.causal || ky * p.k_w + kx <= qi);
      }
      sv[j] = visible ? ss[row * kSLd + key] * scale + (text ? bias : 0.0f) : kNegInf;
      top = sv[j] > top ? sv[j] : top;
    }
    const float other = __shfl_xor_sync(0xffffffffu, top, 1);
    top = other > top ? other : top;
    const float m_old = m_s[row];
    const float m_new = m_old > top ? m_old : top;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float pr = m_new == kNegInf ? 0.0f : expf(sv[j] - m_new);  // exp(-inf) = 0 for masked keys
      sum += pr;
      ps[row * kPLd + half * 32 + j] = T::from_acc(pr);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = m_new == kNegInf ? 1.0f : expf(m_old - m_new);
    __syncwarp();
    if (half == 0) {
      l_s[row] = l_s[row] * alpha + sum;
      m_s[row] = m_new;
      a_s[row] = alpha;
    }
    __syncwarp();
    for (int i = lane; i < 16 * dpad; i += 32) {
      const int r = warp * 16 + i / dpad, e = i % dpad;
      os[r * ldo + e] *= a_s[r];
    }
    __syncwarp();

    // O += P V for this warp's rows.
    for (int n = 0; n < dpad; n += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, os + warp * 16 * ldo + n, ldo, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kMmaK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, elem, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, elem, wmma::row_major> bv;
        wmma::load_matrix_sync(a, reinterpret_cast<const elem*>(ps + warp * 16 * kPLd + kk), kPLd);
        wmma::load_matrix_sync(bv, reinterpret_cast<const elem*>(vs + kk * ld + n), ld);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(os + warp * 16 * ldo + n, acc, ldo, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncthreads();

  // out = O / l, lse = m + log l for the queries inside the grid.
  for (int i = threadIdx.x; i < kMmaQ * dpad; i += kMmaThreads) {
    const int r = i / dpad, e = i % dpad;
    if (e >= d || !q_valid(r)) continue;
    const int64_t y = ty + r / kMmaPatch, x = tx + r % kMmaPatch;
    const int64_t out_row = (b * p.heads + h) * p.n_q + y * p.q_w + x;
    store_one<T>(p.out, out_row * d + e, os[r * ldo + e] / l_s[r]);
  }
  if (threadIdx.x < kMmaQ && q_valid(threadIdx.x)) {
    const int r = threadIdx.x;
    const int64_t y = ty + r / kMmaPatch, x = tx + r % kMmaPatch;
    const int64_t out_row = (b * p.heads + h) * p.n_q + y * p.q_w + x;
    static_cast<float*>(p.lse)[out_row] = m_s[r] + logf(l_s[r]);
  }
#endif
}

}  // namespace
}  // namespace cogview::cuda
