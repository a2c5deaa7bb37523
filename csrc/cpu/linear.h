// Whether cogview::linear runs its bfloat16 products on the AMX matrix tiles (csrc/cpu/linear.cpp).
#pragma once

namespace cogview::cpu {

// The CPU has AMX (tile + bf16), Linux granted this process the tile state, and the avx512
// kernels (the build that carries the tile code) are the active ones.
bool tile_linear_available();

}  // namespace cogview::cpu
