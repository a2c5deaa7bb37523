// Run-time choice among the per-ISA builds of csrc/cpu/kernels/ (like ATen's CPU_CAPABILITY).
#pragma once

#include <string>
#include <vector>

#include "build_info.h"
#include "cpu/kernels/kernels.h"

namespace cogview::cpu {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
// ISAs compiled into this build, in increasing order.
std::vector<std::string> compiled_isas();
// ISAs this CPU can run (and this build has).
std::vector<std::string> usable_isas();
// The ISA in use: COGVIEW_CPU_ISA if set (checked), else the best usable one.
Isa active_isa();
// Switch ISA at run time (tests, benchmarks). Throws for an ISA this build or CPU can't run.
void set_active_isa(const std::string& name);

#if defined(COGVIEW_ISA_AVX512_COMPILED)
#define COGVIEW_ISA_CASE_AVX512(fn, ...) case ::cogview::cpu::Isa::avx512: return ::cogview::cpu::avx512::fn(__VA_ARGS__);
#else
#define COGVIEW_ISA_CASE_AVX512(fn, ...)
#endif
#if defined(COGVIEW_ISA_AVX2_COMPILED)
#define COGVIEW_ISA_CASE_AVX2(fn, ...) case ::cogview::cpu::Isa::avx2: return ::cogview::cpu::avx2::fn(__VA_ARGS__);
#else
#define COGVIEW_ISA_CASE_AVX2(fn, ...)
#endif

// Calls kernel `fn` from the active ISA's namespace; an expression with fn's result.
#define COGVIEW_CPU_DISPATCH(fn, ...)                        \
  [&] {                                                      \
    switch (::cogview::cpu::active_isa()) {                  \
      COGVIEW_ISA_CASE_AVX512(fn, __VA_ARGS__)               \
      COGVIEW_ISA_CASE_AVX2(fn, __VA_ARGS__)                 \
      default:                                               \
        return ::cogview::cpu::baseline::fn(__VA_ARGS__);    \
    }                                                        \
  }()

}  // namespace cogview::cpu
