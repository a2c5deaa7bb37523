// kv_cache_write rows: compiled once per ISA, see kernels.h.
#include <cstring>
#include <memory>

#include "cpu/kernels/kernels.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

template <typename acc_t>
void copy_rows(const KvCacheWriteArgs& a, int64_t begin, int64_t end) {
  const int64_t cache_size = elem_size(a.cache_type), src_size = elem_size(a.src_type);
  const bool same = a.cache_type == a.src_type;
  std::unique_ptr<acc_t[]> buffer(same ? nullptr : new acc_t[a.dim]);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / a.heads, h = pair % a.heads;
    char* cache = static_cast<char*>(a.cache) +
                  (b * a.cache_stride_b + h * a.cache_stride_h + a.start[b] * a.cache_stride_pos) * cache_size;
    const char* src = static_cast<const char*>(a.src) + (b * a.src_stride_b + h * a.src_stride_h) * src_size;
    for (int64_t i = 0; i < a.n; ++i) {
      char* dst_row = cache + i * a.cache_stride_pos * cache_size;
      const char* src_row = src + i * a.src_stride_pos * src_size;
      if (same) {
        std::memcpy(dst_row, src_row, a.dim * cache_size);
      } else {
        load_row(buffer.get(), src_row, a.src_type, a.dim);
        store_row(dst_row, buffer.get(), a.cache_type, a.dim);
      }
    }
  }
}

}  // namespace

void kv_cache_write(const KvCacheWriteArgs& args, int64_t begin, int64_t end) {
  // float64 on either side converts through double so nothing is rounded twice.
  if (args.cache_type == ElemType::f64 || args.src_type == ElemType::f64) {
    copy_rows<double>(args, begin, end);
  } else {
    copy_rows<float>(args, begin, end);
  }
}

}  // namespace cogview::cpu::COGVIEW_ISA
