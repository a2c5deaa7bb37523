// CUDA implementation of cogview::gelu_tanh and cogview::gelu_tanh_backward: one grid-stride
// elementwise pass in the accumulator type (float; double for float64), the same formula as the
// CPU kernels (csrc/cpu/kernels/gelu.cpp): gelu(x) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
// through exp of a non-positive argument so nothing overflows.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "ops/gelu_checks.h"

namespace cogview::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float exp_np(float x) { return __expf(x); }
__device__ __forceinline__ double exp_np(double x) { return exp(x); }

// (sigmoid(2u), sigmoid(2u) (1 - sigmoid(2u)), u') at v.
template <typename acc_t>
__device__ __forceinline__ void gelu_parts(acc_t v, acc_t& s, acc_t& ds, acc_t& du) {
  const acc_t beta = static_cast<acc_t>(0.79788456080286535588), kappa = static_cast<acc_t>(0.044715);
  const acc_t v2 = v * v;
  const acc_t z = static_cast<acc_t>(2) * beta * (v + kappa * v2 * v);
  const acc_t e = exp_np(z > 0 ? -z : z);
  const acc_t one_plus = static_cast<acc_t>(1) + e;
  s = (z >= 0 ? static_cast<acc_t>(1) : e) / one_plus;
  ds = e / (one_plus * one_plus);
  du = beta * (static_cast<acc_t>(1) + static_cast<acc_t>(3) * kappa * v2);
}

template <typename T, typename acc_t>
__global__ void gelu_forward_kernel(const typename T::bits* __restrict__ x, typename T::bits* __restrict__ out,
                                    int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t v = to_acc<T, acc_t>(x[i]);
    acc_t s, ds, du;
    gelu_parts(v, s, ds, du);
    out[i] = T::from_acc(v * s);
  }
}

template <typename T, typename G, typename acc_t>
__global__ void gelu_backward_kernel(const typename G::bits* __restrict__ grad, const typename T::bits* __restrict__ x,
                                     typename T::bits* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t v = to_acc<T, acc_t>(x[i]);
    acc_t s, ds, du;
    gelu_parts(v, s, ds, du);
    out[i] = T::from_acc(to_acc<G, acc_t>(grad[i]) * (s + static_cast<acc_t>(2) * v * du * ds));
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// Calls fn(T{}) with T the element traits of `type`.
template <typename Fn>
void with_type(at::ScalarType type, const Fn& fn) {
  switch (type) {
    case at::kFloat: fn(F32{}); break;
    case at::kHalf: fn(F16{}); break;
    case at::kBFloat16: fn(BF16{}); break;
    default: fn(F64{}); break;
  }
}

at::Tensor gelu_tanh_cuda(const at::Tensor& x_in) {
  ops::check_gelu_tanh(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    using acc_t = std::conditional_t<T::kind == Kind::f64, double, float>;
    gelu_forward_kernel<T, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const typename T::bits*>(x.data_ptr()), static_cast<typename T::bits*>(out.data_ptr()), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gelu_tanh_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in) {
  ops::check_gelu_tanh_backward(grad_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool f64 = x.scalar_type() == at::kDouble || grad.scalar_type() == at::kDouble;
  with_type(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    with_type(grad.scalar_type(), [&](auto g) {
      using G = decltype(g);
      const auto* gp = static_cast<const typename G::bits*>(grad.data_ptr());
      const auto* xp = static_cast<const typename T::bits*>(x.data_ptr());
      auto* op = static_cast<typename T::bits*>(out.data_ptr());
      if (f64) {
        gelu_backward_kernel<T, G, double><<<blocks_for(n), kThreads, 0, stream>>>(gp, xp, op, n);
      } else {
        gelu_backward_kernel<T, G, float><<<blocks_for(n), kThreads, 0, stream>>>(gp, xp, op, n);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cogview::cuda

TORCH_LIBRARY_IMPL(cogview, CUDA, m) {
  m.impl("gelu_tanh", &cogview::cuda::gelu_tanh_cuda);
  m.impl("gelu_tanh_backward", &cogview::cuda::gelu_tanh_backward_cuda);
}
