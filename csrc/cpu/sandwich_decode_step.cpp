// CPU implementation of cogview::sandwich_decode_step: one cached decode step (one new token per
// row) through a whole stack of CogView sandwich-LayerNorm layers, in one call.
//
// It runs the per-op loop's kernels (LayerNorms, cache write, decode attention, GELU) in the same
// order on raw pointers into one workspace: at batch 1 a small model's step is short enough that
// the per-op cost of Python, the dispatcher and ~50 tensor objects per layer outweighed its
// arithmetic. The projections are the one difference (see `project`): up to kFewRowsMax rows go
// through cogview's matrix-vector kernel, so the hidden states match the per-op loop's up to the
// rounding of those products.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <optional>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "cpu/runners.h"
#include "cpu/tensor_utils.h"
#include "ops/decoding_checks.h"

namespace cogview::cpu {
namespace {

// Per layer, in this order (cogview/ops/decoding.py documents the same list).
enum Param : int64_t {
  kQkvWeight, kQkvBias, kDenseWeight, kDenseBias,
  kThirdWeight, kThirdBias, kPostAttentionWeight, kPostAttentionBias,
  kUpWeight, kUpBias, kDownWeight, kDownBias,
  kFourthWeight, kFourthBias, kNextWeight, kNextBias,
  kParamsPerLayer
};
constexpr const char* kParamNames[kParamsPerLayer] = {
    "qkv_weight", "qkv_bias", "dense_weight", "dense_bias",
    "third_ln_weight", "third_ln_bias", "post_attention_ln_weight", "post_attention_ln_bias",
    "up_weight", "up_bias", "down_weight", "down_bias",
    "fourth_ln_weight", "fourth_ln_bias", "next_ln_weight", "next_ln_bias"};

void check_args(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& start,
                const at::Tensor& words, const at::Tensor& places, const at::Tensor& first_weight,
                const at::Tensor& first_bias, at::TensorList params, const at::Tensor& k_cache,
                const at::Tensor& v_cache, int64_t num_heads, double scale) {
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(1) == 1 && tokens.scalar_type() == at::kLong,
                    "cogview: sandwich_decode_step `tokens` must be int64 [rows, 1], got ", tokens.scalar_type(), " ",
                    tokens.sizes());
  TORCH_CHECK_VALUE(positions.sizes() == tokens.sizes() && positions.scalar_type() == at::kLong,
                    "cogview: sandwich_decode_step `positions` must be int64 ", tokens.sizes(), ", got ",
                    positions.scalar_type(), " ", positions.sizes());
  const int64_t rows = tokens.size(0);
  TORCH_CHECK_VALUE(start.dim() == 1 && start.size(0) == rows, "cogview: sandwich_decode_step `start` must be [",
                    rows, "], got ", start.sizes());
  TORCH_CHECK_VALUE(words.dim() == 2, "cogview: sandwich_decode_step `word_embeddings` must be [vocab, hidden], got ",
                    words.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(),
                    "cogview: sandwich_decode_step `k_cache`/`v_cache` must both be [layers, rows, heads, max_len, "
                    "head_dim], got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t layers = k_cache.size(0), hidden = words.size(1);
  TORCH_CHECK_VALUE(layers >= 1 && static_cast<int64_t>(params.size()) == layers * kParamsPerLayer,
                    "cogview: sandwich_decode_step needs ", kParamsPerLayer, " `layer_params` per layer (",
                    layers, " layers in the cache), got ", params.size());
  TORCH_CHECK_VALUE(k_cache.size(1) == rows, "cogview: sandwich_decode_step: the cache has ", k_cache.size(1),
                    " rows but `tokens` has ", rows);
  TORCH_CHECK_VALUE(num_heads >= 1 && k_cache.size(2) == num_heads && num_heads * k_cache.size(4) == hidden,
                    "cogview: sandwich_decode_step: `num_heads` ", num_heads, " x head_dim ", k_cache.size(4),
                    " must match the cache's heads ", k_cache.size(2), " and the hidden size ", hidden);
  TORCH_CHECK_VALUE(std::isfinite(scale), "cogview: sandwich_decode_step `scale` must be finite, got ", scale);
  TORCH_CHECK_TYPE(at::isFloatingType(words.scalar_type()) && k_cache.scalar_type() == words.scalar_type() &&
                       v_cache.scalar_type() == words.scalar_type(),
                   "cogview: sandwich_decode_step `k_cache`/`v_cache` must have the dtype of `word_embeddings` (",
                   words.scalar_type(), "), got ", k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(places.dim() == 2 && places.size(1) == hidden && places.scalar_type() == words.scalar_type(),
                    "cogview: sandwich_decode_step `position_embeddings` must be [positions, ", hidden, "] of ",
                    words.scalar_type(), ", got ", places.scalar_type(), " ", places.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"first_weight", &first_weight},
                                {"first_bias", &first_bias}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({hidden}) && t->scalar_type() == words.scalar_type(),
                      "cogview: sandwich_decode_step `", name, "` must be [", hidden, "] of ", words.scalar_type(),
                      ", got ", t->scalar_type(), " ", t->sizes());
  }
  // Ids outside the tables would make at::embedding fail without naming the argument.
  for (const auto& [name, ids, table] : {std::tuple<const char*, const at::Tensor*, const at::Tensor*>{
                                             "tokens", &tokens, &words},
                                         {"positions", &positions, &places}}) {
    const auto id = ids->accessor<int64_t, 2>();
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK_VALUE(id[r][0] >= 0 && id[r][0] < table->size(0), "cogview: sandwich_decode_step `", name, "[", r,
                        "]` = ", id[r][0], " must lie in [0, ", table->size(0), ")");
    }
  }
  // Expected shapes: H = hidden, M = the MLP width (from the first up-projection).
  const int64_t mlp = params[kUpWeight].dim() == 2 ? params[kUpWeight].size(0) : -1;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.defined() && p.device().is_cpu(), "cogview: sandwich_decode_step `layer_params[", i,
                      "]` must be a CPU tensor");
    TORCH_CHECK_TYPE(p.scalar_type() == words.scalar_type(), "cogview: sandwich_decode_step `layer_params[", i,
                     "]` is ", p.scalar_type(), " but `word_embeddings` is ", words.scalar_type());
    int64_t want[2] = {hidden, 0}, dims = 1;  // (a fixed array: this runs ~100 times per decode step)
    switch (i % kParamsPerLayer) {
      case kQkvWeight: want[0] = 3 * hidden, want[1] = hidden, dims = 2; break;
      case kQkvBias: want[0] = 3 * hidden; break;
      case kDenseWeight: want[1] = hidden, dims = 2; break;
      case kUpWeight: want[0] = mlp, want[1] = hidden, dims = 2; break;
      case kUpBias: want[0] = mlp; break;
      case kDownWeight: want[1] = mlp, dims = 2; break;
      default: break;  // biases of width H and every LayerNorm parameter
    }
    const at::IntArrayRef expected(want, dims);
    TORCH_CHECK_VALUE(mlp >= 1 && p.sizes() == expected, "cogview: sandwich_decode_step `layer_params[", i, "]` (",
                      kParamNames[i % kParamsPerLayer], " of layer ", i / kParamsPerLayer, ") must have shape ",
                      expected, ", got ", p.sizes());
  }
}

// The step's activations, in the model's dtype, carved from one allocation per call.
struct Workspace {
  Workspace(int64_t rows, int64_t hidden, int64_t mlp, const at::TensorOptions& options)
      : storage(at::empty({rows * (8 * hidden + mlp)}, options)), element(storage.element_size()) {
    char* p = static_cast<char*>(storage.data_ptr());
    const auto take = [&](int64_t width) {
      char* block = p;
      p += rows * width * element;
      return block;
    };
    residual[0] = take(hidden);
    residual[1] = take(hidden);
    normed = take(hidden);
    qkv = take(3 * hidden);
    context = take(hidden);
    branch = take(hidden);
    up = take(mlp);
  }
  at::Tensor storage;
  int64_t element;
  char* residual[2];
  char* normed;
  char* qkv;
  char* context;
  char* branch;
  char* up;
};

// The threads that run a step. With few rows on several threads the whole layer stack runs in ONE
// OpenMP region: each thread takes its part of every matrix-vector product and of the GELU, and
// one thread runs the small parts in between (LayerNorms, cache writes, attention). At one row a
// region per product cost more than a 256 x 256 product. A team of one (size 1) runs every part
// in turn, each threading itself.
class Team {
 public:
  Team(int id, int size) : id_(id), size_(size) {}
  bool alone() const { return size_ == 1; }
  // This thread's part [begin, end) of n items, cut at multiples of `align`.
  std::pair<int64_t, int64_t> part(int64_t n, int64_t align) const {
    const int64_t blocks = (n + align - 1) / align, per = (blocks + size_ - 1) / size_;
    return {std::min(n, id_ * per * align), std::min(n, (id_ + 1) * per * align)};
  }
  // Every thread waits here for the others.
  void wait() const {
#ifdef _OPENMP
    if (size_ > 1) {
#pragma omp barrier
    }
#endif
  }
  // f() on one thread of the team; the others wait for it.
  template <typename F>
  void one(F&& f) const {
#ifdef _OPENMP
    if (size_ > 1) {
#pragma omp single
      f();
      return;
    }
#endif
    f();
  }

 private:
  int id_, size_;
};

// One decode step's arguments, laid out for the kernels.
struct Step {
  const at::Tensor* params;
  const std::vector<at::Tensor>* packed;  // or nullptr
  int64_t packed_rows, rows, hidden, mlp, heads, head_dim, layers;
  double eps;
  bool pb_relax;
  ElemType type;
  Workspace* ws;
  const int64_t* slot;  // [rows]: the new token's cache slot
  const at::Tensor* k_cache;  // [layers, rows, heads, max_len, head_dim], unit stride along head_dim
  const at::Tensor* v_cache;
  void* result;  // [rows, hidden]: the final LayerNorm's output
  std::vector<double>* stats;  // room for (mean, rstd) x 2 per row, float64 included
  DecodeAttentionArgs* attention;  // the same lengths in every layer: set up and planned once
  const DecodeAttentionPlan* plan;
};

FewRowsLinearArgs few_rows_args(const Step& s, const void* x, const at::Tensor& weight, const at::Tensor& bias,
                                void* y) {
  FewRowsLinearArgs a;
  a.rows = s.rows;
  a.in = weight.size(1);
  a.out = weight.size(0);
  a.x = x;
  a.x_type = s.type;
  a.weight = weight.data_ptr();
  a.bias = bias.data_ptr();
  a.weight_type = s.type;
  a.y = y;
  a.y_type = s.type;
  a.f64 = s.type == ElemType::f64;
  return a;
}

// The weight and bias of projection `which` (0 qkv, 1 dense, 2 up, 3 down) of `layer`.
std::pair<const at::Tensor&, const at::Tensor&> projection(const Step& s, int64_t layer, int64_t which) {
  static constexpr Param kWeights[4] = {kQkvWeight, kDenseWeight, kUpWeight, kDownWeight};
  const at::Tensor* p = s.params + layer * kParamsPerLayer + kWeights[which];
  return {p[0], p[1]};
}

// Whether a projection runs on cogview's few-rows kernel: few rows, no packed weights, contiguous
// weight and bias.
bool on_few_rows_kernel(const Step& s, const at::Tensor& weight, const at::Tensor& bias) {
  return s.packed == nullptr && s.rows <= kFewRowsMax && weight.is_contiguous() && bias.is_contiguous();
}

// y = x W^T + b for the step's rows x [rows, in]. On a team: each thread its part of the outputs
// (cogview's few-rows kernel). Alone: few rows and contiguous W, b: the same kernel, threaded by
// itself. More rows: MKL's pre-packed sgemm when `packed` holds W packed for `packed_rows` rows (it
// then skips repacking W on every call, which at a handful of rows costs more than the product;
// MKL falls back to the plain product itself when the row count differs), else at::linear.
// Returns where the result is: `y`, or the data of `keep`, which holds it.
const void* project(const Team& team, const Step& s, const void* x, int64_t which, int64_t layer, void* y,
                    at::Tensor& keep) {
  const auto [weight, bias] = projection(s, layer, which);
  if (!team.alone()) {
    const FewRowsLinearArgs a = few_rows_args(s, x, weight, bias, y);
    const auto [begin, end] = team.part(a.out, 4);
    if (begin < end) COGVIEW_CPU_DISPATCH(few_rows_linear, a, begin, end);
    team.wait();
    return y;
  }
  const at::Tensor* packed = s.packed == nullptr ? nullptr : s.packed->data() + 4 * layer + which;
  if (on_few_rows_kernel(s, weight, bias)) {
    run_few_rows_linear(few_rows_args(s, x, weight, bias, y));
    return y;
  }
  const at::Tensor x_rows = at::from_blob(const_cast<void*>(x), {s.rows, weight.size(1)}, weight.options());
  if (packed == nullptr) {
    keep = at::linear(x_rows, weight, bias);
  } else {
    static const auto mkl_linear =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkl::_mkl_linear", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t)>();
    keep = mkl_linear.call(x_rows, *packed, weight, bias, s.packed_rows).contiguous();
  }
  return keep.data_ptr();
}

// LN_out(x) (no residual), or residual + LN_out(x) -> `out` and LN_next of it -> `normed`.
void norm(const Step& s, const void* residual, const void* x, const at::Tensor& w_out, const at::Tensor& b_out,
          const at::Tensor* w_next, const at::Tensor* b_next, void* out, void* normed) {
  const at::ScalarType acc = ops::accumulator_type(w_out);
  const AccParam wo(w_out, acc), bo(b_out, acc);
  const std::optional<AccParam> wn = w_next ? std::make_optional<AccParam>(*w_next, acc) : std::nullopt;
  const std::optional<AccParam> bn = b_next ? std::make_optional<AccParam>(*b_next, acc) : std::nullopt;
  LayerNormForwardArgs a;
  a.rows = s.rows;
  a.hidden = s.hidden;
  a.residual = residual;
  a.residual_type = s.type;
  a.residual_stride = s.hidden;
  a.branch = x;
  a.branch_type = s.type;
  a.branch_stride = s.hidden;
  a.w_out = wo.data();
  a.b_out = bo.data();
  a.w_next = wn ? wn->data() : nullptr;
  a.b_next = bn ? bn->data() : nullptr;
  a.out = out;
  a.out_type = s.type;
  a.normed = normed;
  a.normed_type = s.type;
  a.stats = s.stats->data();
  a.eps = s.eps;
  a.pb_relax = s.pb_relax;
  a.f64 = acc == at::kDouble;
  run_layer_norm_forward(a);
}

char* layer_data(const at::Tensor& cache, int64_t layer, int64_t element) {
  return static_cast<char*>(cache.data_ptr()) + layer * cache.stride(0) * element;
}

// Writes the new token's k and v (inside `qkv`) into the layer's caches at its slot and points the
// attention at this layer; then the team attends over slots 0..slot, its (b, h, chunk) tasks
// shared out, into ws->context.
void attend(const Team& team, const Step& s, const char* qkv, int64_t layer) {
  const int64_t element = s.ws->element;
  team.one([&] {
    for (int64_t which = 1; which <= 2; ++which) {
      const at::Tensor& cache = which == 1 ? *s.k_cache : *s.v_cache;
      KvCacheWriteArgs w;
      w.heads = s.heads;
      w.n = 1;
      w.dim = s.head_dim;
      w.cache = layer_data(cache, layer, element);
      w.cache_type = s.type;
      w.cache_stride_b = cache.stride(1);
      w.cache_stride_h = cache.stride(2);
      w.cache_stride_pos = cache.stride(3);
      w.src = qkv + which * s.hidden * element;
      w.src_type = s.type;
      w.src_stride_b = 3 * s.hidden;
      w.src_stride_h = s.head_dim;
      w.src_stride_pos = s.hidden;  // (one position per row)
      w.start = s.slot;
      run_kv_cache_write(w, s.rows);
    }
    s.attention->q = qkv;
    s.attention->k = layer_data(*s.k_cache, layer, element);
    s.attention->v = layer_data(*s.v_cache, layer, element);
  });
  const DecodeAttentionArgs& a = *s.attention;
  const DecodeAttentionPlan& plan = *s.plan;
  if (team.alone()) return run_planned_decode_attention(a, plan);
  const auto [first, last] = team.part(plan.task_count(), 1);
  if (first < last) COGVIEW_CPU_DISPATCH(decode_attention_chunks, a, plan.tasks.data(), first, last);
  team.wait();
  if (plan.merge_count() > 0) {
    const auto [begin, end] = team.part(plan.merge_count(), 1);
    if (begin < end) COGVIEW_CPU_DISPATCH(decode_attention_merge, a, plan.merge_pairs.data(), begin, end);
    team.wait();
  }
}

// The layer stack, from the first layer's normed input (in ws->normed, residual stream in
// ws->residual[0]) to the final LayerNorm's output in s.result. Every thread of `team` runs it.
void run_layers(const Team& team, const Step& s) {
  Workspace& ws = *s.ws;
  int current = 0;  // which residual buffer holds the residual stream
  for (int64_t layer = 0; layer < s.layers; ++layer) {
    const at::Tensor* p = s.params + layer * kParamsPerLayer;
    at::Tensor keep, keep_up;  // (results of at::linear, team of one only)
    const char* qkv = static_cast<const char*>(project(team, s, ws.normed, 0, layer, ws.qkv, keep));
    attend(team, s, qkv, layer);
    const void* branch = project(team, s, ws.context, 1, layer, ws.branch, keep);
    team.one([&] {
      norm(s, ws.residual[current], branch, p[kThirdWeight], p[kThirdBias], &p[kPostAttentionWeight],
           &p[kPostAttentionBias], ws.residual[1 - current], ws.normed);
    });
    current = 1 - current;
    void* up = const_cast<void*>(project(team, s, ws.normed, 2, layer, ws.up, keep_up));
    GeluArgs g;
    g.x = up;
    g.x_type = s.type;
    g.out = up;  // in place
    g.out_type = s.type;
    g.f64 = s.type == ElemType::f64;
    if (team.alone()) {
      run_gelu_forward(g, s.rows * s.mlp);
    } else {
      const auto [begin, end] = team.part(s.rows * s.mlp, 64);
      if (begin < end) COGVIEW_CPU_DISPATCH(gelu_forward, g, begin, end);
      team.wait();
    }
    branch = project(team, s, up, 3, layer, ws.branch, keep);
    void* normed = layer + 1 < s.layers ? static_cast<void*>(ws.normed) : s.result;
    team.one([&] {
      norm(s, ws.residual[current], branch, p[kFourthWeight], p[kFourthBias], &p[kNextWeight], &p[kNextBias],
           ws.residual[1 - current], normed);
    });
    current = 1 - current;
  }
}

// The first input: word + position embeddings (added in the model's dtype, as at::embedding + add_
// would).
void embed(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& words, const at::Tensor& places,
           void* residual, int64_t rows, int64_t hidden) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, words.scalar_type(), "sandwich_embed", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* out = static_cast<scalar_t*>(residual);
    const scalar_t* w = words.const_data_ptr<scalar_t>();
    const scalar_t* p = places.const_data_ptr<scalar_t>();
    const auto token = tokens.accessor<int64_t, 2>(), position = positions.accessor<int64_t, 2>();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* wr = w + token[r][0] * words.stride(0);
      const scalar_t* pr = p + position[r][0] * places.stride(0);
      for (int64_t i = 0; i < hidden; ++i) {
        out[r * hidden + i] = static_cast<scalar_t>(static_cast<acc_t>(wr[i * words.stride(1)]) +
                                                    static_cast<acc_t>(pr[i * places.stride(1)]));
      }
    }
  });
}

at::Tensor sandwich_decode_step_cpu(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& start,
                                    const at::Tensor& word_embeddings, const at::Tensor& position_embeddings,
                                    const at::Tensor& first_weight, const at::Tensor& first_bias,
                                    at::TensorList params, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    int64_t num_heads, double scale, double eps, bool pb_relax,
                                    const std::optional<std::vector<at::Tensor>>& packed_weights, int64_t packed_rows) {
  check_args(tokens, positions, start, word_embeddings, position_embeddings, first_weight, first_bias, params, k_cache,
             v_cache, num_heads, scale);
  const int64_t rows = tokens.size(0), hidden = word_embeddings.size(1);
  const int64_t layers = k_cache.size(0), max_len = k_cache.size(3);
  const bool packed = packed_weights.has_value() && !packed_weights->empty();
  TORCH_CHECK_VALUE(!packed || static_cast<int64_t>(packed_weights->size()) == 4 * layers,
                    "cogview: sandwich_decode_step needs 4 `packed_weights` per layer (qkv, dense, up, down), got ",
                    packed_weights->size());
  // Every position is checked before anything is written: a bad call leaves the caches untouched.
  ops::check_positions(start, "start", rows, k_cache.device());
  const at::Tensor start64 = start.to(at::kLong).contiguous();
  const int64_t* slot = start64.data_ptr<int64_t>();
  std::vector<int64_t> lengths(rows);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(slot[r] >= 0 && slot[r] < max_len, "cogview: sandwich_decode_step `start[", r, "]` = ", slot[r],
                      " must lie in [0, max_len) = [0, ", max_len, ")");
    lengths[r] = slot[r] + 1;
  }
  ops::check_writable_caches(k_cache, v_cache);
  at::Tensor result = at::empty({rows, hidden}, word_embeddings.options());
  if (rows == 0) return result;
  // The kernels read the caches with unit stride along head_dim (other layouts: a contiguous copy
  // in, and the written slots copied back).
  const bool unit = k_cache.stride(4) == 1 && v_cache.stride(4) == 1;
  const at::Tensor k_work = unit ? k_cache : k_cache.contiguous(), v_work = unit ? v_cache : v_cache.contiguous();

  const int64_t mlp = params[kUpWeight].size(0);
  Workspace ws(rows, hidden, mlp, word_embeddings.options());
  std::vector<double> stats(static_cast<size_t>(rows) * 4);
  const ElemType type = elem_type(word_embeddings, "word_embeddings");
  const int64_t head_dim = k_cache.size(4);
  DecodeAttentionArgs attention;
  attention.batch = rows;
  attention.heads = num_heads;
  attention.n = 1;
  attention.dim = head_dim;
  attention.q_type = type;
  attention.q_stride_b = 3 * hidden;
  attention.q_stride_h = head_dim;
  attention.q_stride_i = hidden;
  attention.kv_type = type;
  attention.k_stride_b = k_work.stride(1);
  attention.k_stride_h = k_work.stride(2);
  attention.k_stride_pos = k_work.stride(3);
  attention.v_stride_b = v_work.stride(1);
  attention.v_stride_h = v_work.stride(2);
  attention.v_stride_pos = v_work.stride(3);
  attention.lengths = lengths.data();
  attention.scale = scale;
  attention.out = ws.context;
  attention.out_type = type;
  attention.f64 = type == ElemType::f64;
  DecodeAttentionPlan plan;
  plan_decode_attention(attention, plan);
  Step s{params.data(), packed ? &*packed_weights : nullptr, packed_rows, rows, hidden, mlp, num_heads, head_dim,
         layers, eps, pb_relax, type, &ws, slot, &k_work, &v_work, result.data_ptr(), &stats, &attention, &plan};
  embed(tokens, positions, word_embeddings, position_embeddings, ws.residual[0], rows, hidden);
  norm(s, nullptr, ws.residual[0], first_weight, first_bias, nullptr, nullptr, ws.normed, nullptr);

  // One region for the whole stack when every projection is a few-rows product (see Team).
  bool team = at::get_num_threads() > 1 && !at::in_parallel_region();
  for (int64_t layer = 0; team && layer < layers; ++layer) {
    for (int64_t which = 0; team && which < 4; ++which) {
      const auto [weight, bias] = projection(s, layer, which);
      team = on_few_rows_kernel(s, weight, bias);
    }
  }
#ifdef _OPENMP
  if (team) {
#pragma omp parallel num_threads(at::get_num_threads())
    run_layers(Team(omp_get_thread_num(), omp_get_num_threads()), s);
  } else {
    run_layers(Team(0, 1), s);
  }
#else
  run_layers(Team(0, 1), s);
#endif
  if (!unit) {  // the written slots back into the caller's caches
    for (int64_t r = 0; r < rows; ++r) {
      k_cache.select(1, r).narrow(2, slot[r], 1).copy_(k_work.select(1, r).narrow(2, slot[r], 1));
      v_cache.select(1, r).narrow(2, slot[r], 1).copy_(v_work.select(1, r).narrow(2, slot[r], 1));
    }
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(cogview, CPU, m) { m.impl("sandwich_decode_step", &sandwich_decode_step_cpu); }
// MKL-packed weights are MkldnnCPU tensors; with them in `packed_weights` the call dispatches here.
TORCH_LIBRARY_IMPL(cogview, MkldnnCPU, m) { m.impl("sandwich_decode_step", &sandwich_decode_step_cpu); }

}  // namespace cogview::cpu
