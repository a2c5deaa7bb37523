// CPU implementation of cogview::linear and cogview::pack_linear_weight.
//
// bfloat16 products whose feature counts fit the tile layout, up to kTileMacsMax multiply-adds, run
// on the AMX matrix tiles (csrc/cpu/kernels/tile_linear.cpp) when the CPU has them, Linux grants the
// tile state and the avx512 kernels are active; with the activation and the bias applied before the
// one rounding. Everything else is at::linear, followed by the gelu_tanh kernel in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/isa.h"
#include "cpu/linear.h"
#include "cpu/runners.h"
#include "cpu/tensor_utils.h"
#include "ops/linear_checks.h"

namespace cogview::cpu {
namespace {

// Linux hands the tile registers' state (XTILEDATA, 8 KiB per thread) only to a process that asks
// for it; asked once, for the whole process.
bool cpu_has_tiles() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64)) && defined(COGVIEW_ISA_AVX512_COMPILED)
  static const bool granted = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

// Products up to this many multiply-adds run on the tiles. Below it oneDNN's ~40 us of set-up per
// bf16 call weighs most and the tiles are 1.1-1.6x faster (the SR stage's 576-row projections,
// bench/linear.py); well above it oneDNN's blocked product is as fast or faster than these
// 32 x 32 blocks (0.73-0.98x at CogView2's 3600-row ones, GELU fused or not), so those calls take
// at::linear.
constexpr int64_t kTileMacsMax = int64_t{1} << 27;

at::Tensor pack(const at::Tensor& weight_in) {
  const at::Tensor weight = weight_in.contiguous();
  const int64_t out = weight.size(0), in = weight.size(1), m = ops::kLinearPackMultiple;
  at::Tensor packed = at::empty({out / 16, in / m, 16, m}, weight.options());
  TileLinearPackArgs a;
  a.in = in;
  a.out = out;
  a.weight = reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
  a.packed = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, out / 16, 8, [&](int64_t begin, int64_t end) { COGVIEW_CPU_DISPATCH(tile_linear_pack, a, begin, end); });
  return packed;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view activation_in, const std::optional<at::Tensor>& packed_weight) {
  const std::string_view activation(activation_in.data(), activation_in.size());
  ops::check_linear(x, weight, bias, activation, packed_weight);
  const bool gelu = activation == "gelu_tanh";
  if (!tile_linear_runs(x, weight)) {
    at::Tensor y = at::linear(x, weight, bias);
    if (gelu && y.numel() > 0) {  // in place
      y = y.contiguous();
      GeluArgs g;
      g.x = g.out = y.data_ptr();
      g.x_type = g.out_type = elem_type(y, "x");
      g.f64 = y.scalar_type() == at::kDouble;
      run_gelu_forward(g, y.numel());
    }
    return y;
  }
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor rows = x.reshape({-1, in}).contiguous();
  const at::Tensor packed = packed_weight.has_value() ? *packed_weight : pack(weight);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({rows.size(0), out}, x.options());
  TileLinearArgs a;
  a.rows = rows.size(0);
  a.in = in;
  a.out = out;
  a.x = reinterpret_cast<const uint16_t*>(rows.const_data_ptr());
  a.packed = reinterpret_cast<const uint16_t*>(packed.const_data_ptr());
  a.bias = b.defined() ? reinterpret_cast<const uint16_t*>(b.const_data_ptr()) : nullptr;
  a.y = reinterpret_cast<uint16_t*>(y.data_ptr());
  a.gelu = gelu;
  const int64_t blocks = (a.rows + kTileLinearRows - 1) / kTileLinearRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const bool ran = COGVIEW_CPU_DISPATCH(tile_linear, a, begin, end);
    TORCH_CHECK(ran, "cogview: linear: the active CPU kernels have no tile code");  // tile_linear_available() said they do
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.view(shape);
}

at::Tensor pack_linear_weight_cpu(const at::Tensor& weight) {
  ops::check_pack_linear_weight(weight);
  return pack(weight);
}

}  // namespace

bool tile_linear_available() { return cpu_has_tiles() && active_isa() == Isa::avx512; }

int64_t tile_linear_max_macs() { return kTileMacsMax; }

bool tile_linear_runs(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t m = ops::kLinearPackMultiple;
  if (!tile_linear_available() || x.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16 ||
      weight.dim() != 2 || x.dim() < 1 || x.size(-1) != weight.size(1) || x.numel() == 0 ||
      weight.size(0) % m || weight.size(1) % m || x.device() != weight.device() || !x.device().is_cpu()) {
    return false;
  }
  const int64_t rows = x.numel() / weight.size(1);
  return rows <= kTileMacsMax / std::max<int64_t>(1, weight.size(0) * weight.size(1));
}

TORCH_LIBRARY_IMPL(cogview, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("pack_linear_weight", &pack_linear_weight_cpu);
}

}  // namespace cogview::cpu
