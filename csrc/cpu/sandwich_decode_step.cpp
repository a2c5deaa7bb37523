// CPU implementation of cogview::sandwich_decode_step: one cached decode step (one new token per
// row) through a whole stack of CogView sandwich-LayerNorm layers, in one call.
//
// It runs the same kernels in the same order as the per-op loop (cogview/generation/sampler.py,
// `lean_cpu_step`), so it gives the same numbers; what it removes is the per-op cost of Python and
// the dispatcher (about 10 ops per layer), which at batch 1 outweighs the arithmetic of a small model.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/cpu_ops.h"

namespace cogview::cpu {
namespace {

// Per layer, in this order (cogview/ops/decoding.py documents the same list).
enum Param : int64_t {
  kQkvWeight, kQkvBias, kDenseWeight, kDenseBias,
  kThirdWeight, kThirdBias, kPostAttentionWeight, kPostAttentionBias,
  kUpWeight, kUpBias, kDownWeight, kDownBias,
  kFourthWeight, kFourthBias, kNextWeight, kNextBias,
  kParamsPerLayer
};
constexpr const char* kParamNames[kParamsPerLayer] = {
    "qkv_weight", "qkv_bias", "dense_weight", "dense_bias",
    "third_ln_weight", "third_ln_bias", "post_attention_ln_weight", "post_attention_ln_bias",
    "up_weight", "up_bias", "down_weight", "down_bias",
    "fourth_ln_weight", "fourth_ln_bias", "next_ln_weight", "next_ln_bias"};

void check_args(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& start,
                const at::Tensor& words, const at::Tensor& places, const at::Tensor& first_weight,
                const at::Tensor& first_bias, at::TensorList params, const at::Tensor& k_cache,
                const at::Tensor& v_cache, int64_t num_heads, double scale) {
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(1) == 1 && tokens.scalar_type() == at::kLong,
                    "cogview: sandwich_decode_step `tokens` must be int64 [rows, 1], got ", tokens.scalar_type(), " ",
                    tokens.sizes());
  TORCH_CHECK_VALUE(positions.sizes() == tokens.sizes() && positions.scalar_type() == at::kLong,
                    "cogview: sandwich_decode_step `positions` must be int64 ", tokens.sizes(), ", got ",
                    positions.scalar_type(), " ", positions.sizes());
  const int64_t rows = tokens.size(0);
  TORCH_CHECK_VALUE(start.dim() == 1 && start.size(0) == rows, "cogview: sandwich_decode_step `start` must be [",
                    rows, "], got ", start.sizes());
  TORCH_CHECK_VALUE(words.dim() == 2, "cogview: sandwich_decode_step `word_embeddings` must be [vocab, hidden], got ",
                    words.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(),
                    "cogview: sandwich_decode_step `k_cache`/`v_cache` must both be [layers, rows, heads, max_len, "
                    "head_dim], got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t layers = k_cache.size(0), hidden = words.size(1);
  TORCH_CHECK_VALUE(layers >= 1 && static_cast<int64_t>(params.size()) == layers * kParamsPerLayer,
                    "cogview: sandwich_decode_step needs ", kParamsPerLayer, " `layer_params` per layer (",
                    layers, " layers in the cache), got ", params.size());
  TORCH_CHECK_VALUE(k_cache.size(1) == rows, "cogview: sandwich_decode_step: the cache has ", k_cache.size(1),
                    " rows but `tokens` has ", rows);
  TORCH_CHECK_VALUE(num_heads >= 1 && k_cache.size(2) == num_heads && num_heads * k_cache.size(4) == hidden,
                    "cogview: sandwich_decode_step: `num_heads` ", num_heads, " x head_dim ", k_cache.size(4),
                    " must match the cache's heads ", k_cache.size(2), " and the hidden size ", hidden);
  TORCH_CHECK_VALUE(std::isfinite(scale), "cogview: sandwich_decode_step `scale` must be finite, got ", scale);
  TORCH_CHECK_TYPE(at::isFloatingType(words.scalar_type()) && k_cache.scalar_type() == words.scalar_type() &&
                       v_cache.scalar_type() == words.scalar_type(),
                   "cogview: sandwich_decode_step `k_cache`/`v_cache` must have the dtype of `word_embeddings` (",
                   words.scalar_type(), "), got ", k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(places.dim() == 2 && places.size(1) == hidden && places.scalar_type() == words.scalar_type(),
                    "cogview: sandwich_decode_step `position_embeddings` must be [positions, ", hidden, "] of ",
                    words.scalar_type(), ", got ", places.scalar_type(), " ", places.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"first_weight", &first_weight},
                                {"first_bias", &first_bias}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({hidden}) && t->scalar_type() == words.scalar_type(),
                      "cogview: sandwich_decode_step `", name, "` must be [", hidden, "] of ", words.scalar_type(),
                      ", got ", t->scalar_type(), " ", t->sizes());
  }
  // Ids outside the tables would make at::embedding fail without naming the argument.
  for (const auto& [name, ids, table] : {std::tuple<const char*, const at::Tensor*, const at::Tensor*>{
                                             "tokens", &tokens, &words},
                                         {"positions", &positions, &places}}) {
    if (ids->numel() == 0) continue;
    const int64_t lo = ids->min().item<int64_t>(), hi = ids->max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < table->size(0), "cogview: sandwich_decode_step `", name, "` must lie in [0, ",
                      table->size(0), "), got values in [", lo, ", ", hi, "]");
  }
  // Expected shapes: H = hidden, M = the MLP width (from the first up-projection).
  const int64_t mlp = params[kUpWeight].dim() == 2 ? params[kUpWeight].size(0) : -1;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.defined() && p.device().is_cpu(), "cogview: sandwich_decode_step `layer_params[", i,
                      "]` must be a CPU tensor");
    TORCH_CHECK_TYPE(p.scalar_type() == words.scalar_type(), "cogview: sandwich_decode_step `layer_params[", i,
                     "]` is ", p.scalar_type(), " but `word_embeddings` is ", words.scalar_type());
    std::vector<int64_t> want;
    switch (i % kParamsPerLayer) {
      case kQkvWeight: want = {3 * hidden, hidden}; break;
      case kQkvBias: want = {3 * hidden}; break;
      case kDenseWeight: want = {hidden, hidden}; break;
      case kUpWeight: want = {mlp, hidden}; break;
      case kUpBias: want = {mlp}; break;
      case kDownWeight: want = {hidden, mlp}; break;
      default: want = {hidden}; break;  // biases of width H and every LayerNorm parameter
    }
    TORCH_CHECK_VALUE(mlp >= 1 && p.sizes() == at::IntArrayRef(want), "cogview: sandwich_decode_step `layer_params[",
                      i, "]` (", kParamNames[i % kParamsPerLayer], " of layer ", i / kParamsPerLayer,
                      ") must have shape ", at::IntArrayRef(want), ", got ", p.sizes());
  }
}

// x W^T + b, through MKL's pre-packed sgemm when `packed` holds W packed for `packed_rows` rows (it
// then skips repacking W on every call, which at a handful of rows costs more than the product;
// MKL falls back to the plain product itself when the row count differs).
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor* packed,
                   int64_t packed_rows) {
  if (packed == nullptr) return at::linear(x, weight, bias);
  static const auto mkl_linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkl::_mkl_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t)>();
  return mkl_linear.call(x, *packed, weight, bias, packed_rows);
}

at::Tensor sandwich_decode_step_cpu(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& start,
                                    const at::Tensor& word_embeddings, const at::Tensor& position_embeddings,
                                    const at::Tensor& first_weight, const at::Tensor& first_bias,
                                    at::TensorList params, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    int64_t num_heads, double scale, double eps, bool pb_relax,
                                    const std::optional<std::vector<at::Tensor>>& packed_weights, int64_t packed_rows) {
  check_args(tokens, positions, start, word_embeddings, position_embeddings, first_weight, first_bias, params, k_cache,
             v_cache, num_heads, scale);
  const int64_t rows = tokens.size(0), hidden = word_embeddings.size(1), head_dim = k_cache.size(4);
  at::Tensor residual = at::embedding(word_embeddings, tokens).add_(at::embedding(position_embeddings, positions));
  at::Tensor normed = std::get<0>(layer_norm_cpu(residual, first_weight, first_bias, eps, pb_relax));
  const at::Tensor lengths = start + 1;
  const bool packed = packed_weights.has_value() && !packed_weights->empty();
  TORCH_CHECK_VALUE(!packed || static_cast<int64_t>(packed_weights->size()) == 4 * k_cache.size(0),
                    "cogview: sandwich_decode_step needs 4 `packed_weights` per layer (qkv, dense, up, down), got ",
                    packed_weights->size());
  for (int64_t layer = 0; layer < k_cache.size(0); ++layer) {
    const at::Tensor* p = params.data() + layer * kParamsPerLayer;
    const at::Tensor* w = packed ? packed_weights->data() + 4 * layer : nullptr;
    const auto packed_of = [&](int64_t i) { return w == nullptr ? nullptr : w + i; };
    const at::Tensor k_layer = k_cache[layer], v_layer = v_cache[layer];
    // [rows, 1, 3 * hidden] -> q, k, v [rows, heads, 1, head_dim] (views)
    const at::Tensor qkv = project(normed, p[kQkvWeight], p[kQkvBias], packed_of(0), packed_rows)
                               .view({rows, 1, 3, num_heads, head_dim})
                               .permute({2, 0, 3, 1, 4});
    kv_cache_write_cpu(k_layer, v_layer, qkv[1], qkv[2], start);
    const at::Tensor context = decode_attention_cpu(qkv[0], k_layer, v_layer, lengths, scale, 0, 0.0);
    at::Tensor branch = project(context.view({rows, 1, hidden}), p[kDenseWeight], p[kDenseBias], packed_of(1), packed_rows);
    std::tie(residual, normed, std::ignore) =
        add_layer_norm_cpu(residual, branch, p[kThirdWeight], p[kThirdBias], p[kPostAttentionWeight],
                           p[kPostAttentionBias], eps, pb_relax);
    const at::Tensor up = project(normed, p[kUpWeight], p[kUpBias], packed_of(2), packed_rows);
    branch = project(gelu_tanh_cpu(up), p[kDownWeight], p[kDownBias], packed_of(3), packed_rows);
    std::tie(residual, normed, std::ignore) = add_layer_norm_cpu(
        residual, branch, p[kFourthWeight], p[kFourthBias], p[kNextWeight], p[kNextBias], eps, pb_relax);
  }
  return normed.select(1, 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(cogview, CPU, m) { m.impl("sandwich_decode_step", &sandwich_decode_step_cpu); }
// MKL-packed weights are MkldnnCPU tensors; with them in `packed_weights` the call dispatches here.
TORCH_LIBRARY_IMPL(cogview, MkldnnCPU, m) { m.impl("sandwich_decode_step", &sandwich_decode_step_cpu); }

}  // namespace cogview::cpu
