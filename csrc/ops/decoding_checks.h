// Argument checks for kv_cache_write, decode_attention and sample_tokens, shared by the CPU and
// CUDA implementations. The Python wrappers check first (with the user's argument names); these
// keep direct torch.ops.cogview calls safe. Checks that need tensor VALUES (positions, lengths,
// per-row sampling parameters) are done by each device's implementation where it can read them
// without synchronising.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>

#include "ops/layer_norm_checks.h"

namespace cogview::ops {

inline void check_cache_pair(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK_TYPE(is_supported_float(k_cache.scalar_type()), "cogview: `k_cache` must be float32, float16, "
                   "bfloat16 or float64, got ", k_cache.scalar_type());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), "cogview: `v_cache` is ",
                   v_cache.scalar_type(), " but `k_cache` is ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "cogview: `k_cache` must be [batch, heads, max_len, head_dim], got shape ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "cogview: `v_cache` has shape ", v_cache.sizes(),
                    " but `k_cache` has ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.device() == k_cache.device(), "cogview: `v_cache` is on ", v_cache.device(),
                    " but `k_cache` is on ", k_cache.device());
}

// The caches are written in place: no two of their elements may share memory (an expanded view),
// and k_cache and v_cache must not share memory with each other.
inline void check_writable_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "cogview: `", name,
                      "` is written in place but some of its elements share memory (an expanded view?); "
                      "pass a tensor that owns its elements (e.g. .clone())");
  }
  const at::MemOverlapStatus overlap = at::get_overlap_status(k_cache, v_cache);
  const bool same_start = k_cache.numel() > 0 && k_cache.data_ptr() == v_cache.data_ptr();
  TORCH_CHECK_VALUE(!same_start && overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
                    "cogview: `k_cache` and `v_cache` share memory; they must be separate tensors");
}

inline void check_rows_like_cache(const at::Tensor& t, const char* name, const at::Tensor& cache) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "cogview: `", name, "` must be float32, float16, "
                   "bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == cache.size(0) && t.size(1) == cache.size(1) &&
                        t.size(3) == cache.size(3),
                    "cogview: `", name, "` must be [", cache.size(0), ", ", cache.size(1), ", n, ", cache.size(3),
                    "] to match the cache, got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == cache.device(), "cogview: `", name, "` is on ", t.device(),
                    " but the cache is on ", cache.device());
}

inline void check_positions(const at::Tensor& t, const char* name, int64_t batch, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "cogview: `", name,
                   "` must be int64 (or int32), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, "cogview: `", name, "` must have shape (", batch,
                    ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, "cogview: `", name, "` is on ", t.device(), " but the cache is on ",
                    device);
}

inline void check_kv_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                                 const at::Tensor& v_new, const at::Tensor& start) {
  check_cache_pair(k_cache, v_cache);
  check_rows_like_cache(k_new, "k_new", k_cache);
  check_rows_like_cache(v_new, "v_new", k_cache);
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), "cogview: `v_new` has shape ", v_new.sizes(),
                    " but `k_new` has ", k_new.sizes());
  check_positions(start, "start", k_cache.size(0), k_cache.device());
  check_writable_caches(k_cache, v_cache);
}

inline void check_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& lengths, double scale, double text_bias) {
  check_cache_pair(k_cache, v_cache);
  check_rows_like_cache(q, "q", k_cache);
  check_positions(lengths, "lengths", k_cache.size(0), k_cache.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), "cogview: `scale` must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(text_bias), "cogview: `text_bias` must be finite, got ", text_bias);
}

// A scalar (one element) or per-row ([rows]) parameter tensor.
inline void check_row_param(const std::optional<at::Tensor>& t, const char* name, int64_t rows, bool integral) {
  if (!t) return;
  const at::ScalarType type = t->scalar_type();
  if (integral) {
    TORCH_CHECK_TYPE(at::isIntegralType(type, /*includeBool=*/false), "cogview: `", name,
                     "` must be an integer tensor, got ", type);
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(type), "cogview: `", name, "` must be a floating-point tensor, got ", type);
  }
  TORCH_CHECK_VALUE(t->numel() == 1 || (t->dim() == 1 && t->size(0) == rows), "cogview: `", name,
                    "` must have one element or shape (", rows, ",), got ", t->sizes());
}

inline void check_sample_tokens(const at::Tensor& logits, const at::Tensor& seed, const at::Tensor& offset,
                                const std::optional<at::Tensor>& temperature,
                                const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
                                double temperature_value, int64_t top_k_value, double top_p_value,
                                int64_t vocab_lo, int64_t vocab_hi, const std::optional<at::Tensor>& invalid) {
  TORCH_CHECK_TYPE(is_supported_float(logits.scalar_type()), "cogview: `logits` must be float32, float16, "
                   "bfloat16 or float64, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2, "cogview: `logits` must be [rows, vocab], got shape ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{seed, "seed"}, {offset, "offset"}}) {
    TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "cogview: `", name,
                     "` must be an integer tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == 1, "cogview: `", name, "` must have exactly one element, got shape ", t.sizes());
  }
  check_row_param(temperature, "temperature", rows, false);
  check_row_param(top_k, "top_k", rows, true);
  check_row_param(top_p, "top_p", rows, false);
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(temperature_value)) && temperature_value >= 0,
                    "cogview: `temperature` must be finite and >= 0, got ", temperature_value);
  TORCH_CHECK_VALUE(top_k_value >= 0, "cogview: `top_k` must be >= 0 (0 = off), got ", top_k_value);
  TORCH_CHECK_VALUE(top_p_value >= 0 && top_p_value <= 1, "cogview: `top_p` must lie in [0, 1], got ", top_p_value);
  const int64_t hi = vocab_hi < 0 ? vocab : vocab_hi;
  TORCH_CHECK_VALUE(vocab_lo >= 0 && vocab_lo < hi && hi <= vocab, "cogview: `vocab_range` (", vocab_lo, ", ", hi,
                    ") must satisfy 0 <= lo < hi <= vocab size ", vocab);
  TORCH_CHECK_VALUE(hi - vocab_lo <= (int64_t{1} << 31) - 1, "cogview: `vocab_range` (", vocab_lo, ", ", hi,
                    ") spans ", hi - vocab_lo, " ids: at most 2^31 - 1 are supported");
  if (invalid) {
    TORCH_CHECK_TYPE(invalid->scalar_type() == at::kBool, "cogview: `invalid` must be a bool tensor, got ",
                     invalid->scalar_type());
    TORCH_CHECK_VALUE(invalid->dim() == 1 && invalid->size(0) == rows, "cogview: `invalid` must have shape (", rows,
                      ",), got ", invalid->sizes());
    TORCH_CHECK_VALUE(invalid->device() == logits.device(), "cogview: `invalid` is on ", invalid->device(),
                      " but `logits` is on ", logits.device());
    TORCH_CHECK_VALUE(at::has_internal_overlap(*invalid) != at::MemOverlap::Yes, "cogview: `invalid` is written "
                      "in place but some of its elements share memory (an expanded view?)");
  }
}

}  // namespace cogview::ops
