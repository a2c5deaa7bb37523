// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// the counter-based generator behind every random draw of cogview's ops.
//
// Torch-free and usable from host and device code, so the CPU kernels, the CUDA kernels and the
// plain-PyTorch reference (cogview/ops/reference.py, `philox4x32_10`) produce the same stream.
//
// sample_tokens draws one uniform per row:
//   key     = (seed mod 2^32, seed >> 32)                      seed as a uint64 (two's complement)
//   counter = (offset mod 2^32, offset >> 32, row mod 2^32, row >> 32)
//   u       = first output word / 2^32, in [0, 1 - 2^-32]
// This is the layout of cuRAND's Philox4_32_10 state after curand_init(seed, row, 4 * offset):
// its first curand() returns the same word.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define COGVIEW_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define COGVIEW_HOST_DEVICE inline
#endif

namespace cogview::philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

struct Words4 {
  uint32_t x, y, z, w;
};

// Ten rounds of Philox4x32 on counter c with key (k0, k1).
COGVIEW_HOST_DEVICE Words4 philox4x32_10(Words4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c.x;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c.z;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = Words4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// The 32-bit random word of (seed, offset, row); see the header comment.
COGVIEW_HOST_DEVICE uint32_t row_word(uint64_t seed, uint64_t offset, uint64_t row) {
  const Words4 counter{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32)};
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)).x;
}

// The row's uniform in [0, 1): word * 2^-32, exact in double.
COGVIEW_HOST_DEVICE double row_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
  return static_cast<double>(row_word(seed, offset, row)) * (1.0 / 4294967296.0);
}

}  // namespace cogview::philox
