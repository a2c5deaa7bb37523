// Which arithmetic cogview::local_attention's CPU forward uses (csrc/cpu/local_attention.cpp).
#pragma once

namespace cogview::cpu {

// The CPU has AVX512-BF16, the avx512 kernels are active and the path is enabled: bfloat16 calls
// (even head_dim, strip windows, i.e. all but the shared parent windows) then run on bf16 dot
// products (csrc/cpu/kernels/local_attention_pairs.cpp) instead of converting to float.
bool local_attention_bf16_dot_available();

// Enables (the default) or disables that path for the process; returns the previous setting. For
// tests and benchmarks that hold it against the float arithmetic on the same CPU.
bool set_local_attention_bf16_dot(bool enabled);

}  // namespace cogview::cpu
