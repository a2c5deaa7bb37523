// Raw-pointer runners of the CPU kernels: the planning and threading of each op, on arguments
// already checked and laid out. The ops call them after their checks; the fused decode step calls
// them on its own workspace, so that a step of a small model is not spent creating tensors.
#pragma once

#include "cpu/kernels/kernels.h"

namespace cogview::cpu {

// LayerNorm / add + LayerNorm forward over a.rows rows.
void run_layer_norm_forward(const LayerNormForwardArgs& a);
// gelu_tanh forward of n contiguous elements (a.out may be a.x).
void run_gelu_forward(const GeluArgs& a, int64_t n);
// K/V cache write of a.n positions per (b, h) for `batch` sequences.
void run_kv_cache_write(const KvCacheWriteArgs& a, int64_t batch);
// decode_attention; a.lengths checked, a.chunk / a.chunk_base / a.partials are filled in here.
void run_decode_attention(DecodeAttentionArgs& a);
// few_rows_linear over all outputs, split over the threads.
void run_few_rows_linear(const FewRowsLinearArgs& a);

}  // namespace cogview::cpu
