// decode_attention chunk tasks and merge: compiled once per ISA, see kernels.h.
//
// One pass over each chunk of the cache: keys and values are read once, in blocks of kBlock rows
// that stay in L1 while every query of the sequence uses them. Per block: the scores (vectorized
// dot products), one rescale of the running output (online softmax), the weights through a
// vectorized exp, and one axpy per value row.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec_math.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

constexpr int64_t kBlock = 32;

template <ElemType T, typename acc_t>
inline acc_t load_elem(const void* base, int64_t i) {
  if constexpr (T == ElemType::f32) {
    return static_cast<acc_t>(static_cast<const float*>(base)[i]);
  } else if constexpr (T == ElemType::f64) {
    return static_cast<acc_t>(static_cast<const double*>(base)[i]);
  } else if constexpr (T == ElemType::bf16) {
    return static_cast<acc_t>(bf16_to_float(static_cast<const uint16_t*>(base)[i]));
  } else {
    return static_cast<acc_t>(f16_to_float(static_cast<const uint16_t*>(base)[i]));
  }
}

template <ElemType T>
constexpr int64_t kElemBytes = T == ElemType::f64 ? 8 : (T == ElemType::f32 ? 4 : 2);

template <typename acc_t, ElemType KV>
void chunk_tasks(const DecodeAttentionArgs& a, const int64_t* tasks, int64_t begin, int64_t end) {
  const int64_t d = a.dim, n = a.n;
  constexpr int64_t kv_bytes = kElemBytes<KV>;
  const int64_t q_bytes = elem_size(a.q_type), out_bytes = elem_size(a.out_type);
  std::unique_ptr<acc_t[]> storage(new acc_t[2 * n * d + 2 * n + kBlock]);
  acc_t* q = storage.get();
  acc_t* acc = q + n * d;
  acc_t* m = acc + n * d;
  acc_t* l = m + n;
  acc_t* s = l + n;
  const acc_t scale = static_cast<acc_t>(a.scale), bias = static_cast<acc_t>(a.text_bias);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = tasks[3 * t], h = tasks[3 * t + 1], c = tasks[3 * t + 2];
    const int64_t len = a.lengths[b];
    const int64_t chunks = (len + a.chunk - 1) / a.chunk;
    const int64_t c0 = c * a.chunk, c1 = std::min(len, c0 + a.chunk);
    for (int64_t i = 0; i < n; ++i) {
      load_row(q + i * d,
               static_cast<const char*>(a.q) + (b * a.q_stride_b + h * a.q_stride_h + i * a.q_stride_i) * q_bytes,
               a.q_type, d);
      m[i] = kNegInf;
      l[i] = 0;
    }
    for (int64_t e = 0; e < n * d; ++e) acc[e] = 0;
    const char* k_base = static_cast<const char*>(a.k) + (b * a.k_stride_b + h * a.k_stride_h) * kv_bytes;
    const char* v_base = static_cast<const char*>(a.v) + (b * a.v_stride_b + h * a.v_stride_h) * kv_bytes;

    for (int64_t j0 = c0; j0 < c1; j0 += kBlock) {
      const int64_t j1 = std::min(c1, j0 + kBlock);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t last = len - n + i;  // query i sees positions <= last
        const int64_t count = std::min(j1, last + 1) - j0;
        if (count <= 0) continue;
        const acc_t* qi = q + i * d;
        acc_t block_max = kNegInf;
        for (int64_t j = 0; j < count; ++j) {
          const char* k_row = k_base + (j0 + j) * a.k_stride_pos * kv_bytes;
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < d; ++e) dot += qi[e] * load_elem<KV, acc_t>(k_row, e);
          const acc_t logit = dot * scale + (j0 + j < a.text_len ? bias : acc_t(0));
          s[j] = logit;
          block_max = logit > block_max ? logit : block_max;
        }
        const acc_t m_new = block_max > m[i] ? block_max : m[i];
        if (m_new == kNegInf) continue;  // only -inf logits so far (non-finite inputs)
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < count; ++j) {
          s[j] = exp_nonpositive(s[j] - m_new);
          sum += s[j];
        }
        acc_t* acc_i = acc + i * d;
        if (m_new != m[i]) {
          const acc_t alpha = exp_nonpositive(m[i] - m_new);
          l[i] *= alpha;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) acc_i[e] *= alpha;
          m[i] = m_new;
        }
        l[i] += sum;
        for (int64_t j = 0; j < count; ++j) {
          const char* v_row = v_base + (j0 + j) * a.v_stride_pos * kv_bytes;
          const acc_t p = s[j];
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) acc_i[e] += p * load_elem<KV, acc_t>(v_row, e);
        }
      }
    }

    if (chunks == 1) {
      for (int64_t i = 0; i < n; ++i) {
        acc_t* acc_i = acc + i * d;
        const acc_t inv = acc_t(1) / l[i];
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) acc_i[e] *= inv;
        store_row(static_cast<char*>(a.out) + (((b * a.heads + h) * n) + i) * d * out_bytes, acc_i,
                  a.out_type, d);
      }
    } else {
      acc_t* slot = static_cast<acc_t*>(a.partials) + (a.chunk_base[b] + h * chunks + c) * n * (d + 2);
      for (int64_t i = 0; i < n; ++i) {
        acc_t* dst = slot + i * (d + 2);
        const acc_t* acc_i = acc + i * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) dst[e] = acc_i[e];
        dst[d] = m[i];
        dst[d + 1] = l[i];
      }
    }
  }
}

template <typename acc_t>
void merge(const DecodeAttentionArgs& a, const int64_t* pairs, int64_t begin, int64_t end) {
  const int64_t d = a.dim, n = a.n, out_bytes = elem_size(a.out_type);
  std::unique_ptr<acc_t[]> num(new acc_t[d]);
  const auto* partials = static_cast<const acc_t*>(a.partials);
  for (int64_t p = begin; p < end; ++p) {
    const int64_t b = pairs[2 * p], h = pairs[2 * p + 1];
    const int64_t chunks = (a.lengths[b] + a.chunk - 1) / a.chunk;
    const acc_t* first = partials + (a.chunk_base[b] + h * chunks) * n * (d + 2);
    for (int64_t i = 0; i < n; ++i) {
      acc_t top = -std::numeric_limits<acc_t>::infinity();
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t mc = first[(c * n + i) * (d + 2) + d];
        top = mc > top ? mc : top;
      }
      acc_t den = 0;
      for (int64_t e = 0; e < d; ++e) num[e] = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t* part = first + (c * n + i) * (d + 2);
        if (!(part[d + 1] > 0)) continue;  // this query sees no key of chunk c
        const acc_t w = exp_nonpositive(part[d] - top);
        den += w * part[d + 1];
        acc_t* nu = num.get();
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) nu[e] += w * part[e];
      }
      const acc_t inv = acc_t(1) / den;
      acc_t* nu = num.get();
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) nu[e] *= inv;
      store_row(static_cast<char*>(a.out) + (((b * a.heads + h) * n) + i) * d * out_bytes, nu, a.out_type, d);
    }
  }
}

template <typename acc_t>
void chunk_tasks_for(const DecodeAttentionArgs& a, const int64_t* tasks, int64_t begin, int64_t end) {
  switch (a.kv_type) {
    case ElemType::f32: return chunk_tasks<acc_t, ElemType::f32>(a, tasks, begin, end);
    case ElemType::f16: return chunk_tasks<acc_t, ElemType::f16>(a, tasks, begin, end);
    case ElemType::bf16: return chunk_tasks<acc_t, ElemType::bf16>(a, tasks, begin, end);
    case ElemType::f64: return chunk_tasks<acc_t, ElemType::f64>(a, tasks, begin, end);
  }
}

}  // namespace

void decode_attention_chunks(const DecodeAttentionArgs& args, const int64_t* tasks, int64_t begin,
                             int64_t end) {
  if (args.f64) {
    chunk_tasks_for<double>(args, tasks, begin, end);
  } else {
    chunk_tasks_for<float>(args, tasks, begin, end);
  }
}

void decode_attention_merge(const DecodeAttentionArgs& args, const int64_t* pairs, int64_t begin,
                            int64_t end) {
  if (args.f64) {
    merge<double>(args, pairs, begin, end);
  } else {
    merge<float>(args, pairs, begin, end);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
