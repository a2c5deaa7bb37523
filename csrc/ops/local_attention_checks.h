// Argument checks for the local-attention ops, shared by the CPU and CUDA implementations.
// The Python wrapper checks first (with the user's argument names); these keep direct
// torch.ops.cogview calls safe: no shape the kernels can't handle gets through.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace cogview::ops {

struct LocalAttentionDims {
  int64_t batch, heads, n_q, head_dim;
  int64_t k_batch, n_k;
  int64_t text_batch, text;  // text = 0 (and text_batch = 1) without text keys
  int64_t q_h, q_w, k_h, k_w, win_h, win_w;
};

inline void check_attention_input(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
                   "cogview: `", name, "` must be float32, float16, bfloat16 or float64, got ",
                   t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "cogview: `", name, "` has dtype ",
                   t.scalar_type(), " but `q` has ", q.scalar_type(), " (they must match)");
  TORCH_CHECK_VALUE(t.device() == q.device(), "cogview: `", name, "` is on ", t.device(),
                    " but `q` is on ", q.device());
  TORCH_CHECK_VALUE(t.dim() == 4, "cogview: `", name,
                    "` must be 4-D [batch, heads, tokens, head_dim], got shape ", t.sizes());
}

inline void check_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= 1 && v[1] >= 1, "cogview: `", name,
                    "` must be two positive integers, got ", v);
}

inline LocalAttentionDims check_local_attention(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, at::IntArrayRef grid_q,
                                                at::IntArrayRef grid_kv, at::IntArrayRef window,
                                                bool causal, const std::optional<at::Tensor>& text_k,
                                                const std::optional<at::Tensor>& text_v,
                                                double text_bias, double scale) {
  check_attention_input(q, "q", q);
  check_attention_input(k, "k", q);
  check_attention_input(v, "v", q);
  check_pair(grid_q, "grid_q");
  check_pair(grid_kv, "grid_kv");
  check_pair(window, "window");
  LocalAttentionDims d{};
  d.batch = q.size(0);
  d.heads = q.size(1);
  d.n_q = q.size(2);
  d.head_dim = q.size(3);
  d.k_batch = k.size(0);
  d.n_k = k.size(2);
  d.q_h = grid_q[0];
  d.q_w = grid_q[1];
  d.k_h = grid_kv[0];
  d.k_w = grid_kv[1];
  d.win_h = window[0];
  d.win_w = window[1];
  TORCH_CHECK_VALUE(d.head_dim >= 1, "cogview: `q` needs head_dim >= 1, got shape ", q.sizes());
  // Grid products are formed without overflow (direct op calls may pass any int64).
  int64_t q_tokens = 0, k_tokens = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(d.q_h, d.q_w, &q_tokens) && d.n_q == q_tokens, "cogview: `q` has ", d.n_q,
                    " tokens but `grid_q` is ", grid_q);
  TORCH_CHECK_VALUE(!c10::mul_overflows(d.k_h, d.k_w, &k_tokens) && d.n_k == k_tokens, "cogview: `k` has ", d.n_k,
                    " tokens but `grid_kv` is ", grid_kv);
  TORCH_CHECK_VALUE(d.q_h % d.k_h == 0 && d.q_w % d.k_w == 0, "cogview: `grid_q` ", grid_q,
                    " must be a multiple of `grid_kv` ", grid_kv, " in both dimensions");
  TORCH_CHECK_VALUE(d.win_h % 2 == 1 && d.win_w % 2 == 1, "cogview: `window` must be odd, got ",
                    window);
  TORCH_CHECK_VALUE(!causal || (d.q_h == d.k_h && d.q_w == d.k_w),
                    "cogview: `causal` needs `grid_q` == `grid_kv`, got ", grid_q, " and ", grid_kv);
  TORCH_CHECK_VALUE(k.size(1) == d.heads && k.size(3) == d.head_dim, "cogview: `k` has shape ",
                    k.sizes(), " but `q` has ", q.sizes(), " (heads and head_dim must match)");
  TORCH_CHECK_VALUE(d.k_batch == d.batch || d.k_batch == 1, "cogview: `k` has batch ", d.k_batch,
                    " but `q` has ", d.batch, " (must match or be 1)");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "cogview: `v` has shape ", v.sizes(),
                    " but `k` has ", k.sizes());
  TORCH_CHECK_VALUE(text_k.has_value() == text_v.has_value(),
                    "cogview: `text_k` and `text_v` must be given together");
  d.text_batch = 1;
  d.text = 0;
  if (text_k.has_value()) {
    check_attention_input(*text_k, "text_k", q);
    check_attention_input(*text_v, "text_v", q);
    d.text_batch = text_k->size(0);
    d.text = text_k->size(2);
    TORCH_CHECK_VALUE(text_k->size(1) == d.heads && text_k->size(3) == d.head_dim,
                      "cogview: `text_k` has shape ", text_k->sizes(), " but `q` has ", q.sizes(),
                      " (heads and head_dim must match)");
    TORCH_CHECK_VALUE(d.text_batch == d.batch || d.text_batch == 1, "cogview: `text_k` has batch ",
                      d.text_batch, " but `q` has ", d.batch, " (must match or be 1)");
    TORCH_CHECK_VALUE(text_v->sizes() == text_k->sizes(), "cogview: `text_v` has shape ",
                      text_v->sizes(), " but `text_k` has ", text_k->sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(text_bias), "cogview: `text_bias` must be finite, got ", text_bias);
  TORCH_CHECK_VALUE(std::isfinite(scale), "cogview: `scale` must be finite, got ", scale);
  // A window of 2 * grid - 1 keys already reaches every key from any centre: larger windows mean
  // the same, and are clamped so that no buffer is sized by an absurd window.
  d.win_h = std::min(d.win_h, 2 * d.k_h - 1);
  d.win_w = std::min(d.win_w, 2 * d.k_w - 1);
  return d;
}

inline void check_local_attention_backward(const LocalAttentionDims& d, const at::Tensor& q,
                                           const std::optional<at::Tensor>& grad_out,
                                           const std::optional<at::Tensor>& grad_lse,
                                           const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "cogview: `out` has shape ", out.sizes(),
                    " but `q` has ", q.sizes());
  TORCH_CHECK_VALUE(out.device() == q.device() && lse.device() == q.device(),
                    "cogview: `out` and `lse` must be on `q`'s device ", q.device());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == d.batch && lse.size(1) == d.heads &&
                        lse.size(2) == d.n_q,
                    "cogview: `lse` must have shape [", d.batch, ", ", d.heads, ", ", d.n_q, "], got ",
                    lse.sizes());
  if (grad_out.has_value()) {
    TORCH_CHECK_VALUE(grad_out->sizes() == q.sizes() && grad_out->device() == q.device(),
                      "cogview: `grad_out` must match `q` in shape and device, got ",
                      grad_out->sizes(), " on ", grad_out->device());
  }
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes() && grad_lse->device() == q.device(),
                      "cogview: `grad_lse` must match `lse` in shape and device, got ",
                      grad_lse->sizes(), " on ", grad_lse->device());
  }
  for (const at::Tensor* t : {&out, &lse}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "cogview: `out` and `lse` must be floating point");
  }
}

}  // namespace cogview::ops
