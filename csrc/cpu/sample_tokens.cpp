// CPU implementation of cogview::sample_tokens (definition: cogview/ops/sampling.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/isa.h"
#include "cpu/tensor_utils.h"
#include "ops/decoding_checks.h"

namespace cogview::cpu {
namespace {

// Per-row parameter as a contiguous CPU array of `type`, or undefined when a scalar suffices
// (then `*scalar` holds the single value).
template <typename T>
at::Tensor row_param(const std::optional<at::Tensor>& t, at::ScalarType type, T* scalar) {
  if (!t) return at::Tensor();
  at::Tensor c = t->to(at::kCPU, type).contiguous();
  if (c.numel() == 1) {
    *scalar = c.data_ptr<T>()[0];
    return at::Tensor();
  }
  return c;
}

template <typename T, typename Ok>
void check_values(const at::Tensor& values, T scalar, Ok ok, const char* what) {
  const T* p = values.defined() ? values.data_ptr<T>() : &scalar;
  const int64_t count = values.defined() ? values.numel() : 1;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(ok(p[i]), "cogview: ", what, ", got ", p[i], values.defined() ? " in row " : "",
                      values.defined() ? std::to_string(i) : std::string());
  }
}

at::Tensor sample_tokens_cpu(const at::Tensor& logits_in, const at::Tensor& seed, const at::Tensor& offset,
                             const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
                             const std::optional<at::Tensor>& top_p, double temperature_value,
                             int64_t top_k_value, double top_p_value, int64_t vocab_lo, int64_t vocab_hi,
                             const std::optional<at::Tensor>& invalid) {
  ops::check_sample_tokens(logits_in, seed, offset, temperature, top_k, top_p, temperature_value, top_k_value,
                           top_p_value, vocab_lo, vocab_hi, invalid);
  const int64_t rows = logits_in.size(0);
  const int64_t hi = vocab_hi < 0 ? logits_in.size(1) : vocab_hi;
  float t_value = static_cast<float>(temperature_value);
  int64_t k_value = top_k_value;
  double p_value = top_p_value;
  const at::Tensor t_rows = row_param(temperature, at::kFloat, &t_value);
  const at::Tensor k_rows = row_param(top_k, at::kLong, &k_value);
  const at::Tensor p_rows = row_param(top_p, at::kDouble, &p_value);
  check_values(t_rows, t_value, [](float t) { return std::isfinite(t) && t >= 0; },
               "`temperature` must be finite and >= 0");
  check_values(k_rows, k_value, [](int64_t k) { return k >= 0; }, "`top_k` must be >= 0 (0 = off)");
  check_values(p_rows, p_value, [](double p) { return p >= 0 && p <= 1; }, "`top_p` must lie in [0, 1]");

  at::Tensor tokens = at::empty({rows}, logits_in.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  // Logits without unit stride along the vocabulary (a transposed or expanded view) are copied,
  // but only the allowed columns, and one row when every row is the same memory (stride 0): an
  // expanded [rows, V] view must not be materialised. The kernel then sees ids [0, hi - lo).
  int64_t lo = vocab_lo, id_shift = 0;
  at::Tensor logits = logits_in;
  bool shared_rows = false;
  if (logits_in.stride(1) != 1) {
    logits = logits_in.narrow(1, vocab_lo, hi - vocab_lo);
    shared_rows = rows > 1 && logits.stride(0) == 0;
    logits = (shared_rows ? logits.narrow(0, 0, 1) : logits).contiguous();
    id_shift = vocab_lo;
    lo = 0;
  }
  at::Tensor flags;
  if (invalid) flags = invalid->is_contiguous() ? *invalid : invalid->contiguous();

  SampleTokensArgs a;
  a.vocab_lo = lo;
  a.vocab_hi = hi - id_shift;
  a.logits = logits.data_ptr();
  a.logits_type = elem_type(logits, "logits");
  a.row_stride = shared_rows ? 0 : rows > 1 ? logits.stride(0) : logits.size(1);
  a.temperature = t_rows.defined() ? t_rows.data_ptr<float>() : nullptr;
  a.top_k = k_rows.defined() ? k_rows.data_ptr<int64_t>() : nullptr;
  a.top_p = p_rows.defined() ? p_rows.data_ptr<double>() : nullptr;
  a.temperature_value = t_value;
  a.top_k_value = k_value;
  a.top_p_value = p_value;
  a.seed = static_cast<uint64_t>(seed.item().toLong());
  a.offset = static_cast<uint64_t>(offset.item().toLong());
  a.tokens = tokens.data_ptr<int64_t>();
  a.invalid = flags.defined() ? flags.data_ptr<bool>() : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(sample_tokens, a, begin, end);
  });
  if (flags.defined() && !flags.is_same(*invalid)) invalid->copy_(flags);
  if (id_shift != 0) tokens.add_(id_shift);
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(cogview, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace cogview::cpu
