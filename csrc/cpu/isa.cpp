#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace cogview::cpu {
namespace {

bool compiled(Isa isa) {
  switch (isa) {
    case Isa::baseline: return true;
#if defined(COGVIEW_ISA_AVX2_COMPILED)
    case Isa::avx2: return true;
#endif
#if defined(COGVIEW_ISA_AVX512_COMPILED)
    case Isa::avx512: return true;
#endif
    default: return false;
  }
}

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::baseline: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
  }
  return false;
#else
  return isa == Isa::baseline;
#endif
}

constexpr Isa kAll[] = {Isa::baseline, Isa::avx2, Isa::avx512};

Isa parse(const std::string& name) {
  for (Isa isa : kAll) {
    if (name == isa_name(isa)) return isa;
  }
  throw std::invalid_argument("unknown CPU ISA '" + name +
                              "'; expected one of baseline, avx2, avx512");
}

Isa checked(const std::string& name) {
  Isa isa = parse(name);
  if (!compiled(isa)) {
    throw std::invalid_argument("CPU ISA '" + name + "' is not compiled into this build (" +
                                COGVIEW_CPU_ISAS_STRING + ")");
  }
  if (!cpu_supports(isa)) {
    throw std::invalid_argument("this CPU cannot run the '" + name + "' kernels");
  }
  return isa;
}

Isa best_usable() {
  Isa best = Isa::baseline;
  for (Isa isa : kAll) {
    if (compiled(isa) && cpu_supports(isa)) best = isa;
  }
  return best;
}

Isa initial() {
  const char* forced = std::getenv("COGVIEW_CPU_ISA");
  if (forced != nullptr && *forced != '\0') return checked(forced);
  return best_usable();
}

std::atomic<int>& current() {
  static std::atomic<int> value{static_cast<int>(initial())};
  return value;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default: return "baseline";
  }
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (Isa isa : kAll) {
    if (compiled(isa)) names.emplace_back(isa_name(isa));
  }
  return names;
}

std::vector<std::string> usable_isas() {
  std::vector<std::string> names;
  for (Isa isa : kAll) {
    if (compiled(isa) && cpu_supports(isa)) names.emplace_back(isa_name(isa));
  }
  return names;
}

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_active_isa(const std::string& name) {
  current().store(static_cast<int>(checked(name)), std::memory_order_relaxed);
}

}  // namespace cogview::cpu
