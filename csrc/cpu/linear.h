// Whether cogview::linear runs its bfloat16 products on the AMX matrix tiles (csrc/cpu/linear.cpp).
#pragma once

#include <cstdint>

namespace cogview::cpu {

// The CPU has AMX (tile + bf16), Linux granted this process the tile state, and the avx512
// kernels (the build that carries the tile code) are the active ones.
bool tile_linear_available();

// Products (rows x in x out multiply-adds) above this run on at::linear even where the tiles are
// available: oneDNN's blocked product is as fast or faster there.
int64_t tile_linear_max_macs();

}  // namespace cogview::cpu
