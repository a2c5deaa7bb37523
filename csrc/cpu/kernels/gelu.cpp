// gelu_tanh forward and backward: compiled once per ISA, see kernels.h. The forward's math is
// in gelu_math.h; with e = exp(-|2u|) as there,
// d/dx gelu = sigmoid(2u) + 2 x u' sigmoid(2u) (1 - sigmoid(2u)), sigmoid (1 - sigmoid) = e / (1 + e)^2.
#include "cpu/kernels/kernels.h"
#include "cpu/kernels/gelu_math.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

constexpr int64_t kBlock = 512;  // elements converted to the accumulator type at a time (in L1)

// grad [n] in, x [n] in; grad becomes grad * gelu'(x).
template <typename acc_t>
void backward_block(acc_t* __restrict grad, const acc_t* __restrict x, int64_t n) {
  using C = GeluCoefficients<acc_t>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = x[i];
    const acc_t v2 = v * v;
    const acc_t z = static_cast<acc_t>(2) * C::kBeta * (v + C::kKappa * v2 * v);
    const acc_t e = exp_nonpositive(z > 0 ? -z : z);
    const acc_t one_plus = static_cast<acc_t>(1) + e;
    const acc_t s = (z >= 0 ? static_cast<acc_t>(1) : e) / one_plus;
    const acc_t ds = e / (one_plus * one_plus);  // sigmoid(2u) (1 - sigmoid(2u))
    const acc_t du = C::kBeta * (static_cast<acc_t>(1) + static_cast<acc_t>(3) * C::kKappa * v2);
    grad[i] *= s + static_cast<acc_t>(2) * v * du * ds;
  }
}

template <typename acc_t>
void forward(const GeluArgs& a, int64_t begin, int64_t end) {
  acc_t buffer[kBlock];
  const int64_t in_size = elem_size(a.x_type), out_size = elem_size(a.out_type);
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = end - start < kBlock ? end - start : kBlock;
    load_row(buffer, static_cast<const char*>(a.x) + start * in_size, a.x_type, n);
    gelu_forward_rows(buffer, n);
    store_row(static_cast<char*>(a.out) + start * out_size, buffer, a.out_type, n);
  }
}

template <typename acc_t>
void backward(const GeluArgs& a, int64_t begin, int64_t end) {
  acc_t grad[kBlock], x[kBlock];
  const int64_t x_size = elem_size(a.x_type), grad_size = elem_size(a.grad_type), out_size = elem_size(a.out_type);
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = end - start < kBlock ? end - start : kBlock;
    load_row(grad, static_cast<const char*>(a.grad) + start * grad_size, a.grad_type, n);
    load_row(x, static_cast<const char*>(a.x) + start * x_size, a.x_type, n);
    backward_block(grad, x, n);
    store_row(static_cast<char*>(a.out) + start * out_size, grad, a.out_type, n);
  }
}

}  // namespace

void gelu_forward(const GeluArgs& args, int64_t begin, int64_t end) {
  if (args.f64) {
    forward<double>(args, begin, end);
  } else {
    forward<float>(args, begin, end);
  }
}

void gelu_backward(const GeluArgs& args, int64_t begin, int64_t end) {
  if (args.f64) {
    backward<double>(args, begin, end);
  } else {
    backward<float>(args, begin, end);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
