// Argument checks for the LayerNorm ops, shared by the CPU and CUDA implementations.
// The Python wrappers check first (with the user's argument names); these keep direct
// torch.ops.cogview calls safe.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace cogview::ops {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline at::ScalarType accumulator_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_param(const at::Tensor& p, const char* name, const at::Tensor& x,
                        const at::Tensor* other_input = nullptr) {
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == x.size(-1), "cogview: `", name,
                    "` must be 1-D with ", x.size(-1), " elements (the hidden size), got shape ",
                    p.sizes());
  TORCH_CHECK_VALUE(p.device() == x.device(), "cogview: `", name, "` is on ", p.device(),
                    " but the input is on ", x.device());
  const at::ScalarType t = p.scalar_type();
  const bool ok = t == at::kFloat || t == x.scalar_type() ||
                  (other_input != nullptr && t == other_input->scalar_type());
  TORCH_CHECK_TYPE(ok && is_supported_float(t), "cogview: `", name,
                   "` must be float32 or the input's dtype (", x.scalar_type(), "), got ", t);
}

inline void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), "cogview: `", name,
                   "` must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "cogview: `", name,
                    "` needs a last (hidden) dimension of size >= 1, got shape ", x.sizes());
}

inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "cogview: `eps` must be finite and >= 0, got ", eps);
}

inline void check_layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             double eps) {
  check_input(x, "x");
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  check_eps(eps);
}

inline void check_add_layer_norm(const at::Tensor& residual, const at::Tensor& branch,
                                 const at::Tensor& w_out, const at::Tensor& b_out,
                                 const std::optional<at::Tensor>& w_next,
                                 const std::optional<at::Tensor>& b_next, double eps) {
  check_input(residual, "residual");
  check_input(branch, "branch");
  TORCH_CHECK_VALUE(residual.sizes() == branch.sizes(), "cogview: `residual` has shape ",
                    residual.sizes(), " but `branch` has shape ", branch.sizes());
  TORCH_CHECK_VALUE(residual.device() == branch.device(), "cogview: `residual` is on ",
                    residual.device(), " but `branch` is on ", branch.device());
  TORCH_CHECK_TYPE((residual.scalar_type() == at::kDouble) == (branch.scalar_type() == at::kDouble),
                   "cogview: float64 `residual` and `branch` must both be float64, got ",
                   residual.scalar_type(), " and ", branch.scalar_type());
  check_param(w_out, "w_out", branch, &residual);
  check_param(b_out, "b_out", branch, &residual);
  TORCH_CHECK_VALUE(w_next.has_value() == b_next.has_value(),
                    "cogview: `w_next` and `b_next` must be given together");
  if (w_next) {
    check_param(*w_next, "w_next", branch, &residual);
    check_param(*b_next, "b_next", branch, &residual);
  }
  check_eps(eps);
}

// The backward ops are reached through autograd with tensors the forward made, but they are
// public ops too: a direct call with a wrong-shaped gradient or `stats` must not read out of bounds.
inline void check_grad(const at::Tensor& grad, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(grad.sizes() == like.sizes(), "cogview: `", name, "` must have shape ", like.sizes(),
                    ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == like.device(), "cogview: `", name, "` is on ", grad.device(),
                    " but the input is on ", like.device());
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()), "cogview: `", name,
                   "` must be float32, float16, bfloat16 or float64, got ", grad.scalar_type());
}

inline void check_stats(const at::Tensor& stats, int64_t columns, const at::Tensor& like) {
  const int64_t rows = like.numel() / like.size(-1);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) >= columns,
                    "cogview: `stats` must have shape [", rows, ", >=", columns, "] (from the forward), got ",
                    stats.sizes());
  TORCH_CHECK_VALUE(stats.device() == like.device(), "cogview: `stats` is on ", stats.device(),
                    " but the input is on ", like.device());
  TORCH_CHECK_TYPE(at::isFloatingType(stats.scalar_type()), "cogview: `stats` must be floating point, got ",
                   stats.scalar_type());
}

inline void check_layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& stats) {
  check_input(x, "x");
  check_param(weight, "weight", x);
  check_grad(grad_out, "grad_out", x);
  check_stats(stats, 2, x);
}

inline void check_add_layer_norm_backward(const std::optional<at::Tensor>& grad_new_residual,
                                          const std::optional<at::Tensor>& grad_normed, const at::Tensor& branch,
                                          const at::Tensor& new_residual, const at::Tensor& w_out,
                                          const std::optional<at::Tensor>& w_next, const at::Tensor& stats) {
  check_input(branch, "branch");
  check_input(new_residual, "new_residual");
  TORCH_CHECK_VALUE(new_residual.sizes() == branch.sizes(), "cogview: `new_residual` has shape ",
                    new_residual.sizes(), " but `branch` has shape ", branch.sizes());
  TORCH_CHECK_VALUE(new_residual.device() == branch.device(), "cogview: `new_residual` is on ",
                    new_residual.device(), " but `branch` is on ", branch.device());
  TORCH_CHECK_TYPE((new_residual.scalar_type() == at::kDouble) == (branch.scalar_type() == at::kDouble),
                   "cogview: float64 `new_residual` and `branch` must both be float64, got ",
                   new_residual.scalar_type(), " and ", branch.scalar_type());
  check_param(w_out, "w_out", branch, &new_residual);
  if (w_next) check_param(*w_next, "w_next", branch, &new_residual);
  if (grad_new_residual) check_grad(*grad_new_residual, "grad_new_residual", branch);
  if (w_next && grad_normed) check_grad(*grad_normed, "grad_normed", branch);
  check_stats(stats, w_next ? 4 : 2, branch);
}

}  // namespace cogview::ops
