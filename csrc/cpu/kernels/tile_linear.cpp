// tile_linear and its weight packing: compiled once per ISA, see kernels.h.
//
// A task takes 32 rows of x (two 16-row tiles) and walks the output features 32 at a time: four
// float accumulator tiles (2 x 2) sum the bf16 tile products over the input features, 32 at a
// time; the block then goes through L1, where the bias and the activation are applied and it is
// rounded to bf16 once. The eight tile registers: 4 accumulators, 2 of x, 2 of the weight.
// A last block of fewer than 32 rows is copied into a zeroed one first, so every tile load reads
// 16 whole rows. Only the avx512 build has this code; the tile instructions are enabled per
// function, so the rest of that build keeps plain AVX-512 and runs on CPUs without AMX.
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__x86_64__)
#include <immintrin.h>
#define COGVIEW_TILE_CODE 1
#endif

#include "cpu/kernels/gelu_math.h"
#include "cpu/kernels/kernels.h"

namespace cogview::cpu::COGVIEW_ISA {
namespace {

constexpr int64_t kTile = 16;  // rows of a tile; a weight tile's 16 columns
constexpr int64_t kChunkSteps = 8;  // input-feature steps per chunk (256 features)

#if defined(COGVIEW_TILE_CODE)
inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Bias, activation and rounding of one block c [rows][32] (float) into y (row stride y_stride).
void finish_block(const float* c, int64_t rows, const uint16_t* bias, bool gelu, uint16_t* y, int64_t y_stride) {
  static_assert(kTileLinearN == 32, "a block row is two vectors");
  const __m512 b0 = bias != nullptr ? load_bf16(bias) : _mm512_setzero_ps();
  const __m512 b1 = bias != nullptr ? load_bf16(bias + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = c + r * kTileLinearN;
    uint16_t* out = y + r * y_stride;
    __m512 v0 = _mm512_add_ps(_mm512_load_ps(row), b0), v1 = _mm512_add_ps(_mm512_load_ps(row + 16), b1);
    if (gelu) {  // the activation sees the biased sum
      v0 = gelu16(v0);
      v1 = gelu16(v1);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), float_to_bf16_16(v0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), float_to_bf16_16(v1));
  }
}

// The tile shapes of `ldtilecfg` (palette 1): tiles 0-7 of 16 rows of 64 bytes. A constant in
// memory: GCC drops stores to a stack copy that only `ldtilecfg` reads.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
constexpr TileConfig kTileConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64},
                                    {kTile, kTile, kTile, kTile, kTile, kTile, kTile, kTile}};

__attribute__((target("amx-tile"))) void configure_tiles() { _tile_loadconfig(&kTileConfig); }

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// One 32 x 32 output block over input-feature steps [0, k_steps) of x and the two packed weight
// blocks (all three pointers at the first step): starts from c_in (row stride c_in_bytes) or zero
// when c_in is null, leaves the sums in c_out (row stride c_out_bytes).
__attribute__((target("amx-tile,amx-bf16"))) void block_product(const uint16_t* x, int64_t x_bytes,
                                                                 const uint16_t* w0, const uint16_t* w1,
                                                                 int64_t k_steps, const float* c_in,
                                                                 int64_t c_in_bytes, float* c_out,
                                                                 int64_t c_out_bytes) {
  constexpr int64_t kStep = kTileLinearK * kTile;  // bf16 per packed weight tile
  if (c_in == nullptr) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    const int64_t down = kTile * (c_in_bytes / static_cast<int64_t>(sizeof(float)));
    _tile_loadd(0, c_in, c_in_bytes);
    _tile_loadd(1, c_in + kTile, c_in_bytes);
    _tile_loadd(2, c_in + down, c_in_bytes);
    _tile_loadd(3, c_in + down + kTile, c_in_bytes);
  }
  const uint16_t* x1 = x + kTile * (x_bytes / 2);
  for (int64_t k = 0; k < k_steps; ++k) {
    _tile_loadd(4, x + k * kTileLinearK, x_bytes);
    _tile_loadd(5, x1 + k * kTileLinearK, x_bytes);
    _tile_loadd(6, w0 + k * kStep, 64);
    _tile_loadd(7, w1 + k * kStep, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  const int64_t down = kTile * (c_out_bytes / static_cast<int64_t>(sizeof(float)));
  _tile_stored(0, c_out, c_out_bytes);
  _tile_stored(1, c_out + kTile, c_out_bytes);
  _tile_stored(2, c_out + down, c_out_bytes);
  _tile_stored(3, c_out + down + kTile, c_out_bytes);
}
#endif

}  // namespace

void tile_linear_pack(const TileLinearPackArgs& a, int64_t begin, int64_t end) {
  const int64_t k_steps = a.in / kTileLinearK;
  for (int64_t nb = begin; nb < end; ++nb) {
    for (int64_t k = 0; k < k_steps; ++k) {
      uint16_t* tile = a.packed + (nb * k_steps + k) * kTileLinearK * kTile;
      for (int64_t i = 0; i < kTile; ++i) {      // input pair 16k + i
        for (int64_t j = 0; j < kTile; ++j) {    // weight row 16nb + j
          const uint16_t* src = a.weight + (nb * kTile + j) * a.in + k * kTileLinearK + 2 * i;
          tile[(i * kTile + j) * 2] = src[0];
          tile[(i * kTile + j) * 2 + 1] = src[1];
        }
      }
    }
  }
}

bool tile_linear(const TileLinearArgs& a, int64_t begin, int64_t end) {
#if defined(COGVIEW_TILE_CODE)
  const int64_t k_steps = a.in / kTileLinearK, n_blocks = a.out / kTileLinearN;
  const int64_t weight_block = k_steps * kTileLinearK * kTile;  // bf16 per 16 weight rows
  const int64_t x_bytes = a.in * static_cast<int64_t>(sizeof(uint16_t));
  constexpr int64_t kBlockBytes = kTileLinearN * sizeof(float);
  // Input features are taken kChunkSteps steps at a time over all output blocks, so the chunk of x
  // (32 rows x 256 features, 16 KiB) stays in L1 while the weights stream past; the partial sums of
  // a row of blocks wait in `partial` between chunks.
  const int64_t chunk = std::min(k_steps, kChunkSteps);
  alignas(64) float c[kTileLinearRows * kTileLinearN];
  std::vector<float> partial(chunk < k_steps ? kTileLinearRows * a.out : 0);
  std::vector<uint16_t> last;
  configure_tiles();
  for (int64_t mb = begin; mb < end; ++mb) {
    const int64_t r0 = mb * kTileLinearRows, rows = std::min(kTileLinearRows, a.rows - r0);
    const uint16_t* x = a.x + r0 * a.in;
    if (rows < kTileLinearRows) {
      last.assign(kTileLinearRows * a.in, 0);
      std::memcpy(last.data(), x, rows * a.in * sizeof(uint16_t));
      x = last.data();
    }
    for (int64_t k0 = 0; k0 < k_steps; k0 += chunk) {
      const int64_t steps = std::min(chunk, k_steps - k0);
      const bool first = k0 == 0, final = k0 + steps == k_steps;
      for (int64_t nb = 0; nb < n_blocks; ++nb) {
        const uint16_t* w0 = a.packed + 2 * nb * weight_block + k0 * kTileLinearK * kTile;
        float* sums = partial.data() + nb * kTileLinearN;
        block_product(x + k0 * kTileLinearK, x_bytes, w0, w0 + weight_block, steps, first ? nullptr : sums,
                      a.out * static_cast<int64_t>(sizeof(float)), final ? c : sums,
                      final ? kBlockBytes : a.out * static_cast<int64_t>(sizeof(float)));
        if (final) {
          finish_block(c, rows, a.bias != nullptr ? a.bias + nb * kTileLinearN : nullptr, a.gelu,
                       a.y + r0 * a.out + nb * kTileLinearN, a.out);
        }
      }
    }
  }
  release_tiles();
  return true;
#else
  (void)a;
  (void)begin;
  (void)end;
  return false;
#endif
}

}  // namespace cogview::cpu::COGVIEW_ISA
