// The threading of csrc/cpu/kernels/few_rows_linear.cpp: the projections of the fused decode step
// when a step has only a few rows (not a registered op; sandwich_decode_step calls it).
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/isa.h"
#include "cpu/runners.h"

namespace cogview::cpu {
namespace {

// Weight bytes per task: enough that a task outweighs waking a thread, small enough that a
// 256 x 256 projection still splits over two cores.
constexpr int64_t kGrainBytes = 64 * 1024;

}  // namespace

void run_few_rows_linear(const FewRowsLinearArgs& a) {
  const int64_t grain = std::max<int64_t>(4, kGrainBytes / std::max<int64_t>(1, a.in * elem_size(a.weight_type)));
  at::parallel_for(0, a.out, grain, [&](int64_t begin, int64_t end) { COGVIEW_CPU_DISPATCH(few_rows_linear, a, begin, end); });
}

}  // namespace cogview::cpu
