// Whether cogview::linear runs its bfloat16 products on the AMX matrix tiles (csrc/cpu/linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace cogview::cpu {

// The CPU has AMX (tile + bf16), Linux granted this process the tile state, and the avx512
// kernels (the build that carries the tile code) are the active ones.
bool tile_linear_available();

// Products (rows x in x out multiply-adds) above this run on at::linear even where the tiles are
// available: oneDNN's blocked product is as fast or faster there.
int64_t tile_linear_max_macs();

// Whether cogview::linear(x, weight, ...) runs on the tiles: available, bfloat16 CPU tensors of
// matching shapes, feature counts that fit the tile layout, at most tile_linear_max_macs(). False
// (never an error) for anything else, so it can be asked before the arguments are checked.
bool tile_linear_runs(const at::Tensor& x, const at::Tensor& weight);

}  // namespace cogview::cpu
