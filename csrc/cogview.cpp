// cogview._C: the pybind11 module and the schemas of every cogview op.
//
// Kernels are registered per device in csrc/cpu/*.cpp and csrc/cuda/*.cu with
// TORCH_LIBRARY_IMPL; Python reaches them through the dispatcher (torch.ops.cogview.*), so
// autograd, fake tensors and torch.compile all see them. This module binds no kernel directly.
#include <torch/extension.h>

#include "build_info.h"
#include "cpu/isa.h"
#include "cpu/linear.h"
#include "cpu/local_attention.h"

TORCH_LIBRARY(cogview, m) {
  // Sandwich LayerNorm. `stats` holds (mean, rstd) per row and LayerNorm, for the backward.
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps=1e-05, bool pb_relax=False)"
        " -> (Tensor out, Tensor stats)");
  m.def("layer_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor stats)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // `normed` is empty (0 elements) when no next LayerNorm is given.
  m.def("add_layer_norm(Tensor residual, Tensor branch, Tensor w_out, Tensor b_out, Tensor? w_next,"
        " Tensor? b_next, float eps=1e-05, bool pb_relax=False)"
        " -> (Tensor new_residual, Tensor normed, Tensor stats)");
  m.def("add_layer_norm_backward(Tensor? grad_new_residual, Tensor? grad_normed, Tensor branch,"
        " Tensor new_residual, Tensor w_out, Tensor? w_next, Tensor stats)"
        " -> (Tensor grad_residual, Tensor grad_branch, Tensor grad_w_out, Tensor grad_b_out,"
        " Tensor grad_w_next, Tensor grad_b_next)");

  // Cached decoding (cogview/ops/decoding.py). Caches [B, heads, max_len, d]; writes positions
  // start[b] .. start[b] + n - 1 of both caches in place.
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor start) -> ()");
  // q [B, heads, n, d]; lengths [B] counts the valid cached positions including the n new ones.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale, int text_len,"
        " float text_bias) -> Tensor");
  // One decode step (one new token per row) through a whole stack of sandwich-LayerNorm layers
  // (cogview/ops/decoding.py): embeddings, first LayerNorm, per layer 16 `layer_params`, caches
  // [layers, rows, heads, max_len, head_dim] written at `start`. Returns the final normed hidden
  // state [rows, hidden]. Inference only. packed_weights: optional MKL-packed copies of the four
  // projection weights per layer, packed for `packed_rows` rows (a speed hint: the products change
  // by rounding only).
  m.def("sandwich_decode_step(Tensor tokens, Tensor positions, Tensor start, Tensor word_embeddings,"
        " Tensor position_embeddings, Tensor first_weight, Tensor first_bias, Tensor[] layer_params,"
        " Tensor(a!) k_cache, Tensor(b!) v_cache, int num_heads, float scale, float eps=1e-05,"
        " bool pb_relax=False, Tensor[]? packed_weights=None, int packed_rows=0) -> Tensor");
  // GELU, tanh approximation (CogView's MLP activation; cogview/ops/activation.py).
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad_out, Tensor x) -> Tensor");
  // Fused sampling (cogview/ops/sampling.py). seed/offset: one-element integer tensors (they may
  // live on the device). temperature/top_k/top_p: a one-element or per-row [rows] tensor, which
  // overrides the scalar *_value when given. vocab_hi = -1 means the vocabulary size. `invalid`
  // (bool [rows]) gets True for rows with no finite allowed logit; other entries are untouched.
  m.def("sample_tokens(Tensor logits, Tensor seed, Tensor offset, Tensor? temperature=None,"
        " Tensor? top_k=None, Tensor? top_p=None, float temperature_value=1.0, int top_k_value=0,"
        " float top_p_value=1.0, int vocab_lo=0, int vocab_hi=-1, Tensor(a!)? invalid=None) -> Tensor");
  // y = activation(x W^T + b) (cogview/ops/linear.py); activation "none" or "gelu_tanh".
  // packed_weight: optional pack_linear_weight(weight), the AMX tile layout (a speed hint, read only
  // where the tile products run; it must be the packing of this `weight`).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None, str activation=\"none\","
        " Tensor? packed_weight=None) -> Tensor");
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  // Local (2D neighbourhood) attention with optional joint text keys (CogView2). `lse` is the
  // natural log of the softmax denominator per query (float32; float64 for float64 inputs).
  m.def("local_attention(Tensor q, Tensor k, Tensor v, int[2] grid_q, int[2] grid_kv, int[2] window,"
        " bool causal=False, Tensor? text_k=None, Tensor? text_v=None, float text_bias=0.0,"
        " float scale=1.0) -> (Tensor out, Tensor lse)");
  // dtext_k / dtext_v are empty (0 elements) when no text keys were given.
  m.def("local_attention_backward(Tensor? grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v,"
        " Tensor out, Tensor lse, int[2] grid_q, int[2] grid_kv, int[2] window, bool causal,"
        " Tensor? text_k, Tensor? text_v, float text_bias, float scale)"
        " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dtext_k, Tensor dtext_v)");
}

namespace {

const char* compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = COGVIEW_VERSION_STRING;
  info["torch_version"] = COGVIEW_TORCH_VERSION_STRING;
  info["cuda"] = static_cast<bool>(COGVIEW_WITH_CUDA);
  info["cuda_arch_list"] = COGVIEW_CUDA_ARCH_LIST_STRING;
  info["cpu_isas"] = cogview::cpu::compiled_isas();
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = compiler();
  info["build_tool"] = COGVIEW_BUILD_TOOL_STRING;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cogview native extension: op schemas, CPU/CUDA kernels and build information";
  m.def("build_info", &build_info, "What this build contains (versions, CUDA, archs, CPU ISAs).");
  m.def("cpu_isa", [] { return std::string(cogview::cpu::isa_name(cogview::cpu::active_isa())); },
        "The instruction set whose CPU kernels run now.");
  m.def("usable_cpu_isas", &cogview::cpu::usable_isas,
        "Instruction sets compiled into this build that this CPU can run.");
  m.def("set_cpu_isa", &cogview::cpu::set_active_isa, pybind11::arg("name"),
        "Switch the CPU kernels to another compiled, supported instruction set.");
  m.def("tile_linear_available", &cogview::cpu::tile_linear_available,
        "Whether cogview::linear runs bfloat16 products on the AMX matrix tiles now.");
  m.def("tile_linear_runs", &cogview::cpu::tile_linear_runs, pybind11::arg("x"), pybind11::arg("weight"),
        "Whether cogview::linear(x, weight, ...) runs on the AMX tiles (False for anything it would not).");
  m.def("local_attention_bf16_dot_available", &cogview::cpu::local_attention_bf16_dot_available,
        "Whether cogview::local_attention's bfloat16 CPU forward runs on AVX512-BF16 dot products now.");
  m.def("set_local_attention_bf16_dot", &cogview::cpu::set_local_attention_bf16_dot, pybind11::arg("enabled"),
        "Enable (default) or disable local_attention's bf16 dot-product forward; returns the previous setting.");
  m.def("tile_linear_max_macs", &cogview::cpu::tile_linear_max_macs,
        "The largest product (rows x in x out) cogview::linear runs on the tiles; larger ones take at::linear.");
}
