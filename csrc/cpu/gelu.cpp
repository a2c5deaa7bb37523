// CPU implementation of cogview::gelu_tanh and cogview::gelu_tanh_backward: elementwise, so the
// work is split into fixed chunks of contiguous elements (results do not depend on the threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_ops.h"
#include "cpu/isa.h"
#include "cpu/runners.h"
#include "cpu/tensor_utils.h"
#include "ops/gelu_checks.h"

namespace cogview::cpu {
namespace {

// Elements per task: big enough that a thread's share outweighs waking it (a 4 x 1024 MLP
// activation of a decode step runs inline).
constexpr int64_t kGrainElems = 32768;

void run(GeluArgs& a, const at::Tensor& x, const at::Tensor& out, bool backward) {
  a.x = x.data_ptr();
  a.x_type = elem_type(x, "x");
  a.out = out.data_ptr();
  a.out_type = elem_type(out, "out");
  a.f64 = x.scalar_type() == at::kDouble || (backward && a.grad_type == ElemType::f64);
  if (!backward) return run_gelu_forward(a, x.numel());
  at::parallel_for(0, x.numel(), kGrainElems, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(gelu_backward, a, begin, end);
  });
}

at::Tensor gelu_tanh_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_in) {
  ops::check_gelu_tanh_backward(grad_out, x_in);
  const at::Tensor x = x_in.contiguous(), grad = grad_out.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  GeluArgs a;
  a.grad = grad.data_ptr();
  a.grad_type = elem_type(grad, "grad_out");
  run(a, x, out, true);
  return out;
}

}  // namespace

void run_gelu_forward(const GeluArgs& a, int64_t n) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(gelu_forward, a, begin, end);
  });
}

at::Tensor gelu_tanh_cpu(const at::Tensor& x_in) {
  ops::check_gelu_tanh(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  GeluArgs a;
  run(a, x, out, false);
  return out;
}

TORCH_LIBRARY_IMPL(cogview, CPU, m) {
  m.impl("gelu_tanh", &gelu_tanh_cpu);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward_cpu);
}

}  // namespace cogview::cpu
