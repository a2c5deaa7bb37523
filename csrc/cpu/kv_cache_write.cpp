// CPU implementation of cogview::kv_cache_write (in place).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_ops.h"
#include "cpu/isa.h"
#include "cpu/runners.h"
#include "cpu/tensor_utils.h"
#include "ops/decoding_checks.h"

namespace cogview::cpu {
namespace {

constexpr int64_t kGrainElems = 16384;

void write_one(const at::Tensor& cache, const at::Tensor& src_in, const at::Tensor& start, const char* name) {
  const int64_t batch = cache.size(0), heads = cache.size(1), n = src_in.size(2), dim = cache.size(3);
  if (batch * heads * n * dim == 0) return;
  if (cache.stride(3) != 1 && dim > 1) {
    // Rare layout: let ATen do the strided copy, sequence by sequence (positions already checked).
    const int64_t* s = start.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) cache[b].narrow(1, s[b], n).copy_(src_in[b]);
    return;
  }
  const at::Tensor src = src_in.stride(3) == 1 || dim == 1 ? src_in : src_in.contiguous();
  KvCacheWriteArgs a;
  a.heads = heads;
  a.n = n;
  a.dim = dim;
  a.cache = cache.data_ptr();
  a.cache_type = elem_type(cache, name);
  a.cache_stride_b = cache.stride(0);
  a.cache_stride_h = cache.stride(1);
  a.cache_stride_pos = cache.stride(2);
  a.src = src.data_ptr();
  a.src_type = elem_type(src, name);
  a.src_stride_b = src.stride(0);
  a.src_stride_h = src.stride(1);
  a.src_stride_pos = src.stride(2);
  a.start = start.data_ptr<int64_t>();
  run_kv_cache_write(a, batch);
}

}  // namespace

void run_kv_cache_write(const KvCacheWriteArgs& a, int64_t batch) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, a.n * a.dim));
  at::parallel_for(0, batch * a.heads, grain, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(kv_cache_write, a, begin, end);
  });
}

// Entry points, also called directly by the fused decode step (csrc/cpu/cpu_ops.h).
void kv_cache_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                        const at::Tensor& v_new, const at::Tensor& start) {
  ops::check_kv_cache_write(k_cache, v_cache, k_new, v_new, start);
  const at::Tensor start64 = start.to(at::kLong).contiguous();
  const int64_t n = k_new.size(2), max_len = k_cache.size(2);
  const int64_t* s = start64.data_ptr<int64_t>();
  // Every position is checked before anything is written: a bad call leaves the caches untouched.
  for (int64_t b = 0; b < start64.size(0); ++b) {
    TORCH_CHECK_VALUE(s[b] >= 0 && s[b] <= max_len - n, "cogview: kv_cache_write of ", n,
                      " positions from `start[", b, "]` = ", s[b], " overruns the cache (max_len ", max_len, ")");
  }
  write_one(k_cache, k_new, start64, "k_new");
  write_one(v_cache, v_new, start64, "v_new");
}

TORCH_LIBRARY_IMPL(cogview, CPU, m) { m.impl("kv_cache_write", &kv_cache_write_cpu); }

}  // namespace cogview::cpu
