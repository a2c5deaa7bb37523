// Argument checks for gelu_tanh and gelu_tanh_backward, shared by the CPU and CUDA implementations
// (the Python wrapper checks first; these keep direct torch.ops.cogview calls safe).
#pragma once

#include <ATen/ATen.h>

#include "ops/layer_norm_checks.h"

namespace cogview::ops {

inline void check_gelu_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "cogview: ", op, " `", name,
                   "` must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_gelu_tanh(const at::Tensor& x) { check_gelu_input(x, "gelu_tanh", "x"); }

inline void check_gelu_tanh_backward(const at::Tensor& grad_out, const at::Tensor& x) {
  check_gelu_input(x, "gelu_tanh_backward", "x");
  check_gelu_input(grad_out, "gelu_tanh_backward", "grad_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "cogview: gelu_tanh_backward `grad_out` must have the shape of "
                    "`x` ", x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "cogview: gelu_tanh_backward `grad_out` is on ",
                    grad_out.device(), " but `x` is on ", x.device());
}

}  // namespace cogview::ops
