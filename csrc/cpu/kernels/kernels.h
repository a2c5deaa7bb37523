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

// gelu_tanh over elements [begin, end) of contiguous arrays: out = gelu(x) (forward) or
// out = grad * gelu'(x) (backward; `grad` unused in the forward). Accumulates in double when `f64`.
struct GeluArgs {
  const void* x = nullptr;
  ElemType x_type = ElemType::f32;
  const void* grad = nullptr;
  ElemType grad_type = ElemType::f32;
  void* out = nullptr;
  ElemType out_type = ElemType::f32;
  bool f64 = false;
};

// ---- Local (2D neighbourhood) attention with joint text keys -------------------------------
// Geometry of one call. Queries lie on a grid_h x grid_w raster (`q_h` x `q_w`), keys on a
// `k_h` x `k_w` raster with q_h % k_h == 0 and q_w % k_w == 0; the window of query (y, x) is the
// win_h x win_w block of keys centred on (y / (q_h / k_h), x / (q_w / k_w)), clipped to the grid
// (and, when causal, to keys at or before the query in raster order).
struct LocalAttentionShape {
  int64_t q_h = 0, q_w = 0, k_h = 0, k_w = 0, win_h = 0, win_w = 0;
  int64_t head_dim = 0, text = 0;  // head_dim d, number of text keys T
  bool causal = false;
  bool f64 = false;  // accumulate in double (float64 inputs), else float
};

// Blocking chosen by the active ISA (it depends on the vector width), so the torch layer can
// size the packed buffers the kernels read.
struct LocalAttentionPlan {
  int64_t lanes = 0;      // accumulator elements per vector register
  int64_t strip = 0;      // key columns a query tile reads per key row (multiple of lanes)
  int64_t tile_w = 0;     // query columns per tile (multiple of q_w / k_w)
  int64_t tile_h = 0;     // query rows per forward task
  int64_t pad = 0;        // zero columns left of key column 0 in the transposed layout
  int64_t row_width = 0;  // columns per head_dim row of one key row in the transposed layout
  int64_t dp = 0;         // head_dim rounded up to lanes (row-major packed rows)
  int64_t tpad = 0;       // text keys rounded up to lanes
  int64_t band_h = 0;     // query rows per backward band (bands two apart touch disjoint keys)
  bool parents = false;   // the forward groups queries by parent cell (one packed window per cell)
  int64_t pair_cols = 0;  // column pairs per key row of the bf16 pair packs: (row_width + 1) / 2
};

// Packs `src` [batch, heads, rows * cols, head_dim] (element strides sb/sh/sn, unit stride on
// head_dim) into accumulator-type buffers (either pointer may be null):
//   transposed [batch, heads, rows, head_dim, row_width]: key (r, c) at column pad + c, zeros
//              elsewhere; the layout the score micro-kernels read 16 (lanes) keys at a time;
//   rowmajor   [batch, heads, rows * cols, dp], zero-padded beyond head_dim.
struct LocalAttentionPackArgs {
  int64_t batch = 0, heads = 0, rows = 0, cols = 0, head_dim = 0;
  const void* src = nullptr;
  ElemType src_type = ElemType::f32;
  int64_t sb = 0, sh = 0, sn = 0;
  void* transposed = nullptr;
  int64_t pad = 0, row_width = 0;
  void* rowmajor = nullptr;
  int64_t dp = 0;
  bool f64 = false;
  // bfloat16 pairs for the bf16 dot-product forward (local_attention_pack_pairs; src bfloat16,
  // head_dim even), in 32-bit words each holding two bf16 (the first in the low half):
  //   transposed [batch, heads, rows, head_dim / 2, row_width]: word (dd, pad + c) = key c's
  //              elements 2 dd and 2 dd + 1, zeros elsewhere;
  //   rowmajor   [batch, heads, rows, pair_cols, dp]: word (j, d) = element d of the keys at
  //              columns 2 j - pad and 2 j + 1 - pad (zero where a column is outside the row).
  int64_t pair_cols = 0;
};

// 32-bit words of one head's k and v pair packs (the per_head scratch of the bf16 forward).
inline int64_t local_attention_pairs_head_words(const LocalAttentionShape& s, const LocalAttentionPlan& p) {
  return s.k_h * (s.head_dim / 2 * p.row_width + p.pair_cols * p.dp);
}

// An input as given: element type and element strides (unit stride on head_dim; sb = 0
// broadcasts a batch-1 tensor).
struct LocalAttentionSource {
  const void* data = nullptr;
  ElemType type = ElemType::f32;
  int64_t sb = 0, sh = 0, sn = 0;
};

// Strides below are in elements; a zero batch stride broadcasts a batch-1 tensor.
// Packed inputs (kt, v, text_kt, text_v; in the backward also vt, k, text_vt, text_k) may be
// null: with `per_head`, each task then packs its own head from the sources into scratch.
// What the forward and the backward both read: the geometry and the queries.
struct LocalAttentionQueryArgs {
  LocalAttentionShape shape;
  LocalAttentionPlan plan;
  int64_t batch = 0, heads = 0;
  const void* q = nullptr;  // [batch, heads, q_h * q_w, head_dim]
  ElemType q_type = ElemType::f32;
  int64_t q_sb = 0, q_sh = 0, q_sn = 0;
};

struct LocalAttentionForwardArgs : LocalAttentionQueryArgs {
  const void* kt = nullptr;  // transposed pack of k
  int64_t kt_sb = 0, kt_sh = 0;
  const void* v = nullptr;  // accumulator-type rows of v, >= dp readable elements per row
  int64_t v_sb = 0, v_sh = 0, v_sn = 0;
  const void* text_kt = nullptr;  // transposed pack of text_k (one row of T columns)
  int64_t tk_sb = 0, tk_sh = 0;
  const void* text_v = nullptr;  // row-major pack of text_v [.., T, dp]
  int64_t tv_sb = 0, tv_sh = 0;
  LocalAttentionSource k_src, v_src, text_k_src, text_v_src;
  // Tasks: per_head -> one (batch, head) each, packing what is null; else one query tile each.
  bool per_head = false;
  double scale = 1.0, text_bias = 0.0;
  void* out = nullptr;  // contiguous [batch, heads, q_h * q_w, head_dim], q_type
  void* lse = nullptr;  // contiguous accumulator [batch, heads, q_h * q_w]
};

struct LocalAttentionBackwardArgs : LocalAttentionQueryArgs {
  const void* grad_out = nullptr;  // may be null (no gradient reached `out`)
  ElemType grad_out_type = ElemType::f32;
  int64_t go_sb = 0, go_sh = 0, go_sn = 0;
  const void* lse = nullptr;       // contiguous accumulator [batch, heads, n_q]
  const void* grad_lse = nullptr;  // contiguous accumulator [batch, heads, n_q], may be null
  const void* kt = nullptr;        // transposed packs of k and v
  const void* vt = nullptr;
  int64_t kt_sb = 0, kt_sh = 0;    // shared by kt and vt
  const void* k = nullptr;         // accumulator-type rows of k (>= dp readable per row)
  int64_t k_sb = 0, k_sh = 0, k_sn = 0;
  const void* text_kt = nullptr;   // transposed packs of text_k / text_v, row-major text_k
  const void* text_vt = nullptr;
  int64_t tt_sb = 0, tt_sh = 0;
  const void* text_k = nullptr;
  int64_t tk_sb = 0, tk_sh = 0;
  LocalAttentionSource k_src, v_src, text_k_src, text_v_src;
  double scale = 1.0, text_bias = 0.0;
  void* grad_q = nullptr;   // contiguous [batch, heads, n_q, head_dim], q_type
  void* grad_k = nullptr;   // accumulator [k_batch, heads, n_k, dp], zeroed, accumulated into
  void* grad_v = nullptr;
  int64_t gk_sb = 0, gk_sh = 0;  // shared by grad_k and grad_v
  bool kv_broadcast = false;  // k/v have batch 1 while q has more: grad_k/grad_v sum over batch
  void* grad_text_k = nullptr;  // accumulator partials [batch, heads, bands, T, dp], zeroed
  void* grad_text_v = nullptr;
  int64_t bands = 0;
};

// few_rows_linear: y[r] = x[r] W^T + b for the few rows of a decode step (r < rows <=
// kFewRowsMax). With so few rows the product is a stream over W: each weight row is read once and
// applied to every x row while it is in registers. x [rows][in] contiguous in x_type; weight
// [out][in] contiguous and bias [out] (or nullptr) in weight_type; y [rows][out] contiguous in
// y_type; accumulates in double when `f64`, else float. Each y element is summed in one fixed
// order whatever `rows` and the split of outputs among threads, so a row's result does not depend
// on the other rows of the call.
constexpr int64_t kFewRowsMax = 4;
struct FewRowsLinearArgs {
  int64_t rows = 0, in = 0, out = 0;
  const void* x = nullptr;
  ElemType x_type = ElemType::f32;
  const void* weight = nullptr;
  const void* bias = nullptr;
  ElemType weight_type = ElemType::f32;
  void* y = nullptr;
  ElemType y_type = ElemType::f32;
  bool f64 = false;
};

// tile_linear: y = act(x W^T + b) in bfloat16 on the AMX matrix tiles (Sapphire Rapids and later),
// accumulating in float and rounding once, after the bias and the activation (gelu_tanh when
// `gelu`). x [rows][in] and y [rows][out] contiguous; `packed` is W [out][in] in the tile layout
// of tile_linear_pack; bias [out] or nullptr. `in` and `out` are multiples of kTileLinearK and
// kTileLinearN. Only the avx512 build carries the tile code (the tile instructions are enabled
// per function); the caller checks that the CPU has AMX and that Linux granted the tile state.
constexpr int64_t kTileLinearRows = 32;  // rows per task (two tiles of 16)
constexpr int64_t kTileLinearK = 32;     // input features per tile step (a tile row: 32 bf16)
constexpr int64_t kTileLinearN = 32;     // output features per block (two tiles of 16)
struct TileLinearArgs {
  int64_t rows = 0, in = 0, out = 0;
  const uint16_t* x = nullptr;
  const uint16_t* packed = nullptr;
  const uint16_t* bias = nullptr;
  uint16_t* y = nullptr;
  bool gelu = false;
};
// The tile layout of W [out][in]: [out / 16][in / 32][16][16][2], block (n, k) holding, for
// weight rows 16n + j and input pair 16k + i, the two bf16 at [i][j] (the pair-interleaved "VNNI"
// form the tile product reads as its right operand).
struct TileLinearPackArgs {
  int64_t in = 0, out = 0;
  const uint16_t* weight = nullptr;
  uint16_t* packed = nullptr;
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
  void sample_tokens(const SampleTokensArgs& args, int64_t begin, int64_t end); \
  /* gelu_tanh forward / backward over elements [begin, end). */                                  \
  void gelu_forward(const GeluArgs& args, int64_t begin, int64_t end);                            \
  void gelu_backward(const GeluArgs& args, int64_t begin, int64_t end);                           \
  /* few_rows_linear over output features [begin, end). */                                        \
  void few_rows_linear(const FewRowsLinearArgs& args, int64_t begin, int64_t end);                 \
  /* tile_linear over blocks of kTileLinearRows rows [begin, end); false (nothing written) in */ \
  /* the builds without tile code. tile_linear_pack over blocks of 16 weight rows.           */ \
  bool tile_linear(const TileLinearArgs& args, int64_t begin, int64_t end);                        \
  void tile_linear_pack(const TileLinearPackArgs& args, int64_t begin, int64_t end);               \
  /* Local attention: blocking for this ISA; packing of (batch, head, row) items [begin, end); */ \
  /* forward over tasks [begin, end) (see local_attention_forward_tasks); backward of one     */ \
  /* (batch, head, band): it accumulates into the grad_k/grad_v rows that band touches.       */ \
  LocalAttentionPlan local_attention_plan(const LocalAttentionShape& shape);                \
  void local_attention_pack(const LocalAttentionPackArgs& args, int64_t begin, int64_t end); \
  int64_t local_attention_forward_tasks(const LocalAttentionForwardArgs& args);             \
  /* Accumulator elements of per-task scratch for packing one head (per_head schedules). */  \
  int64_t local_attention_head_scratch(const LocalAttentionShape& shape,                    \
                                       const LocalAttentionPlan& plan, bool backward);      \
  void local_attention_forward(const LocalAttentionForwardArgs& args, int64_t begin, int64_t end, \
                               void* scratch);                                              \
  void local_attention_backward(const LocalAttentionBackwardArgs& args, int64_t b, int64_t h, \
                                int64_t band);                                              \
  /* The bf16 dot-product forward (strip path, bfloat16 inputs, a CPU with AVX512-BF16): its */ \
  /* packs, and tasks [begin, end) over pair packs (with per_head, k/v packed per head into  */ \
  /* `scratch`, local_attention_pairs_head_words words per thread). false (nothing done) in  */ \
  /* the builds without that code.                                                            */ \
  bool local_attention_pack_pairs(const LocalAttentionPackArgs& args, int64_t begin, int64_t end); \
  bool local_attention_forward_pairs(const LocalAttentionForwardArgs& args, int64_t begin, int64_t end, \
                                     void* scratch);                                          \
  /* Backward of whole heads: task i is head i % heads of batch i / heads, or, when k/v are */ \
  /* batch-broadcast, head i of every batch; null packed inputs are packed per head.        */ \
  void local_attention_backward_heads(const LocalAttentionBackwardArgs& args, int64_t begin, \
                                      int64_t end, void* scratch);

namespace baseline { COGVIEW_CPU_KERNEL_DECLARATIONS }
namespace avx2 { COGVIEW_CPU_KERNEL_DECLARATIONS }
namespace avx512 { COGVIEW_CPU_KERNEL_DECLARATIONS }

}  // namespace cogview::cpu
