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


// kv_cache_write: copies n rows of `dim` elements per (batch, head) from `src` into `cache` at
// positions start[b] .. start[b] + n - 1. Strides are in elements; the last dimension of both
// tensors has unit stride. Positions were bounds-checked by the caller.
struct KvCacheWriteArgs {
  int64_t heads = 0, n = 0, dim = 0;
  void* cache = nullptr;
  ElemType cache_type = ElemType::f32;
  int64_t cache_stride_b = 0, cache_stride_h = 0, cache_stride_pos = 0;
  const void* src = nullptr;
  ElemType src_type = ElemType::f32;
  int64_t src_stride_b = 0, src_stride_h = 0, src_stride_pos = 0;
  const int64_t* start = nullptr;  // [batch]
};

// decode_attention, split-K: the keys [0, lengths[b]) of every (b, h) are cut into chunks of
// `chunk` positions. A chunk task runs an online softmax over its keys for all n queries; with one
// chunk it writes the output directly, otherwise a partial (acc[dim], max, sum) per query into
// `partials` at slot chunk_base[b] + h * chunks(b) + c, and decode_attention_merge combines them.
struct DecodeAttentionArgs {
  int64_t batch = 0, heads = 0, n = 0, dim = 0;
  const void* q = nullptr;  // [B, H, n, dim], unit stride along dim
  ElemType q_type = ElemType::f32;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_i = 0;
  const void* k = nullptr;  // caches [B, H, max_len, dim], unit stride along dim
  const void* v = nullptr;
  ElemType kv_type = ElemType::f32;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_pos = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_pos = 0;
  const int64_t* lengths = nullptr;  // [B], already checked to lie in [n, max_len]
  double scale = 1.0;
  int64_t text_len = 0;  // keys at positions < text_len get text_bias added to their logits
  double text_bias = 0.0;
  void* out = nullptr;  // [B, H, n, dim] contiguous, out_type
  ElemType out_type = ElemType::f32;
  int64_t chunk = 512;
  const int64_t* chunk_base = nullptr;  // [B]: first partial slot of sequence b
  void* partials = nullptr;  // accumulator type, [slots, n, dim + 2]
  bool f64 = false;  // accumulate in double (float64 q) instead of float
};

// sample_tokens, one row at a time; see cogview/ops/sampling.py for the definition.
struct SampleTokensArgs {
  int64_t vocab_lo = 0, vocab_hi = 0;  // the allowed ids [lo, hi)
  const void* logits = nullptr;  // [rows, V], unit stride along V
  ElemType logits_type = ElemType::f32;
  int64_t row_stride = 0;
  // Per-row parameters: arrays of `rows` values, or nullptr to use the scalar.
  const float* temperature = nullptr;
  const int64_t* top_k = nullptr;
  const double* top_p = nullptr;
  float temperature_value = 1.0f;
  int64_t top_k_value = 0;
  double top_p_value = 1.0;
  uint64_t seed = 0, offset = 0;
  int64_t* tokens = nullptr;  // [rows]
  bool* invalid = nullptr;    // [rows] or nullptr; set to true for rows with no finite allowed logit
};

#define COGVIEW_CPU_KERNEL_DECLARATIONS                                                           \
  /* Forward over rows [begin, end). */                                                           \
  void layer_norm_forward(const LayerNormForwardArgs& args, int64_t begin, int64_t end);          \
  /* Backward over rows [begin, end), accumulating weight grads into partial `chunk`. */          \
  void layer_norm_backward(const LayerNormBackwardArgs& args, int64_t begin, int64_t end,         \
                           int64_t chunk);                                                        \
  /* kv_cache_write over the (batch * heads) pairs [begin, end). */                               \
  void kv_cache_write(const KvCacheWriteArgs& args, int64_t begin, int64_t end);                  \
  /* decode_attention chunk tasks [begin, end); `tasks` holds (b, h, c) triples. */               \
  void decode_attention_chunks(const DecodeAttentionArgs& args, const int64_t* tasks,             \
                               int64_t begin, int64_t end);                                       \
  /* decode_attention merge of the split (b, h) pairs listed in `pairs` [begin, end). */          \
  void decode_attention_merge(const DecodeAttentionArgs& args, const int64_t* pairs,              \
                              int64_t begin, int64_t end);                                        \
  /* sample_tokens over rows [begin, end). */                                                     \
  void sample_tokens(const SampleTokensArgs& args, int64_t begin, int64_t end);

namespace baseline { COGVIEW_CPU_KERNEL_DECLARATIONS }
namespace avx2 { COGVIEW_CPU_KERNEL_DECLARATIONS }
namespace avx512 { COGVIEW_CPU_KERNEL_DECLARATIONS }

}  // namespace cogview::cpu
