// Argument checks for linear and pack_linear_weight (the Python wrapper checks first; these keep
// direct torch.ops.cogview calls safe).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "ops/layer_norm_checks.h"

namespace cogview::ops {

// The activations `linear` can apply to x W^T + b.
inline bool is_linear_activation(std::string_view name) { return name == "none" || name == "gelu_tanh"; }

// The tile layout (csrc/cpu/kernels/kernels.h) groups weights by 32 rows and 32 input features.
constexpr int64_t kLinearPackMultiple = 32;

inline void check_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         std::string_view activation, const std::optional<at::Tensor>& packed) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), "cogview: linear `x` must be float32, float16, bfloat16 "
                   "or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "cogview: linear `weight` must be 2-D [out_features, in_features], got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "cogview: linear `weight` must have the dtype of `x` (",
                   x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "cogview: linear `x` must end in in_features = ",
                    weight.size(1), " (the columns of `weight`), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "cogview: linear `weight` is on ", weight.device(),
                    " but `x` is on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "cogview: linear `bias` must be [",
                      weight.size(0), "] (out_features), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "cogview: linear `bias` must have the dtype of `x` (",
                     x.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "cogview: linear `bias` is on ", bias->device(),
                      " but `x` is on ", x.device());
  }
  TORCH_CHECK_VALUE(is_linear_activation(activation), "cogview: linear `activation` must be 'none' or "
                    "'gelu_tanh', got '", std::string(activation), "'");
  if (packed.has_value()) {
    const int64_t out = weight.size(0), in = weight.size(1), m = kLinearPackMultiple;
    TORCH_CHECK_VALUE(packed->scalar_type() == at::kBFloat16 && packed->is_contiguous() &&
                          packed->sizes() == at::IntArrayRef({out / 16, in / m, 16, m}) && out % m == 0 &&
                          in % m == 0 && packed->device() == x.device(),
                      "cogview: linear `packed_weight` must be pack_linear_weight(weight): contiguous bfloat16 [",
                      out / 16, ", ", in / m, ", 16, ", m, "] on ", x.device(), ", got ", packed->scalar_type(), " ",
                      packed->sizes());
  }
}

inline void check_pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kBFloat16, "cogview: pack_linear_weight `weight` must be bfloat16 "
                   "(the tile products are bf16), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) % kLinearPackMultiple == 0 &&
                        weight.size(1) % kLinearPackMultiple == 0,
                    "cogview: pack_linear_weight `weight` must be 2-D [out_features, in_features], both multiples "
                    "of ", kLinearPackMultiple, ", got ", weight.sizes());
}

}  // namespace cogview::ops
