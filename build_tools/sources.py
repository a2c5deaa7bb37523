"""The one rule that says which files make up `cogview._C`.

setup.py imports it and CMakeLists.txt runs it (`python build_tools/sources.py --cmake`), so the
source list is never kept by hand in two places.

- `csrc/*.cpp`, `csrc/cpu/*.cpp`: the module, op schemas and the CPU dispatch layer (compiled once).
- `csrc/cpu/kernels/*.cpp`: vectorized CPU math, torch-free, compiled once per instruction set.
- `csrc/cuda/*.cu`: CUDA kernels, compiled only in a CUDA build.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# Instruction sets the per-ISA kernels are compiled for on x86-64, with their compiler flags.
# The baseline is x86-64 itself (SSE2); AVX2 and AVX-512 mirror ATen's CPU_CAPABILITY builds.
X86_ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi2"],
}


def _sorted(pattern: str, base: Path = CSRC) -> list[Path]:
    return sorted(base.glob(pattern))


def core_sources() -> list[Path]:
    return _sorted("*.cpp") + _sorted("cpu/*.cpp")


def isa_kernel_sources() -> list[Path]:
    return _sorted("cpu/kernels/*.cpp")


def cuda_sources() -> list[Path]:
    return _sorted("cuda/*.cu")


def isa_flags() -> dict[str, list[str]]:
    """ISA name -> extra flags, for the machine the build targets."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return dict(X86_ISA_FLAGS)
    return {"baseline": []}


def _cmake_list(paths) -> str:
    return ";".join(p.as_posix() for p in paths)


def main(argv: list[str]) -> int:
    if argv[1:] != ["--cmake"]:
        print("usage: python build_tools/sources.py --cmake", file=sys.stderr)
        return 2
    # One `set(...)` per line, read by CMakeLists.txt with include().
    print(f'set(COGVIEW_CORE_SOURCES "{_cmake_list(core_sources())}")')
    print(f'set(COGVIEW_ISA_KERNEL_SOURCES "{_cmake_list(isa_kernel_sources())}")')
    print(f'set(COGVIEW_CUDA_SOURCES "{_cmake_list(cuda_sources())}")')
    isas = isa_flags()
    print(f'set(COGVIEW_ISAS "{";".join(isas)}")')
    for name, flags in isas.items():
        print(f'set(COGVIEW_ISA_FLAGS_{name} "{";".join(flags)}")')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
