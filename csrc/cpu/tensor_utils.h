// Helpers shared by the torch-facing CPU files: ATen tensors -> raw rows for csrc/cpu/kernels/.
#pragma once

#include <ATen/ATen.h>

#include "cpu/kernels/scalar_types.h"

namespace cogview::cpu {

inline ElemType elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::f32;
    case at::kHalf: return ElemType::f16;
    case at::kBFloat16: return ElemType::bf16;
    case at::kDouble: return ElemType::f64;
    default:
      TORCH_CHECK_TYPE(false, "cogview: `", name, "` must be float32, float16, bfloat16 or float64, got ",
                       t.scalar_type());
  }
}

// `t` as [rows, hidden] with unit stride along hidden (a view when possible, else a copy).
inline at::Tensor as_rows(const at::Tensor& t, int64_t hidden) {
  at::Tensor rows = t.reshape({-1, hidden});
  return rows.stride(1) == 1 || rows.size(0) * hidden == 0 ? rows : rows.contiguous();
}

inline int64_t row_stride(const at::Tensor& rows) { return rows.size(0) > 1 ? rows.stride(0) : rows.size(1); }

}  // namespace cogview::cpu
