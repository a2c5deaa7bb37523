// The torch-free CPU kernels, declared once per instruction set.
//
// Every file in csrc/cpu/kernels/ is compiled once per ISA with -DCOGVIEW_ISA=<name> and the
// ISA's flags (build_tools/sources.py), putting its definitions in namespace
// cogview::cpu::<name>. csrc/cpu/isa.h picks one namespace at run time.
#pragma once

#include <cstdint>

#include "cpu/kernels/scalar_types.h"

namespace cogview::cpu {

// Rows are `hidden` contiguous elements; consecutive rows are `*_stride` elements apart.
// Weights/biases are arrays of the accumulator type (double when `f64`, else float).
struct LayerNormForwardArgs {
  int64_t rows = 0, hidden = 0;
  const void* residual = nullptr;  // nullptr: plain LayerNorm of `branch`
  ElemType residual_type = ElemType::f32;
  int64_t residual_stride = 0;
  const void* branch = nullptr;
  ElemType branch_type = ElemType::f32;
  int64_t branch_stride = 0;
  const void* w_out = nullptr;
  const void* b_out = nullptr;
  const void* w_next = nullptr;  // nullptr: no second LayerNorm
  const void* b_next = nullptr;
  void* out = nullptr;  // [rows, hidden] contiguous: residual + LN(branch), or LN(branch)
  ElemType out_type = ElemType::f32;
  void* normed = nullptr;  // [rows, hidden] contiguous: LN_next(out)
  ElemType normed_type = ElemType::f32;
  void* stats = nullptr;  // accumulator [rows, 2 or 4]: (mean, rstd) per LayerNorm
  double eps = 1e-5;
  bool pb_relax = false;
  bool f64 = false;
};

struct LayerNormBackwardArgs {
  int64_t rows = 0, hidden = 0;
  const void* grad_out = nullptr;  // may be nullptr (no gradient reached `out`)
  ElemType grad_out_type = ElemType::f32;
  int64_t grad_out_stride = 0;
  const void* grad_normed = nullptr;  // may be nullptr
  ElemType grad_normed_type = ElemType::f32;
  int64_t grad_normed_stride = 0;
  const void* branch = nullptr;  // input of the first LayerNorm
  ElemType branch_type = ElemType::f32;
  int64_t branch_stride = 0;
  const void* out = nullptr;  // input of the second LayerNorm (only read when has_next)
  ElemType out_type = ElemType::f32;
  int64_t out_stride = 0;
  const void* w_out = nullptr;
  const void* w_next = nullptr;
  const void* stats = nullptr;
  bool has_next = false;
  void* grad_branch = nullptr;  // contiguous, branch_type
  void* grad_residual = nullptr;  // contiguous, out_type; nullptr for plain LayerNorm
  ElemType grad_residual_type = ElemType::f32;
  void* partials = nullptr;  // accumulator [chunks, 4, hidden]: dw_out, db_out, dw_next, db_next
  bool f64 = false;
};

#define COGVIEW_CPU_KERNEL_DECLARATIONS                                                     \
  /* Forward over rows [begin, end). */                                                     \
  void layer_norm_forward(const LayerNormForwardArgs& args, int64_t begin, int64_t end);   \
  /* Backward over rows [begin, end), accumulating weight grads into partial `chunk`. */    \
  void layer_norm_backward(const LayerNormBackwardArgs& args, int64_t begin, int64_t end,  \
                           int64_t chunk);

namespace baseline { COGVIEW_CPU_KERNEL_DECLARATIONS }
namespace avx2 { COGVIEW_CPU_KERNEL_DECLARATIONS }
namespace avx512 { COGVIEW_CPU_KERNEL_DECLARATIONS }

}  // namespace cogview::cpu
