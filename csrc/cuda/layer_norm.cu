// CUDA implementation of cogview::layer_norm / add_layer_norm and their backward ops.
//
// Same schema and semantics as csrc/cpu/layer_norm.cpp: statistics in fp32 (fp64 for fp64
// inputs), PB-relax as eps * (max|x| / 8)^2 per row, the second LayerNorm reads the new residual
// as stored, and the weight gradients are reduced deterministically (no atomics).
//
// Forward: a row is split over a group of `tpr` threads (one warp for small hidden sizes, up to
// 16 warps for large ones), `rpb` groups per block. Each thread keeps its share of the row in
// registers (at most kFwdElems values), so every input is read once and every output written
// once. Loads and stores are VEC-element packs of 16 bytes (8 for a 16-bit tensor next to an
// fp32 one) when the tensors allow it; when the hidden size is not a multiple of VEC, each row
// starts with a short scalar head up to the first aligned element and ends with a scalar tail,
// so odd sizes keep (almost) the vector speed. Otherwise VEC = 1 (scalar, still coalesced).
// Hidden sizes beyond what fits in registers go to a slower kernel that re-reads global memory.
//
// Backward: same row groups; dx is fused with the residual path (the gradient reaching the new
// residual is its own plus what flows back through the second LayerNorm). Each thread owns fixed
// columns, accumulates their weight-gradient partial sums in registers over the rows its group
// visits, and writes them once to a [groups, 2 or 4, hidden] buffer; a second kernel sums that
// buffer over groups in a fixed order. Same inputs, same device: bitwise the same result.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/common.cuh"
#include "ops/layer_norm_checks.h"

namespace cogview::cuda {
namespace {

constexpr int kMaxThreads = 512;   // per block; __launch_bounds__ of every kernel here
constexpr int kBlockTarget = 256;  // threads per block we aim for with several rows per block
// Values of a row one thread holds in registers (fp32 accumulator; half as many for fp64). The
// backward also keeps 2 or 4 weight-gradient accumulators per value, so it holds fewer with a
// next LayerNorm. Sized to stay clear of register spills at 512 threads per block (<= 128 regs).
constexpr int kFwdElems = 16;
constexpr int kBwdElems = 16;
constexpr int kBwdElemsNext = 8;

template <typename BT>
using acc_of = std::conditional_t<std::is_same_v<BT, F64>, double, float>;
template <typename acc_t>
using AccT = std::conditional_t<std::is_same_v<acc_t, double>, F64, F32>;

// fp64 rows take twice the registers: hold half as many.
template <typename BT>
constexpr int fwd_elems() { return std::is_same_v<BT, F64> ? kFwdElems / 2 : kFwdElems; }
template <typename BT, bool HAS_NEXT>
constexpr int bwd_elems() {
  return (HAS_NEXT ? kBwdElemsNext : kBwdElems) / (std::is_same_v<BT, F64> ? 2 : 1);
}

// Widest vector (in elements) that keeps every pack of the two big tensor types <= 16 bytes.
template <typename BT, typename RT>
constexpr int full_vec() {
  constexpr int widest = static_cast<int>(std::max(sizeof(typename BT::bits), sizeof(typename RT::bits)));
  return 16 / widest;
}

struct FwdParams {
  int64_t rows = 0, hidden = 0, groups = 0;
  const void* branch = nullptr;
  int64_t branch_stride = 0;
  const void* residual = nullptr;  // nullptr: plain LayerNorm (out has the branch's type)
  int64_t residual_stride = 0;
  Ref w_out, b_out, w_next, b_next;  // w_next.ptr == nullptr: no second LayerNorm
  void* out = nullptr;     // [rows, hidden] contiguous
  void* normed = nullptr;  // [rows, hidden] contiguous, branch type
  void* stats = nullptr;   // acc [rows, stat_cols]
  int stat_cols = 2;
  double eps = 1e-5;
  bool pb_relax = false;
};

struct BwdParams {
  int64_t rows = 0, hidden = 0, groups = 0;
  Ref grad_out;  // gradient of the new residual (or of the LayerNorm output); ptr may be null
  int64_t grad_out_stride = 0;
  Ref grad_normed;  // may be null
  int64_t grad_normed_stride = 0;
  const void* branch = nullptr;  // input of the first LayerNorm
  int64_t branch_stride = 0;
  const void* out = nullptr;  // input of the second LayerNorm (read only with a next LayerNorm)
  int64_t out_stride = 0;
  Ref w_out, w_next;  // w_next.ptr == nullptr: no second LayerNorm
  const void* stats = nullptr;  // acc [rows, stat_stride]
  int64_t stat_stride = 2;
  void* grad_branch = nullptr;    // [rows, hidden] contiguous, branch type
  void* grad_residual = nullptr;  // [rows, hidden] contiguous, residual type; nullptr for plain LN
  void* partials = nullptr;       // acc [P, 2 or 4, hidden]: dw_out, db_out (, dw_next, db_next)
};

// ---- row layout ----------------------------------------------------------------------------

// A row is `head` scalars, `body` aligned VEC-packs, then `tail` scalars. Every tensor a kernel
// touches has its base aligned to a whole pack and a row stride congruent to `hidden` modulo
// VEC (checked on the host), so all of them share this split.
struct RowSplit {
  int head;
  int64_t body;  // in packs
  int tail;
};

template <int VEC>
__device__ __forceinline__ RowSplit split_row(int64_t row, int64_t hidden) {
  if constexpr (VEC == 1) {
    return {0, hidden, 0};
  } else {
    const int phase = static_cast<int>(((row % VEC) * (hidden % VEC)) % VEC);
    const int head = static_cast<int>(std::min<int64_t>((VEC - phase) % VEC, hidden));
    const int64_t body = (hidden - head) / VEC;
    return {head, body, static_cast<int>(hidden - head - body * VEC)};
  }
}

// Mean and 1/sqrt(var + eps) of a row held in registers (two passes, like the CPU kernel).
// With PB-relax, eps becomes eps * c^2 with c = max|x| / 8 unless c is 0 or not finite.
template <int N, int VEC, typename acc_t>
__device__ __forceinline__ void row_stats(const acc_t (&x)[N][VEC], acc_t xh, acc_t xt, const RowSplit& s,
                                          bool valid, int64_t hidden, double eps, bool pb_relax,
                                          GroupReducer<acc_t>& red, acc_t& mean, acc_t& rstd) {
  const int tx = threadIdx.x, tpr = blockDim.x;
  acc_t sum = 0, amax = 0;
  if (valid) {
    if (VEC > 1 && tx < s.head) {
      sum += xh;
      amax = device_abs(xh) > amax ? device_abs(xh) : amax;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (tx + static_cast<int64_t>(k) * tpr < s.body) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          sum += x[k][i];
          amax = device_abs(x[k][i]) > amax ? device_abs(x[k][i]) : amax;
        }
      }
    }
    if (VEC > 1 && tx < s.tail) {
      sum += xt;
      amax = device_abs(xt) > amax ? device_abs(xt) : amax;
    }
  }
  red.template reduce<true>(sum, amax);
  mean = sum / static_cast<acc_t>(hidden);
  acc_t sq = 0, unused = 0;
  if (valid) {
    if (VEC > 1 && tx < s.head) sq += (xh - mean) * (xh - mean);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (tx + static_cast<int64_t>(k) * tpr < s.body) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sq += (x[k][i] - mean) * (x[k][i] - mean);
      }
    }
    if (VEC > 1 && tx < s.tail) sq += (xt - mean) * (xt - mean);
  }
  red.template reduce<false>(sq, unused);
  acc_t eps_eff = static_cast<acc_t>(eps);
  if (pb_relax) {
    const acc_t c = amax / acc_t(8);
    if (c > acc_t(0) && isfinite(c)) eps_eff *= c * c;
  }
  rstd = acc_t(1) / device_sqrt(sq / static_cast<acc_t>(hidden) + eps_eff);
}

// ---- forward ----------------------------------------------------------------------------------

// Normalises the row in registers with (w, b), adds the residual (raw bits of RT) when given,
// stores the result as OT at `dst` (contiguous rows) and leaves the stored (rounded) values in x.
template <typename OT, typename RT, int N, int VEC, typename acc_t>
__device__ __forceinline__ void normalize_store(acc_t (&x)[N][VEC], acc_t& xh, acc_t& xt,
                                                const typename RT::bits (&r)[N][VEC],
                                                typename RT::bits rh, typename RT::bits rt, bool has_res,
                                                const RowSplit& s, acc_t mean, acc_t rstd, Ref w, Ref b,
                                                void* dst, int64_t dst_off) {
  const int tx = threadIdx.x, tpr = blockDim.x;
  using OBits = typename OT::bits;
  if (VEC > 1 && tx < s.head) {
    const int64_t c = tx;
    acc_t y = (xh - mean) * rstd * load_one_dyn<acc_t>(w, c) + load_one_dyn<acc_t>(b, c);
    if (has_res) y += to_acc<RT, acc_t>(rh);
    const OBits o = OT::from_acc(y);
    static_cast<OBits*>(dst)[dst_off + c] = o;
    xh = to_acc<OT, acc_t>(o);
  }
  // Weights and biases are packs only where the body starts at column 0 (head == 0).
  const bool param_packs = s.head == 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int64_t v = tx + static_cast<int64_t>(k) * tpr;
    if (v < s.body) {
      const int64_t c0 = s.head + v * VEC;
      acc_t wv[VEC], bv[VEC];
      load_vec_dyn_maybe<VEC>(w, c0, param_packs, wv);
      load_vec_dyn_maybe<VEC>(b, c0, param_packs, bv);
      typename Pack<OT, VEC>::Type pack;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_t y = (x[k][i] - mean) * rstd * wv[i] + bv[i];
        if (has_res) y += to_acc<RT, acc_t>(r[k][i]);
        pack.v[i] = OT::from_acc(y);
        x[k][i] = to_acc<OT, acc_t>(pack.v[i]);
      }
      *reinterpret_cast<typename Pack<OT, VEC>::Type*>(static_cast<OBits*>(dst) + dst_off + c0) = pack;
    }
  }
  if (VEC > 1 && tx < s.tail) {
    const int64_t c = s.head + s.body * VEC + tx;
    acc_t y = (xt - mean) * rstd * load_one_dyn<acc_t>(w, c) + load_one_dyn<acc_t>(b, c);
    if (has_res) y += to_acc<RT, acc_t>(rt);
    const OBits o = OT::from_acc(y);
    static_cast<OBits*>(dst)[dst_off + c] = o;
    xt = to_acc<OT, acc_t>(o);
  }
}

// BT: branch (and normed) type; RT: residual and new-residual type (= BT for plain LayerNorm).
template <typename BT, typename RT, int VEC>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_forward_kernel(const FwdParams p) {
  using acc_t = acc_of<BT>;
  constexpr int N = fwd_elems<BT>() / VEC;
  using RBits = typename RT::bits;
  __shared__ acc_t scratch[2][kMaxWarpsPerBlock][2];
  const int tx = threadIdx.x, tpr = blockDim.x, rpb = blockDim.y;
  const int warps = tpr / 32;
  GroupReducer<acc_t> red{scratch, 0, warps, (static_cast<int>(threadIdx.y) * tpr + tx) / 32, tx & 31,
                          static_cast<int>(threadIdx.y) * warps};
  const int64_t hidden = p.hidden;
  const bool has_res = p.residual != nullptr;
  const bool has_next = p.w_next.ptr != nullptr;
  auto* stats = static_cast<acc_t*>(p.stats);

  for (int64_t g = blockIdx.x; g < p.groups; g += gridDim.x) {  // uniform across the block
    const int64_t row = g * rpb + threadIdx.y;
    const bool valid = row < p.rows;
    const RowSplit s = split_row<VEC>(valid ? row : 0, hidden);

    acc_t x[N][VEC];
    RBits r[N][VEC];
    acc_t xh = 0, xt = 0;
    RBits rh = 0, rt = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        x[k][i] = 0;
        r[k][i] = 0;
      }
    }
    // Issue every load of the row before the first reduction.
    if (valid) {
      const int64_t bo = row * p.branch_stride, ro = row * p.residual_stride;
      if (VEC > 1 && tx < s.head) {
        xh = load_one<BT, acc_t>(p.branch, bo + tx);
        if (has_res) rh = static_cast<const RBits*>(p.residual)[ro + tx];
      }
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int64_t v = tx + static_cast<int64_t>(k) * tpr;
        if (v < s.body) {
          load_vec<BT, VEC>(p.branch, bo + s.head + v * VEC, x[k]);
          if (has_res) load_raw<RT, VEC>(p.residual, ro + s.head + v * VEC, r[k]);
        }
      }
      if (VEC > 1 && tx < s.tail) {
        const int64_t c = s.head + s.body * VEC + tx;
        xt = load_one<BT, acc_t>(p.branch, bo + c);
        if (has_res) rt = static_cast<const RBits*>(p.residual)[ro + c];
      }
    }

    acc_t mean, rstd;
    row_stats(x, xh, xt, s, valid, hidden, p.eps, p.pb_relax, red, mean, rstd);
    if (valid) {
      normalize_store<RT, RT>(x, xh, xt, r, rh, rt, has_res, s, mean, rstd, p.w_out, p.b_out, p.out,
                              row * hidden);
      if (tx == 0) {
        stats[row * p.stat_cols + 0] = mean;
        stats[row * p.stat_cols + 1] = rstd;
      }
    }
    if (has_next) {  // uniform: every thread takes part in the reductions
      // x now holds the new residual as stored (rounded to RT).
      row_stats(x, xh, xt, s, valid, hidden, p.eps, p.pb_relax, red, mean, rstd);
      if (valid) {
        normalize_store<BT, RT>(x, xh, xt, r, rh, rt, /*has_res=*/false, s, mean, rstd, p.w_next, p.b_next,
                                p.normed, row * hidden);
        if (tx == 0) {
          stats[row * p.stat_cols + 2] = mean;
          stats[row * p.stat_cols + 3] = rstd;
        }
      }
    }
  }
}

// Hidden sizes too large for registers: one row per block, every pass over global memory (the
// re-reads mostly hit L2). Each thread reads back only the elements it wrote itself.
template <typename BT, typename RT>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_forward_large_kernel(const FwdParams p) {
  using acc_t = acc_of<BT>;
  __shared__ acc_t scratch[2][kMaxWarpsPerBlock][2];
  const int tx = threadIdx.x, tpr = blockDim.x;
  GroupReducer<acc_t> red{scratch, 0, tpr / 32, tx / 32, tx & 31, 0};
  const int64_t hidden = p.hidden;
  const bool has_res = p.residual != nullptr;
  const bool has_next = p.w_next.ptr != nullptr;
  auto* stats = static_cast<acc_t*>(p.stats);

  auto stats_of = [&](auto type_tag, const void* base, int64_t off, acc_t& mean, acc_t& rstd) {
    using T = decltype(type_tag);
    acc_t sum = 0, amax = 0;
    for (int64_t c = tx; c < hidden; c += tpr) {
      const acc_t v = load_one<T, acc_t>(base, off + c);
      sum += v;
      amax = device_abs(v) > amax ? device_abs(v) : amax;
    }
    red.template reduce<true>(sum, amax);
    mean = sum / static_cast<acc_t>(hidden);
    acc_t sq = 0, unused = 0;
    for (int64_t c = tx; c < hidden; c += tpr) {
      const acc_t d = load_one<T, acc_t>(base, off + c) - mean;
      sq += d * d;
    }
    red.template reduce<false>(sq, unused);
    acc_t eps_eff = static_cast<acc_t>(p.eps);
    if (p.pb_relax) {
      const acc_t cc = amax / acc_t(8);
      if (cc > acc_t(0) && isfinite(cc)) eps_eff *= cc * cc;
    }
    rstd = acc_t(1) / device_sqrt(sq / static_cast<acc_t>(hidden) + eps_eff);
  };

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {  // uniform across the block
    acc_t mean, rstd;
    const int64_t bo = row * p.branch_stride, ro = row * p.residual_stride, oo = row * hidden;
    stats_of(BT{}, p.branch, bo, mean, rstd);
    for (int64_t c = tx; c < hidden; c += tpr) {
      acc_t y = (load_one<BT, acc_t>(p.branch, bo + c) - mean) * rstd * load_one_dyn<acc_t>(p.w_out, c) +
                load_one_dyn<acc_t>(p.b_out, c);
      if (has_res) y += load_one<RT, acc_t>(p.residual, ro + c);
      store_one<RT>(p.out, oo + c, y);
    }
    if (tx == 0) {
      stats[row * p.stat_cols + 0] = mean;
      stats[row * p.stat_cols + 1] = rstd;
    }
    if (has_next) {
      stats_of(RT{}, p.out, oo, mean, rstd);
      for (int64_t c = tx; c < hidden; c += tpr) {
        const acc_t y = (load_one<RT, acc_t>(p.out, oo + c) - mean) * rstd * load_one_dyn<acc_t>(p.w_next, c) +
                        load_one_dyn<acc_t>(p.b_next, c);
        store_one<BT>(p.normed, oo + c, y);
      }
      if (tx == 0) {
        stats[row * p.stat_cols + 2] = mean;
        stats[row * p.stat_cols + 3] = rstd;
      }
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------

// The host only picks VEC > 1 when hidden % VEC == 0 and every row stride is a multiple of VEC,
// so every row is whole packs and a thread owns the same columns in every row.
template <typename BT, typename RT, int VEC, bool HAS_NEXT>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_backward_kernel(const BwdParams p) {
  using acc_t = acc_of<BT>;
  constexpr int N = bwd_elems<BT, HAS_NEXT>() / VEC;
  constexpr int NN = HAS_NEXT ? N : 1;  // accumulators of the next LayerNorm's weights
  constexpr int NP = HAS_NEXT ? 4 : 2;
  using BBits = typename BT::bits;
  __shared__ acc_t scratch[2][kMaxWarpsPerBlock][2];
  const int tx = threadIdx.x, tpr = blockDim.x, rpb = blockDim.y;
  const int warps = tpr / 32;
  GroupReducer<acc_t> red{scratch, 0, warps, (static_cast<int>(threadIdx.y) * tpr + tx) / 32, tx & 31,
                          static_cast<int>(threadIdx.y) * warps};
  const int64_t hidden = p.hidden;
  const int64_t packs = hidden / VEC;
  const bool use_next = HAS_NEXT && p.grad_normed.ptr != nullptr;
  const auto* stats = static_cast<const acc_t*>(p.stats);

  acc_t dw[N][VEC], db[N][VEC], dwn[NN][VEC], dbn[NN][VEC];
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[k][i] = db[k][i] = 0;
  }
#pragma unroll
  for (int k = 0; k < NN; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dwn[k][i] = dbn[k][i] = 0;
  }

  for (int64_t g = blockIdx.x; g < p.groups; g += gridDim.x) {  // uniform across the block
    const int64_t row = g * rpb + threadIdx.y;
    const bool valid = row < p.rows;
    acc_t dr[N][VEC], x[N][VEC];
    BBits xb[N][VEC];
#pragma unroll
    for (int k = 0; k < N; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dr[k][i] = 0;
        x[k][i] = 0;
        xb[k][i] = 0;
      }
    }
    if (valid) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int64_t v = tx + static_cast<int64_t>(k) * tpr;
        if (v < packs) {
          if (p.grad_out.ptr != nullptr) load_vec_dyn<VEC>(p.grad_out, row * p.grad_out_stride + v * VEC, dr[k]);
          load_raw<BT, VEC>(p.branch, row * p.branch_stride + v * VEC, xb[k]);
        }
      }
    }

    // Through the second LayerNorm: dr += dLN_next/dout (grad_normed).
    if constexpr (HAS_NEXT) {
      if (use_next) {  // uniform
        acc_t gn[N][VEC];
        acc_t sg = 0, sgx = 0, mean = 0, rstd = 0;
#pragma unroll
        for (int k = 0; k < N; ++k) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) gn[k][i] = 0;
        }
        if (valid) {
          mean = stats[row * p.stat_stride + 2];
          rstd = stats[row * p.stat_stride + 3];
#pragma unroll
          for (int k = 0; k < N; ++k) {
            const int64_t v = tx + static_cast<int64_t>(k) * tpr;
            if (v < packs) {
              load_vec_dyn<VEC>(p.grad_normed, row * p.grad_normed_stride + v * VEC, gn[k]);
              load_vec<RT, VEC>(p.out, row * p.out_stride + v * VEC, x[k]);
            }
          }
#pragma unroll
          for (int k = 0; k < N; ++k) {
            const int64_t v = tx + static_cast<int64_t>(k) * tpr;
            if (v < packs) {
              acc_t wv[VEC];
              load_vec_dyn<VEC>(p.w_next, v * VEC, wv);
#pragma unroll
              for (int i = 0; i < VEC; ++i) {
                const acc_t xhat = (x[k][i] - mean) * rstd;
                const acc_t gg = gn[k][i] * wv[i];
                dwn[k][i] += gn[k][i] * xhat;
                dbn[k][i] += gn[k][i];
                sg += gg;
                sgx += gg * xhat;
                x[k][i] = xhat;
                gn[k][i] = gg;
              }
            }
          }
        }
        red.template reduce<false>(sg, sgx);
        if (valid) {
          const acc_t mean_g = sg / static_cast<acc_t>(hidden), mean_gx = sgx / static_cast<acc_t>(hidden);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            if (tx + static_cast<int64_t>(k) * tpr < packs) {
#pragma unroll
              for (int i = 0; i < VEC; ++i) dr[k][i] += rstd * (gn[k][i] - mean_g - x[k][i] * mean_gx);
            }
          }
        }
      }
    }

    // First LayerNorm: grad_residual = dr; grad_branch = dLN_out/dbranch (dr).
    acc_t sg = 0, sgx = 0, mean = 0, rstd = 0;
    if (valid) {
      mean = stats[row * p.stat_stride + 0];
      rstd = stats[row * p.stat_stride + 1];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int64_t v = tx + static_cast<int64_t>(k) * tpr;
        if (v < packs) {
          if (p.grad_residual != nullptr) store_vec<RT, VEC>(p.grad_residual, row * hidden + v * VEC, dr[k]);
          acc_t wv[VEC];
          load_vec_dyn<VEC>(p.w_out, v * VEC, wv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const acc_t xhat = (to_acc<BT, acc_t>(xb[k][i]) - mean) * rstd;
            const acc_t gg = dr[k][i] * wv[i];
            dw[k][i] += dr[k][i] * xhat;
            db[k][i] += dr[k][i];
            sg += gg;
            sgx += gg * xhat;
            x[k][i] = xhat;
            dr[k][i] = gg;
          }
        }
      }
    }
    red.template reduce<false>(sg, sgx);
    if (valid) {
      const acc_t mean_g = sg / static_cast<acc_t>(hidden), mean_gx = sgx / static_cast<acc_t>(hidden);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int64_t v = tx + static_cast<int64_t>(k) * tpr;
        if (v < packs) {
          acc_t dx[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) dx[i] = rstd * (dr[k][i] - mean_g - x[k][i] * mean_gx);
          store_vec<BT, VEC>(p.grad_branch, row * hidden + v * VEC, dx);
        }
      }
    }
  }

  // This group's weight-gradient partial sums: one row of the [P, NP, hidden] buffer.
  const int64_t group = static_cast<int64_t>(blockIdx.x) * rpb + threadIdx.y;
  const int64_t base = group * NP * hidden;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int64_t v = tx + static_cast<int64_t>(k) * tpr;
    if (v < packs) {
      store_vec<AccT<acc_t>, VEC>(p.partials, base + 0 * hidden + v * VEC, dw[k]);
      store_vec<AccT<acc_t>, VEC>(p.partials, base + 1 * hidden + v * VEC, db[k]);
      if constexpr (HAS_NEXT) {
        store_vec<AccT<acc_t>, VEC>(p.partials, base + 2 * hidden + v * VEC, dwn[k]);
        store_vec<AccT<acc_t>, VEC>(p.partials, base + 3 * hidden + v * VEC, dbn[k]);
      }
    }
  }
}

// Large hidden sizes: one row per block over global memory. The gradient reaching the new
// residual is recomputed where needed instead of kept; weight-gradient partials are accumulated
// in this block's row of the (zeroed) [gridDim.x, NP, hidden] buffer, each column always by the
// same thread.
template <typename BT, typename RT>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_backward_large_kernel(const BwdParams p) {
  using acc_t = acc_of<BT>;
  __shared__ acc_t scratch[2][kMaxWarpsPerBlock][2];
  const int tx = threadIdx.x, tpr = blockDim.x;
  GroupReducer<acc_t> red{scratch, 0, tpr / 32, tx / 32, tx & 31, 0};
  const int64_t hidden = p.hidden;
  const bool has_next = p.w_next.ptr != nullptr;
  const bool use_next = has_next && p.grad_normed.ptr != nullptr;
  const int np = has_next ? 4 : 2;
  const auto* stats = static_cast<const acc_t*>(p.stats);
  acc_t* part = static_cast<acc_t*>(p.partials) + static_cast<int64_t>(blockIdx.x) * np * hidden;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {  // uniform across the block
    const acc_t* st = stats + row * p.stat_stride;
    const int64_t go = row * p.grad_out_stride, gno = row * p.grad_normed_stride;
    const int64_t oo = row * p.out_stride, bo = row * p.branch_stride, co = row * hidden;
    acc_t mean2 = 0, rstd2 = 0, mean_g2 = 0, mean_gx2 = 0;
    if (use_next) {  // uniform
      mean2 = st[2];
      rstd2 = st[3];
      acc_t sg = 0, sgx = 0;
      for (int64_t c = tx; c < hidden; c += tpr) {
        const acc_t gn = load_one_dyn<acc_t>(p.grad_normed, gno + c);
        const acc_t xhat = (load_one<RT, acc_t>(p.out, oo + c) - mean2) * rstd2;
        const acc_t gg = gn * load_one_dyn<acc_t>(p.w_next, c);
        part[2 * hidden + c] += gn * xhat;
        part[3 * hidden + c] += gn;
        sg += gg;
        sgx += gg * xhat;
      }
      red.template reduce<false>(sg, sgx);
      mean_g2 = sg / static_cast<acc_t>(hidden);
      mean_gx2 = sgx / static_cast<acc_t>(hidden);
    }
    auto grad_residual_at = [&](int64_t c) {
      acc_t d = p.grad_out.ptr != nullptr ? load_one_dyn<acc_t>(p.grad_out, go + c) : acc_t(0);
      if (use_next) {
        const acc_t xhat = (load_one<RT, acc_t>(p.out, oo + c) - mean2) * rstd2;
        const acc_t gg = load_one_dyn<acc_t>(p.grad_normed, gno + c) * load_one_dyn<acc_t>(p.w_next, c);
        d += rstd2 * (gg - mean_g2 - xhat * mean_gx2);
      }
      return d;
    };
    const acc_t mean = st[0], rstd = st[1];
    acc_t sg = 0, sgx = 0;
    for (int64_t c = tx; c < hidden; c += tpr) {
      const acc_t d = grad_residual_at(c);
      if (p.grad_residual != nullptr) store_one<RT>(p.grad_residual, co + c, d);
      const acc_t xhat = (load_one<BT, acc_t>(p.branch, bo + c) - mean) * rstd;
      const acc_t gg = d * load_one_dyn<acc_t>(p.w_out, c);
      part[c] += d * xhat;
      part[hidden + c] += d;
      sg += gg;
      sgx += gg * xhat;
    }
    red.template reduce<false>(sg, sgx);
    const acc_t mean_g = sg / static_cast<acc_t>(hidden), mean_gx = sgx / static_cast<acc_t>(hidden);
    for (int64_t c = tx; c < hidden; c += tpr) {
      const acc_t d = grad_residual_at(c);
      const acc_t xhat = (load_one<BT, acc_t>(p.branch, bo + c) - mean) * rstd;
      store_one<BT>(p.grad_branch, co + c, rstd * (d * load_one_dyn<acc_t>(p.w_out, c) - mean_g - xhat * mean_gx));
    }
  }
}

// Second stage of the weight gradients: out[j][c] = sum over q of partials[q, j, c], q in
// increasing order per thread row, then the 16 thread rows in order (deterministic), rounded
// once to each output's dtype. The outputs are separate tensors (outputs of an op must not alias).
constexpr int kSumRows = 16;
struct SumOutputs {
  void* ptr[4];
  Kind kind[4];
};

template <typename acc_t>
__global__ void __launch_bounds__(32 * kSumRows) sum_partials_kernel(const acc_t* __restrict__ partials,
                                                                      int64_t count, int64_t hidden, int np,
                                                                      const SumOutputs outs) {
  __shared__ acc_t buf[kSumRows][33];
  const int64_t columns = np * hidden;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  acc_t v = 0;
  if (col < columns) {
    for (int64_t q = threadIdx.y; q < count; q += kSumRows) v += partials[q * columns + col];
  }
  buf[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0 && col < columns) {
    acc_t total = buf[0][threadIdx.x];
    for (int i = 1; i < kSumRows; ++i) total += buf[i][threadIdx.x];
    const int j = static_cast<int>(col / hidden);
    const int64_t c = col - j * hidden;
    switch (outs.kind[j]) {
      case Kind::f16: store_one<F16>(outs.ptr[j], c, total); break;
      case Kind::bf16: store_one<BF16>(outs.ptr[j], c, total); break;
      case Kind::f64: store_one<F64>(outs.ptr[j], c, total); break;
      default: store_one<F32>(outs.ptr[j], c, total); break;
    }
  }
}

// ---- host side --------------------------------------------------------------------------------

Kind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Kind::f16;
    case at::kBFloat16: return Kind::bf16;
    case at::kDouble: return Kind::f64;
    default: return Kind::f32;
  }
}

Ref ref_of(const at::Tensor& t) { return Ref{t.data_ptr(), kind_of(t)}; }

// `t` as [rows, hidden] with unit stride along hidden (a view when possible, else a copy).
at::Tensor as_rows(const at::Tensor& t, int64_t hidden) {
  at::Tensor rows = t.reshape({-1, hidden});
  return rows.stride(1) == 1 || rows.numel() == 0 ? rows : rows.contiguous();
}

int64_t row_stride(const at::Tensor& rows) { return rows.size(0) > 1 ? rows.stride(0) : rows.size(1); }

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// A row tensor can use VEC-packs: base aligned to a whole pack and row stride congruent to
// hidden modulo VEC (then every row has the same head/body/tail split as the output rows).
bool rows_allow_vec(const at::Tensor& rows, int vec, int64_t hidden) {
  return aligned(rows.data_ptr(), vec * rows.element_size()) && row_stride(rows) % vec == hidden % vec;
}

bool param_allows_vec(const at::Tensor& p, int vec) {
  return p.stride(0) == 1 && aligned(p.data_ptr(), vec * p.element_size());
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

struct Launch {
  bool large = false;  // the row does not fit in registers: use the *_large kernel
  int tpr = 32;        // threads per row (a multiple of 32, <= kMaxThreads)
  int rpb = 1;         // rows per block
};

Launch pick_launch(int64_t hidden, int vec, int elems_per_thread) {
  const int64_t packs = (hidden + vec - 1) / vec;
  const int64_t per_warp = static_cast<int64_t>(32) * (elems_per_thread / vec);
  const int64_t warps = (packs + per_warp - 1) / per_warp;
  Launch l;
  if (warps * 32 > kMaxThreads) {
    l.large = true;
    l.tpr = kMaxThreads;
    return l;
  }
  l.tpr = static_cast<int>(warps) * 32;
  l.rpb = std::max(1, kBlockTarget / l.tpr);
  return l;
}

template <typename F>
void dispatch_pair(at::ScalarType b, at::ScalarType r, F&& f) {
  if (b == at::kDouble || r == at::kDouble) {
    TORCH_CHECK_TYPE(b == at::kDouble && r == at::kDouble,
                     "cogview: float64 inputs must all be float64, got ", b, " and ", r);
    f(F64{}, F64{});
    return;
  }
  auto with_branch = [&](auto bt) {
    switch (r) {
      case at::kFloat: f(bt, F32{}); return;
      case at::kHalf: f(bt, F16{}); return;
      case at::kBFloat16: f(bt, BF16{}); return;
      default: TORCH_CHECK_TYPE(false, "cogview: unsupported dtype ", r);
    }
  };
  switch (b) {
    case at::kFloat: with_branch(F32{}); return;
    case at::kHalf: with_branch(F16{}); return;
    case at::kBFloat16: with_branch(BF16{}); return;
    default: TORCH_CHECK_TYPE(false, "cogview: unsupported dtype ", b);
  }
}

template <typename BT, typename RT>
void launch_forward(FwdParams& p, bool vec_ok) {
  constexpr int kVec = full_vec<BT, RT>();
  const int vec = vec_ok ? kVec : 1;
  const Launch l = pick_launch(p.hidden, vec, fwd_elems<BT>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 32;
  if (l.large) {
    p.groups = p.rows;
    const auto grid = static_cast<unsigned>(std::min(p.rows, max_blocks));
    layer_norm_forward_large_kernel<BT, RT><<<grid, dim3(l.tpr, 1), 0, stream>>>(p);
  } else {
    p.groups = (p.rows + l.rpb - 1) / l.rpb;
    const auto grid = static_cast<unsigned>(std::min(p.groups, max_blocks));
    const dim3 block(l.tpr, l.rpb);
    if (vec == kVec) {
      layer_norm_forward_kernel<BT, RT, kVec><<<grid, block, 0, stream>>>(p);
    } else {
      layer_norm_forward_kernel<BT, RT, 1><<<grid, block, 0, stream>>>(p);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return static_cast<int64_t>(std::max(per_sm, 1)) * sm_count();
}

// Runs the backward kernels; the weight-gradient sums go to `grads` (NP separate [hidden] tensors).
template <typename BT, typename RT, bool HAS_NEXT>
void launch_backward(BwdParams& p, bool vec_ok, const at::TensorOptions& acc_options,
                     const std::vector<at::Tensor>& grads) {
  using acc_t = acc_of<BT>;
  constexpr int kVec = full_vec<BT, RT>();
  constexpr int NP = HAS_NEXT ? 4 : 2;
  const int vec = vec_ok ? kVec : 1;
  const Launch l = pick_launch(p.hidden, vec, bwd_elems<BT, HAS_NEXT>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  int64_t count = 0;
  if (l.large) {
    count = std::min<int64_t>(p.rows, static_cast<int64_t>(sm_count()) * 2);
    partials = at::zeros({count, NP, p.hidden}, acc_options);
    p.partials = partials.data_ptr();
    p.groups = p.rows;
    layer_norm_backward_large_kernel<BT, RT><<<static_cast<unsigned>(count), dim3(l.tpr, 1), 0, stream>>>(p);
  } else {
    const dim3 block(l.tpr, l.rpb);
    p.groups = (p.rows + l.rpb - 1) / l.rpb;
    auto run = [&](auto kernel) {
      const int64_t grid = std::min(p.groups, resident_blocks(kernel, l.tpr * l.rpb));
      count = grid * l.rpb;
      partials = at::empty({count, NP, p.hidden}, acc_options);  // every element is written
      p.partials = partials.data_ptr();
      kernel<<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
    };
    if (vec == kVec) {
      run(layer_norm_backward_kernel<BT, RT, kVec, HAS_NEXT>);
    } else {
      run(layer_norm_backward_kernel<BT, RT, 1, HAS_NEXT>);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_INTERNAL_ASSERT(static_cast<int>(grads.size()) == NP);
  SumOutputs outs{};
  for (int j = 0; j < NP; ++j) {
    TORCH_INTERNAL_ASSERT(grads[j].is_contiguous() && grads[j].numel() == p.hidden);
    outs.ptr[j] = grads[j].data_ptr();
    outs.kind[j] = kind_of(grads[j]);
  }
  const int64_t columns = NP * p.hidden;
  sum_partials_kernel<acc_t><<<static_cast<unsigned>((columns + 31) / 32), dim3(32, kSumRows), 0, stream>>>(
      partials.data_ptr<acc_t>(), count, p.hidden, NP, outs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor contiguous_param(const at::Tensor& p) { return p.is_contiguous() ? p : p.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor* residual, const at::Tensor& branch,
                                                       const at::Tensor& w_out_in, const at::Tensor& b_out_in,
                                                       const at::Tensor* w_next_in, const at::Tensor* b_next_in,
                                                       double eps, bool pb_relax) {
  const c10::cuda::CUDAGuard guard(branch.device());
  const int64_t hidden = branch.size(-1);
  const at::ScalarType acc = ops::accumulator_type(branch);
  const at::ScalarType out_type = residual ? residual->scalar_type() : branch.scalar_type();
  at::Tensor branch_rows = as_rows(branch, hidden);
  at::Tensor residual_rows = residual ? as_rows(*residual, hidden) : at::Tensor();
  const int64_t rows = branch_rows.size(0);
  const bool has_next = w_next_in != nullptr;
  at::Tensor out = at::empty(branch.sizes(), branch.options().dtype(out_type));
  at::Tensor normed = has_next ? at::empty(branch.sizes(), branch.options()) : branch.new_empty({0});
  at::Tensor stats = at::empty({rows, has_next ? 4 : 2}, branch.options().dtype(acc));
  if (rows == 0) return {out, normed, stats};

  const at::Tensor w_out = contiguous_param(w_out_in), b_out = contiguous_param(b_out_in);
  const at::Tensor w_next = has_next ? contiguous_param(*w_next_in) : at::Tensor();
  const at::Tensor b_next = has_next ? contiguous_param(*b_next_in) : at::Tensor();

  FwdParams p;
  p.rows = rows;
  p.hidden = hidden;
  p.branch = branch_rows.data_ptr();
  p.branch_stride = row_stride(branch_rows);
  if (residual) {
    p.residual = residual_rows.data_ptr();
    p.residual_stride = row_stride(residual_rows);
  }
  p.w_out = ref_of(w_out);
  p.b_out = ref_of(b_out);
  if (has_next) {
    p.w_next = ref_of(w_next);
    p.b_next = ref_of(b_next);
  }
  p.out = out.data_ptr();
  p.normed = has_next ? normed.data_ptr() : nullptr;
  p.stats = stats.data_ptr();
  p.stat_cols = has_next ? 4 : 2;
  p.eps = eps;
  p.pb_relax = pb_relax;

  dispatch_pair(branch.scalar_type(), out_type, [&](auto bt, auto rt) {
    using BT = decltype(bt);
    using RT = decltype(rt);
    constexpr int vec = full_vec<BT, RT>();
    bool ok = rows_allow_vec(branch_rows, vec, hidden) && aligned(out.data_ptr(), vec * out.element_size()) &&
              param_allows_vec(w_out, vec) && param_allows_vec(b_out, vec);
    if (residual) ok = ok && rows_allow_vec(residual_rows, vec, hidden);
    if (has_next) {
      ok = ok && aligned(normed.data_ptr(), vec * normed.element_size()) && param_allows_vec(w_next, vec) &&
           param_allows_vec(b_next, vec);
    }
    launch_forward<BT, RT>(p, ok);
  });
  return {out, normed, stats};
}

// `stats` as the accumulator dtype, contiguous (after ops::check_stats).
at::Tensor stats_as(const at::Tensor& stats, at::ScalarType acc) { return stats.to(acc).contiguous(); }

std::tuple<at::Tensor, at::Tensor> layer_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& bias, double eps, bool pb_relax) {
  ops::check_layer_norm(x, weight, bias, eps);
  auto [out, unused, stats] = forward(nullptr, x, weight, bias, nullptr, nullptr, eps, pb_relax);
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_cuda(
    const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& w_out, const at::Tensor& b_out,
    const std::optional<at::Tensor>& w_next, const std::optional<at::Tensor>& b_next, double eps, bool pb_relax) {
  ops::check_add_layer_norm(residual, branch, w_out, b_out, w_next, b_next, eps);
  return forward(&residual, branch, w_out, b_out, w_next ? &*w_next : nullptr, b_next ? &*b_next : nullptr, eps,
                 pb_relax);
}

// Shared by both backward ops: picks the vector width and runs the kernels, writing the weight
// gradients into `grads` (dw_out, db_out[, dw_next, db_next]).
template <bool HAS_NEXT>
void run_backward(BwdParams& p, at::ScalarType branch_type, at::ScalarType residual_type,
                  const std::vector<const at::Tensor*>& row_tensors, const std::vector<const at::Tensor*>& params,
                  const at::TensorOptions& acc_options, const std::vector<at::Tensor>& grads) {
  dispatch_pair(branch_type, residual_type, [&](auto bt, auto rt) {
    using BT = decltype(bt);
    using RT = decltype(rt);
    constexpr int vec = full_vec<BT, RT>();
    bool ok = p.hidden % vec == 0;
    for (const at::Tensor* t : row_tensors) {
      ok = ok && aligned(t->data_ptr(), vec * t->element_size()) && row_stride(*t) % vec == 0;
    }
    for (const at::Tensor* t : params) ok = ok && param_allows_vec(*t, vec);
    launch_backward<BT, RT, HAS_NEXT>(p, ok, acc_options, grads);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& weight_in,
                                                                        const at::Tensor& stats_in) {
  ops::check_layer_norm_backward(grad_out, x, weight_in, stats_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  const at::ScalarType acc = ops::accumulator_type(x);
  at::Tensor x_rows = as_rows(x, hidden), g_rows = as_rows(grad_out, hidden);
  const int64_t rows = x_rows.size(0);
  at::Tensor stats = stats_as(stats_in, acc);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const at::TensorOptions acc_options = x.options().dtype(acc);
  if (rows == 0) {
    at::Tensor zeros = at::zeros({hidden}, weight_in.options());
    return {grad_x, zeros, zeros.clone()};
  }
  const at::Tensor weight = contiguous_param(weight_in);
  at::Tensor grad_x_rows = grad_x.view({rows, hidden});
  BwdParams p;
  p.rows = rows;
  p.hidden = hidden;
  p.grad_out = ref_of(g_rows);
  p.grad_out_stride = row_stride(g_rows);
  p.branch = x_rows.data_ptr();
  p.branch_stride = row_stride(x_rows);
  p.w_out = ref_of(weight);
  p.stats = stats.data_ptr();
  p.stat_stride = stats.size(1);
  p.grad_branch = grad_x.data_ptr();
  // Both weight gradients in the weight's dtype, like the CPU op (the autograd wrapper casts the
  // bias gradient to the bias dtype).
  at::Tensor grad_w = at::empty({hidden}, weight_in.options()), grad_b = at::empty({hidden}, weight_in.options());
  run_backward<false>(p, x.scalar_type(), x.scalar_type(), {&x_rows, &g_rows, &grad_x_rows}, {&weight},
                      acc_options, {grad_w, grad_b});
  return {grad_x, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cuda(
    const std::optional<at::Tensor>& grad_new_residual, const std::optional<at::Tensor>& grad_normed,
    const at::Tensor& branch, const at::Tensor& new_residual, const at::Tensor& w_out_in,
    const std::optional<at::Tensor>& w_next_in, const at::Tensor& stats_in) {
  ops::check_add_layer_norm_backward(grad_new_residual, grad_normed, branch, new_residual, w_out_in, w_next_in,
                                     stats_in);
  const bool has_next = w_next_in.has_value();
  const bool use_next = has_next && grad_normed.has_value();

  const c10::cuda::CUDAGuard guard(branch.device());
  const int64_t hidden = branch.size(-1);
  const at::ScalarType acc = ops::accumulator_type(branch);
  at::Tensor branch_rows = as_rows(branch, hidden), out_rows = as_rows(new_residual, hidden);
  at::Tensor gr_rows = grad_new_residual ? as_rows(*grad_new_residual, hidden) : at::Tensor();
  at::Tensor gn_rows = use_next ? as_rows(*grad_normed, hidden) : at::Tensor();
  const int64_t rows = branch_rows.size(0);
  at::Tensor stats = stats_as(stats_in, acc);
  at::Tensor grad_residual = at::empty(new_residual.sizes(), new_residual.options());
  at::Tensor grad_branch = at::empty(branch.sizes(), branch.options());
  at::Tensor empty = branch.new_empty({0});
  const at::TensorOptions acc_options = branch.options().dtype(acc);
  if (rows == 0) {
    at::Tensor zo = at::zeros({hidden}, w_out_in.options());
    at::Tensor zn = has_next ? at::zeros({hidden}, w_next_in->options()) : empty;
    return {grad_residual, grad_branch, zo, zo.clone(), zn, has_next ? zn.clone() : branch.new_empty({0})};
  }
  const at::Tensor w_out = contiguous_param(w_out_in);
  const at::Tensor w_next = has_next ? contiguous_param(*w_next_in) : at::Tensor();
  at::Tensor grad_residual_rows = grad_residual.view({rows, hidden});
  at::Tensor grad_branch_rows = grad_branch.view({rows, hidden});

  BwdParams p;
  p.rows = rows;
  p.hidden = hidden;
  std::vector<const at::Tensor*> row_tensors = {&branch_rows, &grad_residual_rows, &grad_branch_rows};
  std::vector<const at::Tensor*> params = {&w_out};
  if (gr_rows.defined()) {
    p.grad_out = ref_of(gr_rows);
    p.grad_out_stride = row_stride(gr_rows);
    row_tensors.push_back(&gr_rows);
  }
  if (use_next) {
    p.grad_normed = ref_of(gn_rows);
    p.grad_normed_stride = row_stride(gn_rows);
    row_tensors.push_back(&gn_rows);
    row_tensors.push_back(&out_rows);
  }
  p.branch = branch_rows.data_ptr();
  p.branch_stride = row_stride(branch_rows);
  p.out = out_rows.data_ptr();
  p.out_stride = row_stride(out_rows);
  p.w_out = ref_of(w_out);
  if (has_next) {
    p.w_next = ref_of(w_next);
    params.push_back(&w_next);
  }
  p.stats = stats.data_ptr();
  p.stat_stride = stats.size(1);
  p.grad_branch = grad_branch.data_ptr();
  p.grad_residual = grad_residual.data_ptr();
  at::Tensor grad_w_out = at::empty({hidden}, w_out_in.options());
  at::Tensor grad_b_out = at::empty({hidden}, w_out_in.options());
  if (has_next) {
    at::Tensor grad_w_next = at::empty({hidden}, w_next_in->options());
    at::Tensor grad_b_next = at::empty({hidden}, w_next_in->options());
    run_backward<true>(p, branch.scalar_type(), new_residual.scalar_type(), row_tensors, params, acc_options,
                       {grad_w_out, grad_b_out, grad_w_next, grad_b_next});
    return {grad_residual, grad_branch, grad_w_out, grad_b_out, grad_w_next, grad_b_next};
  }
  run_backward<false>(p, branch.scalar_type(), new_residual.scalar_type(), row_tensors, params, acc_options,
                      {grad_w_out, grad_b_out});
  return {grad_residual, grad_branch, grad_w_out, grad_b_out, empty, branch.new_empty({0})};
}

}  // namespace
}  // namespace cogview::cuda

TORCH_LIBRARY_IMPL(cogview, CUDA, m) {
  m.impl("layer_norm", &cogview::cuda::layer_norm_cuda);
  m.impl("layer_norm_backward", &cogview::cuda::layer_norm_backward_cuda);
  m.impl("add_layer_norm", &cogview::cuda::add_layer_norm_cuda);
  m.impl("add_layer_norm_backward", &cogview::cuda::add_layer_norm_backward_cuda);
}
