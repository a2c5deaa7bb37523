// Helpers shared by the torch-facing CPU files: ATen tensors -> raw rows for csrc/cpu/kernels/.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

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

// A weight or bias as a contiguous array of the accumulator type: read in place when it already
// is one, else converted here with a plain loop. (Tensor::to + contiguous cost four ATen calls per
// parameter, which for a bf16 model outweighed the LayerNorm of a few hundred rows.)
class AccParam {
 public:
  AccParam(const at::Tensor& p, at::ScalarType acc) {
    if (p.scalar_type() == acc && p.is_contiguous()) {
      data_ = p.data_ptr();
      return;
    }
    if (acc == at::kDouble) {
      data_ = convert<double>(p);
    } else {
      data_ = convert<float>(p);
    }
  }
  void* data() const { return data_; }

 private:
  template <typename Acc>
  void* convert(const at::Tensor& p) {
    const int64_t n = p.numel();
    buffer_.resize(static_cast<size_t>(n) * sizeof(Acc));
    Acc* out = reinterpret_cast<Acc*>(buffer_.data());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "layer_norm_param", [&] {
      const scalar_t* src = p.const_data_ptr<scalar_t>();
      const int64_t stride = p.stride(0);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(src[i * stride]);
    });
    return out;
  }

  void* data_ = nullptr;
  std::vector<char> buffer_;
};

}  // namespace cogview::cpu
