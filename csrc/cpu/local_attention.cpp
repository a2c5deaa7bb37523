// CPU implementation of cogview::local_attention and cogview::local_attention_backward.
//
// This layer checks, packs keys/values once per call into the layouts the micro-kernels read
// (csrc/cpu/kernels/local_attention.cpp), allocates, and schedules:
//   forward:  (batch, head) tasks, or query tiles when there are few heads per thread, handed
//             out dynamically to the threads;
//   backward: whole heads per task (each task owns its head's key gradients) when there are
//             enough heads per thread; otherwise bands of query rows: bands two apart touch
//             disjoint key rows, so even bands run in parallel, then odd bands (and, when k/v are
//             batch-broadcast, batches one after another). Both visit a head's bands in the same
//             order, so every key gradient is summed in a fixed order, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/local_attention.h"
#include "cpu/tensor_utils.h"
#include "ops/local_attention_checks.h"

namespace cogview::cpu {
namespace {

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

int64_t batch_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : t.stride(0); }

// Elements per packing task (small packs, like the text keys, run inline).
constexpr int64_t kPackGrainElems = 16384;

// Whole heads per task when there are at least this many per thread: one parallel region,
// each head's packed keys built in per-task scratch and used while still in cache.
constexpr int64_t kHeadsPerThread = 2;

bool whole_heads(int64_t units) { return units >= kHeadsPerThread * at::get_num_threads(); }

LocalAttentionSource source(const at::Tensor& t) {
  return {t.data_ptr(), elem_type(t, "input"), batch_stride(t), t.stride(1), t.stride(2)};
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }


LocalAttentionShape make_shape(const ops::LocalAttentionDims& d, bool causal, at::ScalarType acc) {
  LocalAttentionShape s;
  s.q_h = d.q_h;
  s.q_w = d.q_w;
  s.k_h = d.k_h;
  s.k_w = d.k_w;
  s.win_h = d.win_h;
  s.win_w = d.win_w;
  s.head_dim = d.head_dim;
  s.text = d.text;
  s.causal = causal;
  s.f64 = acc == at::kDouble;
  return s;
}

// Runs fn(begin, end) over [0, units) in chunks that threads take from a shared counter: on a
// busy machine a thread that gets less CPU does less of the work. Every unit is independent and
// its own summation order is fixed, so results do not depend on who runs what.
template <typename Fn>
void dynamic_for(int64_t units, const Fn& fn) {
  if (units <= 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, units / (threads * 8));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, units), 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t begin = next.fetch_add(chunk);
      if (begin >= units) break;
      fn(begin, std::min(units, begin + chunk));
    }
  });
}

// One slice of scratch per thread (allocated through torch, so memory profiles see it).
class ThreadScratch {
 public:
  ThreadScratch(int64_t elems, const at::TensorOptions& options) : elems_(elems) {
    if (elems > 0) buffer_ = at::empty({at::get_num_threads(), elems}, options);
  }
  void* mine() const {
    if (elems_ == 0) return nullptr;
    return static_cast<char*>(buffer_.data_ptr()) + at::get_thread_num() * elems_ * buffer_.element_size();
  }

 private:
  int64_t elems_;
  at::Tensor buffer_;
};

// Accumulator-type rows of x readable `dp` elements at a time, with their strides.
struct Rows {
  at::Tensor t;
  int64_t sb = 0, sh = 0, sn = 0;
};

// What every pack of x [batch, heads, rows * cols, d] shares: source, geometry, destinations unset.
LocalAttentionPackArgs pack_args(const at::Tensor& x, int64_t rows, int64_t cols, const LocalAttentionPlan& plan,
                                 int64_t pad, int64_t row_width) {
  LocalAttentionPackArgs a;
  a.batch = x.size(0);
  a.heads = x.size(1);
  a.rows = rows;
  a.cols = cols;
  a.head_dim = x.size(3);
  a.src = x.data_ptr();
  a.src_type = elem_type(x, "k");
  a.sb = x.stride(0);
  a.sh = x.stride(1);
  a.sn = x.stride(2);
  a.pad = pad;
  a.row_width = row_width;
  a.dp = plan.dp;
  return a;
}

// Packs x [batch, heads, rows * cols, d] into the transposed layout (when `transposed`) and
// row-major dp-padded rows (when `rowmajor`), in one pass over x.
void pack(const at::Tensor& x, int64_t rows, int64_t cols, const LocalAttentionPlan& plan, int64_t pad,
          int64_t row_width, at::Tensor* transposed, Rows* rowmajor, at::ScalarType acc) {
  const int64_t batch = x.size(0), heads = x.size(1), d = x.size(3);
  LocalAttentionPackArgs a = pack_args(x, rows, cols, plan, pad, row_width);
  a.f64 = acc == at::kDouble;
  if (transposed != nullptr) {
    *transposed = at::empty({batch, heads, rows, d, row_width}, x.options().dtype(acc));
    a.transposed = transposed->data_ptr();
  }
  if (rowmajor != nullptr) {
    rowmajor->t = at::empty({batch, heads, rows * cols, plan.dp}, x.options().dtype(acc));
    rowmajor->sb = batch == 1 ? 0 : heads * rows * cols * plan.dp;
    rowmajor->sh = rows * cols * plan.dp;
    rowmajor->sn = plan.dp;
    a.rowmajor = rowmajor->t.data_ptr();
  }
  const int64_t items = batch * heads * rows;
  if (items == 0 || (a.transposed == nullptr && a.rowmajor == nullptr)) return;
  const int64_t grain = std::max<int64_t>(1, kPackGrainElems / std::max<int64_t>(1, cols * d));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(local_attention_pack, a, begin, end);
  });
}

// Whether x can be read in place as rows of dp accumulator elements.
bool rows_in_place(const at::Tensor& x, const LocalAttentionPlan& plan, at::ScalarType acc) {
  return x.scalar_type() == acc && x.size(3) == plan.dp && x.stride(3) == 1;
}

Rows in_place_rows(const at::Tensor& x) { return {x, batch_stride(x), x.stride(1), x.stride(2)}; }

int64_t transposed_batch_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : t.stride(0); }

// The geometry and the queries, which the forward and the backward both read.
LocalAttentionQueryArgs query_args(const ops::LocalAttentionDims& d, const LocalAttentionShape& shape,
                                   const LocalAttentionPlan& plan, const at::Tensor& q) {
  LocalAttentionQueryArgs a;
  a.shape = shape;
  a.plan = plan;
  a.batch = d.batch;
  a.heads = d.heads;
  a.q = q.data_ptr();
  a.q_type = elem_type(q, "q");
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.q_sn = q.stride(2);
  return a;
}

// The forward's arguments that both arithmetics share (packed inputs, scale and outputs unset).
LocalAttentionForwardArgs forward_args(const ops::LocalAttentionDims& d, const LocalAttentionShape& shape,
                                       const LocalAttentionPlan& plan, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, bool per_head) {
  LocalAttentionForwardArgs a;
  static_cast<LocalAttentionQueryArgs&>(a) = query_args(d, shape, plan, q);
  a.per_head = per_head;
  a.k_src = source(k);
  a.v_src = source(v);
  return a;
}

// ---- the bf16 dot-product forward (csrc/cpu/kernels/local_attention_pairs.cpp) -------------

std::atomic<bool> bf16_dot_enabled{true};  // set_local_attention_bf16_dot

bool cpu_has_bf16_dot() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
#else
  return false;
#endif
}

// bfloat16 inputs, an even head_dim, the strip path (the parent-window path stays in float), and
// the avx512 kernels active on a CPU with AVX512-BF16.
bool use_pairs(const ops::LocalAttentionDims& d, const LocalAttentionPlan& plan, const at::Tensor& q,
               const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& text_k,
               const std::optional<at::Tensor>& text_v) {
  const auto bf16 = [](const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; };
  if (!bf16(q) || !bf16(k) || !bf16(v) || d.head_dim % 2 != 0 || plan.parents) return false;
  if (d.text > 0 && (!bf16(*text_k) || !bf16(*text_v))) return false;
  return local_attention_bf16_dot_available();
}

// Pair packs of x [batch, heads, rows * cols, d] (kernels.h: LocalAttentionPackArgs), as int32.
at::Tensor pack_pairs(const at::Tensor& x, int64_t rows, int64_t cols, const LocalAttentionPlan& plan, int64_t pad,
                      int64_t row_width, bool transposed) {
  const int64_t batch = x.size(0), heads = x.size(1), depth = x.size(3);
  LocalAttentionPackArgs a = pack_args(x, rows, cols, plan, pad, row_width);
  a.pair_cols = (row_width + 1) / 2;
  at::Tensor out = transposed ? at::empty({batch, heads, rows, depth / 2, row_width}, x.options().dtype(at::kInt))
                              : at::empty({batch, heads, rows, a.pair_cols, plan.dp}, x.options().dtype(at::kInt));
  (transposed ? a.transposed : a.rowmajor) = out.data_ptr();
  const int64_t items = batch * heads * rows;
  const int64_t grain = std::max<int64_t>(1, kPackGrainElems / std::max<int64_t>(1, cols * depth));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    const bool ran = COGVIEW_CPU_DISPATCH(local_attention_pack_pairs, a, begin, end);
    TORCH_CHECK(ran, "cogview: local_attention: the active CPU kernels have no bf16 pair code");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> forward_pairs(const ops::LocalAttentionDims& d, const LocalAttentionShape& shape,
                                                 const LocalAttentionPlan& plan, const at::Tensor& q,
                                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& text_k,
                                                 const at::Tensor& text_v, double text_bias, double scale) {
  // Whole heads per task pack their k and v in per-thread scratch; otherwise packed here, once.
  const bool per_head = whole_heads(d.batch * d.heads);
  at::Tensor kt, vp, tkt, tvp;
  if (!per_head) {
    kt = pack_pairs(k, d.k_h, d.k_w, plan, plan.pad, plan.row_width, true);
    vp = pack_pairs(v, d.k_h, d.k_w, plan, plan.pad, plan.row_width, false);
  }
  if (d.text > 0) {
    tkt = pack_pairs(text_k, 1, d.text, plan, 0, plan.tpad, true);
    tvp = pack_pairs(text_v, 1, d.text, plan, 0, plan.tpad, false);
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.n_q}, q.options().dtype(at::kFloat));
  LocalAttentionForwardArgs a = forward_args(d, shape, plan, q, k, v, per_head);
  if (!per_head) {
    a.kt = kt.data_ptr();  // strides in 32-bit words
    a.kt_sb = transposed_batch_stride(kt);
    a.kt_sh = kt.stride(1);
    a.v = vp.data_ptr();
    a.v_sb = transposed_batch_stride(vp);
    a.v_sh = vp.stride(1);
  }
  if (d.text > 0) {
    a.text_kt = tkt.data_ptr();
    a.tk_sb = transposed_batch_stride(tkt);
    a.tk_sh = tkt.stride(1);
    a.text_v = tvp.data_ptr();
    a.tv_sb = transposed_batch_stride(tvp);
    a.tv_sh = tvp.stride(1);
  }
  a.scale = scale;
  a.text_bias = text_bias;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  const ThreadScratch scratch(per_head ? local_attention_pairs_head_words(shape, plan) : 0,
                              q.options().dtype(at::kInt));
  dynamic_for(COGVIEW_CPU_DISPATCH(local_attention_forward_tasks, a), [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(local_attention_forward_pairs, a, begin, end, scratch.mine());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> local_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, at::IntArrayRef grid_q,
                                                       at::IntArrayRef grid_kv, at::IntArrayRef window,
                                                       bool causal,
                                                       const std::optional<at::Tensor>& text_k_in,
                                                       const std::optional<at::Tensor>& text_v_in,
                                                       double text_bias, double scale) {
  const ops::LocalAttentionDims d =
      ops::check_local_attention(q_in, k_in, v_in, grid_q, grid_kv, window, causal, text_k_in, text_v_in,
                                 text_bias, scale);
  const at::ScalarType acc = acc_type(q_in);
  const LocalAttentionShape shape = make_shape(d, causal, acc);
  const LocalAttentionPlan plan = COGVIEW_CPU_DISPATCH(local_attention_plan, shape);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  if (use_pairs(d, plan, q, k, v, text_k_in, text_v_in)) {
    return forward_pairs(d, shape, plan, q, k, v, d.text > 0 ? unit_last_stride(*text_k_in) : at::Tensor(),
                         d.text > 0 ? unit_last_stride(*text_v_in) : at::Tensor(), text_bias, scale);
  }

  const bool per_head = whole_heads(d.batch * d.heads);
  at::Tensor kt, tkt;
  Rows vr, tvr;
  if (rows_in_place(v, plan, acc)) vr = in_place_rows(v);
  if (!per_head) {
    pack(k, d.k_h, d.k_w, plan, plan.pad, plan.row_width, &kt, nullptr, acc);
    if (!vr.t.defined()) pack(v, d.k_h, d.k_w, plan, 0, 0, nullptr, &vr, acc);
    if (d.text > 0) {
      pack(unit_last_stride(*text_k_in), 1, d.text, plan, 0, plan.tpad, &tkt, nullptr, acc);
      pack(unit_last_stride(*text_v_in), 1, d.text, plan, 0, 0, nullptr, &tvr, acc);
    }
  }
  const at::Tensor text_k = d.text > 0 ? unit_last_stride(*text_k_in) : at::Tensor();
  const at::Tensor text_v = d.text > 0 ? unit_last_stride(*text_v_in) : at::Tensor();

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.n_q}, q.options().dtype(acc));

  LocalAttentionForwardArgs a = forward_args(d, shape, plan, q, k, v, per_head);
  if (kt.defined()) {
    a.kt = kt.data_ptr();
    a.kt_sb = transposed_batch_stride(kt);
    a.kt_sh = kt.stride(1);
  }
  if (vr.t.defined()) {
    a.v = vr.t.data_ptr();
    a.v_sb = vr.sb;
    a.v_sh = vr.sh;
    a.v_sn = vr.sn;
  }
  if (d.text > 0) {
    a.text_k_src = source(text_k);
    a.text_v_src = source(text_v);
    if (tkt.defined()) {
      a.text_kt = tkt.data_ptr();
      a.tk_sb = transposed_batch_stride(tkt);
      a.tk_sh = tkt.stride(1);
    }
    if (tvr.t.defined()) {
      a.text_v = tvr.t.data_ptr();
      a.tv_sb = tvr.sb;
      a.tv_sh = tvr.sh;
    }
  }
  a.scale = scale;
  a.text_bias = text_bias;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  const int64_t tasks = COGVIEW_CPU_DISPATCH(local_attention_forward_tasks, a);
  const ThreadScratch scratch(per_head ? COGVIEW_CPU_DISPATCH(local_attention_head_scratch, shape, plan, false) : 0,
                              q.options().dtype(acc));
  dynamic_for(tasks, [&](int64_t begin, int64_t end) {
    COGVIEW_CPU_DISPATCH(local_attention_forward, a, begin, end, scratch.mine());
  });
  return {out, lse};
}

// Accumulator [batch, heads, n, dp] -> [batch, heads, n, d] in `dtype`.
at::Tensor finish_grad(const at::Tensor& acc_grad, int64_t d, at::ScalarType dtype) {
  at::Tensor g = acc_grad.size(3) == d ? acc_grad : acc_grad.narrow(3, 0, d);
  return g.to(dtype).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_backward_cpu(
    const std::optional<at::Tensor>& grad_out_in, const std::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, at::IntArrayRef grid_q, at::IntArrayRef grid_kv, at::IntArrayRef window,
    bool causal, const std::optional<at::Tensor>& text_k_in, const std::optional<at::Tensor>& text_v_in,
    double text_bias, double scale) {
  const ops::LocalAttentionDims d =
      ops::check_local_attention(q_in, k_in, v_in, grid_q, grid_kv, window, causal, text_k_in, text_v_in,
                                 text_bias, scale);
  ops::check_local_attention_backward(d, q_in, grad_out_in, grad_lse_in, out_in, lse_in);
  const at::ScalarType acc = acc_type(q_in);
  const LocalAttentionShape shape = make_shape(d, causal, acc);
  const LocalAttentionPlan plan = COGVIEW_CPU_DISPATCH(local_attention_plan, shape);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const at::Tensor grad_out = grad_out_in.has_value() ? unit_last_stride(*grad_out_in) : at::Tensor();
  const at::Tensor grad_lse = grad_lse_in.has_value() ? grad_lse_in->to(acc).contiguous() : at::Tensor();

  const bool kv_broadcast = d.k_batch == 1 && d.batch > 1;
  const int64_t head_units = kv_broadcast ? d.heads : d.batch * d.heads;
  const bool per_head = whole_heads(head_units);
  at::Tensor kt, vt, tkt, tvt;
  Rows kr, tkr;
  if (rows_in_place(k, plan, acc)) kr = in_place_rows(k);
  const at::Tensor text_k = d.text > 0 ? unit_last_stride(*text_k_in) : at::Tensor();
  const at::Tensor text_v = d.text > 0 ? unit_last_stride(*text_v_in) : at::Tensor();
  if (!per_head) {
    pack(k, d.k_h, d.k_w, plan, plan.pad, plan.row_width, &kt, kr.t.defined() ? nullptr : &kr, acc);
    pack(v, d.k_h, d.k_w, plan, plan.pad, plan.row_width, &vt, nullptr, acc);
    if (d.text > 0) {
      pack(text_k, 1, d.text, plan, 0, plan.tpad, &tkt, &tkr, acc);
      pack(text_v, 1, d.text, plan, 0, plan.tpad, &tvt, nullptr, acc);
    }
  }

  const int64_t bands = (d.q_h + plan.band_h - 1) / plan.band_h;
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor gk = at::zeros({d.k_batch, d.heads, d.n_k, plan.dp}, q.options().dtype(acc));
  at::Tensor gv = at::zeros({d.k_batch, d.heads, d.n_k, plan.dp}, q.options().dtype(acc));
  at::Tensor gtk, gtv;
  if (d.text > 0) {
    gtk = at::zeros({d.batch, d.heads, bands, d.text, plan.dp}, q.options().dtype(acc));
    gtv = at::zeros({d.batch, d.heads, bands, d.text, plan.dp}, q.options().dtype(acc));
  }

  LocalAttentionBackwardArgs a;
  static_cast<LocalAttentionQueryArgs&>(a) = query_args(d, shape, plan, q);
  if (grad_out.defined()) {
    a.grad_out = grad_out.data_ptr();
    a.grad_out_type = elem_type(grad_out, "grad_out");
    a.go_sb = grad_out.stride(0);
    a.go_sh = grad_out.stride(1);
    a.go_sn = grad_out.stride(2);
  }
  a.lse = lse.data_ptr();
  a.grad_lse = grad_lse.defined() ? grad_lse.data_ptr() : nullptr;
  a.k_src = source(k);
  a.v_src = source(v);
  if (kt.defined()) {
    a.kt = kt.data_ptr();
    a.vt = vt.data_ptr();
    a.kt_sb = transposed_batch_stride(kt);
    a.kt_sh = kt.stride(1);
  }
  if (kr.t.defined()) {
    a.k = kr.t.data_ptr();
    a.k_sb = kr.sb;
    a.k_sh = kr.sh;
    a.k_sn = kr.sn;
  }
  if (d.text > 0) {
    a.text_k_src = source(text_k);
    a.text_v_src = source(text_v);
    if (tkt.defined()) {
      a.text_kt = tkt.data_ptr();
      a.text_vt = tvt.data_ptr();
      a.tt_sb = transposed_batch_stride(tkt);
      a.tt_sh = tkt.stride(1);
      a.text_k = tkr.t.data_ptr();
      a.tk_sb = tkr.sb;
      a.tk_sh = tkr.sh;
    }
    a.grad_text_k = gtk.data_ptr();
    a.grad_text_v = gtv.data_ptr();
  }
  a.kv_broadcast = kv_broadcast;
  a.scale = scale;
  a.text_bias = text_bias;
  a.grad_q = grad_q.data_ptr();
  a.grad_k = gk.data_ptr();
  a.grad_v = gv.data_ptr();
  a.gk_sb = d.k_batch == 1 ? 0 : gk.stride(0);
  a.gk_sh = gk.stride(1);
  a.bands = bands;

  if (per_head) {
    const ThreadScratch scratch(COGVIEW_CPU_DISPATCH(local_attention_head_scratch, shape, plan, true),
                                q.options().dtype(acc));
    dynamic_for(head_units, [&](int64_t begin, int64_t end) {
      COGVIEW_CPU_DISPATCH(local_attention_backward_heads, a, begin, end, scratch.mine());
    });
  }
  // Otherwise phases: even bands, then odd bands; with broadcast k/v also one batch at a time,
  // since all batches then accumulate into the same key gradients.
  const bool serial_batches = kv_broadcast;
  const int64_t phase_batches = per_head ? 0 : serial_batches ? d.batch : 1;
  for (int64_t pb = 0; pb < phase_batches; ++pb) {
    for (int64_t color = 0; color < 2; ++color) {
      const int64_t per_head = (bands - color + 1) / 2;
      const int64_t batches = serial_batches ? 1 : d.batch;
      const int64_t items = batches * d.heads * per_head;
      dynamic_for(items, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t band = color + 2 * (i % per_head);
          const int64_t h = (i / per_head) % d.heads;
          const int64_t b = serial_batches ? pb : i / (per_head * d.heads);
          COGVIEW_CPU_DISPATCH(local_attention_backward, a, b, h, band);
        }
      });
    }
  }

  at::Tensor grad_k = finish_grad(gk, d.head_dim, k.scalar_type());
  at::Tensor grad_v = finish_grad(gv, d.head_dim, v.scalar_type());
  at::Tensor grad_text_k = q.new_empty({0}), grad_text_v = q.new_empty({0});
  if (text_k_in.has_value()) {
    const int64_t tb = d.text_batch, n = d.text * plan.dp;
    at::Tensor rk = at::zeros({tb, d.heads, d.text, plan.dp}, q.options().dtype(acc));
    at::Tensor rv = at::zeros({tb, d.heads, d.text, plan.dp}, q.options().dtype(acc));
    if (n > 0) {
      // Fixed order: batch, then band (the text gradient of a broadcast text sums over batch).
      AT_DISPATCH_FLOATING_TYPES(acc, "local_attention_text_grad", [&] {
        const scalar_t* pk = gtk.data_ptr<scalar_t>();
        const scalar_t* pv = gtv.data_ptr<scalar_t>();
        scalar_t* ok = rk.data_ptr<scalar_t>();
        scalar_t* ov = rv.data_ptr<scalar_t>();
        at::parallel_for(0, tb * d.heads, 1, [&](int64_t begin, int64_t end) {
          for (int64_t th = begin; th < end; ++th) {
            const int64_t t_b = th / d.heads, h = th % d.heads;
            scalar_t* dk = ok + th * n;
            scalar_t* dv = ov + th * n;
            for (int64_t b = 0; b < d.batch; ++b) {
              if (tb != 1 && b != t_b) continue;
              for (int64_t band = 0; band < bands; ++band) {
                const int64_t off = ((b * d.heads + h) * bands + band) * n;
                for (int64_t i = 0; i < n; ++i) {
                  dk[i] += pk[off + i];
                  dv[i] += pv[off + i];
                }
              }
            }
          }
        });
      });
    }
    grad_text_k = finish_grad(rk, d.head_dim, text_k_in->scalar_type());
    grad_text_v = finish_grad(rv, d.head_dim, text_v_in->scalar_type());
  }
  return {grad_q, grad_k, grad_v, grad_text_k, grad_text_v};
}

}  // namespace

bool local_attention_bf16_dot_available() {
  return bf16_dot_enabled.load(std::memory_order_relaxed) && active_isa() == Isa::avx512 && cpu_has_bf16_dot();
}

bool set_local_attention_bf16_dot(bool enabled) { return bf16_dot_enabled.exchange(enabled); }

TORCH_LIBRARY_IMPL(cogview, CPU, m) {
  m.impl("local_attention", &local_attention_cpu);
  m.impl("local_attention_backward", &local_attention_backward_cpu);
}

}  // namespace cogview::cpu
