// The CPU entry points of cogview's ops, for C++ callers inside the extension (the fused decode
// step) that want the kernels without a trip through the dispatcher. Each checks its arguments
// exactly as the registered op does.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cogview::cpu {

std::tuple<at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& bias, double eps, bool pb_relax);

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_cpu(
    const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& w_out, const at::Tensor& b_out,
    const std::optional<at::Tensor>& w_next, const std::optional<at::Tensor>& b_next, double eps, bool pb_relax);

void kv_cache_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                        const at::Tensor& v_new, const at::Tensor& start);

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& lengths, double scale, int64_t text_len, double text_bias);

at::Tensor gelu_tanh_cpu(const at::Tensor& x);

}  // namespace cogview::cpu
