// Raw-pointer runners of the CPU kernels: the planning and threading of each op, on arguments
// already checked and laid out. The ops call them after their checks; the fused decode step calls
// them on its own workspace, so that a step of a small model is not spent creating tensors.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu/kernels/kernels.h"

namespace cogview::cpu {

// LayerNorm / add + LayerNorm forward over a.rows rows.
void run_layer_norm_forward(const LayerNormForwardArgs& a);
// gelu_tanh forward of n contiguous elements (a.out may be a.x).
void run_gelu_forward(const GeluArgs& a, int64_t n);
// K/V cache write of a.n positions per (b, h) for `batch` sequences.
void run_kv_cache_write(const KvCacheWriteArgs& a, int64_t batch);
// decode_attention's schedule for one set of lengths: split-K tasks (b, h, chunk), pair-major, and
// the partial slots of the sequences split into several chunks.
struct DecodeAttentionPlan {
  std::vector<int64_t> tasks;            // (b, h, chunk) triples
  std::vector<int64_t> pair_first_task;  // [pairs + 1]: the first task of each (b, h) pair
  std::vector<int64_t> pairs;            // (b, h) of every pair
  std::vector<int64_t> merge_pairs;      // (b, h) of the split pairs
  std::vector<int64_t> chunk_base;       // [batch]: the first partial slot of sequence b
  at::Tensor partials;
  int64_t work = 0;  // query-key-dim products
  int64_t task_count() const { return static_cast<int64_t>(tasks.size() / 3); }
  int64_t merge_count() const { return static_cast<int64_t>(merge_pairs.size() / 2); }
};
// Plans a call with a.lengths (checked) and points a.chunk / a.chunk_base / a.partials at the plan,
// which must outlive every run of `a`.
void plan_decode_attention(DecodeAttentionArgs& a, DecodeAttentionPlan& plan);
// decode_attention as planned, threaded here.
void run_planned_decode_attention(const DecodeAttentionArgs& a, const DecodeAttentionPlan& plan);
// decode_attention, planned and threaded here.
void run_decode_attention(DecodeAttentionArgs& a);
// few_rows_linear over all outputs, split over the threads.
void run_few_rows_linear(const FewRowsLinearArgs& a);

}  // namespace cogview::cpu
