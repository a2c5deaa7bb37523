// Fused (sandwich) LayerNorm rows: compiled once per ISA, see kernels.h.
//
// Each row is read from memory once into an L1-resident accumulator buffer; every later pass
// (variance, normalisation, the second LayerNorm) runs over that buffer, so memory sees exactly
// one read per input and one write per output.
#include <cmath>
#include <memory>

#include "cpu/kernels/kernels.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

template <typename acc_t>
struct RowStats {
  acc_t mean;
  acc_t rstd;
};

// Mean and 1/sqrt(var + eps) of a row already in the buffer. With PB-relax (CogView), the row is
// normalised as x / c with c = max|x| / 8; LayerNorm is scale-invariant, so that equals
// LayerNorm(x) with eps * c^2, computed here without the division. An all-zero row keeps c = 1.
template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* __restrict x, int64_t n, double eps, bool pb_relax) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const acc_t mean = sum / static_cast<acc_t>(n);
  acc_t sq = 0, amax = 0;
  if (pb_relax) {
#pragma omp simd reduction(+ : sq) reduction(max : amax)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = x[i] - mean;
      sq += d * d;
      amax = std::fabs(x[i]) > amax ? std::fabs(x[i]) : amax;
    }
  } else {
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = x[i] - mean;
      sq += d * d;
    }
  }
  acc_t eps_eff = static_cast<acc_t>(eps);
  if (pb_relax) {
    const acc_t c = amax / acc_t(8);
    if (c > acc_t(0) && std::isfinite(c)) eps_eff *= c * c;
  }
  const acc_t var = sq / static_cast<acc_t>(n);
  return {mean, acc_t(1) / std::sqrt(var + eps_eff)};
}

// y = (x - mean) * rstd * w + b (+ residual when given).
template <typename acc_t>
void normalize(acc_t* __restrict y, const acc_t* __restrict x, RowStats<acc_t> s,
               const acc_t* __restrict w, const acc_t* __restrict b, const acc_t* __restrict residual,
               int64_t n) {
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = residual[i] + ((x[i] - s.mean) * s.rstd * w[i] + b[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - s.mean) * s.rstd * w[i] + b[i];
  }
}

template <typename acc_t>
void forward_rows(const LayerNormForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.hidden;
  std::unique_ptr<acc_t[]> storage(new acc_t[3 * n]);
  acc_t* x = storage.get();
  acc_t* y = x + n;
  acc_t* res = y + n;
  const auto* w_out = static_cast<const acc_t*>(a.w_out);
  const auto* b_out = static_cast<const acc_t*>(a.b_out);
  const auto* w_next = static_cast<const acc_t*>(a.w_next);
  const auto* b_next = static_cast<const acc_t*>(a.b_next);
  const bool has_next = w_next != nullptr;
  const int64_t stat_cols = has_next ? 4 : 2;
  auto* stats = static_cast<acc_t*>(a.stats);
  const int64_t out_size = elem_size(a.out_type), normed_size = elem_size(a.normed_type);
  const int64_t branch_size = elem_size(a.branch_type), res_size = elem_size(a.residual_type);
  // The second LayerNorm must see the new residual exactly as stored (rounded to its dtype), so
  // `normed` equals LN(new_residual) of the unfused composition. Storing in the accumulator's
  // own precision rounds nothing, and the buffer can be used as it is.
  const bool out_is_exact = a.out_type == (a.f64 ? ElemType::f64 : ElemType::f32);

  for (int64_t r = begin; r < end; ++r) {
    const char* branch = static_cast<const char*>(a.branch) + r * a.branch_stride * branch_size;
    char* out = static_cast<char*>(a.out) + r * n * out_size;
    load_row(x, branch, a.branch_type, n);
    const RowStats<acc_t> s1 = row_stats(x, n, a.eps, a.pb_relax);
    const acc_t* residual = nullptr;
    if (a.residual != nullptr) {
      load_row(res, static_cast<const char*>(a.residual) + r * a.residual_stride * res_size,
               a.residual_type, n);
      residual = res;
    }
    normalize(y, x, s1, w_out, b_out, residual, n);
    store_row(out, y, a.out_type, n);
    stats[r * stat_cols + 0] = s1.mean;
    stats[r * stat_cols + 1] = s1.rstd;
    if (!has_next) continue;
    if (!out_is_exact) load_row(y, out, a.out_type, n);
    const RowStats<acc_t> s2 = row_stats(y, n, a.eps, a.pb_relax);
    normalize(x, y, s2, w_next, b_next, static_cast<const acc_t*>(nullptr), n);
    store_row(static_cast<char*>(a.normed) + r * n * normed_size, x, a.normed_type, n);
    stats[r * stat_cols + 2] = s2.mean;
    stats[r * stat_cols + 3] = s2.rstd;
  }
}

// dx of y = (x - mean) * rstd * w + b given dy, with the weight-gradient partials accumulated:
//   xhat = (x - mean) * rstd,  g = dy * w,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw += dy * xhat,  db += dy.
// `x` is overwritten with xhat.
template <typename acc_t>
void layer_norm_row_backward(acc_t* __restrict dx, acc_t* __restrict x, const acc_t* __restrict dy,
                             RowStats<acc_t> s, const acc_t* __restrict w, acc_t* __restrict dw,
                             acc_t* __restrict db, int64_t n) {
  acc_t sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xhat = (x[i] - s.mean) * s.rstd;
    const acc_t g = dy[i] * w[i];
    x[i] = xhat;
    dx[i] = g;  // kept, not recomputed: g - mean(g) must cancel exactly where it should (hidden 1)
    sum_g += g;
    sum_gx += g * xhat;
    dw[i] += dy[i] * xhat;
    db[i] += dy[i];
  }
  const acc_t mean_g = sum_g / static_cast<acc_t>(n);
  const acc_t mean_gx = sum_gx / static_cast<acc_t>(n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = s.rstd * ((dx[i] - mean_g) - x[i] * mean_gx);
}

template <typename acc_t>
void backward_rows(const LayerNormBackwardArgs& a, int64_t begin, int64_t end, int64_t chunk) {
  const int64_t n = a.hidden;
  std::unique_ptr<acc_t[]> storage(new acc_t[4 * n]);
  acc_t* x = storage.get();
  acc_t* g = x + n;
  acc_t* dr = g + n;
  acc_t* dx = dr + n;
  const auto* w_out = static_cast<const acc_t*>(a.w_out);
  const auto* w_next = static_cast<const acc_t*>(a.w_next);
  const auto* stats = static_cast<const acc_t*>(a.stats);
  acc_t* partial = static_cast<acc_t*>(a.partials) + chunk * 4 * n;
  acc_t *dw_out = partial, *db_out = partial + n, *dw_next = partial + 2 * n, *db_next = partial + 3 * n;
  const int64_t stat_cols = a.has_next ? 4 : 2;
  const int64_t go_size = elem_size(a.grad_out_type), gn_size = elem_size(a.grad_normed_type);
  const int64_t branch_size = elem_size(a.branch_type), out_size = elem_size(a.out_type);
  const int64_t gb_size = elem_size(a.branch_type), gr_size = elem_size(a.grad_residual_type);

  for (int64_t r = begin; r < end; ++r) {
    const acc_t* st = stats + r * stat_cols;
    // Gradient reaching the new residual: its own, plus what flows back through LN_next.
    if (a.grad_out != nullptr) {
      load_row(dr, static_cast<const char*>(a.grad_out) + r * a.grad_out_stride * go_size,
               a.grad_out_type, n);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dr[i] = 0;
    }
    if (a.has_next && a.grad_normed != nullptr) {
      load_row(g, static_cast<const char*>(a.grad_normed) + r * a.grad_normed_stride * gn_size,
               a.grad_normed_type, n);
      load_row(x, static_cast<const char*>(a.out) + r * a.out_stride * out_size, a.out_type, n);
      layer_norm_row_backward(dx, x, g, RowStats<acc_t>{st[2], st[3]}, w_next, dw_next, db_next, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dr[i] += dx[i];
    }
    if (a.grad_residual != nullptr) {
      store_row(static_cast<char*>(a.grad_residual) + r * n * gr_size, dr, a.grad_residual_type, n);
    }
    load_row(x, static_cast<const char*>(a.branch) + r * a.branch_stride * branch_size,
             a.branch_type, n);
    layer_norm_row_backward(dx, x, dr, RowStats<acc_t>{st[0], st[1]}, w_out, dw_out, db_out, n);
    store_row(static_cast<char*>(a.grad_branch) + r * n * gb_size, dx, a.branch_type, n);
  }
}

}  // namespace

void layer_norm_forward(const LayerNormForwardArgs& args, int64_t begin, int64_t end) {
  if (args.f64) {
    forward_rows<double>(args, begin, end);
  } else {
    forward_rows<float>(args, begin, end);
  }
}

void layer_norm_backward(const LayerNormBackwardArgs& args, int64_t begin, int64_t end,
                         int64_t chunk) {
  if (args.f64) {
    backward_rows<double>(args, begin, end, chunk);
  } else {
    backward_rows<float>(args, begin, end, chunk);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
