// CPU implementation of cogview::layer_norm / add_layer_norm and their backward ops.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <optional>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/isa.h"
#include "cpu/runners.h"
#include "cpu/tensor_utils.h"
#include "ops/layer_norm_checks.h"

namespace cogview::cpu {
namespace {

// Fixed chunking of rows for the weight-gradient partial sums: the reduction order (and so the
// result) does not depend on the number of threads.
constexpr int64_t kMaxGradChunks = 64;
// Rows per parallel task in the forward: enough work to amortise a task, small enough to balance.
constexpr int64_t kForwardGrainElems = 32768;

// Recycles the large, full-size outputs of these ops (new_residual, normed, the input gradients).
//
// A fresh multi-megabyte tensor from the default CPU allocator often comes from pages the C
// library has just returned to the system (mmap'd chunks, or a trimmed heap top, depending on
// what else the process did), and then every 4 KiB page faults and is zeroed by the kernel on
// first write: for a 16 MiB output that costs more than the LayerNorm itself. Freed outputs are
// therefore kept here, most recently freed first, and handed out again for a request of exactly
// the same size, as warm pages. At most COGVIEW_CPU_OUTPUT_CACHE_MB MiB (default 512; 0 turns
// the cache off) of freed buffers are kept; the oldest go back to the system first. Tensors made
// here are ordinary resizable CPU tensors; only where their memory goes when freed differs.
class OutputCache final : public c10::Allocator {
 public:
  // Smaller outputs come from the default allocator.
  static constexpr size_t kMinBytes = size_t(1) << 20;

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: storages may outlive statics
    return *cache;
  }

  size_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t n) override {
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (block_size(*it) == n) {
          data = *it;
          free_.erase(std::next(it).base());
          cached_ -= n;
          break;
        }
      }
    }
    if (data == nullptr) {
      // A header in front of the data records its size; the data stays 64-byte aligned.
      char* base = static_cast<char*>(c10::alloc_cpu(n + kHeader));
      *reinterpret_cast<size_t*>(base) = n;
      data = base + kHeader;
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static constexpr size_t kHeader = 64;

  OutputCache() {
    const char* env = std::getenv("COGVIEW_CPU_OUTPUT_CACHE_MB");
    limit_ = (env != nullptr && *env != '\0' ? std::strtoull(env, nullptr, 10) : 512) << 20;
  }

  static size_t block_size(void* data) {
    return *reinterpret_cast<size_t*>(static_cast<char*>(data) - kHeader);
  }

  static void release(void* data) {
    if (data == nullptr) return;
    OutputCache& cache = get();
    const size_t n = block_size(data);
    std::vector<void*> evicted;
    if (n >= kMinBytes && n <= cache.limit_) {
      std::lock_guard<std::mutex> lock(cache.mu_);
      while (cache.cached_ + n > cache.limit_) {
        evicted.push_back(cache.free_.front());
        cache.cached_ -= block_size(cache.free_.front());
        cache.free_.erase(cache.free_.begin());
      }
      cache.free_.push_back(data);
      cache.cached_ += n;
    } else {
      evicted.push_back(data);
    }
    for (void* p : evicted) c10::free_cpu(static_cast<char*>(p) - kHeader);
  }

  std::mutex mu_;
  std::vector<void*> free_;  // oldest first
  size_t cached_ = 0;
  size_t limit_ = 0;
};

// at::empty for a full-size output: large ones through OutputCache.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  OutputCache& cache = OutputCache::get();
  if (nbytes < OutputCache::kMinBytes || nbytes > cache.limit()) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor* residual,
                                                       const at::Tensor& branch,
                                                       const at::Tensor& w_out, const at::Tensor& b_out,
                                                       const at::Tensor* w_next, const at::Tensor* b_next,
                                                       double eps, bool pb_relax) {
  const int64_t hidden = branch.size(-1);
  const at::ScalarType acc = ops::accumulator_type(branch);
  if (branch.numel() == 0) {
    // No rows: nothing to read, and the parameters are not converted (an expanded weight of a
    // huge hidden size must not be materialised for an empty input).
    at::Tensor out = at::empty(branch.sizes(), branch.options().dtype(residual ? residual->scalar_type()
                                                                                 : branch.scalar_type()));
    at::Tensor normed = w_next ? at::empty(branch.sizes(), branch.options()) : branch.new_empty({0});
    return {out, normed, at::empty({0, w_next ? 4 : 2}, branch.options().dtype(acc))};
  }
  at::Tensor branch_rows = as_rows(branch, hidden);
  at::Tensor residual_rows = residual ? as_rows(*residual, hidden) : at::Tensor();
  const int64_t rows = branch_rows.size(0);
  at::Tensor out = empty_output(branch.sizes(), branch.options().dtype(residual ? residual->scalar_type()
                                                                                   : branch.scalar_type()));
  at::Tensor normed = w_next ? empty_output(branch.sizes(), branch.options()) : branch.new_empty({0});
  at::Tensor stats = at::empty({rows, w_next ? 4 : 2}, branch.options().dtype(acc));
  const AccParam wo(w_out, acc), bo(b_out, acc);
  const std::optional<AccParam> wn = w_next ? std::make_optional<AccParam>(*w_next, acc) : std::nullopt;
  const std::optional<AccParam> bn = b_next ? std::make_optional<AccParam>(*b_next, acc) : std::nullopt;

  LayerNormForwardArgs a;
  a.rows = rows;
  a.hidden = hidden;
  if (residual) {
    a.residual = residual_rows.data_ptr();
    a.residual_type = elem_type(residual_rows, "residual");
    a.residual_stride = row_stride(residual_rows);
  }
  a.branch = branch_rows.data_ptr();
  a.branch_type = elem_type(branch_rows, "branch");
  a.branch_stride = row_stride(branch_rows);
  a.w_out = wo.data();
  a.b_out = bo.data();
  a.w_next = wn ? wn->data() : nullptr;
  a.b_next = bn ? bn->data() : nullptr;
  a.out = out.data_ptr();
  a.out_type = elem_type(out, "out");
  a.normed = w_next ? normed.data_ptr() : nullptr;
  a.normed_type = elem_type(branch, "branch");
  a.stats = stats.data_ptr();
  a.eps = eps;
  a.pb_relax = pb_relax;
  a.f64 = acc == at::kDouble;
  run_layer_norm_forward(a);
  return {out, normed, stats};
}

// Runs the backward kernel over fixed row chunks, then reduces the partials chunk by chunk.
at::Tensor backward(LayerNormBackwardArgs& a, at::ScalarType acc, const at::TensorOptions& options) {
  const int64_t chunks = std::max<int64_t>(1, std::min(a.rows, kMaxGradChunks));
  const int64_t per_chunk = (a.rows + chunks - 1) / chunks;
  at::Tensor partials = at::zeros({chunks, 4, a.hidden}, options.dtype(acc));
  a.partials = partials.data_ptr();
  a.f64 = acc == at::kDouble;
  if (a.rows > 0) {
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const int64_t begin = c * per_chunk, end = std::min(a.rows, begin + per_chunk);
        if (begin < end) COGVIEW_CPU_DISPATCH(layer_norm_backward, a, begin, end, c);
      }
    });
  }
  // Sequential over chunks (fixed order), vectorised over the 4 x hidden columns.
  return partials.sum(0);
}

}  // namespace

void run_layer_norm_forward(const LayerNormForwardArgs& a) {
  if (a.rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, kForwardGrainElems / a.hidden);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(layer_norm_forward, a, begin, end);
  });
}

// Entry points, also called directly by the fused decode step (csrc/cpu/cpu_ops.h).
std::tuple<at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& bias, double eps, bool pb_relax) {
  ops::check_layer_norm(x, weight, bias, eps);
  auto [out, unused, stats] = forward(nullptr, x, weight, bias, nullptr, nullptr, eps, pb_relax);
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& stats) {
  ops::check_layer_norm_backward(grad_out, x, weight, stats);
  const int64_t hidden = x.size(-1);
  const at::ScalarType acc = ops::accumulator_type(x);
  at::Tensor x_rows = as_rows(x, hidden), g_rows = as_rows(grad_out, hidden);
  const AccParam w(weight, acc);
  at::Tensor stats_c = stats.to(acc).contiguous();
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  LayerNormBackwardArgs a;
  a.rows = x_rows.size(0);
  a.hidden = hidden;
  a.grad_out = g_rows.data_ptr();
  a.grad_out_type = elem_type(g_rows, "grad_out");
  a.grad_out_stride = row_stride(g_rows);
  a.branch = x_rows.data_ptr();
  a.branch_type = elem_type(x_rows, "x");
  a.branch_stride = row_stride(x_rows);
  a.w_out = w.data();
  a.stats = stats_c.data_ptr();
  a.grad_branch = grad_x.data_ptr();
  at::Tensor sums = backward(a, acc, x.options());
  // copy=true: the two gradients must not alias each other (views of one `sums`).
  return {grad_x, sums[0].to(weight.scalar_type(), false, true), sums[1].to(weight.scalar_type(), false, true)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_cpu(
    const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& w_out,
    const at::Tensor& b_out, const std::optional<at::Tensor>& w_next,
    const std::optional<at::Tensor>& b_next, double eps, bool pb_relax) {
  ops::check_add_layer_norm(residual, branch, w_out, b_out, w_next, b_next, eps);
  return forward(&residual, branch, w_out, b_out, w_next ? &*w_next : nullptr,
                 b_next ? &*b_next : nullptr, eps, pb_relax);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
add_layer_norm_backward_cpu(const std::optional<at::Tensor>& grad_new_residual,
                            const std::optional<at::Tensor>& grad_normed, const at::Tensor& branch,
                            const at::Tensor& new_residual, const at::Tensor& w_out,
                            const std::optional<at::Tensor>& w_next, const at::Tensor& stats) {
  ops::check_add_layer_norm_backward(grad_new_residual, grad_normed, branch, new_residual, w_out, w_next, stats);
  const int64_t hidden = branch.size(-1);
  const at::ScalarType acc = ops::accumulator_type(branch);
  const bool has_next = w_next.has_value();
  at::Tensor branch_rows = as_rows(branch, hidden), out_rows = as_rows(new_residual, hidden);
  at::Tensor gr_rows = grad_new_residual ? as_rows(*grad_new_residual, hidden) : at::Tensor();
  at::Tensor gn_rows = has_next && grad_normed ? as_rows(*grad_normed, hidden) : at::Tensor();
  const AccParam wo(w_out, acc);
  const std::optional<AccParam> wn = has_next ? std::make_optional<AccParam>(*w_next, acc) : std::nullopt;
  at::Tensor stats_c = stats.to(acc).contiguous();
  at::Tensor grad_residual = empty_output(new_residual.sizes(), new_residual.options());
  at::Tensor grad_branch = empty_output(branch.sizes(), branch.options());

  LayerNormBackwardArgs a;
  a.rows = branch_rows.size(0);
  a.hidden = hidden;
  if (gr_rows.defined()) {
    a.grad_out = gr_rows.data_ptr();
    a.grad_out_type = elem_type(gr_rows, "grad_new_residual");
    a.grad_out_stride = row_stride(gr_rows);
  }
  if (gn_rows.defined()) {
    a.grad_normed = gn_rows.data_ptr();
    a.grad_normed_type = elem_type(gn_rows, "grad_normed");
    a.grad_normed_stride = row_stride(gn_rows);
  }
  a.branch = branch_rows.data_ptr();
  a.branch_type = elem_type(branch_rows, "branch");
  a.branch_stride = row_stride(branch_rows);
  a.out = out_rows.data_ptr();
  a.out_type = elem_type(out_rows, "new_residual");
  a.out_stride = row_stride(out_rows);
  a.w_out = wo.data();
  a.w_next = wn ? wn->data() : nullptr;
  a.stats = stats_c.data_ptr();
  a.has_next = has_next;
  a.grad_branch = grad_branch.data_ptr();
  a.grad_residual = grad_residual.data_ptr();
  a.grad_residual_type = a.out_type;
  at::Tensor sums = backward(a, acc, branch.options());
  // copy=true and distinct empties: no two outputs may alias.
  const auto grad_of = [&](int64_t i, at::ScalarType type) { return sums[i].to(type, false, true); };
  return {grad_residual,
          grad_branch,
          grad_of(0, w_out.scalar_type()),
          grad_of(1, w_out.scalar_type()),
          has_next ? grad_of(2, w_next->scalar_type()) : branch.new_empty({0}),
          has_next ? grad_of(3, w_next->scalar_type()) : branch.new_empty({0})};
}

TORCH_LIBRARY_IMPL(cogview, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
  m.impl("add_layer_norm", &add_layer_norm_cpu);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace cogview::cpu
