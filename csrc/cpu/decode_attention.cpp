// CPU implementation of cogview::decode_attention: split-K over the cache, then a merge.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/isa.h"
#include "cpu/runners.h"
#include "cpu/tensor_utils.h"
#include "ops/decoding_checks.h"

namespace cogview::cpu {
namespace {

// Keys per split. Fixed (not derived from the thread count), so results do not depend on it:
// both schedules below compute the same chunk partials and merge them in the same order.
constexpr int64_t kChunk = 512;
// With at least this many (b, h) pairs per thread, pairs are the unit of work (one parallel
// region; a second region costs a barrier, which on a busy machine can cost a time slice).
constexpr int64_t kPairsPerThread = 4;
// Below this many query-key-dim products a call runs on the calling thread: waking the other
// threads costs more than the work (one row of a small model's decode step is ~70k).
constexpr int64_t kInlineWork = int64_t{1} << 17;

// `t` with unit stride along head_dim; a copy holds only the first `used` positions (dim 2), the
// ones any query can see, so an expanded cache view is never materialised whole.
at::Tensor unit_last(const at::Tensor& t, int64_t used) {
  return t.stride(3) == 1 || t.size(3) == 1 ? t : t.narrow(2, 0, used).contiguous();
}

}  // namespace

void plan_decode_attention(DecodeAttentionArgs& a, DecodeAttentionPlan& plan) {
  const int64_t* len = a.lengths;
  plan = DecodeAttentionPlan();
  plan.chunk_base.assign(a.batch, 0);
  int64_t slots = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t chunks = (len[b] + kChunk - 1) / kChunk;
    plan.chunk_base[b] = slots;
    if (chunks > 1) slots += a.heads * chunks;
    for (int64_t h = 0; h < a.heads; ++h) {
      plan.pair_first_task.push_back(plan.task_count());
      for (int64_t c = 0; c < chunks; ++c) plan.tasks.insert(plan.tasks.end(), {b, h, c});
      plan.pairs.insert(plan.pairs.end(), {b, h});
      if (chunks > 1) plan.merge_pairs.insert(plan.merge_pairs.end(), {b, h});
    }
    plan.work += len[b] * a.heads * a.n * a.dim;
  }
  plan.pair_first_task.push_back(plan.task_count());
  if (slots > 0) plan.partials = at::empty({slots * a.n * (a.dim + 2)}, a.f64 ? at::kDouble : at::kFloat);
  a.chunk = kChunk;
  a.chunk_base = plan.chunk_base.data();
  a.partials = slots > 0 ? plan.partials.data_ptr() : nullptr;
}

void run_decode_attention(DecodeAttentionArgs& a) {
  DecodeAttentionPlan plan;
  plan_decode_attention(a, plan);
  run_planned_decode_attention(a, plan);
}

void run_planned_decode_attention(const DecodeAttentionArgs& a, const DecodeAttentionPlan& plan) {
  const int64_t pair_count = a.batch * a.heads;
  if (plan.work < kInlineWork || pair_count >= kPairsPerThread * at::get_num_threads()) {
    // Enough (b, h) pairs to share out: one parallel region, each pair's chunks and merge in turn
    // (or all of them here, when the call is too small to share).
    at::parallel_for(0, pair_count, plan.work < kInlineWork ? pair_count : 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t first = plan.pair_first_task[p], last = plan.pair_first_task[p + 1];
        COGVIEW_CPU_DISPATCH(decode_attention_chunks, a, plan.tasks.data(), first, last);
        if (last - first > 1) COGVIEW_CPU_DISPATCH(decode_attention_merge, a, plan.pairs.data(), p, p + 1);
      }
    });
    return;
  }
  // Few pairs (small batch, long caches): spread the chunks, then merge the split pairs.
  at::parallel_for(0, plan.task_count(), 1, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(decode_attention_chunks, a, plan.tasks.data(), begin, end);
  });
  if (plan.merge_count() > 0) {
    at::parallel_for(0, plan.merge_count(), 8, [&](int64_t begin, int64_t end) {
      COGVIEW_CPU_DISPATCH(decode_attention_merge, a, plan.merge_pairs.data(), begin, end);
    });
  }
}

// Entry points, also called directly by the fused decode step (csrc/cpu/cpu_ops.h).
at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& lengths, double scale, int64_t text_len, double text_bias) {
  ops::check_decode_attention(q_in, k_in, v_in, lengths, scale, text_bias);
  const int64_t batch = k_in.size(0), heads = k_in.size(1), max_len = k_in.size(2), dim = k_in.size(3);
  const int64_t n = q_in.size(2);
  const at::Tensor len64 = lengths.to(at::kLong).contiguous();
  const int64_t* len = len64.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(len[b] >= n && len[b] <= max_len, "cogview: decode_attention `lengths[", b, "]` = ", len[b],
                      " must lie in [n, max_len] = [", n, ", ", max_len, "]");
  }
  at::Tensor out = at::empty({batch, heads, n, dim}, q_in.options());
  if (out.numel() == 0) return out;
  const int64_t used = *std::max_element(len, len + batch);
  const at::Tensor q = unit_last(q_in, n), k = unit_last(k_in, used), v = unit_last(v_in, used);

  DecodeAttentionArgs a;
  a.batch = batch;
  a.heads = heads;
  a.n = n;
  a.dim = dim;
  a.q = q.data_ptr();
  a.q_type = elem_type(q, "q");
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.q_stride_i = q.stride(2);
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.kv_type = elem_type(k, "k_cache");
  a.k_stride_b = k.stride(0);
  a.k_stride_h = k.stride(1);
  a.k_stride_pos = k.stride(2);
  a.v_stride_b = v.stride(0);
  a.v_stride_h = v.stride(1);
  a.v_stride_pos = v.stride(2);
  a.lengths = len;
  a.scale = scale;
  a.text_len = text_len;
  a.text_bias = text_bias;
  a.out = out.data_ptr();
  a.out_type = elem_type(out, "q");
  a.f64 = q.scalar_type() == at::kDouble;
  run_decode_attention(a);
  return out;
}

TORCH_LIBRARY_IMPL(cogview, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace cogview::cpu
